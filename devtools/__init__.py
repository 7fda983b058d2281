"""Development tools: the demo, the embedded Redis, job creation on the local backend.

Nothing in ``worker``, ``serve_runtime`` or ``config`` imports this package; the worker
image leaves it out. Its commands join the ``synapse-bridge`` CLI through the entry-point
group ``synapse_bridge.commands`` (pyproject.toml), loaded only when named:

- ``synapse-bridge demo``: the end-to-end demo (``devtools.demo``, ``devtools.demo_env``)
- ``synapse-bridge submit``: create a job on the local backend and enqueue it
  (``devtools.cli_submit``)
- ``synapse-bridge backend``: the local backend (``local_backend.cli``)

``devtools.redis_server`` starts a throwaway ``redis-server`` for the demo, the tests and
the benchmarks.
"""
