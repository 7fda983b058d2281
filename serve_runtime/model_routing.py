"""Telling Serve's router which models a replica holds, so requests follow their model.

Ray's ``serve.multiplexed`` wrapper does this for the models in its own LRU; the model
store keeps its own bounded LRU (it must fetch before it evicts, and never evict a copy
in use), so it reports its slots the same way the wrapper does: a ``RequestRoutingInfo``
to the controller, which hands it to every router. Private Ray API, pinned with
``ray[serve]==2.60.0`` in pyproject.toml; outside a replica it is a no-op.
"""

from __future__ import annotations

import structlog
from ray.serve._private.common import RequestRoutingInfo
from ray.serve.context import _get_global_client, _get_internal_replica_context

log = structlog.get_logger("serve_runtime.model_routing")


class ModelRouting:
    """Publishes this replica's model keys (the multiplexing ids it serves best)."""

    def __init__(self) -> None:
        context = _get_internal_replica_context()
        self._replica_id = context.replica_id if context is not None else None
        self._last: list[str] | None = None

    def publish(self, model_keys: list[str]) -> None:
        if self._replica_id is None or model_keys == self._last:
            return
        self._last = list(model_keys)
        try:
            _get_global_client().record_request_routing_info(
                RequestRoutingInfo(replica_id=self._replica_id, multiplexed_model_ids=model_keys)
            )
        except Exception as e:  # routing is an optimisation: serving goes on without it
            log.warning("could not publish the replica's models", error=type(e).__name__)
