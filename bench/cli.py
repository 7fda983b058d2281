"""``python -m bench``: run the workloads, write their results, regenerate the report.

    python -m bench run [--workload W1|W2|W3|W4|W5|W6|W7|all] [--quick] [--jobs N]
                        [--concurrency N] [--profile] [--results-dir D] [--out-dir D]
                        [--rates R1,R2,... --duration S]   (W6: offered jobs/s, seconds each)
    python -m bench report [--results-dir D] [--out-dir D]

``run`` writes ``<results-dir>/<W>.json`` per workload (default ``bench/results``), then
regenerates ``<out-dir>/REPORT.md`` and ``<out-dir>/plots/*.png`` from every result
file present (default ``bench/``; with only ``--results-dir``, the report goes there).
``all`` runs each workload in its own process (its own Ray cluster, backend and Redis
servers), one after the other.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from bench import harness
from bench.workloads import RUNNERS, SYSTEMS, WORKLOADS, curve_plan

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RESULTS = ROOT / "bench" / "results"
DEFAULT_OUT = ROOT / "bench"
ORDER = ["W1", "W2", "W3", "W4", "W5", "W6", "W7"]


def _dirs(args: argparse.Namespace) -> tuple[Path, Path]:
    results = Path(args.results_dir).resolve() if args.results_dir else DEFAULT_RESULTS
    if args.out_dir:
        out = Path(args.out_dir).resolve()
    else:
        out = DEFAULT_OUT if args.results_dir is None else results
    return results, out


def command_line(argv: list[str]) -> str:
    return ".venv/bin/python -m bench " + " ".join(shlex.quote(a) for a in argv)


def run_one(key: str, args: argparse.Namespace, results: Path, command: str) -> dict[str, Any]:
    """One workload in this process: its own stack, its result file written."""
    w = WORKLOADS[key]
    jobs, plan = sizes(key, args)
    runner = RUNNERS[key] if plan is None else functools.partial(RUNNERS[key], plan=plan)
    concurrency = args.concurrency or w.concurrency
    results.mkdir(parents=True, exist_ok=True)
    started = time.time()
    result: dict[str, Any] = {
        "workload": key,
        "title": w.title,
        "what": w.what,
        "quick": jobs < w.full_jobs,
        "jobs": jobs,
        "full_jobs": w.full_jobs,
        "concurrency": concurrency,
        "worker_processes": args.worker_processes,
        "serve_transport": args.serve_transport,
        "profile": bool(args.profile),
        "command": command,
        **({} if plan is None else {"rates": list(plan.rates), "duration_s": plan.duration_s}),
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "machine": harness.machine_info(),
        "versions": harness.all_versions(),
    }
    harness.log(f"{key} {w.title}: {jobs} jobs, concurrency {concurrency}")
    keep = Path(args.workdir).resolve() if args.workdir else None
    with tempfile.TemporaryDirectory(prefix=f"synapse-bench-{key}-") as tmp:
        workdir = (keep / key) if keep else Path(tmp)
        try:
            with harness.bench_stack(
                key,
                workdir,
                results,
                profile=args.profile,
                worker_processes=args.worker_processes,
                serve_transport=args.serve_transport,
            ) as ctx:
                result.update(runner(ctx, jobs, concurrency))
                result["stack"] = ctx.timings
            result["targets"].append(all_succeeded(result["systems"]))
        except Exception as e:
            result["error"] = f"{type(e).__name__}: {e}"
            result["traceback"] = traceback.format_exc()[-4000:]
            harness.log(f"{key} failed: {result['error']}")
    result["wall_s"] = round(time.time() - started, 1)
    path = results / f"{key}.json"
    path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    harness.log(f"{key} done in {result['wall_s']:.0f}s -> {path}")
    return result


def sizes(key: str, args: argparse.Namespace) -> tuple[int, Any]:
    """Jobs per system, and W6's plan of rates (None for the others): W6 is sized by
    ``--rates``/``--duration``, not ``--jobs``."""
    w = WORKLOADS[key]
    if key != "W6":
        return args.jobs or (w.quick_jobs if args.quick else w.full_jobs), None
    plan = curve_plan(args.quick, args.rates, args.duration)
    return plan.jobs, plan


def all_succeeded(systems: list[dict[str, Any]]) -> dict[str, Any]:
    """Every system's every measured job (or call) succeeded: the figures count."""
    bad = [
        f"{s['label']}: {s.get('failed', 0)} failed, {s.get('lost', 0) or 0} lost"
        for s in systems
        if s.get("failed") or s.get("lost")
    ]
    return {
        "name": "every measured job succeeded, on every system",
        "target": "0 failed, 0 lost",
        "value": sum((s.get("failed") or 0) + (s.get("lost") or 0) for s in systems),
        "met": not bad,
        "detail": "; ".join(bad) or "all succeeded",
    }


def print_plan(keys: list[str], args: argparse.Namespace) -> None:
    print("plan:", flush=True)
    for key in keys:
        w = WORKLOADS[key]
        jobs, plan = sizes(key, args)
        quick = " (QUICK)" if jobs < w.full_jobs else ""
        rates = (
            ""
            if plan is None
            else f" (rates {', '.join(f'{r:g}' for r in plan.rates)} jobs/s, "
            f"{plan.duration_s:g} s each)"
        )
        print(
            f"  {key} {w.title}: {jobs} jobs{quick}{rates} x {SYSTEMS[key]}, "
            f"{args.concurrency or w.concurrency} in flight",
            flush=True,
        )


def cmd_run(args: argparse.Namespace, argv: list[str]) -> int:
    results, out = _dirs(args)
    command = command_line(argv)
    keys = ORDER if args.workload == "all" else [args.workload]
    if args.command is None:  # not a workload process started by `run --workload all`
        print_plan(keys, args)
    t0 = time.time()
    summary: list[tuple[str, int, float, str]] = []
    if len(keys) == 1:
        r = run_one(keys[0], args, results, command)
        summary.append((keys[0], r["jobs"], r["wall_s"], "failed" if "error" in r else "ok"))
    else:
        for key in keys:
            sub = [sys.executable, "-m", "bench", "run", "--workload", key, "--no-report"]
            sub += ["--results-dir", str(results), "--command", command]
            for flag, value in (
                ("--jobs", args.jobs),
                ("--concurrency", args.concurrency),
                ("--workdir", args.workdir),
                ("--rates", args.rates),
                ("--duration", args.duration),
                ("--worker-processes", args.worker_processes),
                ("--serve-transport", args.serve_transport),
            ):
                if value:
                    sub += [flag, str(value)]
            for flag, on in (("--quick", args.quick), ("--profile", args.profile)):
                if on:
                    sub.append(flag)
            k0 = time.time()
            rc = subprocess.call(sub, cwd=str(ROOT))
            try:
                r = json.loads((results / f"{key}.json").read_text())
                jobs = int(r.get("jobs", 0))
                status = "failed" if rc or "error" in r else "ok"
            except (OSError, ValueError):
                jobs, status = 0, f"failed (exit {rc}, no result)"
            summary.append((key, jobs, round(time.time() - k0, 1), status))
    if not args.no_report:
        from bench.report import write_report

        report = write_report(results, out)
        print(f"report: {report}")
    wall = time.time() - t0
    if args.command is not None:  # a workload process of `run --workload all`
        return 0 if all(s[3] == "ok" for s in summary) else 1
    print("\nworkload  jobs    wall      status")
    for key, jobs, w, status in summary:
        print(f"{key:8s}  {jobs:<6d}  {w:7.0f}s  {status}")
    print(f"total wall time {wall:.0f}s ({wall / 60:.1f} min)")
    return 0 if all(s[3] == "ok" for s in summary) else 1


def cmd_report(args: argparse.Namespace) -> int:
    from bench.report import write_report

    results, out = _dirs(args)
    print(f"report: {write_report(results, out)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="run workloads, then regenerate the report")
    run.add_argument("--workload", default="all", choices=[*ORDER, "all"])
    run.add_argument("--quick", action="store_true", help="small sizes (a smoke check)")
    run.add_argument("--jobs", type=int, default=None, help="jobs per system (overrides sizes)")
    run.add_argument("--concurrency", type=int, default=None, help="in flight per system")
    run.add_argument(
        "--worker-processes",
        type=int,
        default=1,
        help="the bridge's worker processes, sharing the in-flight jobs (default 1)",
    )
    run.add_argument(
        "--serve-transport",
        choices=["http", "handle"],
        default="http",
        help="the bridge worker's serve calls: through Serve's proxy, or a DeploymentHandle",
    )
    run.add_argument(
        "--profile",
        action="store_true",
        help="run the bridge worker under py-spy (results/<W>-profile.svg)",
    )
    run.add_argument(
        "--rates",
        default=None,
        help="W6: offered loads, jobs/s, comma-separated (default 25,50,100,150,200,250,300)",
    )
    run.add_argument(
        "--duration", type=float, default=None, help="W6: seconds per rate (default 10)"
    )
    run.add_argument("--results-dir", default=None, help="default bench/results")
    run.add_argument("--out-dir", default=None, help="report and plots; default bench/")
    run.add_argument("--workdir", default=None, help="keep logs and data here (default: temp)")
    run.add_argument("--no-report", action="store_true", help=argparse.SUPPRESS)
    run.add_argument("--command", default=None, help=argparse.SUPPRESS)
    rep = sub.add_parser("report", help="regenerate REPORT.md and the plots only")
    rep.add_argument("--results-dir", default=None)
    rep.add_argument("--out-dir", default=None)
    args = ap.parse_args(argv)
    os.chdir(ROOT)
    if args.cmd == "report":
        return cmd_report(args)
    if args.command:
        return cmd_run(args, shlex.split(args.command.split(" -m bench ", 1)[1]))
    return cmd_run(args, argv)


if __name__ == "__main__":
    sys.exit(main())
