"""(Re)write the bad-input corpus of ``tests/test_bad_input.py``, deterministically.

    .venv/bin/python tests/data/bad_inputs/make_corpus.py

Writes ``cases/NNN-name.json`` (one file per case), ``bodies/`` (raw broker bodies)
and ``archives/`` (hostile model archives). Running it twice gives the same bytes.

A case file says what to send and what must come of it:

``kind``
    ``message``  a task message ``synapse.inference.run`` sent the normal way, with
                 ``message.args`` / ``message.kwargs`` (``kwargs.job`` is the job);
    ``raw``      a raw broker body: ``raw.body_file`` (bytes; ``$JOB_ID``, ``$TOKEN:user``
                 and ``$MARKER`` are filled in where the body is text), its
                 ``content_type``/``content_encoding``, and ``raw.task`` (the ``task``
                 header; ``null`` sends a message without Celery task headers);
    ``model``    a job on a model seeded for the case from ``model.archive`` (stored by
                 the backend as ``model.seed_ext``; ``model.checksum`` overrides the
                 computed checksum), or on a model the session seeds (17, 999);
    ``endpoint`` a job whose serve endpoint misbehaves (the probe plugin's ``respond``).
Placeholders in a job: ``$JOB_ID`` (a fresh id; the job is created on the backend when
``job.create``), ``$TOKEN:<user>`` (that user's token), ``$MODEL`` (the case's model id).
``pad_bytes`` pads ``job.json`` at test time (the huge-body case stays small on disk).

``expect.outcome``
    ``quarantined``  the message lands on ``inference.invalid`` (raw, with the reason in
                     the ``x-synapse-invalid-reason`` header, or as a
                     ``synapse.inference.invalid`` task whose header names the error);
                     ``expect.reason`` is in that reason; when ``expect.job_failed`` the
                     job is FAILED with that error, written once, never RUNNING;
    ``failed``       the job is FAILED, ``expect.error`` is in its error, one final write;
                     unless ``expect.transient``, at most one RUNNING write (tried once).
"""

from __future__ import annotations

import gzip
import io
import json
import pickle
import shutil
import stat
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CASES = HERE / "cases"
BODIES = HERE / "bodies"
ARCHIVES = HERE / "archives"

CLASSIFIER = {"code": "example-classifier", "version": "1.0.0"}
PROBE = {"code": "probe", "version": "0.1.0"}
ROWS = [[5.0, 3.4, 1.5, 0.2]]
ZIP_TIME = (1980, 1, 1, 0, 0, 0)
# The replicas' default bound (SYNAPSE_BRIDGE_MAX_UNPACKED_BYTES): what the bombs pass.
DEFAULT_MAX_UNPACKED = 8 * 1024**3


def job(**over: Any) -> dict[str, Any]:
    """A valid job message; ``over`` replaces fields, a value of ``...`` removes one."""
    base: dict[str, Any] = {
        "job_id": "$JOB_ID",
        "tenant": "acme",
        "token": "$TOKEN:alice",
        "model": 12,
        "json": {"inputs": ROWS},
        "release": CLASSIFIER,
    }
    for k, v in over.items():
        if v is ...:
            base.pop(k, None)
        else:
            base[k] = v
    return base


def quarantined(reason: str, job_failed: bool) -> dict[str, Any]:
    return {"outcome": "quarantined", "reason": reason, "job_failed": job_failed}


def failed(error: str, transient: bool = False, status: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"outcome": "failed", "error": error}
    if status is not None:
        out["status"] = status  # the serve endpoint's HTTP answer, named in the error
    if transient:
        out["transient"] = True
    return out


CASE_LIST: list[dict[str, Any]] = []


def case(name: str, kind: str, description: str, expect: dict[str, Any], **spec: Any) -> None:
    spec.setdefault("job", {"create": True, "tenant": "acme"})
    CASE_LIST.append(
        {"name": name, "kind": kind, "description": description, **spec, "expect": expect}
    )


def message(name: str, description: str, expect: dict[str, Any], **spec: Any) -> None:
    args = spec.pop("args", [])
    kwargs = spec.pop("kwargs", None)
    if kwargs is None:
        kwargs = {"job": spec.pop("job_body")}
    case(name, "message", description, expect, message={"args": args, "kwargs": kwargs}, **spec)


NO_JOB = {"create": False}


# --------------------------------------------------------------------------- messages


def message_cases() -> None:
    message(
        "missing-job-id",
        "job without job_id: nothing to fail, only quarantined",
        quarantined("job_id: Field required", False),
        job_body=job(job_id=...),
        job=NO_JOB,
    )
    for field in ("token", "model", "release"):
        message(
            f"missing-{field}",
            f"job without the required field {field!r}",
            quarantined(f"{field}: Field required", True),
            job_body=job(**{field: ...}),
        )
    message(
        "missing-json-and-items",
        "neither a single request (json) nor a batch (items)",
        quarantined("give exactly one of 'json'", True),
        job_body=job(json=...),
    )
    message(
        "both-json-and-items",
        "a single request and a batch at once",
        quarantined("give exactly one of 'json'", True),
        job_body=job(items=[{"inputs": ROWS}]),
    )
    message(
        "empty-items",
        "a batch of no items",
        quarantined("items: List should have at least 1 item", True),
        job_body=job(json=..., items=[]),
    )
    message(
        "too-many-items",
        "a batch over SYNAPSE_BRIDGE_BATCH_MAX_ITEMS (the test worker: 50)",
        quarantined("batch has 51 items, over the 50 limit", True),
        job_body=job(json=..., items=[{"inputs": ROWS}] * 51),
    )
    message(
        "items-not-a-list",
        "items is an object",
        quarantined("items: Input should be a valid list", True),
        job_body=job(json=..., items={"inputs": ROWS}),
    )
    message(
        "items-of-wrong-type",
        "items are numbers, not request objects",
        quarantined("items.0: Input should be a valid dictionary", True),
        job_body=job(json=..., items=[1, 2]),
    )
    message(
        "json-wrong-type",
        "the request body is a string",
        quarantined("Input should be a valid dictionary", True),
        job_body=job(json="inputs=1,2,3"),
    )
    message(
        "job-id-bad-characters",
        "job_id with a slash and dots (would address another URL): not readable",
        quarantined("job_id: String should match pattern", False),
        job_body=job(job_id="../../jobs/other"),
        job=NO_JOB,
    )
    message(
        "job-id-too-long",
        "job_id of 200 characters",
        quarantined("job_id: String should match pattern", False),
        job_body=job(job_id="j" * 200),
        job=NO_JOB,
    )
    message(
        "job-id-wrong-type",
        "job_id is a number",
        quarantined("job_id: Input should be a valid string", False),
        job_body=job(job_id=12345),
        job=NO_JOB,
    )
    message(
        "token-wrong-type",
        "token is a number",
        quarantined("token: Input should be a valid string", True),
        job_body=job(token=42),
    )
    message(
        "token-empty",
        "token is the empty string",
        quarantined("token: Value should have at least 1 item", True),
        job_body=job(token=""),
    )
    message(
        "model-wrong-type",
        "model is a list",
        quarantined("model.int: Input should be a valid integer", True),
        job_body=job(model=[12]),
    )
    message(
        "model-blank",
        "model is blank text",
        quarantined("model must be a non-empty id", True),
        job_body=job(model="   "),
    )
    message(
        "tenant-wrong-type",
        "tenant is a number",
        quarantined("tenant: Input should be a valid string", True),
        job_body=job(tenant=7),
    )
    message(
        "method-unknown",
        "method DELETE",
        quarantined("method: Input should be 'post', 'put' or 'get'", True),
        job_body=job(method="delete"),
    )
    message(
        "release-wrong-type",
        "release is a string",
        quarantined("release: Input should be a valid dictionary", True),
        job_body=job(release="example-classifier@1.0.0"),
    )
    message(
        "release-without-code-or-checksum",
        "release names neither a code nor a checksum",
        quarantined("release needs a checksum or a code", True),
        job_body=job(release={"version": "1.0.0"}),
    )
    message(
        "release-bad-checksum-characters",
        "a checksum that would be a path in the route",
        quarantined("release.checksum: String should match pattern", True),
        job_body=job(release={"checksum": "../../-/routes"}),
    )
    message(
        "release-unknown-field",
        "release with a field the schema does not know",
        quarantined("release.entrypoint: Extra inputs are not permitted", True),
        job_body=job(release={**CLASSIFIER, "entrypoint": "os.system"}),
    )
    message(
        "priority-too-high",
        "priority 42 (0..9)",
        quarantined("priority: Input should be less than or equal to 9", True),
        job_body=job(priority=42),
    )
    message(
        "priority-negative",
        "priority -1 (0..9)",
        quarantined("priority: Input should be greater than or equal to 0", True),
        job_body=job(priority=-1),
    )
    message(
        "priority-wrong-type",
        "priority is text",
        quarantined("priority: Input should be a valid integer", True),
        job_body=job(priority="high"),
    )
    message(
        "deadline-not-a-date",
        "deadline in words",
        quarantined("deadline: Input should be a valid datetime", True),
        job_body=job(deadline="next tuesday"),
    )
    message(
        "submitted-at-wrong-type",
        "submitted_at is text",
        quarantined("submitted_at: Input should be a valid number", True),
        job_body=job(submitted_at="yesterday"),
    )
    message(
        "unknown-job-field",
        "a field the schema does not know",
        quarantined("callback_url: Extra inputs are not permitted", True),
        job_body=job(callback_url="http://attacker.example/hook"),
    )
    message(
        "job-is-a-list",
        "job is a JSON array",
        quarantined("job must be a JSON object, got list", False),
        job_body=[1, 2, 3],
        job=NO_JOB,
    )
    message(
        "job-is-a-string",
        "job is a JSON string",
        quarantined("job must be a JSON object, got str", False),
        job_body="$JOB_ID",
        job=NO_JOB,
    )
    message(
        "no-job-kwarg",
        "the task called with no arguments at all",
        quarantined("job must be a JSON object, got NoneType", False),
        kwargs={},
        job=NO_JOB,
    )
    message(
        "positional-args",
        "the job passed positionally (and again as the job kwarg)",
        quarantined("unexpected task arguments: ['positional args']", True),
        args=[job()],
        kwargs={"job": job()},
    )
    message(
        "unknown-task-kwargs",
        "an extra keyword argument beside job",
        quarantined("unexpected task arguments: ['callback']", True),
        kwargs={"job": job(), "callback": "os.system"},
    )
    message(
        "huge-body",
        "a job over SYNAPSE_BRIDGE_MAX_MESSAGE_BYTES (the test worker: 262144); "
        "padded at test time",
        quarantined("over the 262144 limit", True),
        job_body=job(json={"inputs": ROWS, "pad": ""}),
        pad_bytes=300_000,
    )
    message(
        "deadline-passed",
        "a deadline long past: failed without running",
        failed("deadline passed before the job could run"),
        job_body=job(deadline="2001-01-01T00:00:00Z"),
    )


# --------------------------------------------------------------------------- raw bodies


def write_body(name: str, data: bytes) -> str:
    (BODIES / name).write_bytes(data)
    return f"bodies/{name}"


def raw(
    name: str,
    description: str,
    expect: dict[str, Any],
    body: str,
    *,
    content_type: str = "application/json",
    content_encoding: str = "utf-8",
    task: str | None = "synapse.inference.run",
    **spec: Any,
) -> None:
    case(
        name,
        "raw",
        description,
        expect,
        raw={
            "body_file": body,
            "content_type": content_type,
            "content_encoding": content_encoding,
            "task": task,
        },
        **spec,
    )


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True).encode()


def raw_cases() -> None:
    good = [[], {"job": job()}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
    text = dumps(good)
    raw(
        "malformed-json",
        "a body that is not JSON, labelled JSON",
        quarantined("undecodable message", False),
        write_body("malformed.json", b'[[], {"job": {"job_id": "$JOB_ID", token: alice}}, {}]'),
        job=NO_JOB,
    )
    raw(
        "truncated-json",
        "a valid task body cut in the middle",
        quarantined("undecodable message", False),
        write_body("truncated.json", text[: len(text) // 2]),
        job=NO_JOB,
    )
    raw(
        "empty-body",
        "an empty body labelled JSON",
        quarantined("the body is not [args, kwargs, embed]", False),
        write_body("empty.json", b""),
        job=NO_JOB,
    )
    raw(
        "body-is-an-object",
        "a JSON object where Celery wants [args, kwargs, embed]",
        quarantined("the body is not [args, kwargs, embed]", False),
        write_body("object.json", dumps({"job": job()})),
        job=NO_JOB,
    )
    raw(
        "body-is-a-number",
        "a JSON number as the task body",
        quarantined("the body is not [args, kwargs, embed]", False),
        write_body("number.json", b"42"),
        job=NO_JOB,
    )
    raw(
        "kwargs-not-a-dict",
        "the kwargs of the task body is a list",
        quarantined("the body is not [args, kwargs, embed]", False),
        write_body("kwargs-list.json", dumps([[], [job()], {}])),
        job=NO_JOB,
    )
    raw(
        "args-not-a-list",
        "the args of the task body is an object",
        quarantined("the body is not [args, kwargs, embed]", True),
        write_body("args-object.json", dumps([{"a": 1}, {"job": job()}, {}])),
    )
    raw(
        "non-utf8-json",
        "bytes that are not UTF-8, labelled JSON in UTF-8",
        quarantined("undecodable message", False),
        write_body("non-utf8.json", b'[[], {"job": {"job_id": "\xff\xfe\xc3\x28"}}, {}]'),
        job=NO_JOB,
    )
    raw(
        "latin1-encoding",
        "a JSON body that claims a non-UTF-8 content encoding",
        quarantined("undecodable message", False),
        write_body("latin1.json", '[[], {"job": {"note": "caf\u00e9"}}, {}]'.encode("latin-1")),
        content_encoding="latin-1",
        job=NO_JOB,
    )
    raw(
        "pickle-task",
        "a pickle-encoded task message (never unpickled)",
        quarantined("content type 'application/x-python-serialize' refused (JSON only)", False),
        write_body(
            "task.pickle",
            pickle.dumps(
                [[], {"job": job(job_id="pickled-job", token="not-a-real-token")}, {}], protocol=4
            ),
        ),
        content_type="application/x-python-serialize",
        content_encoding="binary",
        job=NO_JOB,
    )
    # If this body were ever unpickled, it would create the file $MARKER.
    raw(
        "pickle-code-execution",
        "a pickle that creates a file when loaded: refused, and the file never appears",
        quarantined("content type 'application/x-python-serialize' refused (JSON only)", False),
        write_body("rce.pickle", b"c__builtin__\nopen\n(V$MARKER\nVw\ntR."),
        content_type="application/x-python-serialize",
        content_encoding="binary",
        job=NO_JOB,
        marker=True,
    )
    raw(
        "yaml-task",
        "a YAML-encoded task message",
        quarantined("content type 'application/x-yaml' refused (JSON only)", False),
        write_body(
            "task.yaml",
            b"- []\n- job:\n    job_id: $JOB_ID\n    token: $TOKEN:alice\n    model: 12\n- {}\n",
        ),
        content_type="application/x-yaml",
        job=NO_JOB,
    )
    raw(
        "msgpack-task",
        "a msgpack-encoded task message",
        quarantined("content type 'application/x-msgpack' refused (JSON only)", False),
        # [[], {"job": {"model": 12}}, {}] in msgpack
        write_body("task.msgpack", b"\x93\x90\x81\xa3job\x81\xa5model\x0c\x80"),
        content_type="application/x-msgpack",
        content_encoding="binary",
        job=NO_JOB,
    )
    raw(
        "octet-stream",
        "binary content of an unknown type",
        quarantined("content type 'application/octet-stream' refused (JSON only)", False),
        write_body("blob.bin", bytes(range(256))),
        content_type="application/octet-stream",
        content_encoding="binary",
        job=NO_JOB,
    )
    raw(
        "unknown-task-name",
        "a valid body for a task this worker does not have",
        quarantined("unknown task 'synapse.inference.rm_rf'", True),
        write_body("task.json", text),
        task="synapse.inference.rm_rf",
    )
    raw(
        "no-task-headers",
        "a JSON body without Celery's task headers",
        quarantined("not a Celery task message", True),
        "bodies/task.json",
        task=None,
    )


# --------------------------------------------------------------------------- archives


def _zip(path: Path, entries: list[tuple[zipfile.ZipInfo, bytes]]) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        for info, data in entries:
            zf.writestr(info, data)


def zinfo(name: str, *, mode: int = stat.S_IFREG | 0o644) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, ZIP_TIME)
    info.create_system = 3
    info.external_attr = mode << 16
    info.compress_type = zipfile.ZIP_DEFLATED
    return info


def _tar(path: Path, entries: list[tuple[tarfile.TarInfo, bytes | None]], gz: bool = False) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for info, data in entries:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    data = buf.getvalue()
    if gz:
        out = io.BytesIO()
        with gzip.GzipFile(fileobj=out, mode="wb", mtime=0) as g:
            g.write(data)
        data = out.getvalue()
    path.write_bytes(data)


def tinfo(
    name: str, kind: bytes = tarfile.REGTYPE, size: int = 0, link: str = ""
) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = size
    info.linkname = link
    info.mode = 0o644
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def tfile(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    return tinfo(name, size=len(data)), data


META = b'{"seed": 0, "kind": "bad-input corpus"}\n'


def zip_bomb(path: Path) -> int:
    """An overlapping-entry zip bomb: 88 entries share one deflated kernel of 100 MiB of
    zeros (about 1030:1); every entry truly inflates to 100 MiB, 8.6 GiB in all, above
    the 8 GiB default bound. The file is about 100 KB."""
    kernel_size = 100 * 1024**2
    co = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunk = bytes(1 << 20)
    parts = [co.compress(chunk) for _ in range(kernel_size >> 20)]
    deflated = b"".join(parts) + co.flush()
    crc = 0
    for _ in range(kernel_size >> 20):
        crc = zlib.crc32(chunk, crc)
    n = 88
    first = b"w/0000.bin"
    dostime, dosdate = 0, (0 << 9) | (1 << 5) | 1
    local = (
        struct.pack(
            "<4s5H3L2H",
            b"PK\x03\x04",
            20,
            0,
            8,
            dostime,
            dosdate,
            crc,
            len(deflated),
            kernel_size,
            len(first),
            0,
        )
        + first
        + deflated
    )
    central = b""
    for i in range(n):
        name = f"w/{i:04d}.bin".encode()
        central += (
            struct.pack(
                "<4s6H3L5H2L",
                b"PK\x01\x02",
                (3 << 8) | 20,
                20,
                0,
                8,
                dostime,
                dosdate,
                crc,
                len(deflated),
                kernel_size,
                len(name),
                0,
                0,
                0,
                0,
                (stat.S_IFREG | 0o644) << 16,
                0,  # every entry's data is the one kernel at offset 0
            )
            + name
        )
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, n, n, len(central), len(local), 0)
    path.write_bytes(local + central + end)
    return n * kernel_size


def sparse_tar_bomb(path: Path) -> int:
    """A GNU sparse tar member of 16 GiB holding 512 real bytes (a file of holes)."""
    real_size = 16 * 1024**3
    info = tinfo("model/weights.bin", tarfile.GNUTYPE_SPARSE, size=512)
    header = bytearray(info.tobuf(tarfile.GNU_FORMAT))

    def octal(value: int, width: int) -> bytes:
        return f"{value:0{width - 1}o}".encode() + b"\0"

    header[386:398] = octal(0, 12)  # sparse map: 512 bytes of data at offset 0 ...
    header[398:410] = octal(512, 12)
    header[482] = 0  # ... no extended sparse headers
    header[483:495] = octal(real_size, 12)  # ... in a file of 16 GiB
    header[148:156] = b"        "
    checksum = sum(header[:512])
    header[148:156] = f"{checksum:06o}".encode() + b"\0 "
    path.write_bytes(bytes(header[:512]) + b"\x01" * 512 + b"\0" * 1024 * 19)
    return real_size


def build_archives() -> None:
    _zip(
        ARCHIVES / "zip-slip.zip",
        [(zinfo("meta.json"), META), (zinfo("../../synapse-zip-slip.txt"), b"pwned\n")],
    )
    _zip(
        ARCHIVES / "zip-absolute-path.zip",
        [(zinfo("meta.json"), META), (zinfo("/tmp/synapse-zip-absolute.txt"), b"pwned\n")],
    )
    _zip(
        ARCHIVES / "zip-symlink-escape.zip",
        [
            (zinfo("meta.json"), META),
            (zinfo("escape", mode=stat.S_IFLNK | 0o777), b"../../../../../../etc"),
        ],
    )
    _zip(ARCHIVES / "zip-encrypted.zip", [(zinfo("meta.json"), META)])
    data = bytearray((ARCHIVES / "zip-encrypted.zip").read_bytes())
    for sig, flag_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        data[data.find(sig) + flag_at] |= 0x1  # "encrypted", in both headers
    (ARCHIVES / "zip-encrypted.zip").write_bytes(bytes(data))
    good = io.BytesIO()
    with zipfile.ZipFile(good, "w") as zf:
        zf.writestr(zinfo("meta.json"), META)
    (ARCHIVES / "zip-truncated.zip").write_bytes(good.getvalue()[:-30])
    _tar(ARCHIVES / "tar-dotdot.tar", [tfile("meta.json", META), tfile("../escape.txt", b"x\n")])
    _tar(
        ARCHIVES / "tar-absolute-path.tar",
        [tfile("meta.json", META), tfile("/tmp/synapse-tar-absolute.txt", b"x\n")],
    )
    _tar(
        ARCHIVES / "tar-symlink-escape.tar",
        [
            tfile("meta.json", META),
            (tinfo("etc", tarfile.SYMTYPE, link="../../../../../../etc"), None),
            tfile("etc/synapse-written-through-link", b"x\n"),
        ],
    )
    _tar(
        ARCHIVES / "tar-symlink-absolute.tar",
        [tfile("meta.json", META), (tinfo("passwd", tarfile.SYMTYPE, link="/etc/passwd"), None)],
    )
    _tar(
        ARCHIVES / "tar-hardlink-escape.tar",
        [tfile("meta.json", META), (tinfo("pw", tarfile.LNKTYPE, link="../../etc/passwd"), None)],
    )
    _tar(
        ARCHIVES / "tar-device.tar",
        [tfile("meta.json", META), (tinfo("dev-null", tarfile.CHRTYPE), None)],
    )
    _tar(
        ARCHIVES / "tar-fifo.tar",
        [tfile("meta.json", META), (tinfo("pipe", tarfile.FIFOTYPE), None)],
    )
    _tar(
        ARCHIVES / "valid-model.tar.gz",
        [tfile("meta.json", META)] + [tfile(f"w/{i}.bin", bytes([i]) * 4096) for i in range(8)],
        gz=True,
    )
    full = (ARCHIVES / "valid-model.tar.gz").read_bytes()
    (ARCHIVES / "corrupt.tar.gz").write_bytes(full[: len(full) * 2 // 3])  # cut short
    (ARCHIVES / "not-an-archive.bin").write_bytes(b"this is not an archive\n" * 64)
    zip_bomb(ARCHIVES / "bomb.zip")
    sparse_tar_bomb(ARCHIVES / "tar-sparse-bomb.tar")


def model_case(
    name: str,
    description: str,
    expect: dict[str, Any],
    *,
    model_id: int,
    archive: str | None = None,
    seed_ext: str | None = None,
    checksum: str | None = None,
    release: dict[str, Any] | None = None,
) -> None:
    spec: dict[str, Any] = {"id": model_id}
    if archive is not None:
        spec["archive"] = f"archives/{archive}"
        spec["seed_ext"] = seed_ext or archive.split(".", 1)[1]
    if checksum is not None:
        spec["checksum"] = checksum
    case(
        name,
        "model",
        description,
        expect,
        model=spec,
        message={"args": [], "kwargs": {"job": job(model=model_id, release=release or PROBE)}},
    )


def model_cases() -> None:
    model_case(
        "unknown-model",
        "model 999 does not exist: 404 from the runtime",
        failed("model 999 not found", status=404),
        model_id=999,
    )
    model_case(
        "model-without-file",
        "model 17 has no file to load",
        failed("model 17 has no file", status=422),
        model_id=17,
    )
    refused = "model_archive_refused"
    for n, (archive, reason) in enumerate(
        [
            ("zip-slip.zip", "'..' component in path"),
            ("zip-absolute-path.zip", "absolute path"),
            ("zip-symlink-escape.zip", "leaves the destination"),
            ("zip-encrypted.zip", "is encrypted"),
            ("zip-truncated.zip", "not a zip or tar archive"),
            ("tar-dotdot.tar", "'..' component in path"),
            ("tar-absolute-path.tar", "absolute path"),
            ("tar-symlink-escape.tar", "leaves the destination"),
            ("tar-symlink-absolute.tar", "absolute link target"),
            ("tar-hardlink-escape.tar", "'..' component in hard link target"),
            ("tar-device.tar", "device file"),
            ("tar-fifo.tar", "FIFO"),
            ("corrupt.tar.gz", "corrupt archive"),
            ("not-an-archive.bin", "not a zip or tar archive"),
            ("bomb.zip", f"unpacked size would exceed the limit of {DEFAULT_MAX_UNPACKED} bytes"),
            (
                "tar-sparse-bomb.tar",
                f"unpacked size would exceed the limit of {DEFAULT_MAX_UNPACKED} bytes",
            ),
        ]
    ):
        stem = archive.split(".", 1)[0]
        model_case(
            f"archive-{stem}",
            f"a model whose archive is {archive}: refused before anything is loaded "
            f"(HTTP 422 {refused})",
            failed(reason, status=422),
            model_id=901 + n,
            archive=archive,
            seed_ext="tar.gz" if archive.endswith(".bin") else None,
        )
    model_case(
        "archive-checksum-mismatch",
        "a valid archive whose bytes do not match the checksum the backend states",
        failed("checksum", status=422),
        model_id=951,
        archive="valid-model.tar.gz",
        checksum="sha256:" + "0" * 64,
    )


# --------------------------------------------------------------------------- endpoints


def endpoint_cases() -> None:
    def probe_job(body: dict[str, Any], **over: Any) -> dict[str, Any]:
        return {"job": job(model=22, release=PROBE, json=body, **over)}

    case(
        "endpoint-invalid-json",
        "endpoint",
        "the endpoint answers 200 with a body that is not JSON",
        failed("with a body that is not JSON"),
        message={"args": [], "kwargs": probe_job({"respond": "invalid_json"})},
    )
    case(
        "endpoint-bad-envelope",
        "endpoint",
        "the endpoint answers a deferred envelope of an unknown state",
        failed("malformed deferred envelope"),
        message={"args": [], "kwargs": probe_job({"respond": "bad_envelope"})},
    )
    case(
        "endpoint-bare-500",
        "endpoint",
        "the replica raises: a bare 500, transient by policy, retried within the bound",
        failed("gave up after 3 attempts", transient=True),
        message={"args": [], "kwargs": probe_job({"respond": "http_500"})},
    )
    case(
        "endpoint-bad-input-shape",
        "endpoint",
        "a request the model cannot take: 422 from the endpoint",
        failed("rows of 4 numbers", status=422),
        message={"args": [], "kwargs": {"job": job(json={"inputs": [[1, 2]]})}},
    )
    case(
        "endpoint-route-unknown",
        "endpoint",
        "a release no serve application answers (proxy 404: transient), retried then failed",
        failed("gave up after 3 attempts", transient=True),
        message={
            "args": [],
            "kwargs": {"job": job(release={"code": "no-such-plugin", "version": "0"})},
        },
    )
    case(
        "tenant-mismatch",
        "endpoint",
        "eve (tenant globex) with her token on acme's model 12: 403",
        failed("no access to model", status=403),
        message={"args": [], "kwargs": {"job": job(token="$TOKEN:eve")}},
    )
    case(
        "tenant-mismatch-own-tenant",
        "endpoint",
        "eve names her own tenant for acme's model 12: 403",
        failed("no access to model", status=403),
        message={"args": [], "kwargs": {"job": job(token="$TOKEN:eve", tenant="globex")}},
        job={"create": True, "tenant": "globex"},
    )
    case(
        "no-grant",
        "endpoint",
        "carol (acme, no grant on model 13): 403",
        failed("no access to model", status=403),
        message={"args": [], "kwargs": {"job": job(token="$TOKEN:carol", model=13)}},
    )
    case(
        "unknown-user-token",
        "endpoint",
        "a token the backend does not know: 401",
        failed("backend refused the user token", status=401),
        message={"args": [], "kwargs": {"job": job(token="tok-nobody-0000000000")}},
    )


def main() -> None:
    for d in (CASES, BODIES, ARCHIVES):
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
    CASE_LIST.clear()
    build_archives()
    message_cases()
    raw_cases()
    model_cases()
    endpoint_cases()
    for n, spec in enumerate(CASE_LIST, start=1):
        spec = {"id": f"{n:03d}-{spec['name']}", **spec}
        (CASES / f"{spec['id']}.json").write_text(json.dumps(spec, indent=2) + "\n")
    kinds: dict[str, int] = {}
    for spec in CASE_LIST:
        kinds[spec["kind"]] = kinds.get(spec["kind"], 0) + 1
    print(f"{len(CASE_LIST)} cases: {kinds}")


if __name__ == "__main__":
    main()
