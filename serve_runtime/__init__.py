"""The serve runtime: the Synapse SDK's serve API on Ray Serve, hardened.

This module imports only the light, client-side modules (no Ray, no FastAPI): the worker
imports ``serve_runtime`` and its image has neither. The server side is imported from
its own modules, by plugins and by ``synapse-bridge serve deploy``::

    from serve_runtime.deployment import BaseServeDeployment, BatchItem   # a plugin
    from serve_runtime.deploy import deploy                               # Ray Serve

Nothing here imports Celery; ``worker`` depends on this package, not the reverse.
"""

from serve_runtime.action import ActionNotFound, BaseAction, discover_action
from serve_runtime.client import ServeClient, default_client
from serve_runtime.deferred import DeferredResults, Pending, deferrable
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
