"""Batch jobs: ``items`` run in chunks, in parallel, results kept in item order.

Each item is one request to the serve endpoint; Ray batches them on the replica.
Results are checkpointed in Redis per item as each chunk ends, the items that
finished included when another item of the chunk failed, so a retry of the job does
not redo finished items. Progress (done/total) goes to the backend as
``progress_record``, at most every ``SYNAPSE_BRIDGE_PROGRESS_INTERVAL`` seconds. The
job's time limit is checked before each chunk and bounds every item's call and wait.

Per-item failures (documented policy, ``SYNAPSE_BRIDGE_BATCH_ITEM_FAILURE``):
a client error (4xx) on an item puts ``{"error": {"code", "message"}}`` in its place.
With ``partial`` (default) the job SUCCEEDS unless every item failed; with ``fail``
any failed item fails the job. Either way the result is the full, ordered list.
Transient item errors are retried in place with backoff; past the bound the whole
job is retried (finished items kept), and past that it FAILS.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import redis

from config import Settings
from config.errors import DeadlineExceeded
from serve_runtime.client import ServeClient
from serve_runtime.errors import ServeError
from worker import metrics
from worker.message import JobMessage
from worker.pipeline import Finished, Job, Outcome, TryAgain, error_text, time_limit_failure
from worker.retry import RetryPolicy
from worker.writeback import WriteBack

CHECKPOINT_PREFIX = "synapse:batch:"
CHECKPOINT_TTL_S = 24 * 3600


class ItemTransientError(Exception):
    """An item's transient errors outlasted the in-place retries."""


class BatchRunner:
    """Runs batch jobs with the parts they need."""

    def __init__(
        self,
        serve: ServeClient,
        r: redis.Redis,
        writeback: WriteBack,
        pool: ThreadPoolExecutor,
        policy: RetryPolicy,
        settings: Settings,
    ) -> None:
        self.serve = serve
        self.redis = r
        self.writeback = writeback
        self.pool = pool
        self.policy = policy
        self.settings = settings

    def execute(self, job: Job) -> Outcome:
        msg = job.msg
        items = msg.items or []
        total = len(items)
        key = CHECKPOINT_PREFIX + msg.job_id
        done: dict[int, Any] = {int(k): json.loads(v) for k, v in self.redis.hgetall(key).items()}
        todo = [i for i in range(total) if i not in done]
        chunk = self.settings.batch_chunk_size
        last_progress = 0.0
        t0 = time.perf_counter()
        for start in range(0, len(todo), chunk):
            if time.monotonic() >= job.deadline:
                return time_limit_failure(job, f" with {len(done)} of {total} items done")
            indexes = todo[start : start + chunk]
            futures = {
                i: self.pool.submit(self._run_item, msg, i, items[i], job.deadline) for i in indexes
            }
            results: dict[int, Any] = {}
            problem: BaseException | None = None
            for i, future in futures.items():
                try:
                    results[i] = future.result()
                except Exception as e:  # keep the others: what finished is saved
                    problem = problem or e
            self._save(key, results)
            done.update(results)
            metrics.BATCH_ITEMS.labels(outcome="done").inc(len(results))
            if isinstance(problem, DeadlineExceeded):
                return time_limit_failure(job, f" with {len(done)} of {total} items done")
            if problem is not None:
                return TryAgain(error_text(problem))
            now = time.monotonic()
            if now - last_progress >= self.settings.progress_interval_s and len(done) < total:
                last_progress = now
                self.writeback.update(
                    msg.job_id,
                    {"progress_record": {"done": len(done), "total": total}},
                    tenant=msg.tenant,
                )
        ordered = [done[i] for i in range(total)]
        failed = sum(1 for res in ordered if _is_item_error(res))
        status: Any = "SUCCEEDED"
        if failed and (self.settings.batch_item_failure == "fail" or failed == total):
            status = "FAILED"
        return Finished(
            status,
            result=ordered,
            error=f"{failed} of {total} items failed" if status == "FAILED" else None,
            inference_s=time.perf_counter() - t0,
            metrics={"items_total": total, "items_failed": failed},
            progress={"done": total, "total": total},
        )

    def _save(self, key: str, results: dict[int, Any]) -> None:
        if not results:
            return
        pipe = self.redis.pipeline()
        for i, res in results.items():
            pipe.hset(key, str(i), json.dumps(res))
        pipe.expire(key, CHECKPOINT_TTL_S)
        pipe.execute()

    def _run_item(self, msg: JobMessage, index: int, body: dict[str, Any], deadline: float) -> Any:
        for tries in range(self.policy.max_retries + 1):
            try:
                return self.serve.call_and_wait(
                    msg.release.route_prefix,
                    body,
                    model=msg.model,
                    token=msg.token.get_secret_value(),
                    tenant=msg.tenant,
                    method=msg.method,
                    wait_s=self.settings.deferred_max_wait_s,
                    deadline=deadline,
                )
            except ServeError as e:
                if not e.transient:
                    metrics.BATCH_ITEMS.labels(outcome="failed").inc()
                    code = e.code or f"http_{e.status_code}"
                    return {"error": {"code": code, "message": str(e)[:500]}}
                if tries >= self.policy.max_retries:
                    raise ItemTransientError(f"item {index}: {error_text(e)}") from None
                pause = self.policy.delay(tries)
                if time.monotonic() + pause >= deadline:
                    raise DeadlineExceeded(f"item {index}: no time left to retry") from None
                time.sleep(pause)
        raise AssertionError("unreachable")


def forget_checkpoint(r: redis.Redis, job_id: str) -> None:
    """Drop a batch's checkpoint once its final write is recorded."""
    r.delete(CHECKPOINT_PREFIX + job_id)


def _is_item_error(result: Any) -> bool:
    return (
        isinstance(result, dict) and set(result) == {"error"} and isinstance(result["error"], dict)
    )
