"""The storefront and the cluster page in a real browser: Debian's headless chromium
driven by selenium, against a real `bazar-cluster` this module starts.

With BAZAR_TEST_SCREENSHOTS=DIR the storefront and cluster page screenshots are also
written to DIR (that is how docs/storefront.png and docs/cluster.png are made)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from bazar.testing.processes import TOKEN, Cluster, call, get_json, wait_until

pytestmark = [pytest.mark.browser, pytest.mark.integration]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1280,900"]


@pytest.fixture(scope="module")
def cluster(start_cluster: Callable[..., Cluster]) -> Cluster:
    return start_cluster("browser")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    assert os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER), \
        "apt-get install -y chromium chromium-driver (as .ci/run does)"
    profile = tempfile.mkdtemp(prefix="bazar-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS + [f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def screenshot(driver: Any, name: str, tmp: str) -> None:
    """Save a PNG (and keep it under $BAZAR_TEST_SCREENSHOTS when that is set)."""
    path = os.path.join(tmp, name)
    assert driver.save_screenshot(path)
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    keep = os.environ.get("BAZAR_TEST_SCREENSHOTS")
    if keep:
        os.makedirs(keep, exist_ok=True)
        shutil.copy(path, os.path.join(keep, name))


def stock(cluster: Cluster, book: int) -> int:
    return int(get_json(f"{cluster.front}/bazar/info/{book}")["quantity"])


def orders_of(cluster: Cluster, book: int) -> list[dict[str, Any]]:
    return [o for o in get_json(cluster.front + "/bazar/orders", token=TOKEN) if o["book_id"] == book]


def heading(driver: Any) -> str:
    return str(driver.find_element(By.TAG_NAME, "h2").text)


def navigate(driver: Any, act: Callable[[], Any]) -> None:
    """Do what leaves the page (a click, a submit) and wait for the next page: `click`
    returns before the browser has left, and an element read then is the old page's."""
    old = driver.find_element(By.TAG_NAME, "html")
    act()

    def left(_: Any) -> bool:
        # selenium's staleness_of, but also for a node that leaves the document in the
        # middle of the check (chromedriver: "Node with given id does not belong to
        # the document", a plain WebDriverException)
        try:
            old.is_enabled()
        except WebDriverException:
            return True
        return False

    WebDriverWait(driver, 30).until(left)
    WebDriverWait(driver, 30).until(lambda d: d.execute_script("return document.readyState") == "complete")


def test_browse_search_buy_and_see_the_confirmation(cluster: Cluster, browser: Any, tmp_path: Any) -> None:
    browser.get(cluster.front + "/")
    assert heading(browser) == "Catalogue"
    assert len(browser.find_elements(By.CSS_SELECTOR, "#books tbody tr")) == 7
    screenshot(browser, "storefront.png", str(tmp_path))
    box = browser.find_element(By.NAME, "topic")
    box.send_keys("distributed systems")
    navigate(browser, box.submit)
    assert heading(browser) == "Books on “distributed systems”"
    titles = [a.text for a in browser.find_elements(By.CSS_SELECTOR, "#results a")]
    assert titles == ["How to get a good grade in DOS in 40 minutes a day.", "RPCs for Noobs."]
    navigate(browser, browser.find_element(By.LINK_TEXT, "RPCs for Noobs.").click)
    assert heading(browser) == "RPCs for Noobs."
    before = stock(cluster, 1)
    quantity = browser.find_element(By.NAME, "quantity")
    quantity.clear()
    quantity.send_keys("2")
    navigate(browser, browser.find_element(By.ID, "buy").click)
    assert heading(browser) == "Thank you: order confirmed"
    number = re.search(r"Order (\d+) is confirmed", browser.find_element(By.ID, "confirmation").text)
    assert number
    assert stock(cluster, 1) == before - 2
    [order] = [o for o in orders_of(cluster, 1) if o["id"] == int(number.group(1))]
    assert order["quantity"] == 2 and order["total"] == 44.7


def test_one_form_submitted_three_times_buys_once(cluster: Cluster, browser: Any) -> None:
    browser.get(cluster.front + "/book/3")
    before, bought_before = stock(cluster, 3), len(orders_of(cluster, 3))
    # two background submissions of the very same form, then the click itself: a double click and more
    sent = browser.execute_script("""
        const form = document.querySelector('form[action="/book/3/buy"]');
        const body = new URLSearchParams(new FormData(form));
        const answers = await Promise.all([fetch(form.action, {method: 'POST', body}),
                                           fetch(form.action, {method: 'POST', body})]);
        return answers.map(a => a.status);""")
    assert sent == [200, 200]
    navigate(browser, browser.find_element(By.ID, "buy").click)
    assert heading(browser) == "Thank you: order confirmed"
    assert stock(cluster, 3) == before - 1
    assert len(orders_of(cluster, 3)) == bought_before + 1


def test_out_of_stock_page(cluster: Cluster, browser: Any) -> None:
    browser.get(cluster.front + "/book/2")
    left = stock(cluster, 2)
    browser.execute_script("document.querySelector('input[name=quantity]').removeAttribute('max')")
    quantity = browser.find_element(By.NAME, "quantity")
    quantity.clear()
    quantity.send_keys(str(left + 1))
    navigate(browser, browser.find_element(By.ID, "buy").click)
    assert heading(browser) == "Out of stock"
    assert stock(cluster, 2) == left


def test_unknown_book_page(cluster: Cluster, browser: Any) -> None:
    browser.get(cluster.front + "/book/4242")
    assert heading(browser) == "Not found"


def test_a_title_with_markup_is_shown_as_text(cluster: Cluster, browser: Any) -> None:
    title = '<script>window.xss=1</script><img src=x onerror="window.xss=2">'
    r = call("POST", cluster.front + "/bazar/books", {"title": title, "topic": "<b>t</b>", "price": 5.0,
                                                      "quantity": 3}, token=TOKEN)
    assert r.status == 201, r.body
    ident = r.json["id"]
    for path in ("/", f"/book/{ident}", "/?topic=%3Cb%3Et%3C%2Fb%3E"):
        browser.get(cluster.front + path)
        assert browser.execute_script("return window.xss") is None
        assert title in browser.find_element(By.TAG_NAME, "main").text
        assert not browser.find_elements(By.CSS_SELECTOR, "main img, main script")


def catalog_primary_on_page(browser: Any) -> tuple[str, str, str] | None:
    """(url, epoch, pid) of the catalog primary in the page's table, as it stands now."""
    rows = browser.execute_script("""
        return Array.from(document.querySelectorAll('#replicas tbody tr'))
            .map(tr => Array.from(tr.cells).map(td => td.textContent));""")
    primaries = [(r[2], r[5], r[9]) for r in rows if r[0] == "catalog" and r[3] == "primary" and r[4] == "ok"]
    return primaries[0] if len(primaries) == 1 else None


def test_cluster_page_shows_a_new_primary_after_the_old_one_is_killed(cluster: Cluster, browser: Any,
                                                                      tmp_path: Any) -> None:
    cluster.wait_healthy(30)
    browser.get(cluster.front + "/cluster")
    assert heading(browser) == "Cluster"
    assert len(browser.find_elements(By.CSS_SELECTOR, "#replicas tbody tr")) == 6
    old = wait_until(lambda: catalog_primary_on_page(browser), 10, "a catalog primary on the page")
    url, health = cluster.primary("catalog")
    assert old[0] == url
    wait_until(lambda: browser.find_element(By.ID, "updated").text not in ("", "at page load"), 10,
               "the page refreshing itself")
    screenshot(browser, "cluster.png", str(tmp_path))
    os.kill(int(health["pid"]), signal.SIGKILL)  # a replica of the cluster this module started
    started = time.monotonic()
    # no reload: the page's own polling must show the change
    new = wait_until(lambda: (p := catalog_primary_on_page(browser)) and p[:2] != old[:2] and p, 20,
                     "a new catalog primary on the cluster page")
    assert int(new[1]) > int(old[1]) and time.monotonic() - started < 20
    # the supervisor restarts the killed replica, under a new pid
    wait_until(lambda: any(r["url"] == url and r["status"] == "ok" and r["pid"] != health["pid"]
                           for r in get_json(cluster.front + "/cluster.json")["replicas"]), 30,
               "the killed replica back, with a new pid")
