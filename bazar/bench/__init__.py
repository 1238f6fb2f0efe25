"""bazar-bench: drive a Bazar cluster with bounded, concurrent load and write a report.

Usage::

    python -m bazar.bench [--url http://127.0.0.1:5000] [--url-nocache URL]
                          [--start] [--out DIR] [--duration S] [--quick]
                          [--compare SPEC ...] [--only PHASES] [--timeline-writes N]
                          [--cpu-hog] [--soak [--soak-purchases N]] [--spread-writes N]
    python -m bazar.bench --report-only docs/bench/results.json [--out DIR]

With ``--start`` the tool starts two throw-away clusters on free loopback ports
(one with a large cache, one with ``--cache-size 0``), runs every experiment and
always stops them again.  Without it, it drives the cluster at ``--url``
(and, if given, the cache-less cluster at ``--url-nocache``); the crash
experiment is then skipped, since it may only kill processes this tool started.
Beside Bazar, it measures with the same client what it starts itself on loopback:
two reference servers (a raw twisted.web resource, a bare Klein route), a
three-member etcd cluster when `etcd` is on PATH, and for the timeline of one write,
a cluster of its own with tracing on (`bazar.trace`); and, with `--compare`, other
stores already running. Under faults: the invalidation delay across front ends (clusters
of two front ends of its own), and when asked for, elections beside CPU hogs
(`--cpu-hog`) and the disk over a long soak with a replica far behind (`--soak`).

Output (in ``--out``, default ``./bench-out``): ``report.md``, ``results.json``
and PNG plots.  ``--report-only RESULTS_JSON`` measures nothing: it rewrites
``report.md`` and the plots from a results file of an earlier run (into the
file's own directory unless ``--out`` says otherwise).  Progress goes to stderr, the final table of
targets to stdout.
A benchmark reports; it never asserts: the exit status is 0 whenever the run
completed, whatever the numbers.

Load generation: a small pool of threads, each with one keep-alive HTTP/1.1
connection to 127.0.0.1 (a lean socket client, so the client costs little CPU
next to the server on a small machine).  Every loop is bounded both by a count
and by time.

The modules, one per part of the tool:

- ``bazar.bench.http``: the lean keep-alive client (``LeanConn``, ``build_request``,
  ``read_response``) and control calls (``http_json``, ``health``);
- ``bazar.bench.load``: the thread load runner (``LoadRun``, ``run_load``);
- ``bazar.bench.stats``: percentiles and step summaries, zipf traces and LRU replay;
- ``bazar.bench.phases``: the experiments on Bazar alone, and the start-up time;
- ``bazar.bench.compare``: Bazar beside other servers (the reference servers, ``--compare``);
- ``bazar.bench.references``: the reference servers (``python -m bazar.bench.references``);
- ``bazar.bench.etcd``: Bazar's replicated writes beside a three-member etcd cluster;
- ``bazar.bench.timeline``: a traced cluster, and where one write spends its time;
- ``bazar.bench.hog``: elections under CPU hogs, and a kill under them;
- ``bazar.bench.soak``: the disk over a soak, and a catalog backup far behind;
- ``bazar.bench.spread``: the invalidation delay across front ends;
- ``bazar.bench.faultreport``, ``bazar.bench.faultplots``: their report sections and plots;
- ``bazar.bench.report``: the targets and the Markdown report;
- ``bazar.bench.plots``: the PNG plots (matplotlib);
- ``bazar.bench.cli``: options, the run, the files written (``main``).

The clusters of ``--start`` are launched and stopped by ``bazar.testing.processes``,
the launcher the real-process tests use too; what /proc says about a process (CPU,
memory, parent chain) is ``bazar.testing.procfs``, which both read.
"""
