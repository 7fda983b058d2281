"""One settings object per process, from the environment and an optional YAML file.

The Synapse SDK's variable names keep their meaning (``SYNAPSE_HOST``,
``SYNAPSE_ACCESS_TOKEN``, ...); our own settings use the ``SYNAPSE_BRIDGE_`` prefix
or a well-known bare name (``REDIS_URL``, ``BROKER_URL``). A YAML file named by
``SYNAPSE_BRIDGE_CONFIG`` supplies defaults; the environment wins over it.
"""

from __future__ import annotations

import os
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from config.errors import BridgeError
from config.logging import redact_text

CONFIG_FILE_ENV = "SYNAPSE_BRIDGE_CONFIG"


# The most items one coalesced serve call carries (the replica refuses more).
MAX_COALESCED_ITEMS = 256


class SettingsError(BridgeError, ValueError):
    """A setting is missing or invalid; the message names the variable to fix."""


def _env(name: str, *aliases: str, default: Any = None) -> Any:
    return Field(default, validation_alias=AliasChoices(name, *aliases))


class _YamlSource(PydanticBaseSettingsSource):
    """Reads the YAML file named by SYNAPSE_BRIDGE_CONFIG (keys: field names or env names)."""

    def __init__(self, settings_cls: type[BaseSettings], path: str | None) -> None:
        super().__init__(settings_cls)
        self.path = path

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        if not self.path:
            return {}
        p = Path(self.path)
        if not p.is_file():
            raise SettingsError(f"{CONFIG_FILE_ENV}={self.path}: no such file")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise SettingsError(f"{CONFIG_FILE_ENV}={self.path}: invalid YAML: {e}") from e
        if not isinstance(data, dict):
            raise SettingsError(f"{CONFIG_FILE_ENV}={self.path}: top level must be a mapping")
        names = {}
        for fname, f in self.settings_cls.model_fields.items():
            names[fname] = fname
            alias = f.validation_alias
            if isinstance(alias, AliasChoices):
                for choice in alias.choices:
                    names[str(choice).lower()] = fname
        out: dict[str, Any] = {}
        for key, value in data.items():
            fname = names.get(str(key).lower())
            if fname is None:
                raise SettingsError(f"{CONFIG_FILE_ENV}={self.path}: unknown setting {key!r}")
            out[fname] = value
        return out


class Settings(BaseSettings):
    """Everything a bridge process needs; defaults run the demo on one machine."""

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True, frozen=True)

    # --- The Synapse SDK's variables, same names and meanings.
    plugin_release_checksum: str | None = _env("SYNAPSE_PLUGIN_RELEASE_CHECKSUM")
    plugin_release_code: str | None = _env("SYNAPSE_PLUGIN_RELEASE_CODE")
    plugin_run_host: str | None = _env("SYNAPSE_PLUGIN_RUN_HOST")
    synapse_host: str | None = _env("SYNAPSE_HOST")
    access_token: SecretStr | None = _env("SYNAPSE_ACCESS_TOKEN")

    # --- Serving.
    serve_url: str = _env(
        "SYNAPSE_SERVE_URL", "SYNAPSE_BRIDGE_SERVE_URL", default="http://localhost:8100"
    )
    serve_http_host: str = _env("SYNAPSE_BRIDGE_SERVE_HOST", default="127.0.0.1")
    serve_http_port: int = _env("SYNAPSE_BRIDGE_SERVE_PORT", default=8100)
    ray_address: str | None = _env("RAY_ADDRESS")
    serve_connect_timeout_s: float = _env("SYNAPSE_BRIDGE_SERVE_CONNECT_TIMEOUT", default=5.0)
    serve_read_timeout_s: float = _env("SYNAPSE_BRIDGE_SERVE_READ_TIMEOUT", default=60.0)
    serve_max_connections: int = _env("SYNAPSE_BRIDGE_SERVE_MAX_CONNECTIONS", default=100)
    # A serve call the proxy has not acknowledged (100 Continue) within this is sent again
    # at once, once (serve_runtime/receipt.py); the floor of a bound that rises while the
    # proxy acknowledges slowly; 0 turns the receipt off.
    serve_ack_timeout_s: float = _env("SYNAPSE_BRIDGE_SERVE_ACK_TIMEOUT", default=0.5)
    routing_mode: Literal["compatible", "model_affine"] = _env(
        "SYNAPSE_BRIDGE_ROUTING_MODE", default="compatible"
    )
    # How serve calls travel: "http" through Serve's proxy (SYNAPSE_SERVE_URL), or
    # "handle" through a DeploymentHandle, for a process on a node of the Ray cluster
    # (RAY_ADDRESS; needs Ray, the serve extra): serve_runtime/handle_transport.py.
    serve_transport: Literal["http", "handle"] = _env(
        "SYNAPSE_BRIDGE_SERVE_TRANSPORT", default="http"
    )
    signing_key: SecretStr | None = _env("SYNAPSE_SERVE_SIGNING_KEY")
    # The key read from a file on the node instead (a path is no secret: it may travel in
    # Ray's runtime_env, which Serve's API shows; the key never does).
    signing_key_file: Path | None = _env("SYNAPSE_SERVE_SIGNING_KEY_FILE")
    token_ttl_s: int | None = _env("SYNAPSE_BRIDGE_TOKEN_TTL", default=None)
    deferred_poll_interval_s: float = _env("SYNAPSE_BRIDGE_DEFERRED_POLL_INTERVAL", default=1.0)
    # Replicas: how long a deferred result is kept for its polls, from its completion.
    deferred_keep_s: float = _env("SYNAPSE_BRIDGE_DEFERRED_KEEP", default=600.0)

    # --- Replica side: model store.
    model_dir: Path = _env(
        "SYNAPSE_BRIDGE_MODEL_DIR", default=Path(tempfile.gettempdir()) / "synapse-bridge-models"
    )
    max_download_bytes: int = _env("SYNAPSE_BRIDGE_MAX_DOWNLOAD_BYTES", default=2 * 1024**3)
    max_unpacked_bytes: int = _env("SYNAPSE_BRIDGE_MAX_UNPACKED_BYTES", default=8 * 1024**3)
    auth_cache_ttl_s: float = _env("SYNAPSE_BRIDGE_AUTH_CACHE_TTL", default=30.0)
    # A model that failed to fetch or load is refused this long before it is tried
    # again: a broken model does not evict healthy ones at every request.
    model_failure_backoff_s: float = _env("SYNAPSE_BRIDGE_MODEL_FAILURE_BACKOFF", default=10.0)
    # The worker: one backend call's total deadline, first byte sent to last byte read
    # (the write-back's job lock outlives three of them). The replicas: their timeout.
    backend_timeout_s: float = _env("SYNAPSE_BRIDGE_BACKEND_TIMEOUT", default=30.0)

    # --- Broker and worker.
    redis_url: str | None = _env("REDIS_URL")
    broker_url: str | None = _env("BROKER_URL")

    visibility_timeout_s: int = _env("SYNAPSE_BRIDGE_VISIBILITY_TIMEOUT", default=3600)
    task_soft_time_limit_s: float = _env("SYNAPSE_BRIDGE_TASK_SOFT_TIME_LIMIT", default=600.0)
    task_time_limit_s: float = _env("SYNAPSE_BRIDGE_TASK_TIME_LIMIT", default=660.0)
    worker_concurrency: int = _env("SYNAPSE_BRIDGE_WORKER_CONCURRENCY", default=16)
    retry_max: int = _env("SYNAPSE_BRIDGE_RETRY_MAX", default=6)
    retry_base_s: float = _env("SYNAPSE_BRIDGE_RETRY_BASE", default=1.0)
    retry_cap_s: float = _env("SYNAPSE_BRIDGE_RETRY_CAP", default=60.0)
    deferred_max_wait_s: float = _env("SYNAPSE_BRIDGE_DEFERRED_MAX_WAIT", default=3600.0)
    # A deferred job whose ticket is lost (not_found) is submitted again at most this
    # often, then FAILED: lost work is not recomputed without end.
    deferred_resubmits: int = _env("SYNAPSE_BRIDGE_DEFERRED_RESUBMITS", default=3)
    # Coalescing (worker/coalesce.py): the queued single jobs of one model go to Serve
    # as one call of up to COALESCE_MAX_ITEMS (1: every job its own call). While its
    # model has fewer than COALESCE_CALLS calls in flight a job goes at once; else it
    # waits for a call to be answered, at most COALESCE_WAIT seconds (bench W6 plots
    # throughput against latency by wait). One call per model: at W1's 16 jobs in
    # flight, 2 sent 1.33 jobs per call and 1 sent 1.99 (bench/FINDINGS.md); raise it
    # to feed several replicas of one model from one worker process.
    coalesce_max_items: int = _env("SYNAPSE_BRIDGE_COALESCE_MAX_ITEMS", default=32)
    coalesce_calls: int = _env("SYNAPSE_BRIDGE_COALESCE_CALLS", default=1)
    coalesce_wait_s: float = _env("SYNAPSE_BRIDGE_COALESCE_WAIT", default=0.1)
    batch_chunk_size: int = _env("SYNAPSE_BRIDGE_BATCH_CHUNK_SIZE", default=16)
    batch_max_items: int = _env("SYNAPSE_BRIDGE_BATCH_MAX_ITEMS", default=10_000)
    batch_item_failure: Literal["partial", "fail"] = _env(
        "SYNAPSE_BRIDGE_BATCH_ITEM_FAILURE", default="partial"
    )
    progress_interval_s: float = _env("SYNAPSE_BRIDGE_PROGRESS_INTERVAL", default=1.0)
    # A job still running after this long is marked RUNNING on the backend; 0 marks
    # every job at its start (one more backend request per job).
    running_mark_after_s: float = _env("SYNAPSE_BRIDGE_RUNNING_MARK_AFTER", default=1.0)
    # Models in flight across all workers (the deployment's max_models_per_replica);
    # 0: no limit. A job for a model beyond it goes back to the queue until an active
    # model falls idle (worker/admission.py).
    active_models: int = _env("SYNAPSE_BRIDGE_ACTIVE_MODELS", default=0)
    model_idle_s: float = _env("SYNAPSE_BRIDGE_MODEL_IDLE", default=0.5)
    # A model waiting longer than this makes the models active at least as long drain
    # (no starvation); 0: never. How long the next model's job is held while a slot
    # drains for it, before it is re-published.
    model_max_wait_s: float = _env("SYNAPSE_BRIDGE_MODEL_MAX_WAIT", default=60.0)
    model_turn_wait_s: float = _env("SYNAPSE_BRIDGE_MODEL_TURN_WAIT", default=10.0)
    # Celery task events (what Flower shows): off by default, as in Celery (-E).
    task_events: bool = _env("SYNAPSE_BRIDGE_TASK_EVENTS", default=False)
    outbox_flush_interval_s: float = _env("SYNAPSE_BRIDGE_OUTBOX_FLUSH_INTERVAL", default=5.0)
    final_marker_ttl_s: int = _env("SYNAPSE_BRIDGE_FINAL_MARKER_TTL", default=7 * 24 * 3600)
    intake_interval_s: float = _env("SYNAPSE_BRIDGE_INTAKE_INTERVAL", default=5.0)
    intake_claim_ttl_s: int = _env("SYNAPSE_BRIDGE_INTAKE_CLAIM_TTL", default=24 * 3600)
    intake_page_size: int = _env("SYNAPSE_BRIDGE_INTAKE_PAGE_SIZE", default=100)
    metrics_port: int = _env("SYNAPSE_BRIDGE_METRICS_PORT", default=9808)
    ready_file: Path | None = _env("SYNAPSE_BRIDGE_READY_FILE")
    store_results: bool = _env("SYNAPSE_BRIDGE_STORE_RESULTS", default=False)
    max_message_bytes: int = _env("SYNAPSE_BRIDGE_MAX_MESSAGE_BYTES", default=8 * 1024 * 1024)
    # The key job tokens are sealed with in every message the bridge publishes
    # (worker/sealing.py): a Fernet key, or `new,old` while rotating; unset: one
    # derived from SYNAPSE_ACCESS_TOKEN.
    sealing_key: SecretStr | None = _env("SYNAPSE_BRIDGE_SEALING_KEY")

    # --- Logs.
    log_format: Literal["json", "console"] = _env("SYNAPSE_BRIDGE_LOG_FORMAT", default="console")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = _env(
        "SYNAPSE_BRIDGE_LOG_LEVEL", default="INFO"
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        yaml_source = _YamlSource(settings_cls, os.environ.get(CONFIG_FILE_ENV))
        return (init_settings, env_settings, yaml_source)

    @field_validator("serve_url", "plugin_run_host", "synapse_host", "redis_url", "broker_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and "://" not in v:
            raise ValueError("must be a URL with a scheme, e.g. http://host:port")
        return v

    @field_validator(
        "serve_connect_timeout_s",
        "serve_read_timeout_s",
        "max_download_bytes",
        "max_unpacked_bytes",
        "backend_timeout_s",
        "serve_max_connections",
        "deferred_poll_interval_s",
        "deferred_keep_s",
        "visibility_timeout_s",
        "task_soft_time_limit_s",
        "task_time_limit_s",
        "worker_concurrency",
        "retry_base_s",
        "retry_cap_s",
        "batch_chunk_size",
        "batch_max_items",
        "coalesce_max_items",
        "coalesce_calls",
        "progress_interval_s",
        "outbox_flush_interval_s",
        "intake_interval_s",
        "intake_page_size",
    )
    @classmethod
    def _positive(cls, v: float) -> float:
        if v <= 0:
            raise ValueError("must be greater than 0")
        return v

    @field_validator(
        "running_mark_after_s",
        "model_failure_backoff_s",
        "coalesce_wait_s",
        "active_models",
        "model_idle_s",
        "model_max_wait_s",
        "model_turn_wait_s",
        "deferred_resubmits",
        "serve_ack_timeout_s",
    )
    @classmethod
    def _not_negative(cls, v: float) -> float:
        if v < 0:
            raise ValueError("must be 0 or more")
        return v

    @field_validator("coalesce_max_items")
    @classmethod
    def _coalesce_bound(cls, v: int) -> int:
        if v > MAX_COALESCED_ITEMS:
            raise ValueError(
                f"must be at most {MAX_COALESCED_ITEMS} (the runtime's bound per call)"
            )
        return v

    @model_validator(mode="after")
    def _signing_key_from_file(self) -> Settings:
        """``signing_key`` from ``SYNAPSE_SERVE_SIGNING_KEY_FILE`` when not set itself."""
        if self.signing_key is not None or self.signing_key_file is None:
            return self
        try:
            key = self.signing_key_file.read_text().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(
                f"SYNAPSE_SERVE_SIGNING_KEY_FILE={self.signing_key_file}: cannot read it "
                f"({type(e).__name__})"
            ) from None
        if not key:
            raise ValueError(f"SYNAPSE_SERVE_SIGNING_KEY_FILE={self.signing_key_file}: empty")
        object.__setattr__(self, "signing_key", SecretStr(key))  # frozen: set once, here
        return self

    @model_validator(mode="after")
    def _limits_consistent(self) -> Settings:
        if self.task_soft_time_limit_s >= self.task_time_limit_s:
            raise ValueError(
                "SYNAPSE_BRIDGE_TASK_SOFT_TIME_LIMIT must be below SYNAPSE_BRIDGE_TASK_TIME_LIMIT"
            )
        longest = max(self.task_time_limit_s, self.task_soft_time_limit_s + self.job_lock_s)
        if self.visibility_timeout_s <= longest:
            raise ValueError(
                f"SYNAPSE_BRIDGE_VISIBILITY_TIMEOUT ({self.visibility_timeout_s}) must exceed "
                f"the longest a task can run, {longest:g}s: SYNAPSE_BRIDGE_TASK_TIME_LIMIT, or "
                "SYNAPSE_BRIDGE_TASK_SOFT_TIME_LIMIT plus the final write "
                "(3 x SYNAPSE_BRIDGE_BACKEND_TIMEOUT + 5 s); else the broker redelivers "
                "jobs still running"
            )
        return self

    @property
    def job_lock_s(self) -> float:
        """How long a job's write lock lasts: above the deadlines of the three backend
        calls its holder may make (GET, PATCH, a FAILED PATCH), plus a margin."""
        return 3 * self.backend_timeout_s + 5.0

    @property
    def broker(self) -> str:
        """The broker URL: BROKER_URL, else REDIS_URL, else a local Redis."""
        return self.broker_url or self.redis_url or "redis://127.0.0.1:6379/0"

    @property
    def redis(self) -> str:
        """Redis for results, the outbox and claims (REDIS_URL, else a local Redis)."""
        return self.redis_url or "redis://127.0.0.1:6379/0"

    def __repr_args__(self) -> Any:
        for name, value in super().__repr_args__():
            yield name, redact_text(value) if isinstance(value, str) else value

    @property
    def backend_url(self) -> str | None:
        """The backend base URL, as the SDK finds it: run host first, then SYNAPSE_HOST."""
        return self.plugin_run_host or self.synapse_host

    def require_backend_url(self) -> str:
        url = self.backend_url
        if not url:
            raise SettingsError(
                "no backend URL: set SYNAPSE_PLUGIN_RUN_HOST or SYNAPSE_HOST "
                "(e.g. http://127.0.0.1:8010)"
            )
        return url


def _alias_of(field: str) -> str:
    alias = Settings.model_fields[field].validation_alias
    if isinstance(alias, AliasChoices):
        return str(alias.choices[0])
    return field


def load_settings(**overrides: Any) -> Settings:
    """Build and validate settings; a failure names the environment variable to fix."""
    try:
        return Settings(**overrides)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            if not err["loc"]:  # a check across fields names its variables itself
                problems.append(str(err["msg"]).removeprefix("Value error, "))
                continue
            loc = str(err["loc"][0])
            name = _alias_of(loc) if loc in Settings.model_fields else loc
            problems.append(f"{name}: {err['msg']}")
        raise SettingsError("invalid settings: " + "; ".join(problems)) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return load_settings()
