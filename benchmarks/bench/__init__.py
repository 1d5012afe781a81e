"""The benchmark runner's parts; ``benchmarks/run.py`` is its command line.

A reader can follow a run module by module:

- ``config``: paths, the run's ``Settings``, and what a server's command line depends on;
- ``servers``: the server table (rows as data, ``build_servers()``) and the order rows run in;
- ``process``: starting a server in its own process group, finding its workers, stopping it;
- ``load``: wrk (invocation and its JSON report), pid probes, CPU sampling, the quiet-machine
  wait, the file limit;
- ``measures``: the default measures: timed starts, and rounds of throughput, memory and
  reload failures;
- ``scenarios``: the selectable measures of events: a burst of connections, worker
  replacement after SIGKILL, reload duration, start-up growth with the worker count;
- ``machine``: what the results record about the machine;
- ``install``: ``--setup`` and the checkout's install into the benchmark venv;
- ``report``: results JSON to a Markdown table and PNG charts.
"""
