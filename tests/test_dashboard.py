"""The Grafana dashboard (docker/monitoring) plots metrics that really exist.

Every panel's PromQL must name only metrics that a worker's ``/metrics`` or Ray's
metrics agent (Serve's replicas: ``ray_`` prefixed) exports after jobs have run: a
renamed metric or a typo leaves a panel empty without any error, so names are checked
against a real scrape, not a list. The compose wiring (Prometheus's targets, Grafana's
data source and dashboard folder) is checked against the files compose mounts.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
import ray
import yaml

from tests.conftest import ROOT, WorkerProcess, wait_for
from tests.test_worker import new_job, send, wait_final

MONITORING = ROOT / "docker" / "monitoring"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "synapse-bridge.json"

# The dashboard's subjects (issue 14): a panel for each, found by title.
SUBJECTS = ("queue depth", "outcome", "latency", "retries", "dead-letter", "model loads")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (not functions, labels or ranges)."""
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\b(?:by|without)\s*\([^)]*\)", "", expr)  # grouping labels
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range selectors
    return set(re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()", expr))


def exported(text: str) -> set[str]:
    """Metric names in a Prometheus exposition (histogram series included)."""
    return set(re.findall(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)[{ ]", text, re.M))


def panels() -> list[dict[str, Any]]:
    return json.loads(DASHBOARD.read_text())["panels"]


def test_metric_names_reads_promql() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le) (rate(synapse_x_bucket{queue="a"}[5m])))'
        " / max(synapse_y)"
    )
    assert metric_names(expr) == {"synapse_x_bucket", "synapse_y"}


def test_the_dashboard_covers_its_subjects() -> None:
    titles = [p["title"].lower() for p in panels()]
    for subject in SUBJECTS:
        assert any(subject in t for t in titles), f"no panel on {subject}: {titles}"
    for panel in panels():
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert metric_names(target["expr"]), (panel["title"], target["expr"])


def _ray_metrics() -> str:
    texts = []
    for node in ray.nodes():
        port = node.get("MetricsExportPort")
        if node.get("Alive") and port:
            url = f"http://{node['NodeManagerAddress']}:{port}/metrics"
            texts.append(httpx.get(url, timeout=10).text)
    return "\n".join(texts)


@pytest.mark.timeout(300)
def test_every_panel_reads_metrics_that_are_exported(
    admin: Any, worker_proc: WorkerProcess, worker_env: dict[str, str]
) -> None:
    for _ in range(3):
        job_id = new_job(admin)
        send(job_id)
        assert wait_final(admin, job_id)["status"] == "SUCCEEDED"
    port = worker_env["SYNAPSE_BRIDGE_METRICS_PORT"]
    worker = exported(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text)
    # Ray's agent exports what replicas recorded every few seconds: wait for the loads.
    ray_text = wait_for(
        lambda: "ray_synapse_model_events" in (t := _ray_metrics()) and t,
        timeout=120,
        interval=2,
        what="the replicas' model events in Ray's metrics",
    )
    available = worker | exported(ray_text)
    missing = {
        (panel["title"], name)
        for panel in panels()
        for target in panel["targets"]
        for name in metric_names(target["expr"])
        if name not in available
    }
    assert not missing, f"panels read metrics nobody exports: {sorted(missing)}"
    assert 'event="loads"' in ray_text


def test_compose_wires_prometheus_and_grafana_to_the_dashboard() -> None:
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    services = compose["services"]
    prometheus = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in prometheus["scrape_configs"]}
    worker_port = services["worker"]["environment"]["SYNAPSE_BRIDGE_METRICS_PORT"]
    assert jobs["worker"]["dns_sd_configs"][0] == {
        "names": ["worker"],
        "type": "A",
        "port": int(worker_port),
    }
    ray_target = jobs["ray"]["static_configs"][0]["targets"][0]
    serve_cmd = (ROOT / "docker" / "Dockerfile.serve").read_text()
    assert ray_target == "ray-head:8080" and "--metrics-export-port=8080" in serve_cmd

    def mount(service: str, target: str) -> Path:
        for volume in services[service]["volumes"]:
            source, dest = volume.split(":")[:2]
            if dest == target:
                return (ROOT / "docker" / source).resolve()
        raise AssertionError(f"{service} mounts nothing at {target}")

    assert mount("prometheus", "/etc/prometheus/prometheus.yml") == MONITORING / "prometheus.yml"
    provisioning = mount("grafana", "/etc/grafana/provisioning")
    sources = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())
    assert sources["datasources"][0]["url"] == "http://prometheus:9090"
    uid = sources["datasources"][0]["uid"]
    assert {t["datasource"]["uid"] for p in panels() for t in p["targets"]} == {uid}
    providers = yaml.safe_load((provisioning / "dashboards" / "bridge.yaml").read_text())
    folder = providers["providers"][0]["options"]["path"]
    assert mount("grafana", folder) == DASHBOARD.parent
