"""Extract untrusted model archives (zip, tar, tar.gz) without letting them escape.

Archives come from a remote backend, so every member is checked before anything is
written: no absolute paths, drive letters or ``..``; no links leaving the destination; no
device files or FIFOs; bounded member count and bounded unpacked size, counted on the
bytes actually written (a zip bomb lies in its headers). Files are written by this module
(not ``extractall``) with plain permissions, never through a link that leaves the
destination. On any refusal the destination is emptied again, so a half-extracted model
is never loaded.
"""

from __future__ import annotations

import gzip
import lzma
import os
import posixpath
import re
import shutil
import stat
import tarfile
import zipfile
import zlib
from pathlib import Path
from typing import IO, Any, Literal

from serve_runtime.fetch_errors import ModelFetchError

__all__ = ["ArchiveError", "ModelFetchError", "UnsafeArchiveError", "safe_extract"]

_CHUNK = 1 << 16
# Longest symlink target read from a zip member (the target is the member's content).
_MAX_LINK_TARGET = 4096
# Longest tar metadata block (pax header, GNU long name) tarfile may read into memory.
_MAX_TAR_META = 1 << 20
_DRIVE = re.compile(r"^[A-Za-z]:")
_OPEN_FLAGS = (
    os.O_WRONLY
    | os.O_CREAT
    | os.O_EXCL
    | getattr(os, "O_NOFOLLOW", 0)
    | getattr(os, "O_CLOEXEC", 0)
    | getattr(os, "O_BINARY", 0)
)
# What the stdlib raises for a damaged archive; all become ``ArchiveError``.
_CORRUPT: tuple[type[BaseException], ...] = (
    tarfile.TarError,
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    gzip.BadGzipFile,
    lzma.LZMAError,
    zlib.error,
    EOFError,
)


class ArchiveError(ModelFetchError):
    """The archive cannot be extracted: not an archive, corrupt, or a bad destination."""


class UnsafeArchiveError(ArchiveError):
    """The archive tries to leave its destination or to exceed a resource bound."""


def _refuse(member: str, reason: str) -> UnsafeArchiveError:
    return UnsafeArchiveError(f"refusing archive member {member!r}: {reason}")


def _safe_parts(path: str, member: str, what: str = "path") -> list[str]:
    """Split an archive path into plain components, refusing anything that could escape."""
    shown = "" if what == "path" else f" {path!r}"
    if "\x00" in path:
        raise _refuse(member, f"NUL byte in {what}{shown}")
    # Backslashes are separators on Windows; treat them so everywhere, to be strict.
    norm = path.replace("\\", "/")
    if norm.startswith("/"):
        raise _refuse(member, f"absolute {what}{shown}")
    if _DRIVE.match(norm):
        raise _refuse(member, f"drive letter in {what}{shown}")
    parts = [p for p in norm.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise _refuse(member, f"'..' component in {what}{shown}")
    return parts


def _check_link_target(member: str, parts: list[str], target: str) -> str:
    """Lexical symlink check (the physical one needs the filesystem); returns the target."""
    if not target:
        raise _refuse(member, "empty link target")
    if "\x00" in target:
        raise _refuse(member, "NUL byte in link target")
    norm = target.replace("\\", "/")
    if norm.startswith("/") or _DRIVE.match(norm):
        raise _refuse(member, f"absolute link target {target!r}")
    resolved = posixpath.normpath(posixpath.join(*parts[:-1], norm))
    if resolved == ".." or resolved.startswith("../"):
        raise _refuse(member, f"link target {target!r} leaves the destination")
    return norm


class _CappedTarInfo(tarfile.TarInfo):
    """Refuses huge pax/long-name headers, which tarfile would read wholly into memory."""

    _META_TYPES = frozenset(
        {
            tarfile.GNUTYPE_LONGNAME,
            tarfile.GNUTYPE_LONGLINK,
            tarfile.XHDTYPE,
            tarfile.XGLTYPE,
            tarfile.SOLARIS_XHDTYPE,
        }
    )

    def _proc_member(self, tar_file: tarfile.TarFile) -> Any:  # type: ignore[override]
        if self.type in self._META_TYPES and self.size > _MAX_TAR_META:
            raise _refuse(self.name, f"extended header of {self.size} bytes is too large")
        return super()._proc_member(tar_file)  # type: ignore[misc]


class _Extractor:
    """Writes members under ``root`` while enforcing the bounds and link policy."""

    def __init__(self, root: Path, max_unpacked_bytes: int, max_members: int) -> None:
        self.root = root
        self._root_str = str(root)
        self.max_unpacked_bytes = max_unpacked_bytes
        self.max_members = max_members
        self.members = 0
        self.written = 0

    def inside(self, path: str) -> bool:
        return path == self._root_str or path.startswith(self._root_str + os.sep)

    def count_member(self, member: str) -> None:
        self.members += 1
        if self.members > self.max_members:
            raise _refuse(member, f"archive has more than {self.max_members} members")

    def check_declared(self, member: str, size: int) -> None:
        """Early refusal on the header size; the real bytes are counted while writing."""
        if size < 0 or size > self.max_unpacked_bytes - self.written:
            raise _refuse(
                member, f"unpacked size would exceed the limit of {self.max_unpacked_bytes} bytes"
            )

    def _parent(self, parts: list[str], member: str) -> Path:
        """Real directory that will hold ``parts[-1]``, created as needed, inside root.

        Each component is checked before it is used, so an in-archive link can never make
        a later member land outside the destination.
        """
        cur = self.root
        for comp in parts[:-1]:
            nxt = cur / comp
            if nxt.is_symlink():
                real = os.path.realpath(nxt)
                if not self.inside(real):
                    raise _refuse(member, "path goes through a link that leaves the destination")
                if not os.path.isdir(real):
                    raise _refuse(member, "path goes through a link that is not a directory")
                cur = Path(real)
            elif nxt.is_dir():
                cur = nxt
            elif os.path.lexists(nxt):
                raise _refuse(member, "a parent path is not a directory")
            else:
                nxt.mkdir(mode=0o755)
                cur = nxt
        return cur

    def _target(self, parts: list[str], member: str) -> Path:
        """Path for a new file or link; a previous file or link of that name is replaced."""
        if not parts:
            raise _refuse(member, "empty name")
        target = self._parent(parts, member) / parts[-1]
        if target.is_symlink() or (os.path.lexists(target) and not target.is_dir()):
            target.unlink()  # unlink never follows the link
        elif os.path.lexists(target):
            raise _refuse(member, "would replace a directory")
        return target

    def write_file(
        self, member: str, parts: list[str], src: IO[bytes], mode: int, size: int
    ) -> None:
        self.check_declared(member, size)
        target = self._target(parts, member)
        fd = os.open(target, _OPEN_FLAGS, 0o755 if mode & 0o111 else 0o644)
        with os.fdopen(fd, "wb") as out:
            while chunk := src.read(_CHUNK):
                self.written += len(chunk)
                if self.written > self.max_unpacked_bytes:
                    raise _refuse(
                        member,
                        f"unpacked size exceeds the limit of {self.max_unpacked_bytes} bytes",
                    )
                out.write(chunk)

    def make_dir(self, member: str, parts: list[str]) -> None:
        if not parts:
            return  # the destination itself ("./")
        target = self._parent(parts, member) / parts[-1]
        if target.is_symlink():
            real = os.path.realpath(target)
            if not (self.inside(real) and os.path.isdir(real)):
                raise _refuse(member, "directory is a link that leaves the destination")
        elif target.is_dir():
            return
        elif os.path.lexists(target):
            raise _refuse(member, "directory would replace a file")
        else:
            target.mkdir(mode=0o755)

    def check_symlink(self, member: str, parts: list[str], link_target: str) -> str:
        """Lexical and physical (through links already extracted) check; no writes."""
        link_target = _check_link_target(member, parts, link_target)
        real = os.path.realpath(os.path.join(self.root, *parts[:-1], link_target))
        if not self.inside(real):
            raise _refuse(member, f"link target {link_target!r} leaves the destination")
        return link_target

    def make_symlink(self, member: str, parts: list[str], link_target: str) -> None:
        link_target = self.check_symlink(member, parts, link_target)
        target = self._target(parts, member)
        real = os.path.realpath(os.path.join(target.parent, link_target))
        if not self.inside(real):
            raise _refuse(member, f"link target {link_target!r} leaves the destination")
        os.symlink(link_target, target)

    def hardlink_source(self, member: str, link_name: str) -> str:
        """Real path of a hard link's source: an already extracted file inside root."""
        link_parts = _safe_parts(link_name, member, "hard link target")
        if not link_parts:
            raise _refuse(member, "empty hard link target")
        source = os.path.realpath(self.root.joinpath(*link_parts))
        if not self.inside(source):
            raise _refuse(member, f"hard link target {link_name!r} leaves the destination")
        if not os.path.isfile(source):
            raise _refuse(member, f"hard link target {link_name!r} is not an extracted file")
        return source

    def make_hardlink(self, member: str, parts: list[str], link_name: str) -> None:
        source = self.hardlink_source(member, link_name)
        target = self._target(parts, member)
        if os.path.realpath(target) == source:
            raise _refuse(member, "hard link to itself")
        os.link(source, target, follow_symlinks=False)

    def verify_links(self) -> None:
        """Final sweep: a link valid when made may escape once later links exist."""
        for dirpath, dirnames, filenames in os.walk(self.root):
            for name in (*dirnames, *filenames):
                path = os.path.join(dirpath, name)
                if os.path.islink(path) and not self.inside(os.path.realpath(path)):
                    rel = os.path.relpath(path, self.root)
                    raise _refuse(rel, "link resolves outside the destination")


def _filter_reason(exc: tarfile.FilterError, member: tarfile.TarInfo) -> str:
    """Our wording for the stdlib's refusals, without the absolute local paths it quotes."""
    if isinstance(exc, tarfile.AbsoluteLinkError):
        return f"absolute link target {member.linkname!r}"
    if isinstance(exc, tarfile.LinkOutsideDestinationError):
        return f"link target {member.linkname!r} leaves the destination"
    if isinstance(exc, tarfile.AbsolutePathError):
        return "absolute path"
    if isinstance(exc, tarfile.OutsideDestinationError):
        return "path leaves the destination"
    if isinstance(exc, tarfile.SpecialFileError):
        return "special file"
    return f"rejected by the tarfile data filter ({type(exc).__name__})"


def _extract_tar(archive: Path, ex: _Extractor) -> None:
    data_filter = getattr(tarfile, "data_filter", None)  # Python >= 3.11.4
    with tarfile.open(archive, mode="r:*", tarinfo=_CappedTarInfo) as tf:
        for member in tf:  # lazily: a bad member stops us before later ones are read
            name = member.name
            ex.count_member(name)
            parts = _safe_parts(name, name)
            if member.ischr() or member.isblk():
                raise _refuse(name, "device file")
            if member.isfifo():
                raise _refuse(name, "FIFO")
            if not (member.isreg() or member.isdir() or member.issym() or member.islnk()):
                raise _refuse(name, f"unsupported member type {member.type!r}")
            if member.issym():
                ex.check_symlink(name, parts, member.linkname)
            if member.islnk():
                ex.hardlink_source(name, member.linkname)
            if data_filter is not None:
                # Second opinion from the stdlib, after our own checks.
                try:
                    data_filter(member, str(ex.root))
                except tarfile.FilterError as exc:
                    raise _refuse(name, _filter_reason(exc, member)) from None
            if member.isreg():
                ex.check_declared(name, member.size)
                src = tf.extractfile(member)
                if src is None:
                    raise ArchiveError(f"corrupt archive: no data for member {name!r}")
                with src:
                    ex.write_file(name, parts, src, member.mode, member.size)
            elif member.isdir():
                ex.make_dir(name, parts)
            elif member.issym():
                ex.make_symlink(name, parts, member.linkname)
            else:
                ex.make_hardlink(name, parts, member.linkname)


_ZipKind = Literal["file", "dir", "symlink"]


def _zip_kind(info: zipfile.ZipInfo) -> _ZipKind:
    """Member type from the Unix mode bits (only Unix-made zips carry links or devices)."""
    mode = info.external_attr >> 16
    if info.create_system == 3 and mode:
        fmt = stat.S_IFMT(mode)
        if fmt == stat.S_IFLNK:
            return "symlink"
        if fmt in (stat.S_IFCHR, stat.S_IFBLK):
            raise _refuse(info.filename, "device file")
        if fmt == stat.S_IFIFO:
            raise _refuse(info.filename, "FIFO")
        if fmt == stat.S_IFSOCK:
            raise _refuse(info.filename, "socket")
        if fmt == stat.S_IFDIR:
            return "dir"
    return "dir" if info.is_dir() else "file"


def _extract_zip(archive: Path, ex: _Extractor) -> None:
    with zipfile.ZipFile(archive) as zf:
        # The central directory lists everything, so a bad zip is refused before any write.
        plan: list[tuple[zipfile.ZipInfo, list[str], _ZipKind, str]] = []
        declared = 0
        for info in zf.infolist():
            name = info.filename
            ex.count_member(name)
            parts = _safe_parts(name, name)
            kind = _zip_kind(info)
            if info.flag_bits & 0x1:
                raise ArchiveError(f"archive member {name!r} is encrypted")
            link_target = ""
            if kind == "symlink":
                if info.file_size > _MAX_LINK_TARGET:
                    raise _refuse(name, "link target too long")
                raw = zf.read(info)
                try:
                    link_target = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise _refuse(name, "link target is not UTF-8") from None
                _check_link_target(name, parts, link_target)
            elif kind == "file":
                declared += info.file_size
                if declared > ex.max_unpacked_bytes:
                    raise _refuse(
                        name,
                        f"unpacked size would exceed the limit of {ex.max_unpacked_bytes} bytes",
                    )
            plan.append((info, parts, kind, link_target))
        for info, parts, kind, link_target in plan:
            name = info.filename
            if kind == "dir":
                ex.make_dir(name, parts)
            elif kind == "symlink":
                ex.make_symlink(name, parts, link_target)
            else:
                mode = (info.external_attr >> 16) if info.create_system == 3 else 0o644
                with zf.open(info) as src:
                    ex.write_file(name, parts, src, mode, info.file_size)


def _is_tar(archive: Path) -> bool:
    """``tarfile.is_tarfile`` with the capped header class: a huge first pax header
    would otherwise be read (and decompressed) wholly into memory just to sniff."""
    try:
        with tarfile.open(archive, mode="r:*", tarinfo=_CappedTarInfo):
            return True
    except tarfile.TarError:
        return False


def _detect(archive: Path) -> Literal["zip", "tar"]:
    """By content, not name. Tar first: its header sits at offset 0 (or it is gzip),
    whereas a zip's directory is found by scanning the end, which a tar holding a zip
    could fool."""
    if not archive.is_file():
        raise ArchiveError(f"archive not found: {archive.name!r}")
    try:
        if _is_tar(archive):
            return "tar"
        if zipfile.is_zipfile(archive):
            return "zip"
    except _CORRUPT:  # before OSError: gzip.BadGzipFile is one
        pass
    except OSError as exc:
        raise ArchiveError(f"cannot read archive {archive.name!r}: {exc.strerror}") from exc
    raise ArchiveError(f"not a zip or tar archive: {archive.name!r}")


def _clear_dir(root: Path) -> None:
    """Empty ``root`` without following links (best effort; the original error wins)."""
    try:
        entries = list(os.scandir(root))
    except OSError:
        return
    for entry in entries:
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
        except OSError:
            pass


def safe_extract(
    archive: Path, dest: Path, *, max_unpacked_bytes: int, max_members: int = 10_000
) -> None:
    """Extract ``archive`` (zip, tar, tar.gz; detected by content) into empty ``dest``.

    Raises ``UnsafeArchiveError`` for members that would escape ``dest`` or exceed the
    bounds, ``ArchiveError`` for unknown or corrupt archives; ``dest`` is left empty then.
    """
    archive, dest = Path(archive), Path(dest)
    if max_unpacked_bytes < 0 or max_members < 0:
        raise ValueError("max_unpacked_bytes and max_members must not be negative")
    if not dest.is_dir():
        raise ArchiveError(f"destination {dest.name!r} is not an existing directory")
    if any(dest.iterdir()):
        raise ArchiveError(f"destination {dest.name!r} is not empty")
    root = dest.resolve(strict=True)
    kind = _detect(archive)
    ex = _Extractor(root, max_unpacked_bytes, max_members)
    try:
        try:
            if kind == "tar":
                _extract_tar(archive, ex)
            else:
                _extract_zip(archive, ex)
        except _CORRUPT as exc:
            raise ArchiveError(f"corrupt archive: {exc}") from exc
        except NotImplementedError as exc:  # e.g. an unsupported zip compression method
            raise ArchiveError(f"unsupported archive: {exc}") from exc
        ex.verify_links()
    except BaseException:
        _clear_dir(root)
        raise
