"""What can go wrong calling a serve endpoint, split the way a caller must act on it.

``ServeClientError`` (4xx from our runtime: bad input, unknown model, forbidden) must
not be retried. ``ServeTransientError`` (429/502/503/504, timeouts, connection errors,
a route the proxy does not know yet) may be retried with backoff. ``ServeServerError``
(an unexpected 5xx such as a replica raising) is neither: the caller decides.
Messages carry the route and status, never headers or tokens.
"""

from __future__ import annotations

from config.errors import BridgeError


class ServeError(BridgeError):
    """Base of every error from calling a serve endpoint."""

    def __init__(self, message: str, *, status_code: int | None = None, code: str | None = None):
        super().__init__(message)
        self.status_code = status_code
        self.code = code


class ServeClientError(ServeError):
    """The request itself is wrong (4xx): retrying cannot help."""


class ServeServerError(ServeError):
    """The endpoint failed unexpectedly (5xx other than 502/503/504).

    A bare 500 (a replica raising, or dying mid-request) is retried within the bound;
    a 500 we understand (an answer that is not JSON, a bad envelope: ``code`` set) is not.
    """

    @property  # type: ignore[override]
    def transient(self) -> bool:
        return self.code is None


class ServeTransientError(ServeError):
    """Worth retrying later: overload, restart, network trouble."""

    transient = True


class ServeTimeout(ServeTransientError):
    """No answer within the configured connect or read timeout."""


class ServeConnectionError(ServeTransientError):
    """The serve proxy could not be reached."""


class ServeRouteNotFound(ServeTransientError):
    """The proxy knows no application at the route (not deployed yet, or redeploying)."""


class DeferredFailed(ServeClientError):
    """A deferred inference finished with an error on the replica."""


class DeferredNotFound(ServeTransientError):
    """The replica no longer knows the ticket (restarted, expired): submit again."""


TRANSIENT_STATUS = frozenset({429, 502, 503, 504})
