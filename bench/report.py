"""``bench/REPORT.md`` and ``bench/plots/*.png`` from the result files present.

Only ``W1.json`` .. ``W7.json`` are read (other files in the results folder belong to
other benchmarks). ``bench/FINDINGS.md``, when present, is included verbatim: it is
the hand-written part (profiles read, fixes tried, before/after figures).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
FINDINGS = ROOT / "bench" / "FINDINGS.md"
ORDER = ["W1", "W2", "W3", "W4", "W5", "W6", "W7"]

SYSTEMS_TEXT = """\
- **direct**: async HTTP (httpx) straight to the Serve endpoint with the bridge's
  headers, the same number in flight as the others; no queue, no write-back. The
  limit of the serving path.
- **peer**: Ray Serve's own asynchronous inference, `ray.serve.task_consumer` with
  its Celery adapter, on its own fresh Redis (`bench/peer.py`). Its handler PATCHes
  the job RUNNING, calls the same Serve HTTP endpoint with the same headers (through
  the project's `ServeClient`: a `DeploymentHandle` cannot call a FastAPI route, and
  HTTP keeps the serving path identical) and PATCHes the final result with a
  `metrics_record`. Jobs are sent with Ray's producer API
  (`instantiate_adapter_from_config(...).enqueue_task_sync`). Consumer concurrency =
  the deployment's `max_ongoing_requests` = the same N.
- **bridge**: this project end to end: `python -m worker.cli worker -c N` on its own
  fresh Redis, jobs sent with `worker.submit.submit`. Per job it validates the
  message, checks Redis and the backend (one GET) for an earlier final write, calls
  Serve, records the result in the Redis outbox and PATCHes it under a per-job lock
  (effects once; two Redis round trips around the PATCH). RUNNING is PATCHed only for
  a job still running after 1 s (`SYNAPSE_BRIDGE_RUNNING_MARK_AFTER`), so the jobs
  here make one GET and one PATCH, the peer two PATCHes.

Bridge and peer jobs are sent by a producer subprocess as one burst after a warm-up
(one job per (user, model) pair); throughput is `jobs / (last finished_at - first
submitted_at)` from the jobs' `metrics_record` (one clock), latency is
`metrics_record.total_s` (submit to final write) unless a table says otherwise; under
a burst it is mostly queue wait. Direct: `calls / (last answer - first send)`, latency
one request.
"""


def load_results(results_dir: Path) -> dict[str, dict[str, Any]]:
    out = {}
    for key in ORDER:
        p = results_dir / f"{key}.json"
        if p.is_file():
            try:
                out[key] = json.loads(p.read_text())
            except ValueError:
                continue
    return out


def _f(v: Any, nd: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:,.{nd}f}"
    return str(v)


def _met(m: Any) -> str:
    return {True: "**met**", False: "**missed**", None: "n/a"}.get(m, str(m))


def _lat(s: dict[str, Any], q: str) -> Any:
    return (s.get("latency_ms") or {}).get(q)


def _cpu(s: dict[str, Any]) -> str:
    c = s.get("cpu_ms_per_job") or {}
    parts = [f"{k} {c[k]:.1f}" for k in ("worker", "backend", "redis", "rest") if k in c]
    return " / ".join(parts) if parts else "-"


# --- plots ---------------------------------------------------------------------------------


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _quick_suffix(r: dict[str, Any]) -> str:
    return f" — QUICK ({r['jobs']} of {r['full_jobs']} jobs)" if r.get("quick") else ""


def plot_throughput(key: str, r: dict[str, Any], plots: Path) -> list[str]:
    plt = _plt()
    systems = [s for s in r.get("systems", []) if s.get("throughput") is not None]
    if not systems:
        return []
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    labels = [s["label"] for s in systems]
    values = [s["throughput"] for s in systems]
    bars = ax1.bar(labels, values, color=[_color(s) for s in systems])
    ax1.bar_label(bars, fmt="%.1f")
    ax1.set_ylabel(r.get("unit", "jobs/s"))
    ax1.set_title(f"{key} {r['title']}: throughput")
    if r.get("ceiling"):
        ax1.axhline(r["ceiling"], ls="--", c="k", lw=1, label=f"ceiling {r['ceiling']:.0f}")
        ax1.axhline(0.8 * r["ceiling"], ls=":", c="k", lw=1, label="0.8 x ceiling")
        ax1.legend(loc="upper right", fontsize=8)
    ax1.tick_params(axis="x", labelrotation=15)
    for s in systems:
        tl = s.get("timeline") or {}
        counts, bin_s = tl.get("counts") or [], tl.get("bin_s", 0.5)
        if counts:
            ax2.plot(
                [i * bin_s for i in range(len(counts))],
                [c / bin_s for c in counts],
                label=s["label"],
                color=_color(s),
                lw=1.2,
                marker=".",
            )
    ax2.set_xlabel("seconds since the first job was sent")
    ax2.set_ylabel(f"completions/s ({r.get('unit', 'jobs/s')})")
    ax2.set_title("completions over time")
    ax2.legend(fontsize=8)
    fig.suptitle(f"{key}{_quick_suffix(r)}", fontsize=9)
    fig.tight_layout()
    name = f"{key}-throughput.png"
    fig.savefig(plots / name, dpi=110)
    plt.close(fig)
    return [name]


def plot_latency(key: str, r: dict[str, Any], plots: Path) -> list[str]:
    plt = _plt()
    systems = [s for s in r.get("systems", []) if s.get("latency_ms")]
    if not systems:
        return []
    fig, ax = plt.subplots(figsize=(8, 4.2))
    qs = ["p50", "p90", "p99"]
    width = 0.8 / len(systems)
    for i, s in enumerate(systems):
        vals = [s["latency_ms"].get(q) or 0 for q in qs]
        xs = [j + i * width for j in range(len(qs))]
        b = ax.bar(xs, vals, width, label=s["label"], color=_color(s))
        ax.bar_label(b, fmt="%.0f", fontsize=7)
    ax.set_xticks([j + width * (len(systems) - 1) / 2 for j in range(len(qs))], qs)
    ax.set_ylabel("ms")
    defin = "; ".join(
        sorted({s.get("latency_definition", "") for s in systems if s.get("latency_definition")})
    )
    ax.set_title(f"{key} {r['title']}: latency{_quick_suffix(r)}", fontsize=10)
    ax.text(0, -0.16, defin, transform=ax.transAxes, fontsize=7, va="top", wrap=True)
    ax.legend(fontsize=8)
    fig.tight_layout()
    name = f"{key}-latency.png"
    fig.savefig(plots / name, dpi=110)
    plt.close(fig)
    return [name]


def plot_w3(r: dict[str, Any], plots: Path) -> list[str]:
    plt = _plt()
    systems = r.get("systems", [])
    if not systems:
        return []
    names = []
    fig, axes = plt.subplots(1, len(systems), figsize=(5 * len(systems), 3.8), squeeze=False)
    for ax, s in zip(axes[0], systems, strict=True):
        reps = s.get("replicas") or []
        t0 = min((e[0] for rep in reps for e in rep.get("events", [])), default=None)
        for i, rep in enumerate(reps):
            ev = rep.get("events") or []
            if not ev or t0 is None:
                continue
            line = ax.step(
                [e[0] - t0 for e in ev],
                [e[3] for e in ev],
                where="post",
                label=f"replica {i + 1}: loaded + loading",
            )
            ax.step(
                [e[0] - t0 for e in ev],
                [e[4] for e in ev],
                where="post",
                ls=":",
                color=line[0].get_color(),
                label=f"replica {i + 1}: loaded",
            )
        bound = s.get("bound")
        if bound and bound < 1000:
            ax.axhline(bound, ls="--", c="k", lw=1, label=f"bound {bound}")
        ax.set_title(
            f"{s.get('variant')}: {s.get('downloads')} loads, max resident {s.get('resident_max')}",
            fontsize=9,
        )
        ax.set_xlabel("seconds since the first load")
        ax.set_ylabel("models on the replica")
        ax.legend(fontsize=7)
    fig.suptitle(f"W3 multiplexing: resident models per replica{_quick_suffix(r)}", fontsize=10)
    fig.tight_layout()
    fig.savefig(plots / "W3-residents.png", dpi=110)
    plt.close(fig)
    names.append("W3-residents.png")

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    labels = [s.get("variant", s["label"]) for s in systems]
    b = ax1.bar(labels, [s.get("downloads") or 0 for s in systems], color="#4c72b0")
    ax1.bar_label(b)
    ax1.axhline(2 * len(r["population"]["models"]), ls="--", c="k", lw=1, label="2 x models")
    ax1.set_title("model loads (backend downloads)")
    ax1.legend(fontsize=8)
    b = ax2.bar(labels, [s.get("throughput") or 0 for s in systems], color="#55a868")
    ax2.bar_label(b, fmt="%.1f")
    ax2.set_title(f"throughput ({r.get('unit')})")
    fig.suptitle(f"W3{_quick_suffix(r)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(plots / "W3-throughput.png", dpi=110)
    plt.close(fig)
    names.append("W3-throughput.png")
    return names


def plot_w5(r: dict[str, Any], plots: Path) -> list[str]:
    plt = _plt()
    s = (r.get("systems") or [{}])[0]
    soak = s.get("soak") or {}
    ser = soak.get("series") or {}
    if not ser.get("t"):
        return []
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    ax1.plot(ser["t"], ser["rss_mib"], label="worker RSS", color="#c44e52")
    if soak.get("rss_post_warmup_mib"):
        ax1.axhline(soak["rss_post_warmup_mib"], ls=":", c="k", lw=1, label="post-warm-up")
        ax1.axhline(soak["rss_post_warmup_mib"] * 1.1, ls="--", c="k", lw=1, label="+10%")
    ax1.set_xlabel("seconds")
    ax1.set_ylabel("MiB")
    ax1b = ax1.twinx()
    ax1b.plot(ser["t"], ser["jobs_done"], color="#8172b2", lw=0.8, label="jobs done")
    ax1b.set_ylabel("jobs done")
    ax1.legend(loc="lower right", fontsize=8)
    ax1.set_title("worker RSS")
    ax2.plot(ser["redis_t"], ser["redis_used_mib"], label="used_memory", color="#4c72b0")
    base = soak.get("redis_baseline_bytes")
    if base:
        ax2.axhline(base / 1024 / 1024, ls=":", c="k", lw=1, label="baseline")
    if soak.get("redis_after_purge_bytes"):
        ax2.axhline(
            soak["redis_after_purge_bytes"] / 1024 / 1024,
            ls="--",
            c="g",
            lw=1,
            label="after drain, TTL'd keys removed",
        )
    ax2.set_xlabel("seconds")
    ax2.set_ylabel("MiB")
    ax2.legend(fontsize=8)
    ax2.set_title("Redis used_memory")
    fig.suptitle(f"W5 soak{_quick_suffix(r)}", fontsize=10)
    fig.tight_layout()
    fig.savefig(plots / "W5-memory.png", dpi=110)
    plt.close(fig)
    return ["W5-memory.png"]


CURVE_COLORS = ["#dd8452", "#4c72b0", "#55a868", "#8172b3", "#c44e52", "#937860"]


def plot_w6(r: dict[str, Any], plots: Path) -> list[str]:
    """Latency (p50 solid, p99 dashed, log) against achieved items/s, one colour per
    system, each point labelled with its offered rate: pick the wait from where the
    lines bend."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(10, 6))
    drawn = False
    for i, s in enumerate(r.get("systems") or []):
        pts = [p for p in s.get("points") or [] if p.get("throughput") and p.get("latency_ms")]
        if not pts:
            continue
        drawn = True
        color = CURVE_COLORS[i % len(CURVE_COLORS)]
        x = [p["throughput"] for p in pts]
        for q, style, marker in (("p50", "-", "o"), ("p99", "--", "^")):
            ax.plot(
                x,
                [p["latency_ms"][q] for p in pts],
                style,
                marker=marker,
                color=color,
                lw=1.4,
                ms=4,
                label=f"{s['label']} {q}",
            )
        for p in pts:
            ax.annotate(
                f"{p['rate']:g}/s",
                (p["throughput"], p["latency_ms"]["p99"]),
                textcoords="offset points",
                xytext=(3, 4),
                fontsize=6,
                color=color,
            )
    if not drawn:
        plt.close(fig)
        return []
    if r.get("ceiling"):
        ax.axvline(r["ceiling"], ls=":", c="k", lw=1, label=f"ceiling {r['ceiling']:.0f} items/s")
    ax.set_yscale("log")
    ax.set_xlabel("achieved items/s (jobs of one offered rate / their span)")
    ax.set_ylabel("latency, submit to final write (ms, log)")
    ax.set_title(
        f"W6 throughput against latency: p50 (solid) and p99 (dashed), "
        f"labels = offered jobs/s{_quick_suffix(r)}",
        fontsize=10,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(plots / "W6-curve.png", dpi=110)
    plt.close(fig)
    return ["W6-curve.png"]


def _color(s: dict[str, Any]) -> str:
    base = {"direct": "#4c72b0", "peer": "#dd8452", "bridge": "#55a868"}.get(
        s.get("system"), "#888"
    )
    if s.get("system") == "bridge" and "(" in s.get("label", ""):
        return "#8c8c3c"
    return base


def make_plots(results: dict[str, dict[str, Any]], plots: Path) -> dict[str, list[str]]:
    plots.mkdir(parents=True, exist_ok=True)
    out: dict[str, list[str]] = {}
    for key, r in results.items():
        if "error" in r and not r.get("systems"):
            continue
        names: list[str] = []
        try:
            if key in ("W1", "W2"):
                names += plot_throughput(key, r, plots)
                names += plot_latency(key, r, plots)
            elif key == "W3":
                names += plot_w3(r, plots)
            elif key == "W4":
                names += plot_latency(key, r, plots)
            elif key == "W5":
                names += plot_w5(r, plots)
                names += plot_throughput(key, r, plots)
            elif key == "W6":
                names += plot_w6(r, plots)
        except Exception as e:  # a plot must not cost the report
            names.append(f"(plot failed: {type(e).__name__}: {e})")
        out[key] = names
    return out


# --- markdown ----------------------------------------------------------------------------


def _systems_table(r: dict[str, Any]) -> list[str]:
    unit = r.get("unit", "jobs/s")
    accel = any("accel" in s for s in r["systems"])
    batch = not accel and any("mean_batch" in s for s in r["systems"])
    group = any("mean_group" in s for s in r["systems"])
    head = (
        f"| system | jobs | ok / failed / lost | {unit} | vs direct | vs peer | "
        + ("vs ceiling | accel busy | mean batch | " if accel else "")
        + ("mean batch | " if batch else "")
        + ("jobs per serve call | " if group else "")
        + "p50 ms | p99 ms | service p50 ms | "
        + "CPU ms/job (worker / backend / redis / rest) | machine busy |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for s in r["systems"]:
        a = s.get("accel") or {}
        service = (s.get("service_ms") or {}).get("p50")
        row = (
            f"| {s['label']} | {_f(s.get('jobs'))} | {_f(s.get('succeeded'))} / "
            f"{_f(s.get('failed'))} / {_f(s.get('lost', 0))} | **{_f(s.get('throughput'))}** | "
            f"{_f(s.get('vs_direct'), 2)} | {_f(s.get('vs_peer'), 2)} | "
        )
        if accel:
            row += (
                f"{_f(s.get('vs_ceiling'), 2)} | {_f(a.get('utilization'), 2)} | "
                f"{_f(a.get('mean_batch'))} | "
            )
        if batch:
            row += f"{_f(s.get('mean_batch'))} | "
        if group:
            row += f"{_f(s.get('mean_group'))} | "
        row += (
            f"{_f(_lat(s, 'p50'))} | {_f(_lat(s, 'p99'))} | {_f(service)} | {_cpu(s)} | "
            f"{_f((s.get('machine_busy') or 0) * 100, 0)}% |"
        )
        lines.append(row)
    return lines


def _w3_table(r: dict[str, Any]) -> list[str]:
    lines = [
        "| configuration | routing | loads (backend downloads) | loads (replicas) | "
        "resident max per replica (loaded + loading) | loaded max | bound | loaded at end | "
        "items/s | p50 ms | p99 ms | mean batch |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in r["systems"]:
        reps = s.get("replicas") or []
        per = ", ".join(str(x["resident_max"]) for x in reps) or "-"
        loaded = ", ".join(str(x["loaded_max"]) for x in reps) or "-"
        end = ", ".join(str(x["loaded_at_end"]) for x in reps) or "-"
        bound = s.get("bound")
        lines.append(
            f"| {s.get('variant')} | {s.get('routing_mode')} | {_f(s.get('downloads'))} | "
            f"{_f(s.get('loads'))} | {per} | {loaded} | "
            f"{bound if bound and bound < 1000 else 'none'} | {end} | "
            f"**{_f(s.get('throughput'))}** | {_f(_lat(s, 'p50'))} | {_f(_lat(s, 'p99'))} | "
            f"{_f(s.get('mean_batch'))} |"
        )
    return lines


def _w4_table(r: dict[str, Any]) -> list[str]:
    lines = [
        "| system | jobs | p50 ms | p90 ms | p99 ms | overhead p50 ms | overhead p99 ms | "
        "recorded total_s p50 / p99 ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in r["systems"]:
        lat = s.get("latency_ms") or {}
        o = s.get("overhead_ms") or {}
        rec = s.get("recorded_ms") or {}
        lines.append(
            f"| {s['label']} | {_f(s.get('jobs'))} | {_f(lat.get('p50'))} | {_f(lat.get('p90'))} | "
            f"{_f(lat.get('p99'))} | {_f(o.get('p50'))} | {_f(o.get('p99'))} | "
            f"{_f(rec.get('p50'))} / {_f(rec.get('p99'))} |"
        )
    return lines


def _w5_table(r: dict[str, Any]) -> list[str]:
    s = r["systems"][0]
    k = s.get("soak") or {}
    c = k.get("redis_census") or {}

    def kind(name: str) -> str:
        x = c.get(name) or {}
        mb = _f((x.get("bytes") or 0) / 1e6, 2)
        return f"{_f(x.get('keys'))} keys, {mb} MB, {_f(x.get('no_ttl'))} without TTL"

    rows = [
        (
            "jobs",
            f"{_f(s.get('succeeded'))} SUCCEEDED, {_f(s.get('failed'))} FAILED, "
            f"{_f(s.get('lost'))} lost",
        ),
        ("throughput", f"{_f(s.get('throughput'))} jobs/s over {_f(s.get('span_s'))} s"),
        ("backend PATCHes per job", _f(s.get("backend_patches_per_job"), 3)),
        (
            "worker RSS after warm-up / final",
            f"{_f(k.get('rss_post_warmup_mib'))} / {_f(k.get('rss_final_mib'))} MiB "
            f"(x{_f(k.get('rss_final_vs_post_warmup'), 3)})",
        ),
        (
            "worker RSS trend after warm-up",
            f"{_f(k.get('rss_trend_mib_per_10k_jobs'), 3)} MiB per 10k jobs",
        ),
        (
            "Redis used_memory: baseline",
            f"{_f((k.get('redis_baseline_bytes') or 0) / 1e6, 2)} MB "
            f"({_f(k.get('redis_baseline_keys'))} keys)",
        ),
        (
            "Redis used_memory: after the drain",
            f"{_f((k.get('redis_after_drain_bytes') or 0) / 1e6, 2)} MB",
        ),
        ("Redis: Celery results (24 h TTL)", kind("celery_results")),
        ("Redis: bridge done markers (7-day TTL)", kind("bridge_final_markers")),
        ("Redis: other keys", kind("other")),
        (
            "Redis used_memory after deleting the TTL'd keys",
            f"{_f((k.get('redis_after_purge_bytes') or 0) / 1e6, 2)} MB",
        ),
    ]
    lines = ["| measure | value |", "|---|---|"]
    lines += [f"| {a} | {b} |" for a, b in rows]
    others = k.get("redis_other_keys") or []
    if others:
        lines += [
            "",
            "Other Redis keys after the drain: "
            + ", ".join(
                f"`{o['key']}` ({o['type']}{'' if o.get('len') is None else ', ' + str(o['len'])})"
                for o in others
            )
            + ".",
        ]
    return lines


def _w6_table(r: dict[str, Any]) -> list[str]:
    lines = [
        "| system | offered jobs/s | sent jobs/s | jobs | ok / failed / lost | achieved items/s | "
        "p50 ms | p99 ms | mean batch | accel busy | machine busy |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in r["systems"]:
        for p in s.get("points") or []:
            a = p.get("accel") or {}
            lines.append(
                f"| {s['label']} | {_f(p.get('rate'), 0)} | {_f(p.get('sent_rate'))} | "
                f"{_f(p.get('jobs'))} | {_f(p.get('succeeded'))} / {_f(p.get('failed'))} / "
                f"{_f(p.get('lost', 0))} | **{_f(p.get('throughput'))}** | "
                f"{_f(_lat(p, 'p50'))} | {_f(_lat(p, 'p99'))} | {_f(p.get('mean_batch'))} | "
                f"{_f(a.get('utilization'), 2)} | "
                f"{_f((p.get('machine_busy') or 0) * 100, 0)}% |"
            )
    return lines


def _section(
    key: str, r: dict[str, Any], plots: list[str], plots_rel: str, results_rel: str
) -> list[str]:
    quick = r.get("quick")
    head = f"## {key} {r.get('title', '')} — {_f(r.get('jobs'))} jobs per system"
    if quick:
        head += f" — **QUICK: {r['jobs']} of {_f(r['full_jobs'])}**"
    lines = [head, ""]
    lines.append(
        f"{r.get('what', '')}. Concurrency {r.get('concurrency')} in flight per system. "
        f"Run {r.get('generated_at')} in {_f(r.get('wall_s'), 0)} s"
        + (" **under py-spy (figures perturbed)**" if r.get("profile") else "")
        + f"; raw: [`{key}.json`]({results_rel}/{key}.json)."
    )
    pop = r.get("population") or {}
    if pop.get("interpretation"):
        lines += ["", f"Population: {pop['interpretation']}."]
    if r.get("error"):
        lines += [
            "",
            f"**This workload failed:** `{r['error']}`",
            "",
            "```",
            (r.get("traceback") or "").strip()[-2000:],
            "```",
        ]
    if r.get("systems"):
        lines.append("")
        if key == "W3":
            lines += _w3_table(r)
        elif key == "W4":
            lines += _w4_table(r)
        elif key == "W5":
            lines += _w5_table(r)
        elif key == "W6":
            lines += _w6_table(r)
        else:
            lines += _systems_table(r)
        if key in ("W3", "W4", "W5"):
            lines += ["", "Throughput, latency and CPU per system:", "", *_systems_table(r)]
    if r.get("targets"):
        lines += ["", "| target | wanted | value | result | detail |", "|---|---|---|---|---|"]
        for t in r["targets"]:
            lines.append(
                f"| {t['name']} | {t['target']} | {_f(t['value'], 3)} | {_met(t['met'])} | "
                f"{t.get('detail', '')} |"
            )
    if r.get("notes"):
        lines.append("")
        lines += [f"- {n}" for n in r["notes"]]
    for p in plots:
        if p.startswith("("):
            lines += ["", p]
        else:
            lines += ["", f"![{p}]({plots_rel}/{p})"]
    lines.append("")
    return lines


def _machine_row(key: str, r: dict[str, Any]) -> str:
    m = r.get("machine") or {}
    load = " ".join(str(x) for x in m.get("loadavg_at_start", []))
    return (
        f"| {key} | {r.get('generated_at', '')} | {m.get('nproc')} | {m.get('cpu_model', '')} | "
        f"{m.get('mem_total_gib')} GiB | {m.get('platform', '')} | {load} |"
    )


def write_report(results_dir: Path, out_dir: Path) -> Path:
    results_dir, out_dir = Path(results_dir), Path(out_dir)
    results = load_results(results_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = make_plots(results, out_dir / "plots")
    plots_rel = "plots"
    results_rel = os.path.relpath(results_dir, out_dir)
    any_r = next(iter(results.values()), {})
    versions = any_r.get("versions") or {}
    quick = [k for k, r in results.items() if r.get("quick")]
    lines = ["# Benchmark: the bridge against Ray Serve's task_consumer and a direct call", ""]
    if quick:
        lines += [
            "> **QUICK RUN — sizes reduced for "
            + ", ".join(
                f"{k} ({results[k]['jobs']} of {results[k]['full_jobs']} jobs)" for k in quick
            )
            + ". A smoke check of the harness, not figures to quote.**",
            "",
        ]
    if not results:
        lines += ["No results yet: run `.venv/bin/python -m bench run`.", ""]
    lines += [
        f"Generated {time.strftime('%Y-%m-%d %H:%M:%S %z')} by `python -m bench report` from "
        f"`{results_rel}/W*.json`.",
        "",
        "Rerun everything (each workload in its own process, one after the other; sizes "
        "and wall time printed at the end):",
        "",
        "```",
        ".venv/bin/python -m bench run                       # all workloads, full sizes",
        ".venv/bin/python -m bench run --workload W2         # one workload",
        ".venv/bin/python -m bench run --quick               # small sizes (smoke check)",
        ".venv/bin/python -m bench run --workload W1 --profile  # bridge worker under py-spy",
        ".venv/bin/python -m bench report                    # regenerate this file and the plots",
        "```",
        "",
        "Commands that produced these results: "
        + "; ".join(
            sorted({f"`{r.get('command')}`" for r in results.values() if r.get("command")})
        ),
        "",
        "## Machine and versions",
        "",
        "| workload | run at | nproc | CPU | MemTotal | platform | load average at start |",
        "|---|---|---|---|---|---|---|",
        *(_machine_row(k, r) for k, r in results.items()),
        "",
        "The machine is one of a pool: the CPU model and the kernel build can differ from "
        "one workload's run to another's. Compare figures within a run (each table's "
        "systems ran side by side), not across runs on different CPUs.",
        "",
        "| " + " | ".join(versions) + " |",
        "|" + "---|" * len(versions),
        "| " + " | ".join(str(v) for v in versions.values()) + " |",
        "",
        "All processes (Ray Serve's proxy and replicas, the local backend, Redis, the "
        "worker, the producer and this driver) share this machine; the CPU columns say "
        "where its time went.",
        "",
        "## Targets",
        "",
        "| workload | target | wanted | value | result |",
        "|---|---|---|---|---|",
    ]
    for key, r in results.items():
        if r.get("error"):
            lines.append(f"| {key} | (workload failed: {r['error'][:120]}) | | | **missed** |")
        for t in r.get("targets") or []:
            lines.append(
                f"| {key}{' (quick)' if r.get('quick') else ''} | {t['name']} | {t['target']} | "
                f"{_f(t['value'], 3)} | {_met(t['met'])} |"
            )
    lines += ["", "## The systems", "", SYSTEMS_TEXT]
    for key, r in results.items():
        lines += _section(key, r, plots.get(key, []), plots_rel, results_rel)
    lines += [
        "## Where the time goes",
        "",
        "*CPU ms/job* splits the machine's busy time during the measured run: *worker* is "
        "the bridge worker process (none for direct and peer: the peer's Celery worker "
        "runs inside its Ray replica and counts under *rest*), *backend* the local "
        "backend (SQLite + uvicorn), *redis* that system's redis-server, *rest* "
        "everything else (Ray Serve's proxy and replicas, the producer, this driver, any "
        "other load). *service p50* is started to final write of one job (a slot's busy "
        "time).",
        "",
        "*rest*, by process (ms of CPU per job; Ray's actors by their title, the top "
        "five; the driver is `python -m bench`, which runs the direct system's client):",
        "",
    ]
    for key, r in results.items():
        for sys_ in r.get("systems", []):
            top = list((sys_.get("rest_ms_per_job") or {}).items())[:5]
            if top:
                parts = ", ".join(f"{name.removeprefix('ray::')} {v:.1f}" for name, v in top)
                lines.append(f"- {key} {sys_.get('label')}: {parts}")
    lines.append("")
    profiles = sorted(results_dir.glob("W*-profile.*"))
    lines += ["## Profiles", ""]
    if profiles:
        lines += [f"- [`{p.name}`]({results_rel}/{p.name})" for p in profiles]
    else:
        lines.append(
            "None in the results folder: `python -m bench run --workload W1 --profile` runs "
            "the bridge worker under `py-spy record --subprocesses` and writes "
            "`W1-profile.svg` beside the results."
        )
    lines.append("")
    if FINDINGS.is_file():
        lines += ["## Findings, profiles and fixes", "", FINDINGS.read_text().strip(), ""]
    path = out_dir / "REPORT.md"
    path.write_text("\n".join(lines) + "\n")
    return path
