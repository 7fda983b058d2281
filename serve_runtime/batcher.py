"""Request batching that forms a batch when the device is free, one model per batch.

Why not ``@serve.batch``: since Ray 2.47 (ray-project/ray#53096) its loop forms the
next batch while an earlier one still holds the device, from whatever arrived in
``batch_wait_timeout_s``. Under a sustained load the batches then shrink to the
arrival rate times the timeout: the bench's W2 measured device calls of one item
for every client, the device 95% busy at 50 ms a call. It also batches by the
multiplexing header, which in the compatible mode is a caller's token.

Here the requests wait in one queue per model (a loaded copy, shared by its users),
and a batch is taken only when one of ``max_concurrent_batches`` slots is free: all
that waits for the chosen model, up to ``max_batch_size``. The model chosen is the one
whose oldest request is oldest, once that request has waited ``batch_wait_timeout_s``
for company (counted from its arrival); until then, a model whose queue is full may
go first. Under load the models take turns, oldest first, and none starves.

A coalesced call (``serve_runtime.coalesced``: many jobs' items in one HTTP request)
announces its items as ``Arrivals``: while some of them are still on their way (being
authorized, say), a batch waits for them, so the call's items run as one batch. The
wait ends when they are all here, or when none has arrived for ``GATHER_S``.

A batch whose function raises is run again one item at a time, so one bad item fails
only its own request, never the others that shared its batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")

RunBatch = Callable[[list[T]], Awaitable[list[Any]]]


GATHER_S = 0.02  # how long a batch waits for an announced item that makes no progress


class Arrivals:
    """The items of one coalesced call not yet queued: ``arrived()`` once per item
    (queued, or finished without reaching the batcher)."""

    def __init__(self, count: int) -> None:
        self.pending = count
        self.progress_at = time.monotonic()
        self._wakers: list[Callable[[], None]] = []

    def arrived(self) -> None:
        self.pending -= 1
        self.progress_at = time.monotonic()
        for wake in self._wakers:
            wake()

    def gathering_until(self) -> float | None:
        """Until when a batch should wait for this call's other items; None: don't."""
        return self.progress_at + GATHER_S if self.pending > 0 else None


@dataclass
class _Waiting(Generic[T]):
    item: T
    future: asyncio.Future[Any]
    since: float = field(default_factory=time.monotonic)


class DeviceBatcher(Generic[T]):
    """Batches ``submit(key, item)`` calls per ``key`` and runs them through ``run``."""

    def __init__(
        self,
        run: RunBatch[T],
        *,
        max_batch_size: int,
        batch_wait_timeout_s: float,
        max_concurrent_batches: int = 1,
    ) -> None:
        if max_batch_size < 1 or max_concurrent_batches < 1 or batch_wait_timeout_s < 0:
            raise ValueError(
                "max_batch_size and max_concurrent_batches must be >= 1, batch_wait_timeout_s >= 0"
            )
        self._run = run
        self.max_batch_size = max_batch_size
        self.batch_wait_timeout_s = batch_wait_timeout_s
        self._queues: dict[Hashable, deque[_Waiting[T]]] = {}
        self._arrived = asyncio.Event()
        self._slots = asyncio.Semaphore(max_concurrent_batches)
        self._dispatcher: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()
        self._gathering: set[Arrivals] = set()
        self.batch_sizes: dict[int, int] = {}  # size -> batches run, for metrics

    async def submit(self, key: Hashable, item: T, arrivals: Arrivals | None = None) -> Any:
        """Queue ``item`` with the other requests for ``key``; its result when run.

        ``arrivals``: the coalesced call ``item`` belongs to (``arrived()`` is the
        caller's to say, once, when its item is queued or will never be).
        """
        if self._dispatcher is None or self._dispatcher.done():
            self._dispatcher = asyncio.create_task(self._dispatch())
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queues.setdefault(key, deque()).append(_Waiting(item, future))
        if arrivals is not None and arrivals not in self._gathering:
            self._gathering.add(arrivals)
            arrivals._wakers.append(self._arrived.set)
        self._arrived.set()
        return await future  # a cancelled caller cancels its future: skipped at take

    @property
    def waiting(self) -> int:
        return sum(len(q) for q in self._queues.values())

    async def _dispatch(self) -> None:
        while True:
            await self._slots.acquire()
            batch = await self._take()
            task = asyncio.create_task(self._execute(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _take(self) -> list[_Waiting[T]]:
        """The next batch: wait for a request, then for company up to its deadline."""
        while True:
            self._drop_cancelled()
            if not self._queues:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            key, deadline = self._choose()
            full = len(self._queues[key]) >= self.max_batch_size
            deadline = max(deadline, self._gathering_until())
            wait_s = deadline - time.monotonic()
            if wait_s <= 0 or full:
                return self._pop(key)
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), wait_s)

    def _choose(self) -> tuple[Hashable, float]:
        """The model to run next, and until when its batch may wait for company.

        The oldest waiting request goes first once it has waited its timeout (so under
        load the models take turns, oldest first, and none starves); before that, a
        full queue may go ahead of it.
        """
        oldest = min(self._queues, key=lambda k: self._queues[k][0].since)
        deadline = self._queues[oldest][0].since + self.batch_wait_timeout_s
        if deadline > time.monotonic():
            full = [k for k, q in self._queues.items() if len(q) >= self.max_batch_size]
            if full:
                key = min(full, key=lambda k: self._queues[k][0].since)
                return key, self._queues[key][0].since
        return oldest, deadline

    def _gathering_until(self) -> float:
        """Until when announced items of coalesced calls are worth waiting for."""
        until = 0.0
        for arrivals in list(self._gathering):
            at = arrivals.gathering_until()
            if at is None:
                self._gathering.discard(arrivals)
            else:
                until = max(until, at)
        return until

    def _drop_cancelled(self) -> None:
        for key in list(self._queues):
            queue = self._queues[key]
            while queue and queue[0].future.done():
                queue.popleft()
            if not queue:
                del self._queues[key]

    def _pop(self, key: Hashable) -> list[_Waiting[T]]:
        queue = self._queues[key]
        batch: list[_Waiting[T]] = []
        while queue and len(batch) < self.max_batch_size:
            waiting = queue.popleft()
            if not waiting.future.done():
                batch.append(waiting)
        if not queue:
            del self._queues[key]
        return batch

    async def _execute(self, batch: list[_Waiting[T]]) -> None:
        try:
            if not batch:
                return
            self.batch_sizes[len(batch)] = self.batch_sizes.get(len(batch), 0) + 1
            try:
                results = await self._run_checked(batch)
            except Exception as e:
                if len(batch) == 1:
                    if not batch[0].future.done():
                        batch[0].future.set_exception(e)
                    return
                # Which item broke it? Each alone: the others get their results.
                for w in batch:
                    if w.future.done():
                        continue
                    try:
                        result = (await self._run_checked([w]))[0]
                    except Exception as item_error:
                        w.future.set_exception(item_error)
                    else:
                        if not w.future.done():
                            w.future.set_result(result)
                return
            for w, result in zip(batch, results, strict=True):
                if not w.future.done():
                    w.future.set_result(result)
        finally:
            self._slots.release()

    async def _run_checked(self, batch: list[_Waiting[T]]) -> list[Any]:
        results = await self._run([w.item for w in batch])
        if len(results) != len(batch):
            raise RuntimeError(
                f"the batch function returned {len(results)} results for {len(batch)} requests"
            )
        return results
