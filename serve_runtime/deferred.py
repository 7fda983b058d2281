"""The deferred protocol: answer within a deadline, else a ticket to poll.

Wire format (serve-api.md): a pending answer is
``{"__synapse_deferred__": true, "status": "pending", "ticket": "<id>"}``; the caller
polls with ``{"__synapse_poll__": "<ticket>"}`` on the same route and gets the bare
result when ready, or an envelope whose status is ``pending``, ``failed`` (with
``error``) or ``not_found``.

Tickets live in the replica that ran the work; a poll that lands elsewhere (or after
a restart) answers ``not_found`` and the caller submits again.
"""

from __future__ import annotations

import asyncio
import functools
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

DEFERRED_KEY = "__synapse_deferred__"
POLL_KEY = "__synapse_poll__"


@dataclass(frozen=True)
class Pending:
    """A result not ready yet: poll with ``ticket``."""

    ticket: str


def envelope(status: str, ticket: str, error: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {DEFERRED_KEY: True, "status": status, "ticket": ticket}
    if error is not None:
        out["error"] = error
    return out


def is_envelope(body: Any) -> bool:
    return isinstance(body, Mapping) and body.get(DEFERRED_KEY) is True


def poll_ticket(body: Any) -> str | None:
    """The ticket when ``body`` is a poll request, else None."""
    if isinstance(body, Mapping) and len(body) == 1 and POLL_KEY in body:
        ticket = body[POLL_KEY]
        return ticket if isinstance(ticket, str) else ""
    return None


class DeferredResults:
    """Per-replica table of tickets; finished results are kept ``keep_s`` for re-polls."""

    def __init__(self, deadline_s: float | None, keep_s: float = 600.0, max_tickets: int = 10_000):
        self.deadline_s = deadline_s
        self.keep_s = keep_s
        self.max_tickets = max_tickets
        self._tasks: OrderedDict[str, tuple[asyncio.Task[Any], float]] = OrderedDict()

    async def run(self, work: Awaitable[Any]) -> Any:
        """Await ``work`` up to the deadline; past it, return a pending envelope."""
        if self.deadline_s is None:
            return await work
        task = asyncio.ensure_future(work)
        done, _ = await asyncio.wait({task}, timeout=self.deadline_s)
        if done:
            return task.result()
        self._expire()
        ticket = uuid.uuid4().hex
        self._tasks[ticket] = (task, time.monotonic())
        return envelope("pending", ticket)

    def poll(self, ticket: str) -> Any:
        self._expire()
        entry = self._tasks.get(ticket)
        if entry is None:
            return envelope("not_found", ticket)
        task, _ = entry
        if not task.done():
            return envelope("pending", ticket)
        if task.cancelled():
            return envelope("failed", ticket, "cancelled")
        exc = task.exception()
        if exc is not None:
            return envelope("failed", ticket, f"{type(exc).__name__}: {exc}")
        return task.result()

    def _expire(self) -> None:
        now = time.monotonic()
        for ticket, (task, started) in list(self._tasks.items()):
            over = len(self._tasks) > self.max_tickets
            if over or (task.done() and now - started > self.keep_s):
                if not task.done():
                    task.cancel()
                del self._tasks[ticket]


def deferrable(
    method: Callable[..., Awaitable[Any]],
) -> Callable[..., Awaitable[Any]]:
    """Decorate an endpoint method: poll requests answered, slow work deferred.

    The first dict argument is taken as the request body. The deployment's
    ``_deferred`` table (set up by BaseServeDeployment) holds the tickets.
    """

    @functools.wraps(method)
    async def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        table: DeferredResults = self._deferred
        body = next((a for a in (*args, *kwargs.values()) if isinstance(a, Mapping)), None)
        ticket = poll_ticket(body)
        if ticket is not None:
            return table.poll(ticket)
        return await table.run(method(self, *args, **kwargs))

    return wrapper
