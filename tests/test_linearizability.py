"""The linearizability checker on hand-made histories and on histories generated from a
sequential book, and the JSON form of a history."""

from __future__ import annotations

import random
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bazar.sim.history import OUT_OF_STOCK, History, Op, book_key
from bazar.sim.linearizability import LINEARIZABLE, NOT_LINEARIZABLE, TIMEOUT, BookModel, Result, check

KEY = "book:1"


def op(
    kind: str,
    value: Any,
    output: Any,
    call: float,
    ret: float | None,
    status: str = "ok",
    process: int = 0,
    key: str = KEY,
) -> Op:
    if ret is None:
        status = "unknown"
    return Op(process=process, kind=kind, key=key, value=value, output=output, call=call, ret=ret, status=status)


def book(price: float, quantity: int) -> dict[str, Any]:
    return {"price": price, "quantity": quantity}


def check_one(ops: list[Op], price: float = 10.0, quantity: int = 5, **kw: Any) -> Result:
    return check(ops, {KEY: BookModel(price, quantity)}, **kw)


def assert_linearizable(result: Result) -> None:
    assert result.verdict == LINEARIZABLE, result.explanation
    assert result.ok


def assert_refuted(result: Result, key: str = KEY) -> None:
    assert result.verdict == NOT_LINEARIZABLE
    assert not result.ok
    assert result.key == key
    assert key in result.explanation


# --- hand-made histories ---------------------------------------------------------------


def test_sequential_history_is_linearizable() -> None:
    ops = [
        op("read", None, book(10.0, 5), 0, 1),
        op("set_price", 12.5, book(12.5, 5), 2, 3),
        op("restock", 3, book(12.5, 8), 4, 5),
        op("buy", 2, {"price": 12.5}, 6, 7),
        op("buy", 7, OUT_OF_STOCK, 8, 9, status="fail"),
        op("read", None, book(12.5, 6), 10, 11),
    ]
    assert_linearizable(check_one(ops))


def test_sequential_history_with_a_wrong_output_is_refuted() -> None:
    # The restock reports the book after it with one copy too many.
    ops = [op("restock", 3, book(10.0, 9), 0, 1)]
    assert_refuted(check_one(ops))


@pytest.mark.parametrize("last", [20.0, 30.0])
def test_overlapping_writes_may_take_effect_in_either_order(last: float) -> None:
    ops = [
        op("set_price", 20.0, None, 0, 3, process=1),
        op("set_price", 30.0, None, 1, 4, process=2),
        op("read", None, book(last, 5), 5, 6, process=3),
    ]
    assert_linearizable(check_one(ops))


def test_a_read_of_a_value_neither_write_left_is_refuted() -> None:
    ops = [
        op("set_price", 20.0, None, 0, 3, process=1),
        op("set_price", 30.0, None, 1, 4, process=2),
        op("read", None, book(10.0, 5), 5, 6, process=3),
    ]
    assert_refuted(check_one(ops))


def test_stale_read_after_a_completed_write_is_refuted() -> None:
    ops = [
        op("set_price", 20.0, book(20.0, 5), 0, 1, process=1),
        op("read", None, book(10.0, 5), 2, 3, process=2),
    ]
    result = check_one(ops)
    assert_refuted(result)
    assert result.prefix == (ops[0],)
    assert ops[1] in result.unplaced
    assert "prefix (of those reaching furthest in time): 1 ops" in result.explanation
    assert "illegal in this state" in result.explanation


def test_a_read_concurrent_with_the_write_may_see_the_old_value() -> None:
    ops = [
        op("set_price", 20.0, book(20.0, 5), 0, 2, process=1),
        op("read", None, book(10.0, 5), 1, 3, process=2),
    ]
    assert_linearizable(check_one(ops))


def test_lost_acknowledged_restock_is_refuted() -> None:
    ops = [
        op("restock", 5, book(10.0, 10), 0, 1, process=1),
        op("read", None, book(10.0, 5), 2, 3, process=2),
    ]
    assert_refuted(check_one(ops))


def test_overselling_the_last_copy_is_refuted() -> None:
    ops = [
        op("buy", 1, {"price": 10.0}, 0, 2, process=1),
        op("buy", 1, {"price": 10.0}, 1, 3, process=2),
    ]
    assert_refuted(check_one(ops, quantity=1))


def test_one_of_two_buyers_of_the_last_copy_may_be_refused() -> None:
    ops = [
        op("buy", 1, {"price": 10.0}, 0, 2, process=1),
        op("buy", 1, OUT_OF_STOCK, 1, 3, status="fail", process=2),
        op("read", None, book(10.0, 0), 4, 5, process=3),
    ]
    assert_linearizable(check_one(ops, quantity=1))


def test_out_of_stock_while_stock_was_available_is_refuted() -> None:
    ops = [
        op("read", None, book(10.0, 5), 0, 1, process=1),
        op("buy", 2, OUT_OF_STOCK, 2, 3, status="fail", process=2),
    ]
    assert_refuted(check_one(ops))


def test_out_of_stock_for_more_than_the_stock_is_linearizable() -> None:
    ops = [op("buy", 6, OUT_OF_STOCK, 0, 1, status="fail")]
    assert_linearizable(check_one(ops))


def test_other_definite_failures_are_dropped() -> None:
    # A 400 or 404 did nothing: its output is not a state and must not be checked.
    ops = [
        op("buy", -1, {"error": "bad quantity"}, 0, 1, status="fail"),
        op("set_price", "x", {"error": "bad price"}, 2, 3, status="fail"),
        op("read", None, book(10.0, 5), 4, 5),
    ]
    assert_linearizable(check_one(ops))


@pytest.mark.parametrize("quantity", [3, 5])
def test_an_unknown_buy_may_or_may_not_have_happened(quantity: int) -> None:
    # No answer came back for the buy: a later read of 3 needs it, a read of 5 needs it not.
    ops = [
        op("buy", 2, None, 0, None, process=1),
        op("read", None, book(10.0, quantity), 5, 6, process=2),
    ]
    assert_linearizable(check_one(ops))


def test_an_unknown_buy_cannot_explain_a_value_it_could_not_leave() -> None:
    ops = [
        op("buy", 2, None, 0, None, process=1),
        op("read", None, book(10.0, 4), 5, 6, process=2),
    ]
    assert_refuted(check_one(ops))


def test_an_unknown_buy_takes_effect_only_after_its_call() -> None:
    ops = [
        op("read", None, book(10.0, 3), 0, 1, process=2),
        op("buy", 2, None, 2, None, process=1),
    ]
    assert_refuted(check_one(ops))


def test_an_unknown_buy_that_could_not_have_happened_leaves_no_effect() -> None:
    # Only one copy: the unanswered buy of two cannot have succeeded.
    ops = [
        op("buy", 2, None, 0, None, process=1),
        op("read", None, book(10.0, 1), 5, 6, process=2),
    ]
    assert_linearizable(check_one(ops, quantity=1))
    impossible = [ops[0], op("read", None, book(10.0, -1), 5, 6, process=2)]
    assert_refuted(check_one(impossible, quantity=1))


def test_an_unknown_restock_must_have_happened_to_explain_a_later_buy() -> None:
    ops = [
        op("restock", 4, None, 0, None, process=1),
        op("buy", 3, {"price": 10.0}, 1, 2, process=2),
        op("read", None, book(10.0, 2), 3, 4, process=2),
    ]
    assert_linearizable(check_one(ops, quantity=1))


def test_charging_a_price_that_was_not_current_is_refuted() -> None:
    ops = [
        op("set_price", 20.0, book(20.0, 5), 0, 1, process=1),
        op("buy", 1, {"price": 10.0}, 2, 3, process=2),
    ]
    assert_refuted(check_one(ops))


def test_a_buy_concurrent_with_a_price_change_may_pay_either_price() -> None:
    # The price change reports the stock after it, which tells where the buy went.
    for charged, after in ((10.0, 4), (20.0, 5)):
        ops = [
            op("set_price", 20.0, book(20.0, after), 0, 3, process=1),
            op("buy", 1, {"price": charged}, 1, 2, process=2),
        ]
        assert_linearizable(check_one(ops))


def test_only_the_bad_key_is_named() -> None:
    models = {book_key(i): BookModel(10.0, 5) for i in (1, 2, 3)}
    ops = [
        op("restock", 1, book(10.0, 6), 0, 1, key="book:1"),
        op("read", None, book(10.0, 6), 2, 3, key="book:1"),
        op("buy", 1, {"price": 10.0}, 0, 1, key="book:2"),
        op("read", None, book(10.0, 5), 2, 3, key="book:2"),
        op("set_price", 11.0, book(11.0, 5), 0, 1, key="book:3"),
        op("read", None, book(11.0, 5), 2, 3, key="book:3"),
    ]
    result = check(ops, models)
    assert_refuted(result, key="book:2")
    assert "book:1" not in result.explanation and "book:3" not in result.explanation
    assert result.per_key == {"book:1": LINEARIZABLE, "book:2": NOT_LINEARIZABLE, "book:3": LINEARIZABLE}
    # The same history also checks against a model factory.
    assert check(ops, lambda key: BookModel(10.0, 5)).key == "book:2"


def test_a_key_without_a_model_is_an_error() -> None:
    with pytest.raises(ValueError, match="book:9"):
        check([op("read", None, book(10.0, 5), 0, 1, key="book:9")], {KEY: BookModel(10.0, 5)})


def test_an_op_kind_the_model_does_not_know_is_an_error() -> None:
    with pytest.raises(ValueError, match="delete"):
        check_one([op("delete", None, None, 0, 1)])


# --- histories of a real sequential book ------------------------------------------------

PRICES = (10.0, 12.5, 20.0, 7.25, 99.99)


def generate(rng: random.Random, n_ops: int, processes: int, unknown_rate: float = 0.05) -> tuple[list[Op], BookModel]:
    """Run a sequential book and give each op an interval around the moment it ran.

    Each process runs its ops one after another; each op takes effect at a random point
    inside its interval, and the book applies the ops in the order of these points, so
    the history is linearizable by construction. Some ops get no answer: of those, half
    took effect and half did not.
    """
    model = BookModel(10.0, rng.randint(0, 5))
    slots: list[tuple[float, int, float, float]] = []
    per_process = max(1, n_ops // processes)
    for process in range(processes):
        now = rng.uniform(0.0, 1.0)
        for _ in range(per_process):
            call = now + rng.uniform(0.0, 0.3)
            ret = call + rng.uniform(0.01, 2.0)
            slots.append((rng.uniform(call, ret), process, call, ret))
            now = ret
    slots.sort()
    price, quantity = model.price, model.quantity
    ops = []
    for _, process, call, ret in slots:
        kind = rng.choice(("read", "read", "buy", "buy", "restock", "set_price"))
        value: Any = None
        output: Any
        status = "ok"
        before = price, quantity
        if kind == "read":
            output = book(price, quantity)
        elif kind == "set_price":
            value = price = rng.choice(PRICES)
            output = book(price, quantity)
        elif kind == "restock":
            value = rng.randint(1, 3)
            quantity += value
            output = book(price, quantity)
        else:
            value = rng.randint(1, 3)
            if quantity >= value:
                quantity -= value
                output = {"price": price}
            else:
                output, status = OUT_OF_STOCK, "fail"
        if kind != "read" and rng.random() < unknown_rate:
            if rng.random() < 0.5:
                # Never took effect: undo it on the book.
                price, quantity = before
            ops.append(Op(process, kind, KEY, value, None, call, None, "unknown"))
            continue
        ops.append(Op(process, kind, KEY, value, output, call, ret, status))
    last = max(ret for _, _, _, ret in slots)
    ops.append(Op(processes, "read", KEY, None, book(price, quantity), last + 1, last + 2, "ok"))
    return ops, model


# A book state no history can produce: stock is never negative.
NEVER_SEEN = book(PRICES[0], -1)


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n_ops=st.integers(1, 80),
    processes=st.integers(1, 8),
    unknown_rate=st.sampled_from([0.0, 0.1, 0.3]),
)
def test_histories_of_a_sequential_book_are_linearizable(
    seed: int, n_ops: int, processes: int, unknown_rate: float
) -> None:
    rng = random.Random(seed)
    ops, model = generate(rng, n_ops, processes, unknown_rate)
    assert_linearizable(check(ops, {KEY: model}))

    reads = [i for i, done in enumerate(ops) if done.kind == "read" and done.status == "ok"]
    victim = rng.choice(reads)
    corrupted = list(ops)
    corrupted[victim] = Op(ops[victim].process, "read", KEY, None, NEVER_SEEN, ops[victim].call, ops[victim].ret, "ok")
    result = check(corrupted, {KEY: model})
    assert_refuted(result)
    assert corrupted[victim] in result.unplaced


def test_a_thousand_ops_of_six_processes_check_quickly() -> None:
    ops, model = generate(random.Random(1), 1000, 6, unknown_rate=0.02)
    started = time.monotonic()
    result = check(ops, {KEY: model}, time_limit=60.0)
    elapsed = time.monotonic() - started
    assert_linearizable(result)
    # Generous against a loaded machine; a regression to an unmemoized search takes far longer.
    assert elapsed < 30.0, elapsed


def test_the_budget_turns_a_long_search_into_a_timeout() -> None:
    ops, model = generate(random.Random(2), 2000, 6)
    by_steps = check(ops, {KEY: model}, max_steps=100)
    assert by_steps.verdict == TIMEOUT
    assert not by_steps.ok
    assert by_steps.key == KEY
    assert "gave up after 100 search steps" in by_steps.explanation
    by_time = check(ops, {KEY: model}, time_limit=0.0)
    assert by_time.verdict == TIMEOUT
    assert by_time.per_key == {KEY: TIMEOUT}
    # The same history with room enough gets its verdict.
    assert_linearizable(check(ops, {KEY: model}, time_limit=60.0))


def test_a_refutation_wins_over_a_timeout_on_another_key() -> None:
    ops, model = generate(random.Random(3), 2000, 6)
    bad = [
        op("set_price", 20.0, book(20.0, 5), 0, 1, key="book:2"),
        op("read", None, book(10.0, 5), 2, 3, key="book:2"),
    ]
    result = check(ops + bad, {KEY: model, "book:2": BookModel(10.0, 5)}, max_steps=100)
    assert_refuted(result, key="book:2")
    assert result.per_key == {KEY: TIMEOUT, "book:2": NOT_LINEARIZABLE}


# --- against a brute-force search ------------------------------------------------------


def brute_force(ops: list[Op], model: BookModel) -> bool:
    """Linearizability by definition: try every order that respects real time.

    An op may come next unless some other known op still to be placed returned before it
    was called; unknown ops may be placed or left out; the history is linearizable if
    some such order places every known op and the model accepts every step.
    """
    kept = [o for o in ops if model.keep(o)]

    def search(state: Any, left: list[Op]) -> bool:
        required = [o for o in left if o.status != "unknown"]
        if not required:
            return True
        horizon = min(float(o.ret or 0.0) for o in required)
        for i, candidate in enumerate(left):
            if candidate.call > horizon:
                continue
            legal, after = model.step(state, candidate)
            if legal and search(after, left[:i] + left[i + 1 :]):
                return True
        return False

    return search(model.init(), kept)


@st.composite
def small_histories(draw: st.DrawFn, max_ops: int = 8) -> list[Op]:
    """Short histories with random outputs from a small domain, so that both verdicts occur.

    Times are small integers so that intervals often touch.
    """
    ops = []
    for process in range(draw(st.integers(1, max_ops))):
        kind = draw(st.sampled_from(["read", "set_price", "restock", "buy"]))
        call = draw(st.integers(0, 8))
        ret: float | None = call + draw(st.integers(0, 4))
        status = "ok"
        value: Any = None
        shown = book(draw(st.sampled_from([10.0, 20.0])), draw(st.integers(0, 3)))
        output: Any = draw(st.sampled_from([None, shown]))
        if kind == "read":
            output = shown
        elif kind == "set_price":
            value = draw(st.sampled_from([10.0, 20.0]))
        elif kind == "restock":
            value = draw(st.integers(1, 2))
        else:
            value = draw(st.integers(1, 2))
            refused = draw(st.booleans())
            output = OUT_OF_STOCK if refused else {"price": draw(st.sampled_from([10.0, 20.0]))}
            status = "fail" if refused else "ok"
        if draw(st.integers(0, 3)) == 0:
            ret, status, output = None, "unknown", None
        ops.append(Op(process, kind, KEY, value, output, float(call), None if ret is None else float(ret), status))
    return ops


@settings(max_examples=400, deadline=None)
@given(ops=small_histories(), quantity=st.integers(0, 2))
def test_the_checker_agrees_with_a_brute_force_search(ops: list[Op], quantity: int) -> None:
    model = BookModel(10.0, quantity)
    result = check(ops, {KEY: model})
    assert result.verdict in (LINEARIZABLE, NOT_LINEARIZABLE)
    assert result.ok == brute_force(ops, model), result.explanation


# --- the history record ----------------------------------------------------------------


def test_history_round_trips_through_json() -> None:
    history = History()
    read = history.invoke(1, "read", KEY, None, 0.0)
    buy = history.invoke(2, "buy", KEY, 2, 0.5)
    refused = history.invoke(3, "buy", KEY, 9, 0.6)
    lost = history.invoke(4, "restock", KEY, 3, 0.7)
    history.invoke(5, "set_price", KEY, 12.5, 0.8)  # never completed
    history.ok(read, book(10.0, 5), 1.0)
    history.ok(buy, {"price": 10.0}, 1.5)
    history.fail(refused, OUT_OF_STOCK, 1.6)
    history.unknown(lost)

    assert [o.status for o in history.ops] == ["ok", "ok", "fail", "unknown", "unknown"]
    assert history.ops[3].ret is None and history.ops[4].ret is None
    loaded = History.from_json(history.to_json())
    assert loaded.ops == history.ops
    assert loaded.by_key() == {KEY: history.ops}
    models = {KEY: BookModel(10.0, 5)}
    assert check(loaded, models) == check(history, models)
    assert check(loaded, models).ok


def test_an_op_is_completed_once() -> None:
    history = History()
    handle = history.invoke(1, "read", KEY, None, 1.0)
    with pytest.raises(ValueError, match="before its call"):
        history.ok(handle, book(10.0, 5), 0.5)
    history.ok(handle, book(10.0, 5), 2.0)
    with pytest.raises(ValueError, match="already completed"):
        history.unknown(handle)


def test_by_key_partitions_in_invocation_order() -> None:
    history = History()
    for i in range(6):
        history.invoke(i, "read", book_key(i % 2), None, float(i))
    groups = history.by_key()
    assert sorted(groups) == ["book:0", "book:1"]
    assert [o.process for o in groups["book:1"]] == [1, 3, 5]
