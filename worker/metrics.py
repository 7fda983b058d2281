"""Prometheus metrics of the worker: jobs by outcome, latencies, retries, queue depth.

The worker runs one process with a thread pool, so the default registry is enough;
``serve_metrics`` exposes it on ``SYNAPSE_BRIDGE_METRICS_PORT`` (0 turns it off).
"""

from __future__ import annotations

from collections.abc import Iterator

import redis
import structlog
from prometheus_client import Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import REGISTRY, Collector

from worker.writeback import OUTBOX

log = structlog.get_logger("worker.metrics")

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)

JOBS = Counter("synapse_jobs_total", "Jobs finished, by outcome", ["outcome"])
RETRIES = Counter("synapse_job_retries_total", "Retries scheduled after transient errors")
MODEL_WAITS = Counter(
    "synapse_model_waits_total", "Jobs sent back to the queue: their model was not admitted"
)
DEFERRED_LOST = Counter(
    "synapse_deferred_tickets_lost_total",
    "Deferred results whose ticket was lost: the job submitted again, or failed past "
    "SYNAPSE_BRIDGE_DEFERRED_RESUBMITS",
    ["action"],
)
DEAD_LETTERS = Counter("synapse_dead_letters_total", "Jobs sent to the dead-letter queue")
JOB_LATENCY = Histogram(
    "synapse_job_latency_seconds", "From submit to the final write", buckets=_BUCKETS
)
INFERENCE_LATENCY = Histogram(
    "synapse_inference_latency_seconds", "One serve call (infer_remote)", buckets=_BUCKETS
)
COALESCED_ITEMS = Histogram(
    "synapse_coalesced_call_items",
    "Jobs carried by one serve call (worker.coalesce)",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
BATCH_ITEMS = Counter("synapse_batch_items_total", "Batch items run, by outcome", ["outcome"])


class QueueDepth(Collector):
    """Queue lengths and the outbox size, read from Redis at scrape time."""

    def __init__(self, queues: list[str], r: redis.Redis) -> None:
        self.queues = queues
        self.redis = r

    def collect(self) -> Iterator[GaugeMetricFamily]:
        depth = GaugeMetricFamily("synapse_queue_depth", "Messages waiting", labels=["queue"])
        outbox = GaugeMetricFamily("synapse_outbox_size", "Results waiting to be written")
        try:
            r = self.redis
            for q in self.queues:
                total = sum(int(r.llen(name)) for name in [q, *(f"{q}:{p}" for p in range(1, 10))])
                depth.add_metric([q], total)
            outbox.add_metric([], r.hlen(OUTBOX))
        except Exception as e:  # a scrape never fails the worker
            log.warning("queue depth unavailable", error=type(e).__name__)
            return
        yield depth
        yield outbox


_started = False


def serve_metrics(port: int, queues: list[str], r: redis.Redis) -> bool:
    """Start the metrics HTTP endpoint once per process."""
    global _started
    if _started or port <= 0:
        return False
    REGISTRY.register(QueueDepth(queues, r))
    try:
        start_http_server(port)
    except OSError as e:
        log.warning("metrics endpoint not started", port=port, error=str(e))
        return False
    _started = True
    log.info("metrics endpoint started", port=port)
    return True
