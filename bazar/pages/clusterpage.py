"""The live cluster page of the front end: `GET /cluster` (HTML) and `GET /cluster.json`.

It shows what this front end already knows from its health checks (every 0.25 s, one
`/health` per replica): role, epoch, applied and commit index, lag behind the
primary, status, pid; and the front end's cache. It observes only: no controls. The
table is rendered on the server, so it reads without JavaScript; a small inline
script refreshes it from `/cluster.json` every half second.
"""

from __future__ import annotations

import heapq
import os
from typing import TYPE_CHECKING, Any

from bazar.http.app import JsonApp, Raw
from bazar.pages.html import allow_script, html_response, html_route, page, table, tag
from bazar.pages.storefront import NAV

if TYPE_CHECKING:
    from bazar.balancer import ReplicaSet, ReplicaState
    from bazar.frontend import Frontend

COLUMNS = ["service", "replica", "url", "role", "status", "epoch", "applied", "commit", "lag", "pid", "seen up (s)"]
NUMERIC = {1, 5, 6, 7, 8, 9}
RECENT = 8  # invalidations listed
RECENT_SCAN_LIMIT = 20_000  # past this many remembered keys, finding the newest costs too much per poll


def replica_row(service: str, r: ReplicaState, primary_applied: int | None, up_since: float | None,
                now: float) -> dict[str, Any]:
    h = r.health
    applied = h.get("last_seq")
    if not r.alive:
        status = "down"
    elif h.get("voter") is False:
        status = f"{h.get('status', '?')} (learner)"
    else:
        status = str(h.get("status", "?"))
    return {
        "service": service, "replica": h.get("replica"), "url": r.url,
        "role": h.get("role", "?") if r.alive else "—", "status": status,
        "epoch": h.get("epoch"), "applied": applied, "commit": h.get("commit"),
        "lag": primary_applied - applied if primary_applied is not None and isinstance(applied, int) and r.alive
        else None,
        "pid": h.get("pid"), "seen_up": round(now - up_since, 1) if up_since is not None and r.alive else None,
    }


def install_cluster_page(api: JsonApp, fe: Frontend) -> None:
    clock = fe.catalog.clock
    started = clock.seconds()
    first_seen: dict[str, tuple[Any, float]] = {}  # url -> (pid, when this front end first saw that pid)

    def watch(rs: ReplicaSet) -> None:
        def polled(primary: Any) -> None:
            now = clock.seconds()
            for r in rs.replicas:
                pid = r.health.get("pid") if r.alive else None
                if pid is None:
                    first_seen.pop(r.url, None)
                elif first_seen.get(r.url, (None,))[0] != pid:
                    first_seen[r.url] = (pid, now)
        rs.listeners.append(polled)

    watch(fe.catalog)
    watch(fe.order)

    def snapshot() -> dict[str, Any]:
        now = clock.seconds()
        rows = []
        for rs in (fe.catalog, fe.order):
            primary = rs.primary_state()
            applied = primary.health.get("last_seq") if primary is not None else None
            for r in rs.replicas:
                seen = first_seen.get(r.url)
                rows.append(replica_row(rs.service, r, applied if isinstance(applied, int) else None,
                                        seen[1] if seen else None, now))
        stats: dict[str, Any] = dict(fe.cache.stats())
        looked = stats["hits"] + stats["misses"]
        stats["hit_rate"] = round(stats["hits"] / looked, 4) if looked else None
        stats["bypass"] = fe.cache.bypass
        stats["flushes"] = fe.stream.flushes
        stats["announced_upto"] = fe.stream.upto
        latest = fe.cache.latest
        recent = heapq.nlargest(RECENT, latest.items(), key=lambda kv: kv[1]) if len(latest) <= RECENT_SCAN_LIMIT \
            else []
        stats["recent_invalidations"] = [{"key": k, "seq": s} for k, s in recent]
        return {"replicas": rows, "cache": stats,
                "frontend": {"pid": os.getpid(), "uptime": round(now - started, 1)}}

    def cells(row: dict[str, Any]) -> list[Any]:
        out: list[Any] = ["—" if row[c] is None else row[c] for c in
                          ("service", "replica", "url", "role", "status", "epoch", "applied", "commit", "lag", "pid",
                           "seen_up")]
        if row["role"] == "primary":
            out[3] = tag("span", "primary", class_="primary")
        if row["status"] == "down":
            out[4] = tag("span", "down", class_="down")
        return out

    def cache_rows(stats: dict[str, Any]) -> list[list[Any]]:
        rate = stats["hit_rate"]
        return [["size", f"{stats['size']} / {stats['capacity']}"], ["hits", stats["hits"]],
                ["misses", stats["misses"]], ["hit rate", "—" if rate is None else f"{rate:.1%}"],
                ["evictions", stats["evictions"]], ["flushes", stats["flushes"]],
                ["bypassed", "yes" if stats["bypass"] else "no"],
                ["recent invalidations", ", ".join(f"{i['key']}@{i['seq']}" for i in stats["recent_invalidations"])
                 or "—"]]

    async def cluster_page(request: Any) -> tuple[int, Raw]:
        snap = snapshot()
        replicas = table(COLUMNS, [cells(r) for r in snap["replicas"]], NUMERIC, id="replicas")
        cache = table(["cache", ""], cache_rows(snap["cache"]), id="cache")
        note = tag("p", "Front end pid ", tag("span", snap["frontend"]["pid"], id="fe-pid"),
                   "; lag is the primary's applied index minus the replica's; ",
                   "“seen up” counts from when this front end first saw that pid. Updated ",
                   tag("span", "at page load", id="updated"), ".")
        return html_response(page("Cluster", tag("h2", "Cluster"), note, replicas, tag("h3", "Cache"), cache,
                                  nav=NAV, script=SCRIPT))

    api.route("/cluster", "GET", "cluster_page")(html_route(cluster_page, NAV))

    @api.route("/cluster.json", "GET", "cluster_json")
    def cluster_json(request: Any) -> dict[str, Any]:
        return snapshot()


# The page's only script: a constant, fills cells with textContent (never HTML).
SCRIPT = allow_script("""
(function(){
 var cols=["service","replica","url","role","status","epoch","applied","commit","lag","pid","seen_up"];
 var num={replica:1,epoch:1,applied:1,commit:1,lag:1,pid:1};
 function txt(v){return v===null||v===undefined?"\\u2014":String(v);}
 function fill(tbody,rows){
  tbody.textContent="";
  rows.forEach(function(cells){var tr=document.createElement("tr");
   cells.forEach(function(c){var td=document.createElement("td");td.textContent=c[0];
    if(c[1])td.className=c[1];tr.appendChild(td);});tbody.appendChild(tr);});}
 function tick(){
  fetch("/cluster.json",{cache:"no-store"}).then(function(r){return r.json();}).then(function(s){
   fill(document.querySelector("#replicas tbody"),s.replicas.map(function(r){
    return cols.map(function(c){var cls=num[c]?"n":"";
     if(c==="role"&&r.role==="primary")cls="primary";
     if(c==="status"&&r.status==="down")cls="down";
     return [txt(r[c]),cls];});}));
   var c=s.cache,rate=c.hit_rate===null?"\\u2014":(100*c.hit_rate).toFixed(1)+"%";
   var inv=c.recent_invalidations.map(function(i){return i.key+"@"+i.seq;}).join(", ")||"\\u2014";
   fill(document.querySelector("#cache tbody"),[["size",c.size+" / "+c.capacity],["hits",c.hits],
    ["misses",c.misses],["hit rate",rate],["evictions",c.evictions],["flushes",c.flushes],
    ["bypassed",c.bypass?"yes":"no"],["recent invalidations",inv]]
    .map(function(p){return [[p[0],""],[txt(p[1]),""]];}));
   document.getElementById("updated").textContent=new Date().toLocaleTimeString();
  }).catch(function(){document.getElementById("updated").textContent="(front end unreachable)";});
 }
 setInterval(tick,500);tick();
})();
""")
