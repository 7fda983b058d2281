"""Safe extraction of hostile archives, and bounded, verified downloads.

Every malicious archive is built here with zipfile/tarfile. For each refusal we check
the exception type, that the message names the member and the reason, that nothing
changed outside ``dest`` and that ``dest`` is empty again.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import random
import socket
import stat
import struct
import tarfile
import threading
import time
import zipfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from serve_runtime.archive import ArchiveError, UnsafeArchiveError, safe_extract
from serve_runtime.download import (
    ChecksumMismatchError,
    DownloadError,
    DownloadTooLargeError,
    InvalidChecksumError,
    download,
    parse_checksum,
    redact_url,
)
from serve_runtime.fetch_errors import ModelFetchError

MB = 1024 * 1024
LIMIT = 10 * MB

# --------------------------------------------------------------------------- helpers


@dataclass
class Layout:
    """``tmp/root/dest`` is extracted into; ``tmp/root/sentinel`` must never change."""

    tmp: Path
    root: Path
    dest: Path
    sentinel: Path
    archives: Path


@pytest.fixture
def lay(tmp_path: Path) -> Layout:
    root = tmp_path / "root"
    dest = root / "dest"
    dest.mkdir(parents=True)
    sentinel = root / "sentinel"
    sentinel.mkdir()
    (sentinel / "keep.txt").write_text("keep")
    archives = tmp_path / "archives"
    archives.mkdir()
    return Layout(tmp_path, root, dest, sentinel, archives)


def snapshot(tmp: Path, dest: Path) -> dict[str, object]:
    """Everything under ``tmp`` except ``dest``'s contents: paths, file bytes, link targets."""
    seen: dict[str, object] = {}
    for dirpath, dirnames, filenames in os.walk(tmp):
        for name in (*dirnames, *filenames):
            path = Path(dirpath) / name
            if path.is_relative_to(dest) and path != dest:
                continue
            rel = str(path.relative_to(tmp))
            if path.is_symlink():
                seen[rel] = ("link", os.readlink(path))
            elif path.is_file():
                seen[rel] = ("file", path.read_bytes(), stat.S_IMODE(path.stat().st_mode))
            else:
                seen[rel] = ("dir",)
    return seen


def assert_refused(
    lay: Layout,
    archive: Path,
    exc_type: type[ArchiveError],
    *fragments: str,
    max_unpacked_bytes: int = LIMIT,
    max_members: int = 10_000,
) -> ArchiveError:
    before = snapshot(lay.tmp, lay.dest)
    with pytest.raises(ArchiveError) as info:
        safe_extract(
            archive, lay.dest, max_unpacked_bytes=max_unpacked_bytes, max_members=max_members
        )
    exc = info.value
    assert type(exc) is exc_type, repr(exc)
    for fragment in fragments:
        assert fragment in str(exc), (fragment, str(exc))
    assert snapshot(lay.tmp, lay.dest) == before
    assert list(lay.dest.iterdir()) == []
    assert (lay.sentinel / "keep.txt").read_text() == "keep"
    return exc


Entry = tuple[tarfile.TarInfo, bytes | None]


def tfile(name: str, data: bytes = b"x", mode: int = 0o644) -> Entry:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), mode
    return info, data


def tdir(name: str) -> Entry:
    info = tarfile.TarInfo(name)
    info.type, info.mode = tarfile.DIRTYPE, 0o755
    return info, None


def tlink(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> Entry:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


def tspecial(name: str, kind: bytes) -> Entry:
    info = tarfile.TarInfo(name)
    info.type = kind
    return info, None


def make_tar(path: Path, entries: list[Entry], mode: str = "w") -> Path:
    with tarfile.open(path, mode, format=tarfile.PAX_FORMAT) as tf:  # type: ignore[call-overload]
        for info, data in entries:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


ZEntry = tuple[str, bytes, int | None]  # (name, data, unix mode incl. file type or None)


def make_zip(path: Path, entries: list[ZEntry]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data, mode in entries:
            info = zipfile.ZipInfo(name)
            info.compress_type = zipfile.ZIP_DEFLATED
            if mode is not None:
                info.create_system = 3
                info.external_attr = mode << 16
            zf.writestr(info, data)
    return path


def zlink(name: str, target: str) -> ZEntry:
    return name, target.encode(), stat.S_IFLNK | 0o777


# --------------------------------------------------------------------------- good archives

GOOD_FILES = {"top.txt": b"top", "a/b/c.txt": b"deep", "a/b/run.sh": b"#!/bin/sh\n"}


def build_good(kind: str, path: Path) -> Path:
    if kind == "zip":
        return make_zip(
            path,
            [
                ("top.txt", b"top", None),
                ("a/", b"", stat.S_IFDIR | 0o755),
                ("a/b/c.txt", b"deep", stat.S_IFREG | 0o644),
                ("a/b/run.sh", b"#!/bin/sh\n", stat.S_IFREG | 0o4755),  # setuid dropped
                zlink("a/link.txt", "b/c.txt"),
                zlink("a/b/up.txt", "../../top.txt"),
                zlink("a/dirlink", "b"),
                ("a/dirlink/through.txt", b"via link", None),
            ],
        )
    mode = "w:gz" if kind == "tar.gz" else "w"
    return make_tar(
        path,
        [
            tdir("./"),
            tfile("./top.txt", b"top"),
            tdir("a"),
            tdir("a/b"),
            tfile("a/b/c.txt", b"deep"),
            tfile("a/b/run.sh", b"#!/bin/sh\n", 0o4755),  # setuid dropped
            tlink("a/link.txt", "b/c.txt"),
            tlink("a/b/up.txt", "../../top.txt"),
            tlink("a/dirlink", "b"),
            tfile("a/dirlink/through.txt", b"via link"),
            tlink("a/b/hard.txt", "a/b/c.txt", tarfile.LNKTYPE),
        ],
        mode,
    )


@pytest.mark.parametrize(
    ("kind", "filename"),
    [
        ("zip", "model.zip"),
        ("tar", "model.tar"),
        ("tar.gz", "model.tar.gz"),
        ("tar.gz", "model.tgz"),
        ("tar.gz", "model.bin"),  # detected by content, not name
        ("zip", "model.tar"),
    ],
)
def test_good_archive_extracts(lay: Layout, kind: str, filename: str) -> None:
    archive = build_good(kind, lay.archives / filename)
    before = snapshot(lay.tmp, lay.dest)
    safe_extract(archive, lay.dest, max_unpacked_bytes=LIMIT)
    assert snapshot(lay.tmp, lay.dest) == before
    for rel, data in GOOD_FILES.items():
        assert (lay.dest / rel).read_bytes() == data
    assert os.readlink(lay.dest / "a/link.txt") == "b/c.txt"
    assert (lay.dest / "a/link.txt").read_bytes() == b"deep"
    assert (lay.dest / "a/b/up.txt").read_bytes() == b"top"
    assert (lay.dest / "a/dirlink").is_symlink()
    assert (lay.dest / "a/b/through.txt").read_bytes() == b"via link"
    run_mode = stat.S_IMODE((lay.dest / "a/b/run.sh").stat().st_mode)
    assert run_mode & 0o100
    assert run_mode & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX) == 0
    assert stat.S_IMODE((lay.dest / "top.txt").stat().st_mode) & 0o7111 == 0
    if kind != "zip":
        assert (lay.dest / "a/b/hard.txt").read_bytes() == b"deep"


def test_exact_size_limit_is_allowed(lay: Layout) -> None:
    archive = make_tar(lay.archives / "x.tar", [tfile("a", b"1" * 100), tfile("b", b"2" * 100)])
    safe_extract(archive, lay.dest, max_unpacked_bytes=200, max_members=2)
    assert (lay.dest / "b").read_bytes() == b"2" * 100


def test_dest_must_be_empty(lay: Layout) -> None:
    (lay.dest / "old.txt").write_text("old")
    archive = build_good("zip", lay.archives / "m.zip")
    with pytest.raises(ArchiveError, match="not empty"):
        safe_extract(archive, lay.dest, max_unpacked_bytes=LIMIT)
    assert [p.name for p in lay.dest.iterdir()] == ["old.txt"]


# --------------------------------------------------------------------------- traversal


def test_zip_slip(lay: Layout) -> None:
    archive = make_zip(
        lay.archives / "a.zip", [("ok.txt", b"ok", None), ("../evil.txt", b"x", None)]
    )
    assert_refused(lay, archive, UnsafeArchiveError, "'../evil.txt'", "'..' component")


def test_zip_slip_backslash(lay: Layout) -> None:
    archive = make_zip(lay.archives / "a.zip", [("a\\..\\..\\evil.txt", b"x", None)])
    assert_refused(lay, archive, UnsafeArchiveError, "evil.txt", "'..' component")


def test_tar_dotdot(lay: Layout) -> None:
    archive = make_tar(lay.archives / "a.tar", [tfile("ok.txt"), tfile("a/../../evil.txt")])
    assert_refused(lay, archive, UnsafeArchiveError, "'a/../../evil.txt'", "'..' component")


def test_tar_absolute(lay: Layout) -> None:
    target = str(lay.root / "abs_evil.txt")
    archive = make_tar(lay.archives / "a.tar", [tfile("ok.txt"), tfile(target)])
    assert_refused(lay, archive, UnsafeArchiveError, repr(target), "absolute path")
    assert not Path(target).exists()


def test_zip_absolute(lay: Layout) -> None:
    target = str(lay.root / "abs_evil.txt")
    archive = make_zip(lay.archives / "a.zip", [(target, b"x", None)])
    assert_refused(lay, archive, UnsafeArchiveError, repr(target), "absolute path")


@pytest.mark.parametrize("name", ["C:/evil.txt", "c:evil.txt", "D:\\x\\evil.txt"])
def test_zip_drive_letter(lay: Layout, name: str) -> None:
    archive = make_zip(lay.archives / "a.zip", [(name, b"x", None)])
    assert_refused(lay, archive, UnsafeArchiveError, repr(name), "drive letter")


# --------------------------------------------------------------------------- links


@pytest.mark.parametrize("target", ["/etc/passwd", "../outside", "../sentinel/keep.txt"])
def test_tar_symlink_escape(lay: Layout, target: str) -> None:
    archive = make_tar(lay.archives / "a.tar", [tfile("ok.txt"), tlink("evil", target)])
    reason = "absolute link target" if target.startswith("/") else "leaves the destination"
    assert_refused(lay, archive, UnsafeArchiveError, "'evil'", reason, repr(target))


def test_tar_symlink_then_write_through_it(lay: Layout) -> None:
    archive = make_tar(
        lay.archives / "a.tar",
        [tlink("sub", "../sentinel"), tfile("sub/keep.txt", b"pwned")],
    )
    assert_refused(lay, archive, UnsafeArchiveError, "'sub'", "leaves the destination")


def test_tar_nested_symlink_escape(lay: Layout) -> None:
    # Lexically "a/.." stays inside; physically a -> "." makes a/b -> ".." the parent of dest.
    archive = make_tar(
        lay.archives / "a.tar",
        [tlink("a", "."), tlink("a/b", ".."), tfile("a/b/sentinel/keep.txt", b"pwned")],
    )
    assert_refused(lay, archive, UnsafeArchiveError, "'a/b'", "leaves the destination")


def test_tar_link_made_unsafe_by_later_link(lay: Layout) -> None:
    # x -> y/../w is inside while y does not exist; y -> "." then sends x outside.
    archive = make_tar(lay.archives / "a.tar", [tlink("x", "y/../w"), tlink("y", ".")])
    assert_refused(lay, archive, UnsafeArchiveError, "'x'", "outside the destination")


@pytest.mark.parametrize("target", ["../sentinel/keep.txt", "/etc/passwd"])
def test_tar_hardlink_escape(lay: Layout, target: str) -> None:
    archive = make_tar(
        lay.archives / "a.tar", [tfile("ok.txt"), tlink("evil", target, tarfile.LNKTYPE)]
    )
    reason = "absolute hard link target" if target.startswith("/") else "'..' component"
    assert_refused(lay, archive, UnsafeArchiveError, "'evil'", reason)


def test_tar_hardlink_through_escaping_symlink(lay: Layout) -> None:
    archive = make_tar(
        lay.archives / "a.tar",
        [
            tlink("up", "..", tarfile.SYMTYPE),
            tlink("evil", "up/sentinel/keep.txt", tarfile.LNKTYPE),
        ],
    )
    assert_refused(lay, archive, UnsafeArchiveError, "'up'", "leaves the destination")


def test_zip_symlink_then_write_through_it(lay: Layout) -> None:
    archive = make_zip(
        lay.archives / "a.zip", [zlink("sub", "../sentinel"), ("sub/keep.txt", b"pwned", None)]
    )
    assert_refused(lay, archive, UnsafeArchiveError, "'sub'", "leaves the destination")


def test_zip_symlink_escape(lay: Layout) -> None:
    archive = make_zip(lay.archives / "a.zip", [("ok.txt", b"ok", None), zlink("evil", "../..")])
    assert_refused(lay, archive, UnsafeArchiveError, "'evil'", "leaves the destination")


# --------------------------------------------------------------------------- special files


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        (tarfile.CHRTYPE, "device file"),
        (tarfile.BLKTYPE, "device file"),
        (tarfile.FIFOTYPE, "FIFO"),
    ],
)
def test_tar_special_files(lay: Layout, kind: bytes, reason: str) -> None:
    archive = make_tar(lay.archives / "a.tar", [tfile("ok.txt"), tspecial("dev", kind)])
    assert_refused(lay, archive, UnsafeArchiveError, "'dev'", reason)


def test_zip_fifo(lay: Layout) -> None:
    archive = make_zip(lay.archives / "a.zip", [("pipe", b"", stat.S_IFIFO | 0o644)])
    assert_refused(lay, archive, UnsafeArchiveError, "'pipe'", "FIFO")


# --------------------------------------------------------------------------- size and count


def test_tar_member_over_bound(lay: Layout) -> None:
    archive = make_tar(lay.archives / "a.tar", [tfile("ok.txt"), tfile("big.bin", b"\0" * 1001)])
    assert_refused(
        lay,
        archive,
        UnsafeArchiveError,
        "'big.bin'",
        "exceed the limit of 1000 bytes",
        max_unpacked_bytes=1000,
    )


def test_many_members_sum_over_bound(lay: Layout) -> None:
    entries = [tfile(f"f{i}", b"z" * 400) for i in range(3)]
    archive = make_tar(lay.archives / "a.tar.gz", entries, "w:gz")
    assert_refused(lay, archive, UnsafeArchiveError, "'f2'", "limit", max_unpacked_bytes=1000)


def _zip_bomb(path: Path, size: int) -> Path:
    zeros = bytes(MB)
    with (
        zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf,
        zf.open("bomb.bin", "w") as out,
    ):
        for _ in range(size // MB):
            out.write(zeros)
    return path


def test_zip_bomb_stops_early(lay: Layout) -> None:
    archive = _zip_bomb(lay.archives / "bomb.zip", 50 * MB)
    assert archive.stat().st_size < 200_000
    started = time.monotonic()
    assert_refused(lay, archive, UnsafeArchiveError, "'bomb.bin'", "limit of 10485760 bytes")
    assert time.monotonic() - started < 2


def test_zip_bomb_with_lying_headers(lay: Layout) -> None:
    """Sizes patched down to 1000 in both headers: the data still is 50 MB of zeros."""
    archive = _zip_bomb(lay.archives / "bomb.zip", 50 * MB)
    raw = bytearray(archive.read_bytes())
    local = raw.find(b"PK\x03\x04")
    central = raw.find(b"PK\x01\x02")
    struct.pack_into("<I", raw, local + 22, 1000)
    struct.pack_into("<I", raw, central + 24, 1000)
    archive.write_bytes(bytes(raw))
    started = time.monotonic()
    exc = assert_refused(lay, archive, ArchiveError, "corrupt archive", max_unpacked_bytes=2000)
    assert "bomb.bin" in str(exc)
    assert time.monotonic() - started < 2


def test_stream_longer_than_header_is_cut(lay: Layout, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real bytes are counted: a member whose data outgrows its header is stopped."""
    archive = make_tar(lay.archives / "a.tar", [tfile("small.bin", b"s" * 10)])
    written: list[int] = []
    real_fdopen = os.fdopen

    class Endless(io.RawIOBase):
        def readable(self) -> bool:
            return True

        def readinto(self, buf: Any) -> int:
            buf[: len(buf)] = b"\0" * len(buf)
            return len(buf)

    def fake_extractfile(self: tarfile.TarFile, member: Any) -> io.BufferedReader:
        return io.BufferedReader(Endless())

    def spy_fdopen(fd: int, *args: Any, **kwargs: Any) -> Any:
        f = real_fdopen(fd, *args, **kwargs)
        orig = f.write

        def write(data: bytes) -> int:
            written.append(len(data))
            return orig(data)

        f.write = write
        return f

    monkeypatch.setattr(tarfile.TarFile, "extractfile", fake_extractfile)
    monkeypatch.setattr(os, "fdopen", spy_fdopen)
    assert_refused(
        lay,
        archive,
        UnsafeArchiveError,
        "'small.bin'",
        "exceeds the limit of 200000 bytes",
        max_unpacked_bytes=200_000,
    )
    assert sum(written) <= 200_000


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_too_many_members(lay: Layout, kind: str) -> None:
    if kind == "zip":
        archive = make_zip(lay.archives / "a.zip", [(f"f{i}", b"x", None) for i in range(20)])
    else:
        archive = make_tar(lay.archives / "a.tar", [tfile(f"f{i}") for i in range(20)])
    assert_refused(
        lay, archive, UnsafeArchiveError, "'f10'", "more than 10 members", max_members=10
    )


def test_huge_tar_extended_header(lay: Layout) -> None:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as tf:
        info, data = tfile("n" * 2000)  # forces a GNU long-name block of ~2 KB
        tf.addfile(info, io.BytesIO(data))
    data = bytearray(raw.getvalue())
    # Claim a 4 GB long-name block: tarfile would read that into memory.
    struct.pack_into("12s", data, 124, b"%011o\0" % (4 << 30))
    chksum = sum(data[:148]) + 8 * 32 + sum(data[156:512])
    struct.pack_into("8s", data, 148, b"%06o\0 " % chksum)
    archive = lay.archives / "a.tar"
    archive.write_bytes(bytes(data))
    assert_refused(lay, archive, UnsafeArchiveError, "extended header", "too large")


def test_huge_tar_gz_long_name(lay: Layout) -> None:
    """An honest 2 MB GNU long name, gzipped to a few KB: refused before it is buffered."""
    archive = lay.archives / "a.tar.gz"
    with tarfile.open(archive, "w:gz", format=tarfile.GNU_FORMAT) as tf:
        info, data = tfile("n" * (2 * MB))
        tf.addfile(info, io.BytesIO(data))
    assert archive.stat().st_size < 100_000
    assert_refused(lay, archive, UnsafeArchiveError, "extended header", "too large")


# --------------------------------------------------------------------------- corrupt input


def test_not_an_archive(lay: Layout) -> None:
    archive = lay.archives / "model.zip"
    archive.write_bytes(b"this is not an archive at all\n" * 100)
    assert_refused(lay, archive, ArchiveError, "not a zip or tar archive")


def test_empty_file(lay: Layout) -> None:
    archive = lay.archives / "model.tar"
    archive.write_bytes(b"")
    assert_refused(lay, archive, ArchiveError, "not a zip or tar archive")


def test_corrupt_zip_bad_crc(lay: Layout) -> None:
    archive = lay.archives / "a.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("first.txt", b"fine")
        zf.writestr("second.txt", b"A" * 1000)
    raw = bytearray(archive.read_bytes())
    raw[raw.find(b"A" * 1000) + 10] ^= 0xFF
    archive.write_bytes(bytes(raw))
    assert_refused(lay, archive, ArchiveError, "corrupt archive", "second.txt")


def test_truncated_tar_gz(lay: Layout) -> None:
    rnd = random.Random(7)
    entries = [tfile(f"m{i}.bin", rnd.randbytes(100_000)) for i in range(3)]
    archive = make_tar(lay.archives / "a.tar.gz", entries, "w:gz")
    raw = archive.read_bytes()
    archive.write_bytes(raw[: len(raw) * 2 // 3])
    assert_refused(lay, archive, ArchiveError, "corrupt archive")


def test_missing_archive(lay: Layout) -> None:
    with pytest.raises(ArchiveError, match="not found"):
        safe_extract(lay.archives / "nope.zip", lay.dest, max_unpacked_bytes=LIMIT)


def test_exception_hierarchy() -> None:
    for cls in (
        DownloadError,
        DownloadTooLargeError,
        ChecksumMismatchError,
        ArchiveError,
        UnsafeArchiveError,
        InvalidChecksumError,
    ):
        assert issubclass(cls, ModelFetchError)
    assert issubclass(UnsafeArchiveError, ArchiveError)
    assert issubclass(DownloadTooLargeError, DownloadError)
    assert issubclass(ChecksumMismatchError, DownloadError)
    assert issubclass(InvalidChecksumError, ValueError)


# --------------------------------------------------------------------------- download

BODY = random.Random(1).randbytes(300_000)
SECRET = "s3cr3t-token-value"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # no Content-Length => body ends when the socket closes

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send_body(self, body: bytes, *, length: int | None) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        if length is not None:
            self.send_header("Content-Length", str(length))
        self.end_headers()
        try:
            for i in range(0, len(body), 16_384):
                self.wfile.write(body[i : i + 16_384])
        except (BrokenPipeError, ConnectionResetError):
            pass

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path == "/blob":
            self._send_body(BODY, length=len(BODY))
        elif path == "/nolen":
            self._send_body(BODY, length=None)
        elif path == "/huge":
            self._send_body(BODY, length=10**12)
        elif path == "/auth":
            if self.headers.get("Authorization") == f"Bearer {SECRET}":
                self._send_body(BODY, length=len(BODY))
            else:
                self.send_error(401)
        elif path == "/forbidden":
            self.send_error(403)
        elif path == "/boom":
            self.send_error(503)
        else:
            self.send_error(404)


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def fetch(url: str, dest: Path, **kwargs: Any) -> int:
    async def go() -> int:
        async with httpx.AsyncClient(trust_env=False) as client:
            return await download(client, url, dest, **kwargs)

    return asyncio.run(go())


SHA = hashlib.sha256(BODY).hexdigest()
MD5 = hashlib.md5(BODY).hexdigest()


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.mark.parametrize(
    ("path", "checksum"),
    [
        ("/blob", f"sha256:{SHA}"),
        ("/blob", f"SHA256:{SHA.upper()}"),
        ("/nolen", SHA),
        ("/nolen", f"md5:{MD5}"),
        ("/blob", None),
        ("/blob", ""),
    ],
)
def test_download_ok(server: str, tmp_path: Path, path: str, checksum: str | None) -> None:
    dest = tmp_path / "model.bin"
    n = fetch(f"{server}{path}?sig=abc", dest, max_bytes=len(BODY), checksum=checksum)
    assert n == len(BODY)
    assert dest.read_bytes() == BODY
    assert leftovers(tmp_path) == ["model.bin"]


def test_download_sends_headers(server: str, tmp_path: Path) -> None:
    dest = tmp_path / "m"
    headers = {"Authorization": f"Bearer {SECRET}"}
    assert fetch(f"{server}/auth", dest, headers=headers, max_bytes=MB, checksum=SHA) == len(BODY)


def test_download_checksum_mismatch_removes_file(server: str, tmp_path: Path) -> None:
    dest = tmp_path / "model.bin"
    wrong = "0" * 64
    with pytest.raises(ChecksumMismatchError) as info:
        fetch(f"{server}/blob?sig={SECRET}", dest, max_bytes=MB, checksum=f"sha256:{wrong}")
    assert wrong in str(info.value) and SHA in str(info.value)
    assert SECRET not in str(info.value)
    assert leftovers(tmp_path) == []


def test_download_too_large_by_header(server: str, tmp_path: Path) -> None:
    for path in ("/blob", "/huge"):
        with pytest.raises(DownloadTooLargeError, match="Content-Length") as info:
            fetch(f"{server}{path}", tmp_path / "m", max_bytes=len(BODY) - 1, checksum=None)
        assert info.value.url == f"{server}{path}"
    assert leftovers(tmp_path) == []


def test_download_too_large_by_stream(server: str, tmp_path: Path) -> None:
    with pytest.raises(DownloadTooLargeError, match="body exceeds the limit of 100000 bytes"):
        fetch(f"{server}/nolen", tmp_path / "m", max_bytes=100_000, checksum=SHA)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("path", "status"), [("/missing", 404), ("/forbidden", 403), ("/boom", 503)]
)
def test_download_http_error(server: str, tmp_path: Path, path: str, status: int) -> None:
    url = f"{server}{path}?X-Amz-Signature={SECRET}&token={SECRET}"
    with pytest.raises(DownloadError) as info:
        fetch(
            url,
            tmp_path / "m",
            headers={"Authorization": f"Bearer {SECRET}"},
            max_bytes=MB,
            checksum=None,
        )
    exc = info.value
    assert type(exc) is DownloadError
    assert exc.status_code == status
    assert exc.url == f"{server}{path}"
    assert str(status) in str(exc) and f"{server}{path}" in str(exc)
    assert SECRET not in str(exc) and "?" not in str(exc)
    assert leftovers(tmp_path) == []


def test_download_unauthorized_keeps_header_secret(server: str, tmp_path: Path) -> None:
    with pytest.raises(DownloadError) as info:
        fetch(
            f"{server}/auth",
            tmp_path / "m",
            headers={"Authorization": f"Bearer wrong-{SECRET}"},
            max_bytes=MB,
            checksum=None,
        )
    assert info.value.status_code == 401
    assert SECRET not in str(info.value)


def test_download_connection_refused(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DownloadError) as info:
        fetch(
            f"http://user:{SECRET}@127.0.0.1:{port}/x?sig={SECRET}",
            tmp_path / "m",
            max_bytes=MB,
            checksum=None,
            timeout=httpx.Timeout(2.0),
        )
    assert info.value.status_code is None
    assert SECRET not in str(info.value)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("bad", ["sha256:xyz", "crc32:abcd", "abc123", f"md5:{SHA}"])
def test_invalid_checksum_rejected_before_request(tmp_path: Path, bad: str) -> None:
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(200, content=b"x")

    async def go() -> None:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            await download(client, "http://x/y", tmp_path / "m", max_bytes=10, checksum=bad)

    with pytest.raises(InvalidChecksumError):
        asyncio.run(go())
    assert calls == []
    assert leftovers(tmp_path) == []


def test_cancelled_download_leaves_nothing(tmp_path: Path) -> None:
    async def go() -> None:
        event = asyncio.Event()

        async def slow_body() -> AsyncIterator[bytes]:
            yield b"a" * 1000
            event.set()
            await asyncio.sleep(30)
            yield b"b"

        async def handler(request: httpx.Request) -> httpx.Response:
            return httpx.Response(200, content=slow_body())

        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            task = asyncio.create_task(
                download(client, "http://x/y", tmp_path / "m", max_bytes=MB, checksum=None)
            )
            await event.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(go())
    assert leftovers(tmp_path) == []


def test_parse_checksum_and_redact() -> None:
    assert parse_checksum(SHA) == ("sha256", SHA)
    assert parse_checksum(f" MD5:{MD5.upper()} ") == ("md5", MD5)
    assert redact_url("https://u:p@host:8443/a/b.zip?X-Amz-Signature=s#frag") == (
        "https://host:8443/a/b.zip"
    )
