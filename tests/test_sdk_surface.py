"""Issue 12 item 10: the SDK's surface.

``BaseServeDeployment.app`` is a FastAPI instance on the class (the SDK documents it as
a class attribute), ``BaseAction`` is an ABC (a subclass missing an abstract method
fails when instantiated), and deploy() still refuses a plugin that would serve the
base's empty app instead of its own.
"""

from __future__ import annotations

import textwrap
import uuid
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI

from serve_runtime.action import BaseAction
from serve_runtime.deploy import DeployError, build_application
from serve_runtime.deployment import BaseServeDeployment


def test_app_is_a_fastapi_instance_on_the_class() -> None:
    assert isinstance(vars(BaseServeDeployment).get("app"), FastAPI)
    assert isinstance(BaseServeDeployment.app, FastAPI)


def test_header_middleware_only_on_a_subclasses_own_app() -> None:
    own = FastAPI()

    class WithApp(BaseServeDeployment):
        app = own

        async def _get_model(self, model_info: dict[str, Any]) -> Any:
            return None

        async def infer(self, body: Any) -> Any:
            return body

    assert own.state.synapse_headers is True
    # Once each: the coalesced-call fan-out outermost, then the header capture.
    assert [m.cls.__name__ for m in own.user_middleware] == ["CoalescedCalls", "_CaptureHeaders"]
    assert BaseServeDeployment.app.user_middleware == []
    assert not getattr(BaseServeDeployment.app.state, "synapse_headers", False)


def test_base_action_is_an_abc() -> None:
    class NoExecute(BaseAction):
        action_name = "x"

    with pytest.raises(TypeError, match="execute"):
        NoExecute()

    class WithExecute(BaseAction):
        def execute(self) -> str:
            return "ran"

    assert WithExecute().execute() == "ran"


@pytest.mark.parametrize("missing", ["_get_model", "infer"])
def test_a_deployment_missing_an_abstract_method_fails_when_instantiated(missing: str) -> None:
    async def _get_model(self: Any, model_info: dict[str, Any]) -> Any:
        return None

    async def infer(self: Any, body: Any) -> Any:
        return body

    methods = {"_get_model": _get_model, "infer": infer}
    del methods[missing]
    cls = type("Partial", (BaseServeDeployment,), {"app": FastAPI(), **methods})
    with pytest.raises(TypeError, match=missing):
        cls("http://backend.example")


def _plugin(tmp_path: Path, body: str) -> Path:
    """A plugin directory with a uniquely named module holding ``body``."""
    module = f"sdk_surface_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(
        "from typing import Any\n"
        "from fastapi import FastAPI\n"
        "from serve_runtime.deployment import BaseServeDeployment\n\n" + textwrap.dedent(body)
    )
    (tmp_path / "config.yaml").write_text(
        textwrap.dedent(
            f"""\
            code: sdk-surface
            version: 0.1.0
            actions:
              inference:
                entrypoint: {module}.Plugin
            """
        )
    )
    return tmp_path


def test_deploy_refuses_a_plugin_without_its_own_app(tmp_path: Path) -> None:
    plugin = _plugin(
        tmp_path,
        """
        class Plugin(BaseServeDeployment):
            async def _get_model(self, model_info: dict[str, Any]) -> Any:
                return None

            async def infer(self, body: dict) -> Any:
                return body
        """,
    )
    with pytest.raises(DeployError) as info:
        build_application(plugin)
    assert "app = FastAPI()" in str(info.value)
    assert "@app.post('/')" in str(info.value)


def test_deploy_builds_a_plugin_with_its_own_app(tmp_path: Path) -> None:
    plugin = _plugin(
        tmp_path,
        """
        app = FastAPI()

        class Plugin(BaseServeDeployment):
            app = app

            async def _get_model(self, model_info: dict[str, Any]) -> Any:
                return None

            @app.post("/")
            async def infer(self, body: dict) -> Any:
                return body
        """,
    )
    from config import load_settings

    spec = build_application(plugin, settings=load_settings(synapse_host="http://b.example"))
    assert spec.app_name == "sdk-surface-0.1.0"


def test_a_plugin_with_its_own_init_deploys_and_serves(
    tmp_path: Path, ray_serve: None, serve_env: dict[str, str]
) -> None:
    """The SDK's constructor is ``__init__(self, backend_url)``: a plugin overriding it
    keeps working (the runtime's own wiring, the ticket store, goes around it)."""
    import httpx
    from ray import serve

    from serve_runtime.deploy import deploy

    plugin = _plugin(
        tmp_path,
        """
        app = FastAPI()

        class Plugin(BaseServeDeployment):
            app = app

            def __init__(self, backend_url: str) -> None:
                super().__init__(backend_url)
                self.greeting = "hello from __init__"

            async def _get_model(self, model_info: dict[str, Any]) -> Any:
                return None

            @app.post("/")
            async def infer(self, body: dict) -> Any:
                return {"greeting": self.greeting, "tickets": self._ticket_store is not None}
        """,
    )
    spec = deploy(plugin, app_name="sdk-own-init", route_prefix="/sdkowninit")
    try:
        r = httpx.post(f"{serve_env['SYNAPSE_SERVE_URL']}/sdkowninit/", json={}, timeout=30)
        assert r.status_code == 200, r.text
        assert r.json() == {"greeting": "hello from __init__", "tickets": True}
    finally:
        serve.delete(spec.app_name)
