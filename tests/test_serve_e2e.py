"""The serve runtime end to end: real Ray Serve on the CPU, the real local backend."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from ray import serve

from config import load_settings
from serve_runtime import Pending, ServeClient, ServeClientError, infer_remote
from serve_runtime.errors import ServeRouteNotFound
from serve_runtime.tokens import AFFINE_TOKEN_HEADER, MODEL_TOKEN_HEADER
from tests.conftest import EXAMPLE_PLUGIN, TOKENS, wait_for

pytestmark = pytest.mark.usefixtures("example_app")

ROWS = [[5.0, 3.4, 1.5, 0.2], [6.6, 3.0, 5.6, 2.0], [5.9, 2.8, 4.3, 1.3]]


def stats(app_name: str) -> dict[str, Any]:
    """The ``model_stats`` of an application's plugin deployment (beside its TicketStore)."""
    names = serve.status().applications[app_name].deployments
    (deployment,) = [name for name in names if name != "TicketStore"]
    handle = serve.get_deployment_handle(deployment, app_name)
    return handle.model_stats.remote().result(timeout_s=30)


def events(session_dir: Path) -> list[dict[str, Any]]:
    path = session_dir / "events.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_infer_remote_predicts(
    example_app: Any, serve_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Route prefix from ./config.yaml (the SDK's third branch), token and host from ctx.env.
    monkeypatch.chdir(EXAMPLE_PLUGIN)

    class Env:
        def __init__(self, values: dict[str, str]) -> None:
            self.values = values

        def get_str(self, name: str) -> str | None:
            return self.values.get(name)

    class Ctx:
        env = Env(
            {"SYNAPSE_HOST": serve_env["SYNAPSE_HOST"], "SYNAPSE_ACCESS_TOKEN": TOKENS["alice"]}
        )

    result = infer_remote({"model": 12, "json": {"inputs": ROWS}, "tenant": "acme"}, Ctx())
    assert result["predictions"] == ["setosa", "virginica", "versicolor"]
    assert len(result["probabilities"]) == 3
    assert all(abs(sum(p) - 1) < 1e-5 for p in result["probabilities"])


def client(**overrides: Any) -> ServeClient:
    return ServeClient(load_settings(**overrides))


def call(
    c: ServeClient, app: Any, body: Any, *, model: int, user: str, tenant: str = "acme", **kw: Any
) -> Any:
    return c.infer(app.route_prefix, body, model=model, token=TOKENS[user], tenant=tenant, **kw)


def test_two_users_of_one_model_share_one_load(example_app: Any, admin: Any) -> None:
    c = client()
    before = stats(example_app.app_name)["loads"]
    downloads_before = admin.stats()["downloads_by_model"].get("18", 0)
    a = call(c, example_app, {"inputs": ROWS}, model=18, user="alice")
    b = call(c, example_app, {"inputs": ROWS}, model=18, user="bob")
    assert a["predictions"] == b["predictions"]
    after = stats(example_app.app_name)
    assert after["loads"] - before == 1
    assert admin.stats()["downloads_by_model"].get("18", 0) - downloads_before == 1
    resident = [r for r in after["resident"] if r["ident"][1] == "18"]
    assert len(resident) == 1
    assert resident[0]["slotted"] is True  # one slot per model, whoever asks


def test_concurrent_first_requests_share_one_load(example_app: Any) -> None:
    c = client()
    before = stats(example_app.app_name)["loads"]
    results: list[Any] = []
    errors: list[BaseException] = []

    def worker(user: str) -> None:
        try:
            results.append(call(c, example_app, {"inputs": ROWS[:1]}, model=19, user=user))
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(u,)) for u in ("alice", "bob") * 4]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert len(results) == 8 and all(r["predictions"] == ["setosa"] for r in results)
    assert stats(example_app.app_name)["loads"] - before == 1


def test_user_without_access_is_refused_and_never_served_from_cache(
    example_app: Any, admin: Any
) -> None:
    c = client()
    # alice has a grant on model 13 and loads it; carol (same tenant, no grant) must not
    # be served from alice's copy.
    call(c, example_app, {"inputs": ROWS}, model=13, user="alice")
    with pytest.raises(ServeClientError) as info:
        call(c, example_app, {"inputs": ROWS}, model=13, user="carol")
    assert info.value.status_code == 403
    assert info.value.code == "forbidden"
    assert TOKENS["carol"] not in str(info.value)
    # eve (tenant globex) with acme's model id and her own tenant: refused as well.
    with pytest.raises(ServeClientError) as info:
        call(c, example_app, {"inputs": ROWS}, model=13, user="eve", tenant="globex")
    assert info.value.status_code == 403


def test_model_without_file_fails_clearly(example_app: Any) -> None:
    with pytest.raises(ServeClientError) as info:
        call(client(), example_app, {"inputs": ROWS}, model=17, user="alice")
    assert info.value.status_code == 422
    assert "model 17 has no file" in str(info.value)


def test_unknown_model_is_404_from_the_runtime(example_app: Any) -> None:
    with pytest.raises(ServeClientError) as info:
        call(client(), example_app, {"inputs": ROWS}, model=999, user="alice")
    assert info.value.status_code == 404
    assert info.value.code == "model_not_found"


def test_bad_input_is_a_client_error(example_app: Any) -> None:
    with pytest.raises(ServeClientError) as info:
        call(client(), example_app, {"inputs": [[1, 2]]}, model=12, user="alice")
    assert info.value.status_code == 422
    assert "rows of 4 numbers" in str(info.value)


def test_unknown_route_is_transient(example_app: Any) -> None:
    with pytest.raises(ServeRouteNotFound):
        client().infer(
            "/no-such-app", {"inputs": ROWS}, model=12, token=TOKENS["alice"], tenant="acme"
        )


def test_concurrent_requests_are_batched_and_correct(example_app: Any) -> None:
    c = client()
    rows = {i: [[5.0 + i * 0.01, 3.4, 1.5, 0.2]] for i in range(24)}
    out: dict[int, Any] = {}

    def worker(i: int) -> None:
        out[i] = call(c, example_app, {"inputs": rows[i]}, model=12, user="alice")

    threads = [threading.Thread(target=worker, args=(i,)) for i in rows]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(out) == sorted(rows)
    assert all(r["predictions"] == ["setosa"] for r in out.values())


def test_model_affine_routing(example_app: Any) -> None:
    c = client(routing_mode="model_affine")
    headers = c.model_headers(model=12, token=TOKENS["alice"], tenant="acme")
    assert headers[MODEL_TOKEN_HEADER] == "acme:12"
    assert headers[AFFINE_TOKEN_HEADER].startswith("eyJ")
    result = call(c, example_app, {"inputs": ROWS}, model=12, user="bob")
    assert result["predictions"] == ["setosa", "virginica", "versicolor"]


def test_the_proxy_acknowledges_requests(example_app: Any) -> None:
    """Ray's proxy answers Expect with 100 Continue: the receipt bound is armed (issue 13)."""
    c = client()
    assert not c.receipt.server_acks
    result = call(c, example_app, {"inputs": ROWS}, model=12, user="alice")
    assert result["predictions"] == ["setosa", "virginica", "versicolor"]
    assert c.receipt.server_acks
    assert c.receipt.unacknowledged == 0


def _raw(example_app: Any, serve_env: dict[str, str], headers: dict[str, str]) -> httpx.Response:
    url = f"{serve_env['SYNAPSE_SERVE_URL']}{example_app.route_prefix}/"
    return httpx.post(url, json={"inputs": ROWS}, headers=headers, timeout=30)


def test_affine_key_must_match_the_token(example_app: Any, serve_env: dict[str, str]) -> None:
    c = client(routing_mode="model_affine")
    headers = c.model_headers(model=12, token=TOKENS["alice"], tenant="acme")
    headers[MODEL_TOKEN_HEADER] = "acme:14"  # a token for 12 does not open 14
    r = _raw(example_app, serve_env, headers)
    assert r.status_code == 403
    assert r.json()["detail"]["code"] == "token_model_mismatch"


def test_sdk_token_accepted_at_the_endpoint(example_app: Any, serve_env: dict[str, str]) -> None:
    # Minted exactly as the SDK does: HS256, backend URL as key, no exp.
    sdk = jwt.encode(
        {"model": "12", "token": TOKENS["alice"], "tenant": "acme"},
        serve_env["SYNAPSE_HOST"],
        algorithm="HS256",
    )
    r = _raw(example_app, serve_env, {MODEL_TOKEN_HEADER: sdk})
    assert r.status_code == 200, r.text
    assert r.json()["predictions"][0] == "setosa"


@pytest.mark.parametrize("kind", ["wrong_key", "alg_none", "tampered", "expired", "garbage"])
def test_untrusted_tokens_are_401(example_app: Any, serve_env: dict[str, str], kind: str) -> None:
    claims = {"model": "12", "token": TOKENS["alice"], "tenant": "acme"}
    key = serve_env["SYNAPSE_HOST"]
    if kind == "wrong_key":
        token = jwt.encode(claims, "http://attacker.example", algorithm="HS256")
    elif kind == "alg_none":
        token = jwt.encode(claims, None, algorithm="none")
        token = token if token.count(".") == 2 else token + "."
    elif kind == "tampered":
        good = jwt.encode(claims, key, algorithm="HS256")
        forged = jwt.encode({**claims, "model": "13"}, "x" * 32, algorithm="HS256")
        token = ".".join([*forged.split(".")[:2], good.split(".")[2]])
    elif kind == "expired":
        token = jwt.encode({**claims, "exp": 1_000_000}, key, algorithm="HS256")
    else:
        token = "eyJhbGciOiJIUzI1NiJ9.bm90LWpzb24.c2ln"
    r = _raw(example_app, serve_env, {MODEL_TOKEN_HEADER: token})
    assert r.status_code == 401, r.text
    assert TOKENS["alice"] not in r.text


def test_missing_model_header_is_400(example_app: Any, serve_env: dict[str, str]) -> None:
    r = _raw(example_app, serve_env, {})
    assert r.status_code == 400
    assert "serve_multiplexed_model_id" in r.json()["detail"]["message"]


# --- the probe plugin: eviction, release hook, lazy files, deferred results


def test_eviction_calls_release_and_removes_the_directory(
    probe_app: Any, session_dir: Path
) -> None:
    c = client()
    first = call(c, probe_app, {"x": 1}, model=21, user="alice")
    assert first["meta"]["seed"] == 5  # read lazily from the extracted files
    call(c, probe_app, {"x": 1}, model=22, user="alice")
    st = stats(probe_app.app_name)
    assert len(st["resident"]) == 2
    path_21 = next(r["path"] for r in st["resident"] if r["ident"][1] == "21")
    assert Path(path_21).is_dir()
    call(c, probe_app, {"x": 1}, model=23, user="alice")  # over the bound of 2: evicts 21

    def released() -> list[dict[str, Any]]:
        return [e for e in events(session_dir) if e["event"] == "release" and e["model"] == 21]

    rel = wait_for(released, what="release hook of model 21")
    assert rel[0]["exists"] is True  # the hook ran before the files went
    wait_for(lambda: not Path(path_21).exists(), what="model 21 directory removed")
    st = stats(probe_app.app_name)
    assert sorted(r["ident"][1] for r in st["resident"]) == ["22", "23"]
    assert len(st["resident"]) <= 2


def test_deferred_result_is_polled(probe_app: Any) -> None:
    c = client()
    pending = call(c, probe_app, {"sleep_s": 1.5, "tag": "slow"}, model=22, user="alice")
    assert isinstance(pending, Pending)
    kw = {"model": 22, "token": TOKENS["alice"], "tenant": "acme"}
    first_poll = c.poll(probe_app.route_prefix, pending.ticket, **kw)
    assert isinstance(first_poll, Pending)  # not ready yet: the work takes 1.5 s
    result = wait_for(
        lambda: (
            (r := c.poll(probe_app.route_prefix, pending.ticket, **kw))
            and not isinstance(r, Pending)
            and r
        ),
        timeout=20,
        interval=0.1,
        what="deferred result",
    )
    assert result["echo"]["tag"] == "slow"


def test_call_and_wait_follows_a_deferred_result(probe_app: Any) -> None:
    result = client().call_and_wait(
        probe_app.route_prefix,
        {"sleep_s": 0.8, "tag": "w"},
        model=22,
        token=TOKENS["alice"],
        tenant="acme",
        wait_s=30,
    )
    assert result["echo"]["tag"] == "w"


def test_deferred_failure_and_unknown_ticket(probe_app: Any) -> None:
    from serve_runtime.errors import DeferredFailed, DeferredNotFound

    c = client()
    kw = {"model": 22, "token": TOKENS["alice"], "tenant": "acme"}
    pending = call(c, probe_app, {"sleep_s": 0.7, "fail": True}, model=22, user="alice")
    assert isinstance(pending, Pending)

    def failed() -> bool:
        try:
            c.poll(probe_app.route_prefix, pending.ticket, **kw)
        except DeferredFailed as e:
            return "probe asked to fail" in str(e)
        return False

    wait_for(failed, timeout=20, interval=0.1, what="deferred failure envelope")
    with pytest.raises(DeferredNotFound):
        c.poll(probe_app.route_prefix, "no-such-ticket", **kw)
