"""A replica's model loads, failures and releases as Prometheus metrics.

The worker exports its own metrics (``worker.metrics``); a replica runs inside Ray, so
its metrics go through Ray's metrics agent, which every node serves on its metrics
export port (``ray start --metrics-export-port=8080``) with Ray's ``ray_`` prefix and
the deployment, replica and application as labels: ``ray_synapse_model_events_total``
with ``event`` = ``loads``, ``load_failures`` or ``releases``. docker/grafana's
dashboard plots them beside the worker's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ray.serve.metrics import Counter

from serve_runtime.model_store import StoreStats


def _events() -> Any:
    return Counter(
        "synapse_model_events",
        description="Model loads, load failures and releases on a replica",
        tag_keys=("event",),
    )


@dataclass
class ExportedStats(StoreStats):
    """StoreStats that also counts each event in Ray's metrics."""

    _events: Any = field(default_factory=_events, repr=False, compare=False)

    def count(self, event: str) -> None:
        super().count(event)
        self._events.inc(tags={"event": event})
