"""Issue 12 item 8 (a, b): the caller's token goes to the backend only, the signing key
stays on the node.

(a) A model whose ``file`` URL names another host is downloaded without the caller's
``Authorization`` / ``Synapse-Access-Token`` / ``Synapse-Tenant`` headers (a small real
HTTP server plays that host and records what it is sent); a file on the backend's own
origin still gets them (its downloads need them); a redirect is never followed, so a
redirect to another host cannot carry the token there.

(b) ``deploy()`` never copies a secret into Ray's ``runtime_env`` (Serve's API shows it):
not the signing key, not the sealing key. A replica reads its key from its own
environment or from the file ``SYNAPSE_SERVE_SIGNING_KEY_FILE`` names, and verifies
tokens signed with it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from config import SettingsError, get_settings, load_settings
from serve_runtime.client import ServeClient, reset_default_client
from serve_runtime.errors import ServeError
from tests.conftest import PROBE_PLUGIN, TOKENS

# Models of this module only (ids no other module seeds).
EXTERNAL_MODEL = 8101  # its file on another host
LOCAL_MODEL = 8102  # its file on the backend
REDIRECTED_MODEL = 8103  # the backend redirects its download elsewhere
CREDENTIAL_HEADERS = ("authorization", "synapse-access-token", "synapse-tenant")


@dataclass
class FileHost:
    """A real HTTP server on another port (another origin): serves one archive at any
    path and records every request's path and headers."""

    url: str
    seen: list[dict[str, Any]] = field(default_factory=list)


@pytest.fixture(scope="module")
def file_host(model_archives: dict[int, Path]) -> Iterator[FileHost]:
    body = model_archives[12].read_bytes()
    host = FileHost(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            host.seen.append(
                {"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}}
            )
            self.send_response(200)
            self.send_header("Content-Type", "application/gzip")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield host
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def seeded(admin_module: Any, model_archives: dict[int, Path], file_host: FileHost) -> None:
    archive = model_archives[12]
    checksum = "sha256:" + hashlib.sha256(archive.read_bytes()).hexdigest()
    admin_module.seed(
        {
            "models": [
                {
                    "id": EXTERNAL_MODEL,
                    "name": "external-file",
                    "tenant": "acme",
                    "file_url": f"{file_host.url}/bucket/model.tar.gz?X-Signature=abc",
                    "checksum": checksum,
                },
                {
                    "id": LOCAL_MODEL,
                    "name": "local-file",
                    "tenant": "acme",
                    "archive": str(archive),
                },
                {
                    "id": REDIRECTED_MODEL,
                    "name": "redirected",
                    "tenant": "acme",
                    "archive": str(archive),
                },
            ]
        }
    )


@pytest.fixture(scope="module")
def admin_module(backend: Any) -> Iterator[Any]:
    from local_backend.client import AdminClient

    with AdminClient(backend.url) as client:
        yield client


def _call(route_prefix: str, model: int, signing_key: str | None = None) -> Any:
    """Alice's call for ``model`` (the token signed with ``signing_key``, default the
    backend URL), waiting out a deferred answer; a ``ServeError`` is returned."""
    client = ServeClient(load_settings(signing_key=signing_key))
    try:
        return client.call_and_wait(
            route_prefix, {"x": 1}, model=model, token=TOKENS["alice"], tenant="acme", wait_s=60
        )
    except ServeError as e:
        return e
    finally:
        client.close()


# --------------------------------------------------------------------------- (a) unit


def test_file_headers_only_on_the_backends_origin() -> None:
    from serve_runtime.backend_client import BackendClient

    client = BackendClient("http://Backend.example:8010/api/")
    creds = client.file_headers("http://backend.example:8010/files/models/1.tar.gz", "t", "acme")
    assert creds == {"Authorization": "Token t", "Synapse-Tenant": "Token acme"}
    assert client.file_headers("HTTP://BACKEND.EXAMPLE:8010/x", "t", None) == {
        "Authorization": "Token t"
    }
    for elsewhere in (
        "http://backend.example:8011/files/models/1.tar.gz",  # another port
        "https://backend.example:8010/files/models/1.tar.gz",  # another scheme
        "http://storage.example/bucket/1.tar.gz?X-Amz-Signature=abc",  # another host
        "http://backend.example.evil.example:8010/x",
        "http://backend.example:8010@evil.example/x",  # userinfo: the host is evil.example
        "//backend.example:8010/x",  # no scheme
        "not a url",
        "",
    ):
        assert client.file_headers(elsewhere, "t", "acme") == {}, elsewhere
    # Default ports are filled in on both sides.
    plain = BackendClient("http://backend.example")
    assert plain.file_headers("http://backend.example:80/x", "t", None) != {}
    tls = BackendClient("https://backend.example:443")
    assert tls.file_headers("https://backend.example/x", "t", None) != {}
    assert tls.file_headers("http://backend.example/x", "t", None) == {}


def test_the_replicas_http_client_never_follows_redirects() -> None:
    from serve_runtime.backend_client import BackendClient

    async def flag() -> bool:
        client = BackendClient("http://127.0.0.1:9")
        try:
            return client.http.follow_redirects
        finally:
            await client.aclose()

    assert asyncio.run(flag()) is False


# --------------------------------------------------------------------------- (a) end to end


def test_a_file_on_another_host_gets_no_credentials(
    probe_app: Any, serve_env: dict[str, str], seeded: None, file_host: FileHost
) -> None:
    before = len(file_host.seen)
    result = _call(probe_app.route_prefix, EXTERNAL_MODEL)
    assert not isinstance(result, ServeError), result
    assert result["model"] == EXTERNAL_MODEL
    got = file_host.seen[before:]
    assert [g["path"] for g in got] == ["/bucket/model.tar.gz?X-Signature=abc"]
    leaked = {h: got[0]["headers"][h] for h in CREDENTIAL_HEADERS if h in got[0]["headers"]}
    assert leaked == {}, f"the other host was sent {sorted(leaked)}"
    assert not any(TOKENS["alice"] in v for v in got[0]["headers"].values())


def test_a_file_on_the_backend_still_gets_the_callers_credentials(
    probe_app: Any, serve_env: dict[str, str], seeded: None, admin_module: Any
) -> None:
    result = _call(probe_app.route_prefix, LOCAL_MODEL)
    # The backend answers 401 to a download without the caller's token.
    assert not isinstance(result, ServeError), result
    assert admin_module.stats()["downloads_by_model"].get(str(LOCAL_MODEL)) == 1


def test_a_backend_redirect_is_not_followed(
    probe_app: Any,
    serve_env: dict[str, str],
    seeded: None,
    admin_module: Any,
    file_host: FileHost,
) -> None:
    before = len(file_host.seen)
    admin_module.set_faults(
        [
            {
                "path_prefix": f"files/models/{REDIRECTED_MODEL}.",
                "redirect_to": f"{file_host.url}/redirected",
            }
        ]
    )
    try:
        result = _call(probe_app.route_prefix, REDIRECTED_MODEL)
    finally:
        admin_module.clear_faults()
    assert isinstance(result, ServeError), result
    assert "model_fetch_failed" in str(result) or result.code == "model_fetch_failed", result
    assert "HTTP 302" in str(result), result
    assert file_host.seen[before:] == []  # the token never went there


# --------------------------------------------------------------------------- (b)


def test_replica_env_keeps_no_secret() -> None:
    from serve_runtime.deploy import replica_env

    env = {
        "SYNAPSE_BRIDGE_MODEL_DIR": "/tmp/m",
        "SYNAPSE_BRIDGE_SEALING_KEY": "sealing-secret",
        "SYNAPSE_SERVE_SIGNING_KEY": "signing-secret",
        "SYNAPSE_SERVE_SIGNING_KEY_FILE": "/run/secrets/signing",
        "SYNAPSE_BRIDGE_SOME_TOKEN": "t",
        "SYNAPSE_BRIDGE_DB_PASSWORD": "p",
        "SYNAPSE_BRIDGE_CLIENT_SECRET": "s",
        "SYNAPSE_BRIDGE_CACHE_URL": "redis://user:pw@cache:6379/0",
        "SYNAPSE_BRIDGE_OTHER_URL": "redis://tokenonly@cache:6379/0",
        "SYNAPSE_TEST_EVENTS_DIR": "/tmp/e",
        "SYNAPSE_ACCESS_TOKEN": "service-token",
        "HOME": "/root",
    }
    assert replica_env(env) == {
        "SYNAPSE_BRIDGE_MODEL_DIR": "/tmp/m",
        "SYNAPSE_SERVE_SIGNING_KEY_FILE": "/run/secrets/signing",
        "SYNAPSE_TEST_EVENTS_DIR": "/tmp/e",
    }


def test_signing_key_file_setting(tmp_path: Path) -> None:
    key_file = tmp_path / "signing"
    key_file.write_text("from-the-file-0123456789abcdef\n")
    s = load_settings(signing_key_file=key_file)
    assert s.signing_key is not None
    assert s.signing_key.get_secret_value() == "from-the-file-0123456789abcdef"
    assert "from-the-file" not in repr(s)
    # The key itself, when set, wins over the file.
    s = load_settings(signing_key="direct-key-0123456789", signing_key_file=key_file)
    assert s.signing_key is not None and s.signing_key.get_secret_value().startswith("direct")
    for bad in (tmp_path / "missing", tmp_path):  # no such file; a directory
        with pytest.raises(SettingsError, match="SYNAPSE_SERVE_SIGNING_KEY_FILE"):
            load_settings(signing_key_file=bad)
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(SettingsError, match="SYNAPSE_SERVE_SIGNING_KEY_FILE"):
        load_settings(signing_key_file=empty)


SIGNING_KEY = "node-signing-key-7f3a9c0e1d2b4a6f8e0c"
SEALING_KEY = "Q0mXh3l2b8c7-sealing-key-never-shown-0000="
KEYS_APP = "probe-keys"


@pytest.fixture
def keys_app(
    ray_serve: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seeded: None
) -> Iterator[Any]:
    """The probe plugin deployed with both keys in the driver's environment and the
    signing key's file named; the cluster was started before, so the replica knows the
    key only from what deploy() passes on or the file."""
    from ray import serve

    from serve_runtime.deploy import deploy

    key_file = tmp_path / "signing-key"
    key_file.write_text(SIGNING_KEY + "\n")
    monkeypatch.setenv("SYNAPSE_SERVE_SIGNING_KEY", SIGNING_KEY)
    monkeypatch.setenv("SYNAPSE_BRIDGE_SEALING_KEY", SEALING_KEY)
    monkeypatch.setenv("SYNAPSE_SERVE_SIGNING_KEY_FILE", str(key_file))
    get_settings.cache_clear()
    spec = deploy(PROBE_PLUGIN, app_name=KEYS_APP, route_prefix="/probekeys")
    yield spec
    serve.delete(KEYS_APP)
    # The keys leave this process's cached settings and client before the next test:
    # the session's other apps verify with the backend URL, sealing needs a Fernet key.
    monkeypatch.undo()
    get_settings.cache_clear()
    reset_default_client()


def test_no_secret_in_serves_reported_config(keys_app: Any, serve_env: dict[str, str]) -> None:
    from ray import serve
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    shown = json.dumps(details, default=str) + repr(serve.status())
    assert KEYS_APP in shown
    assert SIGNING_KEY not in shown, "the signing key is in Serve's reported config"
    assert SEALING_KEY not in shown, "the sealing key is in Serve's reported config"
    # The path travels (a path is no secret), so the replica can read the key there.
    assert "SYNAPSE_SERVE_SIGNING_KEY_FILE" in shown
    # And the replica verifies with the key: a token signed with it is served, one
    # signed with the backend URL (the SDK's default key) is refused.
    result = _call(keys_app.route_prefix, LOCAL_MODEL, SIGNING_KEY)
    assert not isinstance(result, ServeError), result
    assert result["model"] == LOCAL_MODEL
    # (This process has the key in its environment: sign with the URL explicitly.)
    refused = _call(keys_app.route_prefix, LOCAL_MODEL, serve_env["SYNAPSE_HOST"])
    assert isinstance(refused, ServeError) and refused.status_code == 401, refused
