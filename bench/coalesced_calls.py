"""The serving path's CPU per item of a coalesced call, by items per call (issue 13).

    .venv/bin/python -m bench.coalesced_calls [--items 2000] [--sizes 1,2,4,8]
                                              [--threads 16] [--rounds 2] [--out FILE]

The demo's stack (local backend, a fresh local Ray, the example classifier deployed as
``bench run`` deploys it, 4 models and 8 users seeded), then ``--threads`` threads of
this process send ``ServeClient.infer_many`` calls of k items each, through Serve's
proxy, for about ``--items`` items per size. Each call's items are for one model and
for k different users (k model tokens). Per size: items/s, and CPU ms per item of
Serve's proxy, the classifier's replica and the rest of the machine. The split of a
call's cost into a part per call and a part per item says what a larger group saves,
and what a leaner replica path for coalesced items could save. Run it alone.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.harness import (
    CpuWindow,
    bench_stack,
    deploy_plugin,
    machine_info,
    make_population,
    pids_titled,
    seed_population,
)
from bench.workloads import classifier_body
from config import load_settings
from devtools.demo_env import EXAMPLE_PLUGIN
from serve_runtime.client import ServeClient
from serve_runtime.errors import ServeError


def run(items: int, sizes: list[int], threads: int, rounds: int) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="coalesced-calls-"))
    out: dict[str, Any] = {"machine": machine_info(), "threads": threads, "rounds": []}
    with bench_stack("coalesced_calls", workdir, workdir) as ctx:
        pop = make_population("cc", 8, 4, 401)
        seed_population(ctx.admin, ctx.workdir, pop)
        spec = deploy_plugin(EXAMPLE_PLUGIN)
        pairs = pop.pairs()
        client = ServeClient(load_settings(routing_mode="compatible"))

        def call(i: int, k: int) -> None:
            _, model = pairs[i % len(pairs)]
            users = [pop.users[(i + j) % len(pop.users)] for j in range(k)]
            answers = client.infer_many(
                spec.route_prefix,
                [classifier_body(i * k + j) for j in range(k)],
                model=model.id,
                tokens=[u.token for u in users],
                tenant=model.tenant,
            )
            for a in answers:
                if isinstance(a, ServeError):
                    raise a

        try:
            with ThreadPoolExecutor(threads) as pool:
                for k in sizes:  # warm: models loaded, authorizations cached, connections open
                    list(pool.map(lambda i, k=k: call(i, k), range(200)))
                for rnd in range(1, rounds + 1):
                    for k in sizes:
                        n = max(1, items // k)
                        window = CpuWindow(
                            {
                                "proxy": lambda: pids_titled("ray::ProxyActor"),
                                "replica": lambda: pids_titled("ray::ServeReplica:"),
                            }
                        ).start()
                        t0 = time.perf_counter()
                        list(pool.map(lambda i, k=k: call(i, k), range(n)))
                        wall = time.perf_counter() - t0
                        cpu = window.stop(n * k)
                        row = {
                            "round": rnd,
                            "items_per_call": k,
                            "items": n * k,
                            "items_per_s": round(n * k / wall, 1),
                            "cpu_ms_per_item": cpu["cpu_ms_per_job"],
                            "machine_busy": cpu["machine_busy"],
                        }
                        out["rounds"].append(row)
                        c = row["cpu_ms_per_item"]
                        print(
                            f"round {rnd}, {k} items per call: {row['items_per_s']} items/s, "
                            f"CPU ms per item: proxy {c['proxy']}, replica {c['replica']}, "
                            f"rest {c['rest']}; machine busy {row['machine_busy']}",
                            flush=True,
                        )
        finally:
            client.close()
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=2000, help="items per size and round")
    parser.add_argument("--sizes", default="1,2,4,8", help="items per call, comma-separated")
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    sizes = [int(x) for x in args.sizes.split(",")]
    result = run(args.items, sizes, args.threads, args.rounds)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
