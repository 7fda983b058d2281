"""The peer: Ray Serve's own asynchronous inference (``ray.serve.task_consumer``).

A Serve deployment decorated with ``@task_consumer`` runs a Celery worker (Ray's
``CeleryTaskProcessorAdapter``: threads pool, ``worker_concurrency`` = the deployment's
``max_ongoing_requests``, late acks) on the same kind of Redis as the bridge. Its
handler does what a user of that API would write to do the bridge's work:

1. PATCH the job ``RUNNING`` on the local backend (service token), as the bridge does;
2. call the same Serve HTTP endpoint with the same multiplexing headers (the project's
   ``ServeClient``, so routing mode, JWT signing and connection pooling are identical:
   a ``DeploymentHandle`` cannot call a FastAPI ingress route, and HTTP keeps the
   serving path the same for all three systems);
3. PATCH the final result with a ``metrics_record`` of the bridge's shape
   (``submitted_at``, ``started_at``, ``finished_at``, ``total_s`` ...).

What it does not do, and the bridge does: message validation (pydantic), the
"already final?" check (a Redis lookup and a backend GET), the Redis outbox with a
per-job lock and done marker (effects once), typed retries with backoff and a DLQ of
its own, redacted structured logs. Celery's ``autoretry_for=(Exception,)`` with
``max_retries=3`` (Ray's default) is its retry policy.
"""

from __future__ import annotations

import time
from typing import Any

TASK_NAME = "synapse.inference.run"
APP_NAME = "bench-peer"


def processor_config(redis_url: str, queue: str) -> Any:
    from ray.serve.schema import CeleryAdapterConfig, TaskProcessorConfig

    return TaskProcessorConfig(
        queue_name=queue,
        adapter_config=CeleryAdapterConfig(broker_url=redis_url, backend_url=redis_url),
    )


def build_app(
    *,
    redis_url: str,
    queue: str,
    concurrency: int,
    backend_url: str,
    service_token: str,
    serve_url: str,
    routing_mode: str,
) -> Any:
    """The peer's Serve application (bind, not run). The class is local: Ray pickles it
    by value, so the replica does not need ``bench`` on its path."""
    from ray import serve
    from ray.serve.task_consumer import task_consumer, task_handler

    env = {
        "SYNAPSE_HOST": backend_url,
        "SYNAPSE_SERVE_URL": serve_url,
        "SYNAPSE_BRIDGE_ROUTING_MODE": routing_mode,
        "SYNAPSE_BRIDGE_SERVE_MAX_CONNECTIONS": str(max(100, concurrency)),
    }

    @serve.deployment(
        name="PeerConsumer",
        num_replicas=1,
        max_ongoing_requests=concurrency,  # Ray makes it the Celery worker's concurrency
        ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": env}},
    )
    @task_consumer(task_processor_config=processor_config(redis_url, queue))
    class PeerConsumer:
        def __init__(self, backend_url: str, service_token: str) -> None:
            import httpx

            from config import load_settings
            from serve_runtime.client import ServeClient

            self.serve = ServeClient(load_settings())
            self.backend = httpx.Client(
                base_url=backend_url.rstrip("/") + "/",
                headers={"Authorization": f"Token {service_token}"},
                timeout=30.0,
                limits=httpx.Limits(
                    max_connections=concurrency, max_keepalive_connections=concurrency
                ),
            )

        def _patch(self, job_id: str, tenant: str | None, body: dict[str, Any]) -> None:
            headers = {"Synapse-Tenant": f"Token {tenant}"} if tenant else None
            self.backend.patch(f"jobs/{job_id}/", json=body, headers=headers).raise_for_status()

        @task_handler(name=TASK_NAME)
        def run(self, job: dict[str, Any]) -> dict[str, Any]:
            from config import prefix_for_release
            from serve_runtime.errors import ServeClientError

            started = time.time()
            job_id, tenant = job["job_id"], job.get("tenant")
            self._patch(job_id, tenant, {"status": "RUNNING"})
            release = job.get("release") or {}
            prefix = prefix_for_release(
                release.get("checksum"), release.get("code"), release.get("version")
            )
            t0 = time.perf_counter()
            status, result = "SUCCEEDED", None
            try:
                result = self.serve.infer(
                    prefix,
                    job.get("json"),
                    model=job["model"],
                    token=job["token"],
                    tenant=tenant,
                    method=job.get("method", "post"),
                )
            except ServeClientError as e:  # 4xx: no retry, as the bridge
                status, result = "FAILED", {"error": str(e)[:500]}
            inferred = time.perf_counter() - t0
            now = time.time()
            metrics: dict[str, Any] = {
                "attempts": 1,
                "inference_s": round(inferred, 6),
                "started_at": started,
                "finished_at": now,
                "worker": "peer",
            }
            if job.get("submitted_at") is not None:
                metrics["submitted_at"] = job["submitted_at"]
                metrics["queue_wait_s"] = round(max(0.0, started - job["submitted_at"]), 6)
                metrics["total_s"] = round(max(0.0, now - job["submitted_at"]), 6)
            self._patch(
                job_id, tenant, {"status": status, "result": result, "metrics_record": metrics}
            )
            return {"job_id": job_id, "status": status}

    return PeerConsumer.bind(backend_url, service_token)
