"""Unit tests for config/: route prefixes, settings, the plugin config.yaml model.

Pure unit tests: no Ray, no Redis, no servers.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from config.plugin import PluginConfig, PluginConfigError, load_plugin_config
from config.route_prefix import RoutePrefixError, prefix_for_release, resolve_route_prefix
from config.settings import CONFIG_FILE_ENV, Settings, SettingsError, load_settings

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_CONFIG = ROOT / "examples" / "classifier" / "config.yaml"

CHECKSUM_ENV = "SYNAPSE_PLUGIN_RELEASE_CHECKSUM"
CODE_ENV = "SYNAPSE_PLUGIN_RELEASE_CODE"


def md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


def write_plugin_config(directory: Path, code: str = "my-plugin", version: str = "2.1.0") -> Path:
    path = directory / "config.yaml"
    path.write_text(
        f"name: My plugin\ncode: {code}\nversion: {version}\n"
        "actions:\n  inference:\n    entrypoint: pkg.mod.Deployment\n"
    )
    return path


# --------------------------------------------------------------------------- route prefix


class TestResolveRoutePrefix:
    def test_checksum_env(self, tmp_path: Path) -> None:
        assert resolve_route_prefix({CHECKSUM_ENV: "abc123"}, tmp_path) == "/abc123"

    def test_code_env_is_md5_of_code(self, tmp_path: Path) -> None:
        got = resolve_route_prefix({CODE_ENV: "my-plugin"}, tmp_path)
        assert got == "/" + md5("my-plugin")
        assert got == "/8a9a57d7db33e5511719944db95809e3"  # pinned: md5 hex of the code

    def test_config_yaml_is_md5_of_code_at_version(self, tmp_path: Path) -> None:
        write_plugin_config(tmp_path, code="my-plugin", version="2.1.0")
        assert resolve_route_prefix({}, tmp_path) == "/" + md5("my-plugin@2.1.0")

    def test_config_dir_defaults_to_cwd(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        write_plugin_config(tmp_path, code="cwd-plugin", version="0.1")
        monkeypatch.chdir(tmp_path)
        assert resolve_route_prefix({}) == "/" + md5("cwd-plugin@0.1")

    def test_env_defaults_to_os_environ(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv(CHECKSUM_ENV, "from-os-environ")
        monkeypatch.delenv(CODE_ENV, raising=False)
        assert resolve_route_prefix(None, tmp_path) == "/from-os-environ"

    def test_checksum_wins_over_code_and_config(self, tmp_path: Path) -> None:
        write_plugin_config(tmp_path)
        env = {CHECKSUM_ENV: "sum1", CODE_ENV: "my-plugin"}
        assert resolve_route_prefix(env, tmp_path) == "/sum1"

    def test_code_wins_over_config(self, tmp_path: Path) -> None:
        write_plugin_config(tmp_path, code="from-file", version="9")
        assert resolve_route_prefix({CODE_ENV: "from-env"}, tmp_path) == "/" + md5("from-env")

    @pytest.mark.parametrize(
        ("yaml_version", "as_text"), [("1", "1"), ("1.0", "1.0"), ("2.10", "2.1")]
    )
    def test_numeric_yaml_version_formats_like_the_sdk(
        self, tmp_path: Path, yaml_version: str, as_text: str
    ) -> None:
        # YAML makes these numbers; the SDK's f"{code}@{version}" formats them with str().
        (tmp_path / "config.yaml").write_text(f"code: p\nversion: {yaml_version}\n")
        assert resolve_route_prefix({}, tmp_path) == "/" + md5(f"p@{as_text}")

    def test_empty_env_values_fall_through(self, tmp_path: Path) -> None:
        write_plugin_config(tmp_path, code="c", version="1")
        env = {CHECKSUM_ENV: "", CODE_ENV: ""}
        assert resolve_route_prefix(env, tmp_path) == "/" + md5("c@1")

    def test_nothing_applies_names_the_variables(self, tmp_path: Path) -> None:
        with pytest.raises(RoutePrefixError) as exc:
            resolve_route_prefix({}, tmp_path)
        msg = str(exc.value)
        assert CHECKSUM_ENV in msg
        assert CODE_ENV in msg
        assert "config.yaml" in msg

    def test_invalid_config_yaml_is_an_error_not_a_fallback(self, tmp_path: Path) -> None:
        (tmp_path / "config.yaml").write_text("name: no code or version\n")
        with pytest.raises(PluginConfigError, match="code"):
            resolve_route_prefix({}, tmp_path)


class TestPrefixForRelease:
    def test_checksum(self) -> None:
        assert prefix_for_release(checksum="deadbeef") == "/deadbeef"

    def test_checksum_wins(self) -> None:
        assert prefix_for_release(checksum="x1", code="c", version="1") == "/x1"

    def test_code_and_version(self) -> None:
        assert prefix_for_release(code="c", version="1.0") == "/" + md5("c@1.0")

    def test_code_only(self) -> None:
        assert prefix_for_release(code="c") == "/" + md5("c")

    def test_agrees_with_resolve(self, tmp_path: Path) -> None:
        write_plugin_config(tmp_path, code="agree", version="3.2.1")
        assert resolve_route_prefix({}, tmp_path) == prefix_for_release(
            code="agree", version="3.2.1"
        )
        assert resolve_route_prefix({CODE_ENV: "agree"}, tmp_path) == prefix_for_release(
            code="agree"
        )

    @pytest.mark.parametrize("kwargs", [{}, {"version": "1.0"}, {"checksum": "", "code": ""}])
    def test_nothing_to_name_it(self, kwargs: dict[str, str]) -> None:
        with pytest.raises(RoutePrefixError, match="checksum or a code"):
            prefix_for_release(**kwargs)


# --------------------------------------------------------------------------- settings


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No setting comes from the surrounding environment."""
    names = {CONFIG_FILE_ENV}
    for field in Settings.model_fields.values():
        alias = field.validation_alias
        for choice in getattr(alias, "choices", ()):
            names.add(str(choice))
    for name in names:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    return monkeypatch


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


class TestSettingsDefaultsAndEnv:
    def test_defaults(self, clean_env: pytest.MonkeyPatch) -> None:
        s = load_settings()
        assert s.serve_url == "http://localhost:8100"
        assert s.serve_http_port == 8100
        assert s.serve_read_timeout_s == 60.0
        assert s.routing_mode == "compatible"
        assert s.access_token is None
        assert s.signing_key is None
        assert s.backend_url is None
        assert s.log_format == "console"

    def test_env_overrides(self, clean_env: pytest.MonkeyPatch) -> None:
        clean_env.setenv("SYNAPSE_SERVE_URL", "http://serve.internal:9000")
        clean_env.setenv("SYNAPSE_BRIDGE_SERVE_READ_TIMEOUT", "12.5")
        clean_env.setenv("SYNAPSE_BRIDGE_SERVE_PORT", "8200")
        clean_env.setenv("SYNAPSE_BRIDGE_ROUTING_MODE", "model_affine")
        clean_env.setenv("SYNAPSE_ACCESS_TOKEN", "tok-env-0123456789")
        clean_env.setenv("SYNAPSE_PLUGIN_RELEASE_CODE", "my-plugin")
        s = load_settings()
        assert s.serve_url == "http://serve.internal:9000"
        assert s.serve_read_timeout_s == 12.5
        assert s.serve_http_port == 8200
        assert s.routing_mode == "model_affine"
        assert s.access_token is not None
        assert s.access_token.get_secret_value() == "tok-env-0123456789"
        assert s.plugin_release_code == "my-plugin"

    def test_second_alias_is_read(self, clean_env: pytest.MonkeyPatch) -> None:
        clean_env.setenv("SYNAPSE_BRIDGE_SERVE_URL", "http://alias:1")
        assert load_settings().serve_url == "http://alias:1"

    def test_overrides_argument_wins_over_env(self, clean_env: pytest.MonkeyPatch) -> None:
        clean_env.setenv("SYNAPSE_BRIDGE_SERVE_READ_TIMEOUT", "12")
        assert load_settings(serve_read_timeout_s=3).serve_read_timeout_s == 3

    @pytest.mark.parametrize("value", ["-1", "0", "abc"])
    def test_invalid_value_names_the_env_var(
        self, clean_env: pytest.MonkeyPatch, value: str
    ) -> None:
        clean_env.setenv("SYNAPSE_BRIDGE_SERVE_READ_TIMEOUT", value)
        with pytest.raises(SettingsError) as exc:
            load_settings()
        assert "SYNAPSE_BRIDGE_SERVE_READ_TIMEOUT" in str(exc.value)

    def test_url_without_scheme_names_the_env_var(self, clean_env: pytest.MonkeyPatch) -> None:
        clean_env.setenv("SYNAPSE_HOST", "backend.example:8010")
        with pytest.raises(SettingsError, match="SYNAPSE_HOST"):
            load_settings()

    def test_bad_literal_names_the_env_var(self, clean_env: pytest.MonkeyPatch) -> None:
        clean_env.setenv("SYNAPSE_BRIDGE_ROUTING_MODE", "random")
        with pytest.raises(SettingsError, match="SYNAPSE_BRIDGE_ROUTING_MODE"):
            load_settings()

    def test_several_problems_all_named(self, clean_env: pytest.MonkeyPatch) -> None:
        clean_env.setenv("SYNAPSE_BRIDGE_SERVE_PORT", "not-a-port")
        clean_env.setenv("SYNAPSE_BRIDGE_MAX_DOWNLOAD_BYTES", "-5")
        with pytest.raises(SettingsError) as exc:
            load_settings()
        assert "SYNAPSE_BRIDGE_SERVE_PORT" in str(exc.value)
        assert "SYNAPSE_BRIDGE_MAX_DOWNLOAD_BYTES" in str(exc.value)

    def test_settings_error_is_a_value_error(self) -> None:
        assert issubclass(SettingsError, ValueError)

    def test_frozen(self, clean_env: pytest.MonkeyPatch) -> None:
        s = load_settings()
        with pytest.raises(ValueError):
            s.serve_url = "http://other:1"  # type: ignore[misc]


class TestSettingsYaml:
    def test_yaml_supplies_values(self, clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
        path = write_yaml(
            tmp_path / "bridge.yaml",
            "serve_url: http://from-yaml:8100\n"
            "SYNAPSE_BRIDGE_SERVE_READ_TIMEOUT: 7\n"  # env names are accepted too
            "synapse_host: http://backend-from-yaml:8010\n",
        )
        clean_env.setenv(CONFIG_FILE_ENV, str(path))
        s = load_settings()
        assert s.serve_url == "http://from-yaml:8100"
        assert s.serve_read_timeout_s == 7.0
        assert s.backend_url == "http://backend-from-yaml:8010"

    def test_env_wins_over_yaml(self, clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
        path = write_yaml(
            tmp_path / "bridge.yaml",
            "serve_url: http://from-yaml:8100\nserve_read_timeout_s: 7\n",
        )
        clean_env.setenv(CONFIG_FILE_ENV, str(path))
        clean_env.setenv("SYNAPSE_SERVE_URL", "http://from-env:8100")
        s = load_settings()
        assert s.serve_url == "http://from-env:8100"
        assert s.serve_read_timeout_s == 7.0  # still from YAML

    def test_unknown_key(self, clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
        path = write_yaml(tmp_path / "bridge.yaml", "serve_urll: http://typo:1\n")
        clean_env.setenv(CONFIG_FILE_ENV, str(path))
        with pytest.raises(SettingsError) as exc:
            load_settings()
        assert "serve_urll" in str(exc.value)
        assert "unknown" in str(exc.value)
        assert CONFIG_FILE_ENV in str(exc.value)

    def test_missing_file(self, clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
        missing = tmp_path / "nope.yaml"
        clean_env.setenv(CONFIG_FILE_ENV, str(missing))
        with pytest.raises(SettingsError) as exc:
            load_settings()
        assert CONFIG_FILE_ENV in str(exc.value)
        assert str(missing) in str(exc.value)
        assert "no such file" in str(exc.value)

    def test_top_level_not_a_mapping(self, clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
        path = write_yaml(tmp_path / "bridge.yaml", "- a\n- b\n")
        clean_env.setenv(CONFIG_FILE_ENV, str(path))
        with pytest.raises(SettingsError, match="mapping"):
            load_settings()

    def test_invalid_yaml(self, clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
        path = write_yaml(tmp_path / "bridge.yaml", "serve_url: [unclosed\n")
        clean_env.setenv(CONFIG_FILE_ENV, str(path))
        with pytest.raises(SettingsError, match="invalid YAML"):
            load_settings()

    def test_invalid_yaml_value_names_the_variable(
        self, clean_env: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        path = write_yaml(tmp_path / "bridge.yaml", "serve_read_timeout_s: -3\n")
        clean_env.setenv(CONFIG_FILE_ENV, str(path))
        with pytest.raises(SettingsError, match="SYNAPSE_BRIDGE_SERVE_READ_TIMEOUT"):
            load_settings()

    def test_empty_file_means_defaults(self, clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
        path = write_yaml(tmp_path / "bridge.yaml", "")
        clean_env.setenv(CONFIG_FILE_ENV, str(path))
        assert load_settings().serve_url == "http://localhost:8100"


class TestBackendUrl:
    def test_run_host_first(self, clean_env: pytest.MonkeyPatch) -> None:
        clean_env.setenv("SYNAPSE_PLUGIN_RUN_HOST", "http://run-host:1")
        clean_env.setenv("SYNAPSE_HOST", "http://synapse-host:2")
        s = load_settings()
        assert s.backend_url == "http://run-host:1"
        assert s.require_backend_url() == "http://run-host:1"

    def test_synapse_host_second(self, clean_env: pytest.MonkeyPatch) -> None:
        clean_env.setenv("SYNAPSE_HOST", "http://synapse-host:2")
        assert load_settings().backend_url == "http://synapse-host:2"

    def test_require_names_both_variables(self, clean_env: pytest.MonkeyPatch) -> None:
        s = load_settings()
        assert s.backend_url is None
        with pytest.raises(SettingsError) as exc:
            s.require_backend_url()
        assert "SYNAPSE_PLUGIN_RUN_HOST" in str(exc.value)
        assert "SYNAPSE_HOST" in str(exc.value)


class TestSecretsStaySecret:
    TOKEN = "tok-very-secret-access-0123456789"
    KEY = "signing-key-very-secret-9876543210"

    @pytest.fixture
    def settings(self, clean_env: pytest.MonkeyPatch) -> Settings:
        clean_env.setenv("SYNAPSE_ACCESS_TOKEN", self.TOKEN)
        clean_env.setenv("SYNAPSE_SERVE_SIGNING_KEY", self.KEY)
        return load_settings()

    def test_values_are_available(self, settings: Settings) -> None:
        assert settings.access_token is not None
        assert settings.signing_key is not None
        assert settings.access_token.get_secret_value() == self.TOKEN
        assert settings.signing_key.get_secret_value() == self.KEY

    @pytest.mark.parametrize(
        "render",
        [repr, str, lambda s: s.model_dump_json(), lambda s: json.dumps(s.model_dump(mode="json"))],
        ids=["repr", "str", "model_dump_json", "model_dump_json_mode"],
    )
    def test_not_rendered(self, settings: Settings, render: object) -> None:
        text = render(settings)  # type: ignore[operator]
        assert self.TOKEN not in text
        assert self.KEY not in text
        assert "access_token" in text  # the field is there, only masked

    def test_yaml_secret_not_rendered(self, clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
        path = write_yaml(tmp_path / "bridge.yaml", f"SYNAPSE_ACCESS_TOKEN: {self.TOKEN}\n")
        clean_env.setenv(CONFIG_FILE_ENV, str(path))
        s = load_settings()
        assert s.access_token is not None
        assert s.access_token.get_secret_value() == self.TOKEN
        assert self.TOKEN not in repr(s)
        assert self.TOKEN not in s.model_dump_json()


# --------------------------------------------------------------------------- plugin config


def plugin_yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


BASE = "code: p\nversion: '1'\n"


class TestPluginConfig:
    def test_example_loads(self) -> None:
        cfg = load_plugin_config(EXAMPLE_CONFIG)
        assert cfg.code == "example-classifier"
        assert cfg.version == "1.0.0"
        action = cfg.action("inference")
        assert action.module_and_class == ("examples.classifier.plugin", "ClassifierDeployment")
        assert action.serve.num_replicas == 1
        assert action.serve.ray_actor_options.num_cpus == 0.5
        assert action.serve.max_ongoing_requests == 64
        assert action.serve.batch is not None
        assert action.serve.batch.batch_wait_timeout_s == 0.005
        assert action.serve.deferred_deadline_s == 30

    def test_directory_is_accepted(self) -> None:
        assert load_plugin_config(EXAMPLE_CONFIG.parent).code == "example-classifier"

    def test_example_route_prefix(self) -> None:
        got = resolve_route_prefix({}, EXAMPLE_CONFIG.parent)
        assert got == "/0418f44ba59825af7d9aba77c228b487"  # md5("example-classifier@1.0.0")

    def test_defaults(self, tmp_path: Path) -> None:
        cfg = load_plugin_config(
            plugin_yaml(tmp_path, BASE + "actions:\n  inference:\n    entrypoint: a.B\n")
        )
        serve = cfg.action("inference").serve
        assert serve.num_replicas is None
        assert serve.autoscaling_config is None
        assert serve.max_models_per_replica == 3
        assert serve.batch is None

    def test_num_replicas_with_autoscaling_refused(self, tmp_path: Path) -> None:
        path = plugin_yaml(
            tmp_path,
            BASE + "actions:\n  inference:\n    entrypoint: a.B\n    serve:\n"
            "      num_replicas: 2\n      autoscaling_config:\n        max_replicas: 4\n",
        )
        with pytest.raises(PluginConfigError) as exc:
            load_plugin_config(path)
        assert "num_replicas" in str(exc.value)
        assert "autoscaling_config" in str(exc.value)

    def test_autoscaling_alone_is_fine(self, tmp_path: Path) -> None:
        path = plugin_yaml(
            tmp_path,
            BASE + "actions:\n  inference:\n    entrypoint: a.B\n    serve:\n"
            "      autoscaling_config:\n        min_replicas: 0\n        max_replicas: 4\n"
            "        upscale_delay_s: 3\n",
        )
        auto = load_plugin_config(path).action("inference").serve.autoscaling_config
        assert auto is not None
        assert auto.max_replicas == 4
        assert auto.model_dump()["upscale_delay_s"] == 3  # Ray's own names pass through

    def test_unknown_serve_option_names_the_field(self, tmp_path: Path) -> None:
        path = plugin_yaml(
            tmp_path,
            BASE + "actions:\n  inference:\n    entrypoint: a.B\n    serve:\n"
            "      max_ongoing_request: 5\n",
        )
        with pytest.raises(PluginConfigError) as exc:
            load_plugin_config(path)
        assert "max_ongoing_request" in str(exc.value)
        assert "actions.inference.serve" in str(exc.value)

    def test_unknown_actor_option_refused(self, tmp_path: Path) -> None:
        path = plugin_yaml(
            tmp_path,
            BASE + "actions:\n  inference:\n    entrypoint: a.B\n    serve:\n"
            "      ray_actor_options:\n        num_gpu: 1\n",
        )
        with pytest.raises(PluginConfigError, match="num_gpu"):
            load_plugin_config(path)

    @pytest.mark.parametrize(
        ("text", "field"),
        [
            ("version: '1'\n", "code"),
            ("code: p\n", "version"),
            ("code: ''\nversion: '1'\n", "code"),
        ],
    )
    def test_missing_identity_names_the_field(self, tmp_path: Path, text: str, field: str) -> None:
        with pytest.raises(PluginConfigError) as exc:
            load_plugin_config(plugin_yaml(tmp_path, text))
        assert field in str(exc.value)

    def test_missing_entrypoint_names_the_field(self, tmp_path: Path) -> None:
        path = plugin_yaml(tmp_path, BASE + "actions:\n  inference:\n    serve: {}\n")
        with pytest.raises(PluginConfigError, match="entrypoint"):
            load_plugin_config(path)

    def test_missing_file(self, tmp_path: Path) -> None:
        with pytest.raises(PluginConfigError, match="no such file"):
            load_plugin_config(tmp_path / "absent.yaml")

    def test_not_a_mapping(self, tmp_path: Path) -> None:
        with pytest.raises(PluginConfigError, match="mapping"):
            load_plugin_config(plugin_yaml(tmp_path, "just a string\n"))

    @pytest.mark.parametrize(
        ("entrypoint", "expected"),
        [
            ("a.b.C", ("a.b", "C")),
            ("a.b:C", ("a.b", "C")),
            ("mod.C", ("mod", "C")),
        ],
    )
    def test_entrypoint_forms(self, entrypoint: str, expected: tuple[str, str]) -> None:
        cfg = PluginConfig.model_validate(
            {"code": "p", "version": "1", "actions": {"x": {"entrypoint": entrypoint}}}
        )
        assert cfg.action("x").module_and_class == expected

    @pytest.mark.parametrize("entrypoint", ["Deployment", "a.b:", ":C", "a.b."])
    def test_bad_entrypoint(self, entrypoint: str) -> None:
        cfg = PluginConfig.model_validate(
            {"code": "p", "version": "1", "actions": {"x": {"entrypoint": entrypoint}}}
        )
        with pytest.raises(PluginConfigError, match="module"):
            _ = cfg.action("x").module_and_class

    def test_unknown_action_lists_actions(self) -> None:
        cfg = PluginConfig.model_validate(
            {
                "code": "p",
                "version": "1",
                "actions": {"inference": {"entrypoint": "a.B"}, "train": {"entrypoint": "a.T"}},
            }
        )
        with pytest.raises(PluginConfigError) as exc:
            cfg.action("nope")
        msg = str(exc.value)
        assert "'nope'" in msg
        assert "inference" in msg
        assert "train" in msg

    def test_unknown_action_with_no_actions(self) -> None:
        cfg = PluginConfig.model_validate({"code": "p", "version": "1"})
        with pytest.raises(PluginConfigError, match="none"):
            cfg.action("inference")


def test_visibility_timeout_must_cover_the_time_limit_and_the_final_write() -> None:
    # Issue 11 A7: redelivery must come after the longest a task can really run: its
    # soft limit (enforced inside the job) plus the final write under the job's lock.
    from config import SettingsError, load_settings

    ok = load_settings(
        task_soft_time_limit_s=600,
        task_time_limit_s=660,
        backend_timeout_s=30,
        visibility_timeout_s=700,
    )
    assert ok.job_lock_s == 95
    with pytest.raises(SettingsError) as e:
        load_settings(
            task_soft_time_limit_s=600,
            task_time_limit_s=660,
            backend_timeout_s=30,
            visibility_timeout_s=690,
        )
    assert "SYNAPSE_BRIDGE_VISIBILITY_TIMEOUT" in str(e.value) and "695" in str(e.value)
