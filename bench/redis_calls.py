"""The worker's CPU per Redis script call, by thread count: alone or pipelined (issue 13).

    python -m bench.redis_calls [--threads 1,16,64,192] [--calls 20000] [--repeats 3]

A throwaway redis-server; ``--threads`` threads share one client built as the
worker's (``worker.redis_conn.connect_redis``) and run the write-back's claim script
(``worker.writeback.CLAIM_SCRIPT``, the round trip before each final PATCH) on
records waiting in an outbox, ``--calls`` in all. ``alone``: each call its own round trip, as
every job's thread made them; ``batched``: through ``worker.script_batch.ScriptBatch``,
as the worker now does. Reported: this process's CPU per call (all threads), calls/s
and calls per pipeline, the median of ``--repeats`` runs, the kinds alternating.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from typing import Any

from devtools.redis_server import RedisServer
from worker.redis_conn import connect_redis
from worker.script_batch import ScriptBatch
from worker.writeback import CLAIM_SCRIPT, DONE_PREFIX, LOCK_PREFIX, OUTBOX


def one_run(url: str, kind: str, threads: int, calls: int) -> dict[str, Any]:
    r = connect_redis(url)
    r.flushall()
    r.hset(OUTBOX, mapping={f"j{i}": '{"body": {}}' for i in range(calls)})
    batch = ScriptBatch(r)
    host = batch if kind == "batched" else r
    claim = host.register_script(CLAIM_SCRIPT)
    claim(keys=[OUTBOX, DONE_PREFIX + "warm", LOCK_PREFIX + "warm"], args=["warm", "", "o", 1])
    batch.pipelines = 0
    ids = iter(range(calls))
    take = threading.Lock()
    start = threading.Barrier(threads + 1)
    verdicts: list[str] = []

    def work() -> None:
        start.wait()
        while True:
            with take:
                i = next(ids, None)
            if i is None:
                return
            job = f"j{i}"
            out = claim(
                keys=[OUTBOX, DONE_PREFIX + job, LOCK_PREFIX + job], args=[job, "", "o", 30000]
            )
            verdicts.append(out[0])

    pool = [threading.Thread(target=work) for _ in range(threads)]
    for t in pool:
        t.start()
    start.wait()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for t in pool:
        t.join()
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    r.close()
    if verdicts.count("claimed") != calls:
        counts = {v: verdicts.count(v) for v in set(verdicts)}
        raise RuntimeError(f"{kind}, {threads} threads: not all claimed: {counts}")
    return {
        "cpu_us_per_call": 1e6 * cpu / calls,
        "calls_per_s": calls / wall,
        "calls_per_pipeline": calls / batch.pipelines if kind == "batched" else 1.0,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.redis_calls", description=__doc__)
    p.add_argument("--threads", default="1,16,64,192")
    p.add_argument("--calls", type=int, default=20000)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)
    server = RedisServer().start()
    try:
        head = f"{'kind':8} {'threads':>7} {'CPU us/call':>12} {'calls/s':>9}"
        print(head + f" {'per pipeline':>13}  runs")
        for threads in (int(t) for t in a.threads.split(",")):
            runs: dict[str, list[dict[str, Any]]] = {"alone": [], "batched": []}
            for _ in range(a.repeats):
                for kind in runs:
                    runs[kind].append(one_run(server.url, kind, threads, a.calls))
            for kind, rs in runs.items():
                cpu = [x["cpu_us_per_call"] for x in rs]
                mid = sorted(rs, key=lambda x: x["cpu_us_per_call"])[len(rs) // 2]
                print(
                    f"{kind:8} {threads:7d} {statistics.median(cpu):12.1f} "
                    f"{mid['calls_per_s']:9.0f} {mid['calls_per_pipeline']:13.1f}  "
                    + ", ".join(f"{c:.1f}" for c in cpu)
                )
    finally:
        server.close()


if __name__ == "__main__":
    main()
