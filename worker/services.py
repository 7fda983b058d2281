"""Everything a worker process talks to, built once from ``Settings``.

One object instead of a lazy global per client: tasks, steps and housekeeping take
what they need from it, and tests reset the whole process state with one call
(``reset_services``). Building it opens no connection; clients connect on first use.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import redis

from config import Settings, get_settings
from serve_runtime.client import ServeClient
from worker.admission import ModelAdmission
from worker.backend_api import BackendAPI
from worker.coalesce import Coalescer
from worker.ledger import Ledger
from worker.redis_conn import connect_redis
from worker.retry import RetryPolicy
from worker.running_mark import RunningMarks
from worker.script_batch import ScriptBatch
from worker.writeback import WriteBack


@dataclass
class Services:
    settings: Settings
    redis: redis.Redis
    scripts: ScriptBatch  # the per-job Redis scripts of all task threads, pipelined
    backend: BackendAPI
    serve: ServeClient
    coalescer: Coalescer
    writeback: WriteBack
    ledger: Ledger
    marks: RunningMarks
    retry: RetryPolicy
    admission: ModelAdmission | None
    batch_pool: ThreadPoolExecutor

    @classmethod
    def build(cls, settings: Settings | None = None) -> Services:
        s = settings or get_settings()
        # a connection per task thread, and some for the flusher, marks and batches
        r = connect_redis(s.redis, max_connections=s.worker_concurrency + 16)
        backend = BackendAPI(s)
        admission = None
        if s.active_models > 0:
            admission = ModelAdmission(
                r,
                s.active_models,
                lease_s=s.task_time_limit_s,
                idle_s=s.model_idle_s,
                max_wait_s=s.model_max_wait_s,
            )
        serve = ServeClient(s)
        scripts = ScriptBatch(r)
        return cls(
            settings=s,
            redis=r,
            scripts=scripts,
            backend=backend,
            serve=serve,
            coalescer=Coalescer(
                serve,
                max_items=s.coalesce_max_items,
                wait_s=s.coalesce_wait_s,
                max_calls=s.coalesce_calls,
            ),
            writeback=WriteBack(backend, r, s, scripts=scripts),
            ledger=Ledger(r, grace_s=float(s.visibility_timeout_s), scripts=scripts),
            marks=RunningMarks(s.running_mark_after_s),
            retry=RetryPolicy.from_settings(s),
            admission=admission,
            batch_pool=ThreadPoolExecutor(
                max_workers=max(4, s.batch_chunk_size * 2), thread_name_prefix="synapse-batch"
            ),
        )

    def close(self) -> None:
        self.batch_pool.shutdown(wait=False, cancel_futures=True)
        self.serve.close()
        self.backend.close()
        self.redis.close()


_current: Services | None = None
_producer_ledger: Ledger | None = None
_lock = threading.Lock()


def services() -> Services:
    """This process's services, built on first use from the process's settings."""
    global _current
    with _lock:
        if _current is None:
            _current = Services.build()
        return _current


def producer_ledger() -> Ledger:
    """The ledger ``worker.submit`` records jobs in: the worker's own when its services
    are built in this process, else one on a Redis connection of its own, built on first
    use. A producer calls neither the backend nor Serve: it needs no backend URL, builds
    no HTTP clients and starts no threads."""
    global _producer_ledger
    with _lock:
        if _current is not None:
            return _current.ledger
        if _producer_ledger is None:
            s = get_settings()
            _producer_ledger = Ledger(connect_redis(s.redis), grace_s=float(s.visibility_timeout_s))
        return _producer_ledger


def reset_services() -> None:
    """Close and forget the services and the cached settings (tests, reconfiguration)."""
    global _current, _producer_ledger
    with _lock:
        if _current is not None:
            _current.close()
        if _producer_ledger is not None:
            _producer_ledger.redis.close()
        _current = _producer_ledger = None
    get_settings.cache_clear()
