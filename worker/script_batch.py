"""Redis scripts from many task threads, sent together in one pipeline.

Each job's thread makes its own Redis round trips (ledger, done and outbox state, the
claim and completion around the final write). Contended on the client's connection
pool and the GIL, one script call cost the worker 130-170 us of CPU with 16-64 threads
calling, against 50 us alone (bench/FINDINGS.md, "Redis work in one pipeline").

Here a call joins the next pipeline instead: while one pipeline is on the wire, the
calls that arrive wait and go together in the next, sent by the first of them. A lone
call goes at once, as a plain script call, so nothing waits at idle. The jobs of a
coalesced group, released together by their serve call, settle their Redis work in a
pipeline or two.

Each call gets its own reply or its own error, as alone: a script's error is that
call's; an error of the whole pipeline (Redis unreachable after the client's retries)
is each call's. A script Redis no longer holds (restarted, flushed) is loaded again
and its calls run again, one by one.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Sequence
from typing import Any, Protocol

import redis
from redis.commands.core import Script
from redis.exceptions import NoScriptError

# At most this many calls in one pipeline; the rest go in the next.
MAX_CALLS = 256


class ScriptHost(Protocol):
    """What registers a script: a ``redis.Redis`` (calls alone) or a ``ScriptBatch``."""

    def register_script(self, script: str) -> Any: ...


class _Call:
    __slots__ = ("args", "keys", "lead", "ready", "reply", "script")

    def __init__(self, script: Script, keys: Sequence[Any], args: Sequence[Any]) -> None:
        self.script = script
        self.keys = list(keys)
        self.args = list(args)
        self.ready: threading.Event | None = None  # only for a call that waits
        self.lead = False  # woken to send the next pipeline, not with a reply
        self.reply: Any = None

    def outcome(self) -> Any:
        if isinstance(self.reply, BaseException):
            raise self.reply
        return self.reply


class BatchedScript:
    """A registered script; calling it (``keys``, ``args``) as a redis-py ``Script``."""

    def __init__(self, batch: ScriptBatch, script: Script) -> None:
        self._batch = batch
        self._script = script

    def __call__(self, keys: Sequence[Any] = (), args: Sequence[Any] = ()) -> Any:
        return self._batch.run(self._script, keys, args)


class ScriptBatch:
    """Sends the scripts its callers run, pipelined while one pipeline is in flight."""

    def __init__(self, r: redis.Redis) -> None:
        self.redis = r
        self.pipelines = 0  # pipelines sent (a call alone counts as one)
        self._lock = threading.Lock()
        self._queue: list[_Call] = []
        self._sending = False

    def register_script(self, script: str) -> BatchedScript:
        return BatchedScript(self, self.redis.register_script(script))

    def run(self, script: Script, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        call = _Call(script, keys, args)
        with self._lock:
            lead = not self._sending
            self._sending = True
            if not lead:
                call.ready = threading.Event()
            self._queue.append(call)
        if call.ready is not None:
            call.ready.wait()  # a reply, or the turn to send (the sender always sets it)
            if not call.lead:
                return call.outcome()
        self._send()  # ``call`` is first in the queue: it goes in this pipeline
        return call.outcome()

    def _send(self) -> None:
        with self._lock:
            wave, self._queue = self._queue[:MAX_CALLS], self._queue[MAX_CALLS:]
            self.pipelines += 1
        replies: list[Any] | None = None
        try:
            replies = self._execute(wave)
        except Exception as e:  # the pipeline as a whole: each call's error, as alone
            replies = [copy.copy(e) for _ in wave]
        finally:  # whatever happened (even a BaseException here), nobody waits for ever
            if replies is None:
                replies = [redis.ConnectionError("the pipeline ended unanswered")] * len(wave)
            with self._lock:
                after = self._queue[0] if self._queue else None
                if after is None:
                    self._sending = False
                else:
                    after.lead = True
            for call, reply in zip(wave, replies, strict=True):
                call.reply = reply
                if call.ready is not None:
                    call.ready.set()
            if after is not None and after.ready is not None:  # it waits: it has one
                after.ready.set()

    def _execute(self, wave: list[_Call]) -> list[Any]:
        if len(wave) == 1:
            return [_alone(wave[0])]
        pipe = self.redis.pipeline(transaction=False)
        for c in wave:
            pipe.evalsha(c.script.sha, len(c.keys), *c.keys, *c.args)
        replies = pipe.execute(raise_on_error=False)
        return [
            _alone(c) if isinstance(reply, NoScriptError) else reply
            for c, reply in zip(wave, replies, strict=True)
        ]


def _alone(call: _Call) -> Any:
    """One call as a plain script call (which loads the script when Redis lacks it)."""
    try:
        return call.script(keys=call.keys, args=call.args)
    except redis.RedisError as e:
        return e


__all__ = ["MAX_CALLS", "BatchedScript", "ScriptBatch", "ScriptHost"]
