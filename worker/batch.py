"""Batch jobs: ``items`` run in chunks, in parallel, results kept in item order.

Each item is one request to the serve endpoint; Ray batches them on the replica.
Results are checkpointed in Redis per item, so a retry of the job (after a transient
failure) does not redo finished items. Progress (done/total) goes to the backend as
``progress_record``, at most every ``SYNAPSE_BRIDGE_PROGRESS_INTERVAL`` seconds.

Per-item failures (documented policy, ``SYNAPSE_BRIDGE_BATCH_ITEM_FAILURE``):
a client error (4xx) on an item puts ``{"error": {"code", "message"}}`` in its place.
With ``partial`` (default) the job SUCCEEDS unless every item failed; with ``fail``
any failed item fails the job. Either way the result is the full, ordered list.
Transient item errors are retried in place with backoff; past the bound the whole
job is retried (finished items kept), and past that it FAILS.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import structlog

from config import get_settings
from serve_runtime.client import default_client
from serve_runtime.errors import ServeError
from worker import metrics
from worker.redis_conn import get_redis
from worker.retry import RetryPolicy

if TYPE_CHECKING:
    from celery import Task

    from worker.message import JobMessage

log = structlog.get_logger("worker.batch")

CHECKPOINT_PREFIX = "synapse:batch:"
CHECKPOINT_TTL_S = 24 * 3600

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(
                max_workers=max(4, get_settings().batch_chunk_size * 2),
                thread_name_prefix="synapse-batch",
            )
        return _pool


class ItemTransientError(Exception):
    pass


def _run_item(msg: JobMessage, index: int, body: dict[str, Any], policy: RetryPolicy) -> Any:
    client = default_client()
    from worker.tasks import _is_transient  # one classification for jobs and items

    for tries in range(policy.max_retries + 1):
        try:
            return client.call_and_wait(
                msg.release.route_prefix,
                body,
                model=msg.model,
                token=msg.token.get_secret_value(),
                tenant=msg.tenant,
                method=msg.method,
                wait_s=get_settings().deferred_max_wait_s,
            )
        except ServeError as e:
            if not _is_transient(e):
                metrics.BATCH_ITEMS.labels(outcome="failed").inc()
                return {
                    "error": {"code": e.code or f"http_{e.status_code}", "message": str(e)[:500]}
                }
            if tries >= policy.max_retries:
                raise ItemTransientError(f"item {index}: {type(e).__name__}: {e}") from None
            time.sleep(policy.delay(tries))
    raise AssertionError("unreachable")


def _is_item_error(result: Any) -> bool:
    return (
        isinstance(result, dict) and set(result) == {"error"} and isinstance(result["error"], dict)
    )


def run_batch(task: Task, msg: JobMessage, *, started: float, attempt: int) -> dict[str, Any]:
    from worker.tasks import _metrics_record, _retry_or_fail, finish, writeback

    settings = get_settings()
    items = msg.items or []
    total = len(items)
    r = get_redis()
    key = CHECKPOINT_PREFIX + msg.job_id
    done: dict[int, Any] = {int(k): json.loads(v) for k, v in r.hgetall(key).items()}
    policy = RetryPolicy.from_settings(settings)
    chunk = settings.batch_chunk_size
    last_progress = 0.0
    t0 = time.perf_counter()
    todo = [i for i in range(total) if i not in done]
    try:
        for start in range(0, len(todo), chunk):
            indexes = todo[start : start + chunk]
            futures = {i: _executor().submit(_run_item, msg, i, items[i], policy) for i in indexes}
            results = {i: f.result() for i, f in futures.items()}
            pipe = r.pipeline()
            for i, res in results.items():
                pipe.hset(key, str(i), json.dumps(res))
            pipe.expire(key, CHECKPOINT_TTL_S)
            pipe.execute()
            done.update(results)
            metrics.BATCH_ITEMS.labels(outcome="done").inc(len(results))
            now = time.monotonic()
            if now - last_progress >= settings.progress_interval_s and len(done) < total:
                last_progress = now
                writeback().update(
                    msg.job_id,
                    {"progress_record": {"done": len(done), "total": total}},
                    tenant=msg.tenant,
                )
    except ItemTransientError as e:
        from serve_runtime.errors import ServeTransientError

        return _retry_or_fail(task, msg, ServeTransientError(str(e)), started, attempt)
    ordered = [done[i] for i in range(total)]
    failed = sum(1 for res in ordered if _is_item_error(res))
    status = "SUCCEEDED"
    if failed and (settings.batch_item_failure == "fail" or failed == total):
        status = "FAILED"
    record = _metrics_record(
        msg, started, time.perf_counter() - t0, attempt, items_total=total, items_failed=failed
    )
    finish(
        msg,
        status,
        result=ordered,
        metrics_record=record,
        progress={"done": total, "total": total},
        error=f"{failed} of {total} items failed" if status == "FAILED" else None,
    )
    r.delete(key)
    return {"job_id": msg.job_id, "status": status}
