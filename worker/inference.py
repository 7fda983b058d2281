"""Executing a single job: one serve call, or one poll of a deferred one.

Each returns an outcome (``worker.pipeline``); the serve client's errors are
classified here once: a client error fails the job, a transient one is tried again,
the job's time limit fails it.
"""

from __future__ import annotations

import time
from typing import Any

import structlog

from config import Settings
from config.errors import DeadlineExceeded
from serve_runtime.client import ServeClient
from serve_runtime.deferred import Pending
from serve_runtime.errors import DeferredNotFound, ServeError
from worker import metrics
from worker.coalesce import Coalescer
from worker.pipeline import (
    Deferred,
    Job,
    Outcome,
    PollState,
    Requeued,
    TryAgain,
    error_text,
    failed,
    succeeded,
    time_limit_failure,
)
from worker.retry import RetryPolicy

log = structlog.get_logger("worker.inference")

# A poll that meets a transient error costs a tenth of a retry: polls are cheap and
# frequent, so the job fails after ``retry_max * POLL_ERRORS_PER_RETRY`` failed polls.
# Errors are counted, not polls: a long deferred job may poll thousands of times.
POLL_ERRORS_PER_RETRY = 10


def poll_errors_exhausted(errors: int, policy: RetryPolicy) -> bool:
    """The job has met as many failed polls as its retry bound allows."""
    return errors >= policy.max_retries * POLL_ERRORS_PER_RETRY


def ticket_lost(job: Job, bound: int, waited: float) -> Outcome:
    """The replica no longer knows the job's ticket: submit it again, up to ``bound``
    times, then fail it rather than compute it again without end."""
    done = job.msg.resubmits or 0
    if done >= bound:
        metrics.DEFERRED_LOST.labels(action="failed").inc()
        log.warning("deferred ticket lost; resubmission bound reached", resubmits=done, bound=bound)
        return failed(
            f"deferred result lost {done + 1} times (its replica restarted, or the result "
            "expired before it was polled); not computed again after "
            f"SYNAPSE_BRIDGE_DEFERRED_RESUBMITS={bound} resubmissions",
            inference_s=waited,
        )
    job.msg = job.msg.model_copy(update={"resubmits": done + 1})  # travels with the message
    metrics.DEFERRED_LOST.labels(action="resubmitted").inc()
    log.warning("deferred ticket lost; submitting the job again", resubmit=done + 1, bound=bound)
    return Requeued("deferred ticket lost; submitting the job again", resubmit=True)


def execute_single(serve: ServeClient, coalescer: Coalescer, job: Job) -> Outcome:
    """One job's call: shared with the lane's other queued jobs (``worker.coalesce``)
    when it is a POST, the only method a coalesced call carries."""
    msg = job.msg
    t0 = time.perf_counter()
    call: dict[str, Any] = {
        "model": msg.model,
        "token": msg.token.get_secret_value(),
        "tenant": msg.tenant,
        "deadline": job.deadline,
    }
    try:
        if msg.method == "post":
            out = coalescer.infer(msg.release.route_prefix, msg.body, **call)
        else:
            out = serve.infer(msg.release.route_prefix, msg.body, method=msg.method, **call)
    except DeadlineExceeded:
        return time_limit_failure(job)
    except ServeError as e:
        return TryAgain(error_text(e)) if e.transient else failed(error_text(e))
    inferred = time.perf_counter() - t0
    metrics.INFERENCE_LATENCY.observe(inferred)
    if isinstance(out, Pending):
        return Deferred(PollState(ticket=out.ticket, first_pending_at=time.time()))
    return succeeded(out, inference_s=inferred)


def execute_poll(serve: ServeClient, settings: Settings, policy: RetryPolicy, job: Job) -> Outcome:
    msg, state = job.msg, job.poll
    assert state is not None, "a poll job carries its poll state"
    waited = time.time() - state.first_pending_at
    if waited > settings.deferred_max_wait_s:
        return failed(f"deferred result not ready within {settings.deferred_max_wait_s:.0f}s")
    polls = state.polls + 1
    try:
        out = serve.poll(
            msg.release.route_prefix,
            state.ticket,
            model=msg.model,
            token=msg.token.get_secret_value(),
            tenant=msg.tenant,
            deadline=job.deadline,
        )
    except DeferredNotFound:
        return ticket_lost(job, settings.deferred_resubmits, waited)
    except DeadlineExceeded:
        return time_limit_failure(job)
    except ServeError as e:
        errors = state.errors + 1
        if not e.transient or poll_errors_exhausted(errors, policy):
            return failed(error_text(e), inference_s=waited)
        backoff = policy.delay(min(errors, 6))
        return Deferred(
            PollState(state.ticket, state.first_pending_at, polls=polls, errors=errors),
            countdown=backoff,
        )
    if isinstance(out, Pending):
        return Deferred(PollState(state.ticket, state.first_pending_at, polls, state.errors))
    return succeeded(out, inference_s=waited, metrics={"polls": polls, "deferred": True})
