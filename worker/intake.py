"""Intake (pull mode): enqueue each PENDING inference job of the backend once.

A job is claimed with an atomic ``SET NX`` (with a TTL) before it is sent, so
concurrent intakes, and repeated polls while the job waits in the queue, enqueue it
once. While the backend fails, polling backs off exponentially.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import redis
import structlog

from config import Settings
from worker.app import app
from worker.backend_api import BackendAPI
from worker.ledger import Ledger
from worker.message import InvalidJob, parse_job
from worker.pipeline import error_text
from worker.retry import RetryPolicy
from worker.services import Services, services
from worker.settle import Settler
from worker.submit import send_message

log = structlog.get_logger("worker.intake")

CLAIM_PREFIX = "synapse:intake:"


def job_to_message(job: dict[str, Any], token: str) -> dict[str, Any]:
    """A backend job (backend-api.md) as a task message, run with the service token."""
    params = job.get("params") or {}
    message: dict[str, Any] = {
        "job_id": str(job.get("id")),
        "tenant": job.get("tenant"),
        "token": token,
        "model": params.get("model"),
        "method": params.get("method", "post"),
        "release": job.get("plugin_release") or {},
        "submitted_at": time.time(),
    }
    if "items" in params:
        message["items"] = params["items"]
    else:
        message["json"] = params.get("json", {})
    return message


@dataclass
class Intake:
    backend: BackendAPI
    redis: redis.Redis
    settings: Settings
    token: str
    ledger: Ledger
    settler: Settler

    @classmethod
    def from_services(cls, svc: Services) -> Intake:
        settings = svc.settings
        token = settings.access_token.get_secret_value() if settings.access_token else ""
        return cls(svc.backend, svc.redis, settings, token, svc.ledger, Settler(app, svc))

    @classmethod
    def from_settings(cls) -> Intake:
        return cls.from_services(services())

    def claim(self, job_id: str) -> bool:
        return bool(
            self.redis.set(CLAIM_PREFIX + job_id, "1", nx=True, ex=self.settings.intake_claim_ttl_s)
        )

    def poll_once(self) -> int:
        """One pass over every page of pending jobs; returns how many were enqueued."""
        enqueued = 0
        for job in self.backend.iter_jobs(
            status="PENDING", action="inference", page_size=self.settings.intake_page_size
        ):
            job_id = str(job.get("id"))
            if not self.claim(job_id):
                continue
            raw = job_to_message(job, self.token)
            try:
                parsed = parse_job(raw)
            except InvalidJob as e:
                self.settler.quarantine(raw, str(e))
                continue
            send_message(parsed, app=app, ledger=self.ledger)
            enqueued += 1
        if enqueued:
            log.info("intake enqueued jobs", count=enqueued)
        return enqueued

    def run_forever(self, stop: threading.Event | None = None) -> None:
        """Poll every interval; back off while anything fails (the backend, Redis, the
        broker): a claimed job that could not be published is in the ledger already."""
        stop = stop or threading.Event()
        policy = RetryPolicy(
            max_retries=10**9,
            base_s=self.settings.intake_interval_s,
            cap_s=max(60.0, self.settings.intake_interval_s),
        )
        failures = 0
        while not stop.is_set():
            try:
                self.poll_once()
                failures = 0
                wait = self.settings.intake_interval_s
            except Exception as e:  # the backend, Redis or the broker: the loop goes on
                wait = policy.delay(failures)
                failures += 1
                log.warning(
                    "intake poll failed; backing off",
                    error=error_text(e),
                    retry_in_s=round(wait, 1),
                )
            stop.wait(wait)
