"""Producing jobs: build a valid message and send it; nobody hand-writes Celery internals.

The message carries the token sealed (``JobMessage.wire()``, key from
``SYNAPSE_BRIDGE_SEALING_KEY`` or derived from ``SYNAPSE_ACCESS_TOKEN``: a producer
needs the same key as the workers), and shows only the job id, tenant and model in
its ``kwargsrepr`` (events, Flower).
"""

from __future__ import annotations

import time
from typing import Any

from celery import Celery
from celery.result import AsyncResult

from worker.app import app as default_app
from worker.ledger import Ledger
from worker.message import TASK_NAME, JobMessage, parse_job, safe_kwargsrepr
from worker.sealing import Sealer
from worker.services import producer_ledger


def send_message(
    job: JobMessage,
    *,
    countdown: float | None = None,
    app: Celery | None = None,
    ledger: Ledger | None = None,
    sealer: Sealer | None = None,
) -> AsyncResult:
    """Record the job in the ledger, then publish it (to ``app``'s broker, default ours).

    Both copies carry the token sealed (``sealer``, default the process's)."""
    app = app or default_app
    wire = job.wire(sealer)
    (ledger or producer_ledger()).record(job.job_id, wire)
    kwargs = {"job": wire}
    return app.send_task(
        TASK_NAME,
        kwargs=kwargs,
        priority=job.priority,
        countdown=countdown,
        kwargsrepr=safe_kwargsrepr(kwargs),
        argsrepr="()",
    )


def submit(
    *,
    job_id: str,
    model: int | str,
    token: str,
    release: dict[str, Any],
    tenant: str | None = None,
    json: dict[str, Any] | list[Any] | None = None,
    items: list[dict[str, Any]] | None = None,
    method: str = "post",
    priority: int = 5,
    deadline: str | None = None,
    countdown: float | None = None,
    app: Celery | None = None,
    sealer: Sealer | None = None,
) -> AsyncResult:
    """Validate and send one job to the ``inference`` queue; raises ``InvalidJob``."""
    raw: dict[str, Any] = {
        "job_id": job_id,
        "tenant": tenant,
        "token": token,
        "model": model,
        "method": method,
        "release": release,
        "priority": priority,
        "submitted_at": time.time(),
    }
    if json is not None:
        raw["json"] = json
    if items is not None:
        raw["items"] = items
    if deadline is not None:
        raw["deadline"] = deadline
    return send_message(
        parse_job({k: v for k, v in raw.items() if v is not None}, sealer=sealer),
        countdown=countdown,
        app=app,
        sealer=sealer,
    )


__all__ = ["TASK_NAME", "send_message", "submit"]
