"""httpx clients for requests made on behalf of many callers: they keep no cookies.

The worker's backend and serve clients, and a replica's backend client, are each one
client shared by every tenant. httpx keeps every cookie an answer sets and sends it
with later requests to that host, whoever makes them: a session cookie the backend
set for one caller's token would go out with the next caller's request. These
clients drop what a response sets, unread, and send none.

Not parsing ``Set-Cookie`` also saves the client CPU: httpx builds urllib request
and response wrappers for ``http.cookiejar`` on every answer, about 15% of its CPU
per request (bench/FINDINGS.md, "httpx's cookie jar").
"""

from __future__ import annotations

from typing import Any

import httpx


class NoCookies(httpx.Cookies):
    """A jar that stays empty: what an answer sets is not read."""

    def extract_cookies(self, response: httpx.Response) -> None:
        return None

    def set(self, name: str, value: str, domain: str = "", path: str = "/") -> None:
        raise TypeError("this client keeps no cookies")


class _KeepsNoCookies:
    """``cookies`` is always empty; httpx reads it to merge and to store cookies."""

    _no_cookies = NoCookies()

    @property
    def cookies(self) -> httpx.Cookies:
        return self._no_cookies

    @cookies.setter
    def cookies(self, cookies: Any) -> None:
        raise TypeError("this client keeps no cookies")


class SharedClient(_KeepsNoCookies, httpx.Client):
    """An ``httpx.Client`` shared by many callers."""


class SharedAsyncClient(_KeepsNoCookies, httpx.AsyncClient):
    """An ``httpx.AsyncClient`` shared by many callers."""
