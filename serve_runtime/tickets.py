"""Deferred tickets answerable on every replica: one small store per application.

``deploy()`` binds a ``TicketStore`` deployment (one replica) into the application and
hands its handle to every ingress replica (Serve's model composition). The replica
that runs deferred work (the owner) registers each ticket with the caller it is bound
to, keeps its pending tickets alive with one heartbeat for all of them, and stores the
answer when the work ends. A poll that lands on another replica asks the store.

* A pending ticket lives while its owner's heartbeats arrive: ``lease_s`` after the
  last one it answers ``not_found``, so a ticket whose owner died is not pending for
  ever. A heartbeat for a ticket the store does not know registers it again (the
  store replica restarted, or a heartbeat came late).
* An answer is kept ``keep_s`` (``SYNAPSE_BRIDGE_DEFERRED_KEEP``) from when it was
  stored, i.e. from completion, not from when the ticket was made.
* Memory is bounded: at most ``max_tickets`` tickets and ``max_bytes`` of results,
  the oldest finished dropped first (then the oldest pending); a result over
  ``max_result_bytes`` is stored as a failure saying so.
* A ticket is bound to its caller (tenant, model, sha256 of the user token): a
  lookup by anyone else answers ``not_found``, as for a ticket that never existed.

Results travel and are kept pickled (Ray pickles them anyway): a store replica
holds bytes it can count. The store is the application's own deployment, inside
the cluster's trust boundary.

The store's methods are plain and guarded by one lock: Serve runs a deployment's
sync methods in a thread pool, and the replica uses the same class in-process for
its own table.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import structlog

from config import get_settings

log = structlog.get_logger("serve_runtime.tickets")

LEASE_S = 30.0  # a pending ticket with no heartbeat for this long is gone
HEARTBEAT_S = LEASE_S / 5  # how often an owner renews its pending tickets
CALL_TIMEOUT_S = 10.0  # one call from a replica to the store
MAX_TICKETS = 10_000
MAX_RESULT_BYTES = 32 * 1024**2
MAX_BYTES = 512 * 1024**2

Status = Literal["pending", "done", "failed", "not_found"]


@dataclass(frozen=True)
class Caller:
    """Whom a ticket answers: the tenant, model and a sha256 of the user token."""

    tenant: str | None
    model: str
    token_sha256: str

    @classmethod
    def of(cls, tenant: str | None, model: str | int, token: str) -> Caller:
        return cls(tenant or None, str(model), hashlib.sha256(token.encode()).hexdigest())


@dataclass(frozen=True)
class Answer:
    """What a ticket says now: ``payload`` (pickled result) when done, ``error`` when failed."""

    status: Status
    payload: bytes | None = None
    error: str | None = None

    @property
    def size(self) -> int:
        return len(self.payload or b"") + len(self.error or "")


PENDING = Answer("pending")
NOT_FOUND = Answer("not_found")


@dataclass
class _Record:
    owner: str
    caller: Caller
    answer: Answer
    expires: float | None  # pending: the lease's end (None: no lease); finished: keep's end


class TicketStore:
    """Tickets, bound to their callers; pending ones on a lease, answers for ``keep_s``."""

    def __init__(
        self,
        keep_s: float | None = None,
        *,
        lease_s: float | None = LEASE_S,
        max_tickets: int = MAX_TICKETS,
        max_result_bytes: int = MAX_RESULT_BYTES,
        max_bytes: int = MAX_BYTES,
    ) -> None:
        self.keep_s = keep_s if keep_s is not None else get_settings().deferred_keep_s
        self.lease_s = lease_s
        self.max_tickets = max_tickets
        self.max_result_bytes = max_result_bytes
        self.max_bytes = max_bytes
        self._pending: OrderedDict[str, _Record] = OrderedDict()
        self._finished: OrderedDict[str, _Record] = OrderedDict()  # in order of completion
        self._bytes = 0
        self._dropped = 0
        self._lock = threading.Lock()
        self._swept = time.monotonic()

    # -- the owner's calls

    def register(self, ticket: str, owner: str, caller: Caller) -> None:
        """A new pending ticket, alive for one lease."""
        with self._lock:
            self._put_pending(ticket, owner, caller, time.monotonic())
            self._bound()

    def heartbeat(self, owner: str, pending: Mapping[str, Caller]) -> None:
        """Renew ``owner``'s pending tickets; register again any the store lost."""
        with self._lock:
            now = time.monotonic()
            for ticket, caller in pending.items():
                if ticket in self._finished:
                    continue
                record = self._pending.get(ticket)
                if record is None or record.owner == owner:
                    self._put_pending(ticket, owner, caller, now)
            self._sweep(now)
            self._bound()

    def finish(self, ticket: str, owner: str, caller: Caller, answer: Answer) -> None:
        """Store the answer of finished work; kept ``keep_s`` from now."""
        if answer.status == "done" and answer.size > self.max_result_bytes:
            answer = Answer(
                "failed",
                error=f"the result is {answer.size} bytes, over the {self.max_result_bytes} "
                "bytes a deferred result may keep",
            )
        with self._lock:
            now = time.monotonic()
            self._pending.pop(ticket, None)
            self._drop_finished(ticket)
            self._finished[ticket] = _Record(owner, caller, answer, now + self.keep_s)
            self._bytes += answer.size
            self._sweep(now)
            self._bound()

    # -- anyone's

    def lookup(self, ticket: str, caller: Caller) -> Answer:
        """The ticket's answer for ``caller``; ``not_found`` for anyone else."""
        with self._lock:
            now = time.monotonic()
            record = self._finished.get(ticket)
            if record is not None and record.expires is not None and record.expires <= now:
                self._drop_finished(ticket)
                record = None
            if record is None:
                record = self._pending.get(ticket)
                if record is not None and record.expires is not None and record.expires <= now:
                    del self._pending[ticket]  # its owner stopped renewing it: died
                    record = None
            if record is None or record.caller != caller:
                return NOT_FOUND
            return record.answer

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "pending": len(self._pending),
                "finished": len(self._finished),
                "bytes": self._bytes,
                "dropped": self._dropped,
            }

    # -- internals (under the lock)

    def _put_pending(self, ticket: str, owner: str, caller: Caller, now: float) -> None:
        expires = None if self.lease_s is None else now + self.lease_s
        self._pending[ticket] = _Record(owner, caller, PENDING, expires)

    def _drop_finished(self, ticket: str) -> None:
        record = self._finished.pop(ticket, None)
        if record is not None:
            self._bytes -= record.answer.size

    def _sweep(self, now: float) -> None:
        """Expired answers (oldest first: kept equally long), and, once a second, leases."""
        while self._finished:
            ticket, record = next(iter(self._finished.items()))
            if record.expires is None or record.expires > now:
                break
            self._drop_finished(ticket)
        if self.lease_s is None or now - self._swept < 1.0:
            return
        self._swept = now
        for ticket in [t for t, r in self._pending.items() if r.expires and r.expires <= now]:
            del self._pending[ticket]

    def _bound(self) -> None:
        """Within ``max_tickets`` and ``max_bytes``: the oldest finished go first."""
        while self._finished and (
            len(self._pending) + len(self._finished) > self.max_tickets
            or self._bytes > self.max_bytes
        ):
            self._drop_finished(next(iter(self._finished)))
            self._dropped += 1
        while len(self._pending) > self.max_tickets:
            self._pending.popitem(last=False)
            self._dropped += 1


class SharedTickets:
    """Calls to the application's store: its Serve handle, or a ``TicketStore`` in-process.

    Every call is bounded by ``timeout_s``; errors reach the caller, who decides.
    """

    def __init__(self, target: Any, timeout_s: float = CALL_TIMEOUT_S) -> None:
        self.target = target
        self.timeout_s = timeout_s

    async def call(self, method: str, *args: Any) -> Any:
        if isinstance(self.target, TicketStore):
            return getattr(self.target, method)(*args)
        response = getattr(self.target, method).remote(*args)  # a DeploymentResponse
        return await asyncio.wait_for(_awaited(response), self.timeout_s)


async def _awaited(response: Any) -> Any:
    return await response


__all__ = ["Answer", "Caller", "SharedTickets", "TicketStore"]
