"""Stream a model archive to disk: bounded in size, verified by checksum, never partial.

The body is written in chunks (never held whole in memory) to a temporary file beside
``dest``, hashed on the way, and renamed onto ``dest`` only once it is complete and
verified; on any failure (including cancellation) the temporary file is removed.
URLs may carry signed tokens and headers carry credentials, so error messages name the
URL without its query string or user info and never any header value.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from serve_runtime.fetch_errors import ModelFetchError

__all__ = [
    "ChecksumMismatchError",
    "DownloadError",
    "DownloadTooLargeError",
    "InvalidChecksumError",
    "ModelFetchError",
    "download",
    "parse_checksum",
    "redact_url",
]

CHUNK_SIZE = 1 << 16
_HEX_LENGTHS = {"sha256": 64, "sha512": 128, "md5": 32}
_HEX = re.compile(r"[0-9a-f]+")


class DownloadError(ModelFetchError):
    """The download failed; ``status_code`` is the HTTP status when there was one."""

    def __init__(
        self, message: str, *, url: str | None = None, status_code: int | None = None
    ) -> None:
        super().__init__(message)
        self.url = url
        self.status_code = status_code


class DownloadTooLargeError(DownloadError):
    """The body is (or claims to be) larger than allowed."""


class ChecksumMismatchError(DownloadError):
    """The bytes received are not the ones the backend promised."""


class InvalidChecksumError(ModelFetchError, ValueError):
    """The expected checksum is malformed, so nothing can be verified against it."""


def parse_checksum(spec: str) -> tuple[str, str]:
    """``sha256:<hex>``, ``sha512:<hex>``, ``md5:<hex>`` or bare 64-hex (sha256) -> (algo, hex)."""
    text = spec.strip()
    algo, sep, digest = text.partition(":")
    if not sep:
        algo, digest = "sha256", text
    algo, digest = algo.strip().lower(), digest.strip().lower()
    length = _HEX_LENGTHS.get(algo)
    if length is None:
        raise InvalidChecksumError(f"unsupported checksum algorithm {algo!r}")
    if len(digest) != length or not _HEX.fullmatch(digest):
        raise InvalidChecksumError(f"malformed {algo} checksum: expected {length} hex digits")
    return algo, digest


def redact_url(url: str) -> str:
    """The URL without query, fragment or user info, fit for messages and logs."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<invalid url>"
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _hasher(algo: str) -> Any:
    if algo == "md5":
        return hashlib.md5(usedforsecurity=False)
    return hashlib.new(algo)


def _content_length(response: httpx.Response) -> int | None:
    value = response.headers.get("content-length")
    if value is None:
        return None
    try:
        return int(value.strip())
    except ValueError:
        return None


async def _stream(
    client: httpx.AsyncClient,
    url: str,
    safe_url: str,
    out: IO[bytes],
    *,
    headers: httpx.Headers,
    max_bytes: int,
    hasher: Any,
    timeout: httpx.Timeout | None,
) -> int:
    """GET ``url`` into ``out``; returns the byte count."""
    extra: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
    total = 0
    async with client.stream("GET", url, headers=headers, **extra) as response:
        status = response.status_code
        if not response.is_success:
            raise DownloadError(
                f"HTTP {status} fetching {safe_url}", url=safe_url, status_code=status
            )
        declared = _content_length(response)
        if declared is not None and declared > max_bytes:
            raise DownloadTooLargeError(
                f"{safe_url}: Content-Length {declared} exceeds the limit of {max_bytes} bytes",
                url=safe_url,
                status_code=status,
            )
        async for chunk in response.aiter_bytes(CHUNK_SIZE):
            total += len(chunk)
            if total > max_bytes:
                raise DownloadTooLargeError(
                    f"{safe_url}: body exceeds the limit of {max_bytes} bytes",
                    url=safe_url,
                    status_code=status,
                )
            if hasher is not None:
                hasher.update(chunk)
            out.write(chunk)
    return total


async def download(
    client: httpx.AsyncClient,
    url: str,
    dest: Path,
    *,
    headers: Mapping[str, str] | None = None,
    max_bytes: int,
    checksum: str | None = None,
    timeout: httpx.Timeout | None = None,
) -> int:
    """Download ``url`` to ``dest`` and return its size in bytes.

    ``checksum`` (``sha256:<hex>``, ``md5:<hex>``, bare 64-hex; empty means none) is
    checked before ``dest`` appears; ``timeout=None`` keeps the client's default.
    Raises ``DownloadError`` (HTTP status >= 400 or transport failure),
    ``DownloadTooLargeError``, ``ChecksumMismatchError`` or ``InvalidChecksumError``.
    """
    if max_bytes < 0:
        raise ValueError("max_bytes must not be negative")
    expected = parse_checksum(checksum) if checksum and checksum.strip() else None
    hasher = _hasher(expected[0]) if expected else None
    safe_url = redact_url(url)
    dest = Path(dest)
    # Ask for the stored bytes as they are: limits and checksum apply to those.
    request_headers = httpx.Headers({"Accept-Encoding": "identity"})
    if headers:
        request_headers.update(headers)

    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                total = await _stream(
                    client,
                    url,
                    safe_url,
                    out,
                    headers=request_headers,
                    max_bytes=max_bytes,
                    hasher=hasher,
                    timeout=timeout,
                )
            except httpx.HTTPError as exc:
                # Only the class name: some httpx messages quote URLs or header values.
                raise DownloadError(
                    f"download of {safe_url} failed: {type(exc).__name__}", url=safe_url
                ) from exc
            except httpx.InvalidURL as exc:
                raise DownloadError(f"invalid download URL {safe_url}", url=safe_url) from exc
        if expected is not None and hasher is not None:
            algo, want = expected
            got = hasher.hexdigest()
            if not hmac.compare_digest(got, want):
                raise ChecksumMismatchError(
                    f"checksum mismatch for {safe_url}: expected {algo}:{want}, got {algo}:{got}",
                    url=safe_url,
                )
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return total
