"""The plugin's ``config.yaml``: identity (code, version), its actions, and serve options.

The shape follows the Synapse SDK's plugin config: ``actions.<name>.entrypoint`` names
the action class as ``module.Class`` (or ``module:Class``); the serve options live
under ``actions.<name>.serve`` and map onto ``serve.deployment(...)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

CONFIG_FILENAME = "config.yaml"


class PluginConfigError(ValueError):
    """The plugin's config.yaml is missing or invalid; the message names the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ActorOptions(_Strict):
    num_cpus: float | None = Field(None, ge=0)
    num_gpus: float | None = Field(None, ge=0)
    memory: int | None = Field(None, ge=0, description="bytes")


class BatchOptions(_Strict):
    """Per replica: batches of one model, formed when one of the batch slots is free."""

    max_batch_size: int = Field(32, ge=1, description="requests per infer_batch call")
    batch_wait_timeout_s: float = Field(
        0.01, ge=0, description="how long a lone request waits for company"
    )
    max_concurrent_batches: int = Field(
        1, ge=1, description="infer_batch calls at once (1: the device runs one batch)"
    )


class AutoscalingOptions(BaseModel):
    """Passed through to Ray Serve's autoscaling_config (its own names)."""

    model_config = ConfigDict(extra="allow")
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float | None = Field(None, gt=0)


class ServeOptions(_Strict):
    num_replicas: int | None = Field(None, ge=1)
    autoscaling_config: AutoscalingOptions | None = None
    ray_actor_options: ActorOptions = Field(default_factory=ActorOptions)
    max_ongoing_requests: int = Field(32, ge=1)
    max_models_per_replica: int = Field(3, ge=1)
    batch: BatchOptions | None = None
    deferred_deadline_s: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _replicas_xor_autoscaling(self) -> ServeOptions:
        if self.num_replicas is not None and self.autoscaling_config is not None:
            raise ValueError("set either num_replicas or autoscaling_config, not both")
        return self


class ActionConfig(_Strict):
    entrypoint: str = Field(..., description="module.Class or module:Class of the action")
    serve: ServeOptions = Field(default_factory=ServeOptions)

    @property
    def module_and_class(self) -> tuple[str, str]:
        if ":" in self.entrypoint:
            module, _, cls = self.entrypoint.partition(":")
        else:
            module, _, cls = self.entrypoint.rpartition(".")
        if not module or not cls:
            raise PluginConfigError(
                f"entrypoint {self.entrypoint!r}: expected 'module.Class' or 'module:Class'"
            )
        return module, cls


class PluginConfig(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str | None = None
    # YAML reads ``version: 1.0`` as a number; the SDK formats it with str() for the prefix.
    code: str = Field(..., min_length=1, coerce_numbers_to_str=True)
    version: str = Field(..., min_length=1, coerce_numbers_to_str=True)
    actions: dict[str, ActionConfig] = Field(default_factory=dict)

    def action(self, name: str) -> ActionConfig:
        try:
            return self.actions[name]
        except KeyError:
            known = ", ".join(sorted(self.actions)) or "none"
            raise PluginConfigError(
                f"config.yaml has no action {name!r} (actions: {known})"
            ) from None


def load_plugin_config(path: Path | str) -> PluginConfig:
    """Read a plugin's config.yaml (a file, or a directory holding one)."""
    p = Path(path)
    if p.is_dir():
        p = p / CONFIG_FILENAME
    if not p.is_file():
        raise PluginConfigError(f"{p}: no such file")
    try:
        data: Any = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise PluginConfigError(f"{p}: invalid YAML: {e}") from e
    if not isinstance(data, dict):
        raise PluginConfigError(f"{p}: the top level must be a mapping")
    try:
        return PluginConfig.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors()
        )
        raise PluginConfigError(f"{p}: {problems}") from None
