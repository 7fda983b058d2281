"""The deferred protocol: answer within a deadline, else a ticket to poll.

Wire format (serve-api.md): a pending answer is
``{"__synapse_deferred__": true, "status": "pending", "ticket": "<id>"}``; the caller
polls with ``{"__synapse_poll__": "<ticket>"}`` on the same route and gets the bare
result when ready, or an envelope whose status is ``pending``, ``failed`` (with
``error``) or ``not_found``.

A ticket is answerable on every replica: the replica that runs the work keeps it in
its own table (a poll that lands there needs no other hop) and in the application's
``TicketStore`` (``serve_runtime.tickets``), which every other replica asks. It is
bound to the caller who made it, and polls are authorized like inference (the
deployment's ``_ticket_caller``). An answer is kept ``keep_s`` from completion.
"""

from __future__ import annotations

import asyncio
import functools
import os
import pickle
import socket
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import structlog

from config import redact_text
from serve_runtime.tickets import (
    HEARTBEAT_S,
    MAX_TICKETS,
    Answer,
    Caller,
    SharedTickets,
    TicketStore,
)

log = structlog.get_logger("serve_runtime.deferred")

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


def answer_of(task: asyncio.Task[Any]) -> Answer:
    """A finished task as a ticket's answer: the result pickled, or the error's text."""
    if task.cancelled():
        return Answer("failed", error="cancelled")
    exc = task.exception()
    if exc is not None:
        return Answer("failed", error=redact_text(f"{type(exc).__name__}: {exc}")[:2000])
    try:
        return Answer("done", payload=pickle.dumps(task.result(), pickle.HIGHEST_PROTOCOL))
    except Exception as e:
        return Answer("failed", error=f"the result cannot be kept for polling: {type(e).__name__}")


def reply(ticket: str, answer: Answer) -> Any:
    """What a poll returns for ``answer``: the bare result, or an envelope."""
    if answer.status == "done":
        return pickle.loads(answer.payload or b"")  # from this replica or the app's store
    return envelope(answer.status, ticket, answer.error)


class DeferredResults:
    """One replica's deferred work: its own table, and the app's shared store when bound.

    ``shared`` is the ``TicketStore`` deployment's handle (or a ``TicketStore``); None
    outside Serve, where the table alone answers.
    """

    def __init__(
        self,
        deadline_s: float | None,
        keep_s: float = 600.0,
        max_tickets: int = MAX_TICKETS,
        *,
        shared: Any = None,
        heartbeat_s: float = HEARTBEAT_S,
    ) -> None:
        self.deadline_s = deadline_s
        self.keep_s = keep_s
        self.max_tickets = max_tickets
        self.heartbeat_s = heartbeat_s
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._local = TicketStore(keep_s, lease_s=None, max_tickets=max_tickets)
        self._shared = SharedTickets(shared) if shared is not None else None
        self._running: dict[str, tuple[asyncio.Task[Any], Caller]] = {}
        self._unsynced: dict[str, tuple[Caller, Answer]] = {}  # answers the store lacks
        self._background: set[asyncio.Task[Any]] = set()
        self._beat: asyncio.Task[None] | None = None
        self.stats = {"deferred": 0, "polls_here": 0, "polls_shared": 0, "store_errors": 0}

    async def run(self, work: Awaitable[Any], caller: Callable[[], Awaitable[Caller]]) -> Any:
        """Await ``work`` up to the deadline; past it, return a pending envelope.

        ``caller`` names whom the ticket answers (authorizing them); it is asked only
        when the work is deferred, and an error there cancels the work.
        """
        if self.deadline_s is None:
            return await work
        task = asyncio.ensure_future(work)
        done, _ = await asyncio.wait({task}, timeout=self.deadline_s)
        if done:
            return task.result()
        try:
            who = await caller()
        except BaseException:
            task.cancel()
            raise
        ticket = uuid.uuid4().hex
        self._local.register(ticket, self.owner, who)
        self._running[ticket] = (task, who)
        task.add_done_callback(functools.partial(self._finished, ticket))
        self._bound_running()
        self.stats["deferred"] += 1
        if self._shared is not None:  # before the ticket is out: any replica knows it
            try:
                await self._store("register", ticket, self.owner, who)  # or the heartbeat will
            except BaseException:  # the request was cancelled: nobody has the ticket
                task.cancel()
                raise
            self._start_heartbeat()
        return envelope("pending", ticket)

    async def poll(self, ticket: str, caller: Caller) -> Any:
        """The result or an envelope; this replica's table first, then the app's store.

        When the store cannot be reached the answer is ``pending``: nothing is known,
        and the caller's own bound on waiting ends it.
        """
        answer = self._local.lookup(ticket, caller)
        if answer.status != "not_found" or self._shared is None:
            self.stats["polls_here"] += 1
            return reply(ticket, answer)
        self.stats["polls_shared"] += 1
        found = await self._store("lookup", ticket, caller)
        return reply(ticket, found if isinstance(found, Answer) else Answer("pending"))

    async def close(self) -> None:
        """Stop the heartbeat (replica shutdown); pending tickets then lapse in the store."""
        for task in [self._beat, *self._background]:
            if task is not None:
                task.cancel()

    # -- internals

    def _bound_running(self) -> None:
        """At most ``max_tickets`` deferred tasks: the oldest are cancelled (answer failed)."""
        if len(self._running) <= self.max_tickets:
            return
        live = [task for task, _ in self._running.values() if not task.cancelling()]
        for task in live[: len(live) - self.max_tickets]:
            task.cancel()

    def _finished(self, ticket: str, task: asyncio.Task[Any]) -> None:
        entry = self._running.pop(ticket, None)
        if entry is None:
            return
        caller = entry[1]
        answer = answer_of(task)
        self._local.finish(ticket, self.owner, caller, answer)
        if self._shared is not None:
            self._unsynced[ticket] = (caller, answer)
            push = asyncio.ensure_future(self._push(ticket))
            self._background.add(push)
            push.add_done_callback(self._background.discard)

    async def _push(self, ticket: str) -> None:
        entry = self._unsynced.get(ticket)
        if entry is None:
            return
        caller, answer = entry
        if await self._store("finish", ticket, self.owner, caller, answer) is not _FAILED:
            self._unsynced.pop(ticket, None)

    def _start_heartbeat(self) -> None:
        if self._beat is None or self._beat.done():
            self._beat = asyncio.ensure_future(self._heartbeat())

    async def _heartbeat(self) -> None:
        """One call for all pending tickets, while any; answers the store missed, again."""
        while self._running or self._unsynced:
            await asyncio.sleep(self.heartbeat_s)
            pending = {ticket: caller for ticket, (_, caller) in self._running.items()}
            if pending:
                await self._store("heartbeat", self.owner, pending)
            for ticket in list(self._unsynced):
                await self._push(ticket)

    async def _store(self, method: str, *args: Any) -> Any:
        assert self._shared is not None
        try:
            return await self._shared.call(method, *args)
        except Exception as e:  # the store restarting or overloaded: the caller decides
            self.stats["store_errors"] += 1
            log.warning("ticket store call failed", method=method, error=type(e).__name__)
            return _FAILED


_FAILED = object()


def deferrable(
    method: Callable[..., Awaitable[Any]],
) -> Callable[..., Awaitable[Any]]:
    """Decorate an endpoint method: poll requests answered, slow work deferred.

    The first dict argument is taken as the request body. The deployment's
    ``_deferred`` table (set up by BaseServeDeployment) holds the tickets, and its
    ``_ticket_caller()`` authorizes the caller, as inference does, for polls and
    for the tickets it binds.
    """

    @functools.wraps(method)
    async def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        table: DeferredResults = self._deferred
        body = next((a for a in (*args, *kwargs.values()) if isinstance(a, Mapping)), None)
        ticket = poll_ticket(body)
        if ticket is not None:
            return await table.poll(ticket, await self._ticket_caller())
        return await table.run(method(self, *args, **kwargs), self._ticket_caller)

    return wrapper
