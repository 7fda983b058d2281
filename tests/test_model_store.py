"""The model store of a replica (issue 12, items 1 and 3-6), in process and end to end.

In process: a ``ModelStore`` against the real local backend, its loader and release hook
recording what happens. End to end: the probe plugin on real Ray Serve (bound: two
models per replica), its load/release events in the session's events.jsonl.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from examples.classifier.model import write_model_archive
from serve_runtime import Pending, ServeClient, ServeClientError
from serve_runtime.backend_client import BackendClient, ModelAccessError
from serve_runtime.errors import DeferredNotFound
from serve_runtime.model_dirs import ReplicaDir, sweep
from serve_runtime.model_store import ModelStore
from tests.conftest import PROBE_PLUGIN, ROOT, TOKENS, wait_for
from tests.test_serve_e2e import client, events, stats

ALICE = TOKENS["alice"]


# -- in process


class Recorder:
    """A loader and a release hook that note what they were given."""

    def __init__(self, fail: set[str] | None = None, load_s: float = 0.0) -> None:
        self.loads: list[str] = []
        self.releases: list[tuple[str, bool]] = []
        self.fail = fail or set()
        self.load_s = load_s

    async def load(self, info: dict[str, Any]) -> dict[str, Any]:
        self.loads.append(str(info["id"]))
        if self.load_s:
            await asyncio.sleep(self.load_s)
        if str(info["id"]) in self.fail:
            raise RuntimeError("this loader refuses the model")
        return {"id": str(info["id"]), "path": Path(info["path"])}

    async def release(self, model: dict[str, Any], info: dict[str, Any]) -> None:
        self.releases.append((model["id"], model["path"].exists()))


def make_store(
    backend_url: str, root: Path, rec: Recorder, max_models: int = 2, backoff: float = 30.0
) -> ModelStore:
    return ModelStore(
        BackendClient(backend_url, 10.0),
        root,
        loader=rec.load,
        releaser=rec.release,
        max_models=max_models,
        max_download_bytes=10**8,
        max_unpacked_bytes=10**8,
        failure_backoff_s=backoff,
    )


async def use(store: ModelStore, model: int) -> Any:
    """One short request for ``model`` (alice, tenant acme)."""
    info = await store.authorize(str(model), ALICE, "acme")
    async with store.use(f"acme:{model}", info, ALICE, "acme") as entry:
        return entry


def resident_ids(store: ModelStore) -> set[str]:
    return {e.ident[1] for e in store.resident}


def downloads(admin: Any, model: int) -> int:
    return int(admin.stats()["downloads_by_model"].get(str(model), 0))


def test_a_failing_fetch_evicts_nothing_and_is_remembered(
    backend: Any, admin: Any, tmp_path: Path
) -> None:
    rec = Recorder()

    async def scenario() -> None:
        store = make_store(backend.url, tmp_path, rec, backoff=30.0)
        await use(store, 12)
        await use(store, 14)
        for model, code in ((24, "model_fetch_failed"), (17, "model_has_no_file")):
            for _ in range(3):
                with pytest.raises(ModelAccessError) as info:
                    await use(store, model)
                assert info.value.code == code
        assert "checksum mismatch" in str(_fetch_error_of(store, 24))
        assert resident_ids(store) == {"12", "14"}  # the healthy models stay
        assert rec.releases == []
        await store.close()

    before = downloads(admin, 24)
    asyncio.run(scenario())
    assert downloads(admin, 24) - before == 1  # remembered: fetched once, not three times


def _fetch_error_of(store: ModelStore, model: int) -> Exception:
    return next(err for ident, (_, err) in store._failed.items() if ident[1] == str(model))


def test_a_loader_exception_evicts_at_most_once_per_backoff(backend: Any, tmp_path: Path) -> None:
    rec = Recorder(fail={"27"})

    async def scenario() -> None:
        store = make_store(backend.url, tmp_path, rec, backoff=30.0)
        await use(store, 12)
        await use(store, 14)
        for _ in range(4):
            with pytest.raises(ModelAccessError) as info:
                await use(store, 27)
            assert info.value.code == "model_load_failed"
            assert "RuntimeError" in str(info.value)
        assert rec.loads.count("27") == 1
        assert len(rec.releases) <= 1  # the room made for it once, never again
        await store.close()

    asyncio.run(scenario())


def test_a_failure_is_tried_again_after_the_backoff(backend: Any, tmp_path: Path) -> None:
    rec = Recorder(fail={"27"})

    async def scenario() -> None:
        store = make_store(backend.url, tmp_path, rec, backoff=0.3)
        with pytest.raises(ModelAccessError):
            await use(store, 27)
        with pytest.raises(ModelAccessError):
            await use(store, 27)
        assert rec.loads.count("27") == 1
        await asyncio.sleep(0.4)  # past the backoff: the store tries again
        with pytest.raises(ModelAccessError):
            await use(store, 27)
        assert rec.loads.count("27") == 2
        await store.close()

    asyncio.run(scenario())


def test_a_model_in_use_is_never_freed_and_waiting_blocks_no_other_load(
    backend: Any, tmp_path: Path
) -> None:
    rec = Recorder()

    async def scenario() -> None:
        store = make_store(backend.url, tmp_path, rec, max_models=2)
        info12 = await store.authorize("12", ALICE, "acme")
        busy = await store.checkout("acme:12", info12, ALICE, "acme")  # a long request
        await use(store, 14)
        await use(store, 15)  # room by evicting the idle 14, not the busy 12
        assert resident_ids(store) == {"12", "15"}
        await use(store, 21)  # the idle 15 goes
        assert busy.path.exists() and ("12", True) not in rec.releases
        # Both slots busy: the next load waits for room, the busy copy is only unslotted.
        info22 = await store.authorize("22", ALICE, "acme")
        info21 = await store.authorize("21", ALICE, "acme")
        busy21 = await store.checkout("acme:21", info21, ALICE, "acme")
        waiting = asyncio.create_task(store.checkout("acme:22", info22, ALICE, "acme"))
        await asyncio.sleep(0.3)
        assert not waiting.done()  # no room: the copies in use stay in memory
        assert busy.path.exists()
        store.checkin(busy)  # the first request ends: its copy goes, the load proceeds
        entry22 = await asyncio.wait_for(waiting, 10)
        assert ("12", True) in rec.releases  # released after its request, files intact
        await wait_async(lambda: not busy.workdir.exists())
        assert len(store.resident) <= 2
        store.checkin(entry22)
        store.checkin(busy21)
        await store.close()

    asyncio.run(scenario())


def test_a_load_whose_callers_left_still_counts_and_is_evicted(
    backend: Any, tmp_path: Path
) -> None:
    rec = Recorder(load_s=0.5)

    async def scenario() -> None:
        store = make_store(backend.url, tmp_path, rec, max_models=2)
        info = await store.authorize("26", ALICE, "acme")
        caller = asyncio.create_task(store.checkout("acme:26", info, ALICE, "acme"))
        await asyncio.sleep(0.2)
        caller.cancel()  # the client gave up during the load
        with pytest.raises(asyncio.CancelledError):
            await caller
        await wait_async(lambda: "26" in resident_ids(store))  # the load finished anyway
        await use(store, 12)
        await use(store, 14)
        assert len(store.resident) <= 2, resident_ids(store)
        assert "26" not in resident_ids(store)
        await store.close()

    asyncio.run(scenario())


def test_a_new_version_replaces_the_copy_in_its_slot(backend: Any, tmp_path: Path) -> None:
    rec = Recorder()

    async def scenario() -> None:
        store = make_store(backend.url, tmp_path, rec, max_models=2)
        v1 = await store.authorize("12", ALICE, "acme")
        v2 = {**v1, "version": 2}  # what the backend answers once version 2 is out
        v3 = {**v1, "version": 3}
        async with store.use("acme:12", v1, ALICE, "acme"):
            pass
        await use(store, 14)
        async with store.use("acme:12", v2, ALICE, "acme") as new:
            assert new.ident[2] == "2"
        assert store.slot_keys.count("acme:12") == 1
        # the room came from the old version, not from model 14
        assert sorted(e.ident[1:3] for e in store.resident) == [("12", "2"), ("14", "1")]
        old = await store.checkout("acme:12", v2, ALICE, "acme")  # in use while v3 comes
        async with store.use("acme:12", v3, ALICE, "acme") as newer:
            assert newer.ident[2] == "3" and old.path.exists()  # in use: not freed
        store.checkin(old)
        await wait_async(lambda: not old.workdir.exists())
        assert {e.ident[2] for e in store.resident if e.ident[1] == "12"} == {"3"}
        await store.close()

    asyncio.run(scenario())


def test_evicted_and_closed_models_leave_no_files(backend: Any, tmp_path: Path) -> None:
    rec = Recorder()

    async def scenario() -> None:
        store = make_store(backend.url, tmp_path, rec, max_models=1)
        for model in (12, 14, 15, 12):
            await use(store, model)
        kept = {store.resident[0].workdir.name}
        await wait_async(lambda: {p.name for p in tmp_path.iterdir()} == kept)
        await store.close()
        assert list(tmp_path.iterdir()) == []

    asyncio.run(scenario())


async def wait_async(predicate: Callable[[], Any], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s")
        await asyncio.sleep(0.05)


# -- replica directories across restarts

DEAD_REPLICA = """
import sys, time
from serve_runtime.model_dirs import ReplicaDir
d = ReplicaDir(sys.argv[1])
(d.path / "extracted-model.bin").write_bytes(b"x" * 4096)
print("ready", flush=True)
time.sleep(600)
"""

DEAD_DEPLOYMENT = """
import sys, time
from probe_plugin import ProbeDeployment
dep = ProbeDeployment(sys.argv[1])
dep._store.root.mkdir(parents=True, exist_ok=True)
(dep._store.root / "extracted-model.bin").write_bytes(b"x" * 4096)
print("ready", flush=True)
time.sleep(600)
"""


def start_and_kill(script: str, arg: str, env: dict[str, str]) -> None:
    """A replica killed as an OOM kill would: no shutdown hook runs."""
    proc = subprocess.Popen(
        [sys.executable, "-c", script, arg], env=env, stdout=subprocess.PIPE, cwd=str(ROOT)
    )
    assert proc.stdout is not None
    for line in proc.stdout:  # log lines may come first
        if line.strip() == b"ready":
            break
    assert proc.poll() is None, "the replica process died before it was ready"
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)


def replica_dirs(model_dir: Path) -> list[Path]:
    return [p for p in model_dir.iterdir() if p.is_dir()]


def test_replicas_restarted_ten_times_leave_only_the_live_ones_files(tmp_path: Path) -> None:
    model_dir = tmp_path / "models"
    for _ in range(10):
        start_and_kill(DEAD_REPLICA, str(model_dir), dict(os.environ))
        assert len(replica_dirs(model_dir)) == 1  # each start swept the one killed before
    live = ReplicaDir(model_dir)
    try:
        assert len(live.swept) == 1
        assert replica_dirs(model_dir) == [live.path]
        assert sweep(model_dir, keep=live.path.name) == []  # a live replica is never swept
        assert live.path.is_dir()
    finally:
        live.close()
    assert list(model_dir.iterdir()) == []


@pytest.mark.slow
def test_a_restarted_deployment_sweeps_the_files_of_its_killed_replica(
    backend: Any, tmp_path: Path
) -> None:
    model_dir = tmp_path / "models"
    env = {
        **os.environ,
        "SYNAPSE_BRIDGE_MODEL_DIR": str(model_dir),
        "SYNAPSE_TEST_EVENTS_DIR": str(tmp_path),
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(PROBE_PLUGIN)]),
    }
    for _ in range(2):
        start_and_kill(DEAD_DEPLOYMENT, backend.url, env)
        assert len(replica_dirs(model_dir)) == 1


# -- end to end, on the probe plugin (two models per replica)


def probe_call(app: Any, model: int, body: dict[str, Any] | None = None, **kw: Any) -> Any:
    c = kw.pop("c", None) or client()
    return c.call_and_wait(
        app.route_prefix, body or {"x": 1}, model=model, token=ALICE, tenant="acme", **kw
    )


def resident_models(app_name: str) -> set[str]:
    return {r["ident"][1] for r in stats(app_name)["resident"]}


def test_a_model_failing_its_checksum_leaves_the_loaded_models_alone(
    probe_app: Any, admin: Any, session_dir: Path
) -> None:
    probe_call(probe_app, 28)
    probe_call(probe_app, 29)
    before = stats(probe_app.app_name)
    assert {r["ident"][1] for r in before["resident"]} == {"28", "29"}
    since = time.time()
    downloads_before = downloads(admin, 24)
    for _ in range(3):
        with pytest.raises(ServeClientError) as info:
            probe_call(probe_app, 24)
        assert info.value.status_code == 422
        assert info.value.code == "model_fetch_failed"
        assert "checksum mismatch" in str(info.value)
    after = stats(probe_app.app_name)
    assert after["resident"] == before["resident"]  # the same copies, same files
    assert after["loads"] == before["loads"]
    released = [e for e in events(session_dir) if e["event"] == "release" and e["time"] > since]
    assert released == []
    assert downloads(admin, 24) - downloads_before == 1  # remembered for the backoff


def test_a_model_in_use_through_get_model_is_not_deleted(probe_app: Any, session_dir: Path) -> None:
    """The SDK's path: ``model = await self.get_model()``, then the model is used."""
    result: dict[str, Any] = {}

    def slow_sdk_request() -> None:
        try:
            result["ok"] = probe_call(probe_app, 21, {"sdk": True, "sleep_s": 3})
        except Exception as e:  # surfaced below
            result["error"] = e

    since = time.time()
    t = threading.Thread(target=slow_sdk_request)
    t.start()
    wait_for(
        lambda: any(
            e["event"] == "sdk_model" and e["model"] == 21 and e["time"] > since
            for e in events(session_dir)
        ),
        timeout=30,
        what="the SDK request holding model 21",
    )
    probe_call(probe_app, 22)  # two other models: 21 is evicted while in use
    probe_call(probe_app, 23)
    t.join(60)
    assert "error" not in result, result.get("error")
    assert result["ok"]["meta"]["version"] == 1  # its files were still there at the end
    probe_call(probe_app, 12)  # 21, least recently used and idle now, goes
    released = wait_for(
        lambda: [
            e
            for e in events(session_dir)
            if e["event"] == "release" and e["model"] == 21 and e["time"] > since
        ],
        timeout=30,
        what="model 21 released",
    )
    assert released[0]["exists"] is True


def test_waiting_for_a_busy_model_blocks_no_other_load(probe_app: Any) -> None:
    c = client()
    busy = c.infer(
        probe_app.route_prefix, {"sleep_s": 8}, model=12, token=ALICE, tenant="acme"
    )  # deferred: the work holds model 12 for 8 s
    assert isinstance(busy, Pending)
    probe_call(probe_app, 14)
    probe_call(probe_app, 15)  # room made without waiting for model 12's request
    probe_call(probe_app, 22)
    still = c.poll(probe_app.route_prefix, busy.ticket, model=12, token=ALICE, tenant="acme")
    assert isinstance(still, Pending)  # the loads above did not wait for it
    done = c.call_and_wait(
        probe_app.route_prefix, {"sleep_s": 0}, model=12, token=ALICE, tenant="acme"
    )
    assert done["model"] == 12
    result = wait_for(
        lambda: _poll_done(c, probe_app, busy.ticket), timeout=30, what="the busy request"
    )
    assert result["meta"]["version"] == 1  # its files stayed while it ran


def _poll_done(c: ServeClient, app: Any, ticket: str) -> Any:
    try:
        out = c.poll(app.route_prefix, ticket, model=12, token=ALICE, tenant="acme")
    except DeferredNotFound:
        raise AssertionError("the ticket of the busy request was lost") from None
    return None if isinstance(out, Pending) else out


def test_a_load_whose_caller_gave_up_counts_against_the_bound(
    probe_app: Any, serve_env: dict[str, str], session_dir: Path
) -> None:
    c = client()
    headers = c.model_headers(model=26, token=ALICE, tenant="acme")
    url = f"{serve_env['SYNAPSE_SERVE_URL']}{probe_app.route_prefix}/direct"
    since = time.time()
    with pytest.raises(httpx.TimeoutException):  # the load takes 3 s: the caller leaves
        httpx.post(url, json={"x": 1}, headers=headers, timeout=0.5)
    wait_for(
        lambda: any(
            e["event"] == "load" and e["model"] == 26 and e["time"] > since
            for e in events(session_dir)
        ),
        timeout=30,
        what="the abandoned load of model 26 to finish",
    )
    probe_call(probe_app, 28)
    probe_call(probe_app, 29)
    resident = resident_models(probe_app.app_name)
    assert len(resident) <= 2, resident
    assert resident == {"28", "29"}


def test_evicted_models_leave_no_directory_behind(probe_app: Any) -> None:
    for model in (12, 14, 15):
        probe_call(probe_app, model)
    s = stats(probe_app.app_name)
    kept = {Path(r["path"]).parent for r in s["resident"]}  # <replica dir>/<load>/model
    (replica_dir,) = {p.parent for p in kept}
    assert set(replica_dir.iterdir()) == kept


@pytest.fixture
def probe_solo(ray_serve: None) -> Iterator[Any]:
    from ray import serve

    from serve_runtime.deploy import deploy

    spec = deploy(PROBE_PLUGIN, app_name="probe-solo", route_prefix="/probesolo")
    yield spec
    serve.delete(spec.app_name)


def test_a_replica_shut_down_releases_its_models_and_deletes_its_files(
    probe_solo: Any, session_dir: Path
) -> None:
    from ray import serve

    probe_call(probe_solo, 14)
    probe_call(probe_solo, 15)
    s = stats(probe_solo.app_name)
    replica_dir = Path(s["resident"][0]["path"]).parent.parent
    assert replica_dir.is_dir()
    serve.delete(probe_solo.app_name)
    released = wait_for(
        lambda: (
            {
                e["model"]
                for e in events(session_dir)
                if e["event"] == "release" and e.get("pid") == s["pid"]
            }
            >= {14, 15}
        ),
        timeout=60,
        what="both models released at shutdown",
    )
    assert released
    wait_for(lambda: not replica_dir.exists(), timeout=30, what="the replica's directory gone")


def test_a_new_version_is_served_in_both_routing_modes(
    example_app: Any, admin: Any, session_dir: Path
) -> None:
    rows = {"inputs": [[5.0, 3.4, 1.5, 0.2]]}
    affine = client(routing_mode="model_affine")
    compatible = client()

    def version(c: ServeClient) -> Any:
        return c.call_and_wait(
            example_app.route_prefix, rows, model=25, token=ALICE, tenant="acme"
        )["model_version"]

    assert version(affine) == 1
    assert version(compatible) == 1
    archive = session_dir / "archives" / "model-25-v2.tar.gz"
    write_model_archive(archive, seed=42, version=2)
    admin.seed(
        {
            "models": [
                {
                    "id": 25,
                    "name": "model-25",
                    "tenant": "acme",
                    "version": 2,
                    "archive": str(archive),
                }
            ]
        }
    )
    wait_for(lambda: version(affine) == 2, timeout=30, what="model-affine calls on version 2")
    wait_for(lambda: version(compatible) == 2, timeout=30, what="compatible calls on version 2")


def test_new_bytes_under_the_same_version_are_served(
    probe_app: Any, admin: Any, session_dir: Path
) -> None:
    """Compatible mode keyed by version only would keep serving the old bytes."""
    assert probe_call(probe_app, 30)["meta"]["seed"] == 16
    archive = session_dir / "archives" / "model-30-rebuilt.tar.gz"
    write_model_archive(archive, seed=77, version=1)
    admin.seed(
        {
            "models": [
                {
                    "id": 30,
                    "name": "model-30",
                    "tenant": "acme",
                    "version": 1,
                    "archive": str(archive),
                }
            ]
        }
    )
    wait_for(
        lambda: probe_call(probe_app, 30)["meta"]["seed"] == 77,
        timeout=30,
        what="the new bytes of model 30 served",
    )


def test_model_affine_calls_follow_their_model_across_two_replicas(
    probe_pair_app: Any, session_dir: Path
) -> None:
    """The store reports its models to Serve's router, as serve.multiplexed did."""
    from ray import serve

    affine = client(routing_mode="model_affine")
    since = time.time()
    probe_call(probe_pair_app, 15, c=affine)
    first = [e for e in events(session_dir) if e["event"] == "load" and e["time"] > since]
    assert [e["model"] for e in first] == [15]
    holder = first[0]["pid"]
    handle = serve.get_deployment_handle("ProbeDeployment", probe_pair_app.app_name)
    by_model = handle.options(multiplexed_model_id="acme:15")

    def routed_to_holder() -> bool:
        return all(
            by_model.model_stats.remote().result(timeout_s=30)["pid"] == holder for _ in range(20)
        )

    wait_for(routed_to_holder, timeout=30, what="Serve's router to learn who holds acme:15")
    for _ in range(20):
        probe_call(probe_pair_app, 15, c=affine)
    loads = [e for e in events(session_dir) if e["event"] == "load" and e["time"] > since]
    assert len(loads) == 1, loads  # every later call went to the replica holding it
