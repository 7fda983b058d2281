"""Coalescing: the queued single jobs of one model go to Serve as one call.

Every job is still its own Celery task with its own steps, settle, retries and ack
(``worker.tasks``); only its serve call is shared. A task thread that reaches its
call joins the open group of its *lane* (route, tenant, model) and waits for its own
item's answer:

* the first job of a group leads it: while its lane has fewer than
  ``SYNAPSE_BRIDGE_COALESCE_CALLS`` calls in flight it sends the group at once (a lone
  job at idle waits for nothing); otherwise the group takes company until a call of
  the lane is answered, until it holds ``SYNAPSE_BRIDGE_COALESCE_MAX_ITEMS`` items, or
  for at most ``SYNAPSE_BRIDGE_COALESCE_WAIT``, then goes. Under load a lane keeps a
  few large calls in flight, not many small ones: each waiting job costs at most one
  call's time, as a device batch does;
* a group of one is sent as today's single body; larger ones as one coalesced call
  (``serve_runtime.coalesced``);
* an endpoint that refuses a coalesced call as a whole with a 4xx other than
  ``invalid_items`` (a runtime from before coalescing: its endpoint gets a list) gets
  single calls from each job, for a minute, then a coalesced call again;
* each item's answer is its own: one item's error (bad input, say) fails only its
  job; a call that fails as a whole gives each job that error, classified as usual
  (transient: each job retries on its own).

Jobs of many callers share a call: each item carries its own caller's model token and
is authorized as that caller on the replica, as a single call would be.
A group's call lasts until its latest job's deadline; a job whose own deadline comes
first stops waiting then (its time limit), except the leader, who sends the call and
waits for it.

Nothing is kept across calls, so a worker killed mid-group loses nothing: each job's
message is unacked and delivered again.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

import structlog

from config.errors import DeadlineExceeded
from serve_runtime.client import ServeClient
from serve_runtime.coalesced import INVALID_ITEMS
from serve_runtime.errors import ServeClientError, ServeConnectionError, ServeError
from worker import metrics

log = structlog.get_logger("worker.coalesce")

# An answer meaning "send your own call": the endpoint does not take coalesced calls.
ALONE = object()
# How long a route that refused a coalesced call gets single calls before a new try.
SINGLES_RECHECK_S = 60.0


@dataclass(frozen=True)
class Lane:
    """Jobs that may share a call: one route (deployment and release), one model."""

    route_prefix: str
    tenant: str | None
    model: int | str


@dataclass
class _Item:
    body: Any
    token: str  # its caller's: each item is authorized as its own caller
    deadline: float | None
    answer: Future[Any] = field(default_factory=Future)


@dataclass
class _Group:
    items: list[_Item] = field(default_factory=list)
    closed: threading.Event = field(default_factory=threading.Event)


@dataclass
class _LaneState:
    open: _Group | None = None
    in_flight: int = 0  # groups closed and not yet answered


class Coalescer:
    """Shares serve calls between the task threads of one worker process."""

    def __init__(
        self, serve: ServeClient, *, max_items: int, wait_s: float, max_calls: int = 1
    ) -> None:
        self.serve = serve
        self.max_items = max_items
        self.wait_s = wait_s
        self.max_calls = max_calls
        self._lanes: dict[Lane, _LaneState] = {}
        self._lock = threading.Lock()
        self._singles_until: dict[str, float] = {}  # routes that refused a coalesced call

    def infer(
        self,
        route_prefix: str,
        body: Any,
        *,
        model: int | str,
        token: str,
        tenant: str | None,
        deadline: float | None = None,
    ) -> Any:
        """As ``ServeClient.infer`` (a POST): the result or ``Pending``; raises a
        ``ServeError`` or ``DeadlineExceeded``."""
        lane = Lane(route_prefix, tenant, model)
        item = _Item(body, token, deadline)
        if self.max_items <= 1:
            return self._alone(lane, item)
        with self._lock:
            state = self._lanes.setdefault(lane, _LaneState())
            group = state.open
            leader = group is None
            if group is None:
                group = state.open = _Group()
            group.items.append(item)
            if len(group.items) >= self.max_items or (leader and state.in_flight < self.max_calls):
                self._close(state, group)
        if leader:
            self._lead(lane, group)
        return self._answer(lane, item)

    def _close(self, state: _LaneState, group: _Group) -> None:
        """No job joins ``group`` any more; it counts as in flight from here (the lock
        is held), so a job arriving now waits for company instead of going alone."""
        if group.closed.is_set():
            return
        if state.open is group:
            state.open = None
        group.closed.set()
        state.in_flight += 1

    def _lead(self, lane: Lane, group: _Group) -> None:
        """Wait for company while the lane is busy, then send the group."""
        group.closed.wait(self.wait_s)
        with self._lock:
            state = self._lanes[lane]
            self._close(state, group)
        try:
            self._send(lane, group)
        finally:
            with self._lock:
                state.in_flight -= 1
                if state.open is not None and state.in_flight < self.max_calls:
                    self._close(state, state.open)  # a call slot is free: the group goes now
                elif state.in_flight == 0 and state.open is None:
                    del self._lanes[lane]
            for item in group.items:  # whatever happened, no job waits for ever
                if not item.answer.done():
                    item.answer.set_exception(
                        ServeConnectionError(
                            f"{lane.route_prefix}: coalesced call ended unanswered"
                        )
                    )

    def _send(self, lane: Lane, group: _Group) -> None:
        items = group.items
        metrics.COALESCED_ITEMS.observe(len(items))
        deadlines = [i.deadline for i in items]
        deadline = None if None in deadlines else max(d for d in deadlines if d is not None)
        kw: dict[str, Any] = {"model": lane.model, "tenant": lane.tenant, "deadline": deadline}
        try:
            if len(items) == 1:
                answers: list[Any] = [self._alone(lane, items[0])]
            elif self._single_only(lane.route_prefix):
                answers = [ALONE] * len(items)  # each job's thread sends its own call
            else:
                answers = self.serve.infer_many(
                    lane.route_prefix,
                    [i.body for i in items],
                    tokens=[i.token for i in items],
                    **kw,
                )
        except ServeClientError as e:
            if len(items) == 1 or e.code == INVALID_ITEMS:
                answers = [e] * len(items)
            else:  # an endpoint that predates coalesced calls: each job calls alone
                self._singles_until[lane.route_prefix] = time.monotonic() + SINGLES_RECHECK_S
                log.warning(
                    "the endpoint refused a coalesced call; its jobs go alone",
                    route_prefix=lane.route_prefix,
                    status=e.status_code,
                    recheck_s=SINGLES_RECHECK_S,
                )
                answers = [ALONE] * len(items)
        except (ServeError, DeadlineExceeded) as e:
            answers = [e] * len(items)
        for item, answer in zip(items, answers, strict=True):
            if isinstance(answer, BaseException):
                item.answer.set_exception(answer)
            else:
                item.answer.set_result(answer)

    def _single_only(self, route_prefix: str) -> bool:
        until = self._singles_until.get(route_prefix)
        if until is None:
            return False
        if time.monotonic() < until:
            return True
        self._singles_until.pop(route_prefix, None)  # try a coalesced call again
        return False

    def _answer(self, lane: Lane, item: _Item) -> Any:
        timeout = None if item.deadline is None else max(0.0, item.deadline - time.monotonic())
        try:
            answer = item.answer.result(timeout=timeout)
        except FutureTimeout:
            raise DeadlineExceeded(
                "no answer to the coalesced call before the time limit"
            ) from None
        return self._alone(lane, item) if answer is ALONE else answer

    def _alone(self, lane: Lane, item: _Item) -> Any:
        """``item`` in a call of its own, from its job's thread."""
        return self.serve.infer(
            lane.route_prefix,
            item.body,
            model=lane.model,
            token=item.token,
            tenant=lane.tenant,
            deadline=item.deadline,
        )


__all__ = ["Coalescer", "Lane"]
