"""The serve runtime: the Synapse SDK's serve API on Ray Serve, hardened.

Nothing here imports Celery; ``worker`` depends on this package, not the reverse.
"""

from serve_runtime.action import ActionNotFound, BaseAction, discover_action
from serve_runtime.client import ServeClient, default_client
from serve_runtime.deferred import DeferredResults, Pending, deferrable
from serve_runtime.deployment import BaseServeDeployment, BatchItem
from serve_runtime.errors import (
    ServeClientError,
    ServeConnectionError,
    ServeError,
    ServeServerError,
    ServeTimeout,
    ServeTransientError,
)
from serve_runtime.remote import infer_remote
from serve_runtime.tokens import (
    ModelKey,
    create_serve_multiplexed_model_id,
    decode_model_token,
)

__all__ = [
    "ActionNotFound",
    "BaseAction",
    "BaseServeDeployment",
    "BatchItem",
    "DeferredResults",
    "ModelKey",
    "Pending",
    "ServeClient",
    "ServeClientError",
    "ServeConnectionError",
    "ServeError",
    "ServeServerError",
    "ServeTimeout",
    "ServeTransientError",
    "create_serve_multiplexed_model_id",
    "decode_model_token",
    "default_client",
    "deferrable",
    "discover_action",
    "infer_remote",
]
