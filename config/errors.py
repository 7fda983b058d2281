"""One error root for the bridge, and one answer to "is it worth trying again?".

Every error we raise carries ``transient``: True when the same call may succeed later
(overload, restart, network trouble), False when retrying cannot help (the request,
the message or the data is wrong). ``is_transient`` extends that to the few foreign
exceptions a caller meets (Redis and HTTP transport errors), so no module keeps its
own list.
"""

from __future__ import annotations

import httpx
import redis


class BridgeError(Exception):
    """Base of every error this project raises on purpose."""

    transient: bool = False

    def __init__(self, message: str = "", *, transient: bool | None = None) -> None:
        super().__init__(message)
        if transient is not None:
            self.transient = transient


def is_transient(exc: BaseException) -> bool:
    """True when the operation that raised ``exc`` may succeed if tried again later."""
    if isinstance(exc, BridgeError):
        return bool(exc.transient)
    # Foreign errors met on the way: connection trouble is transient, nothing else is.
    return isinstance(
        exc,
        redis.ConnectionError
        | redis.TimeoutError
        | httpx.TransportError
        | ConnectionError
        | TimeoutError,
    )


class DeadlineExceeded(BridgeError):
    """The work ran past the time it was given (a job's time limit): not retried."""
