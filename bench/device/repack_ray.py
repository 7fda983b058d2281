"""Repack the ray wheel smaller for the GPU machine's carry (64 MiB limit for the tree).

python3 bench/device/repack_ray.py SRC.whl DST.whl

Drops what the bench never touches (Java jar, the dashboard web UI's source maps, RLlib,
ray.llm / ray.serve.llm, tests directories), strips the symbol tables of the ELF
binaries (strip --strip-unneeded: the dynamic symbols stay), recompresses with
deflate level 9 (LZMA for ELF files over 1 MiB; REPACK_LZMA=0: deflate only), and
rewrites RECORD (sha256 and size of every file kept), so that ``pip install --no-deps
--target`` accepts it.
"""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile

DROP_PREFIXES = (
    "ray/jars/",
    "ray/rllib/",
    "ray/llm/",
    "ray/serve/llm/",
)


LZMA = os.environ.get("REPACK_LZMA", "1") == "1"


def dropped(name: str) -> bool:
    if name.startswith(DROP_PREFIXES):
        return True
    # The dashboard must find its web UI (client/build, client/build/static) or it fails to
    # start and ray.init() waits a minute for it: keep the UI, drop its source maps.
    if name.startswith("ray/dashboard/client/build/") and name.endswith(".map"):
        return True
    parts = name.split("/")
    return "tests" in parts[:-1]


def strip_elf(data: bytes) -> bytes:
    if not data.startswith(b"\x7fELF"):
        return data
    with tempfile.NamedTemporaryFile(delete=False) as f:
        f.write(data)
        path = f.name
    try:
        subprocess.run(["strip", "--strip-unneeded", path], check=True)
        with open(path, "rb") as f:
            return f.read()
    finally:
        os.unlink(path)


def main(src: str, dst: str) -> None:
    record_name = None
    rows = []
    kept = dropped_n = 0
    with (
        zipfile.ZipFile(src) as zin,
        zipfile.ZipFile(dst, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zout,
    ):
        for info in zin.infolist():
            name = info.filename
            if name.endswith(".dist-info/RECORD"):
                record_name = name
                continue
            if dropped(name):
                dropped_n += 1
                continue
            data = zin.read(info)
            if not info.is_dir():
                data = strip_elf(data)
            zi = zipfile.ZipInfo(name, date_time=info.date_time)
            zi.external_attr = info.external_attr  # keep the executable bits
            # The big ELF binaries (raylet, gcs_server, _raylet.so) as LZMA: about a third
            # smaller than deflate; pip unpacks wheels with zipfile, which reads LZMA.
            method = (
                zipfile.ZIP_LZMA
                if LZMA and data.startswith(b"\x7fELF") and len(data) > 1 << 20
                else zipfile.ZIP_DEFLATED
            )
            zi.compress_type = method
            zout.writestr(zi, data, compress_type=method, compresslevel=9)
            if not info.is_dir():
                digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
                rows.append(f"{name},sha256={digest.decode()},{len(data)}")
            kept += 1
        assert record_name is not None
        rows.append(f"{record_name},,")
        zout.writestr(record_name, "\n".join(rows) + "\n", compress_type=zipfile.ZIP_DEFLATED)
    print(f"kept {kept} entries, dropped {dropped_n}; {os.path.getsize(dst) / 2**20:.1f} MiB")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
