"""The request router: Ray's default one, with its per-model-id bookkeeping bounded.

Ray Serve 2.60's router (``PowerOfTwoChoicesRequestRouter``; the state is in
``MultiplexMixin`` and ``RequestRouter`` of ``ray/serve/_private/request_router/
request_router.py``) keeps two things per multiplexing header value it routes:

* ``_multiplexed_model_id_fallback_match``, a set of ids that fell back to "the
  replicas with the fewest models"; an id leaves it only once a replica reports that
  id loaded;
* ``_pending_requests_by_model_id``, a deque per id, cleaned only when a later
  request for the same id is matched.

In compatible mode the header is the caller's JWT. Replicas key their LRU by the
model's identity, never by the JWT, so no JWT is ever reported loaded, and with a
TTL every JWT is new: in the HTTP proxy both grow by one entry per JWT, forever, and
hold the callers' tokens. This router keeps the newest ``max_unmatched_model_ids``
ids in the set (a forgotten id falls back at once instead of waiting one backoff)
and drops a request from its id's deque as soon as it is routed or cancelled. The
routing decisions are Ray's: below the bound the set behaves as Ray's does, and the
deques are cleaned the way Ray's lookup cleans them, only earlier.

Serve pickles this module by value into every process that routes (the proxy
included), where the runtime may not be importable: it imports Ray and the standard
library only.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, MutableSet
from typing import Any

from ray.serve._private.request_router.common import PendingRequest
from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter

DEFAULT_MAX_UNMATCHED_MODEL_IDS = 1024


class RecentIds(MutableSet[str]):
    """A set of at most ``limit`` strings; adding past it forgets the least recently added."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        self.limit = limit
        self._ids: OrderedDict[str, None] = OrderedDict()

    def __contains__(self, item: object) -> bool:
        return item in self._ids

    def __iter__(self) -> Iterator[str]:
        return iter(self._ids)

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, value: str) -> None:
        self._ids[value] = None
        self._ids.move_to_end(value)
        while len(self._ids) > self.limit:
            self._ids.popitem(last=False)

    def discard(self, value: str) -> None:
        self._ids.pop(value, None)


class BoundedRequestRouter(PowerOfTwoChoicesRequestRouter):
    """Ray's power-of-two-choices router whose memory does not grow with distinct ids."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._multiplexed_model_id_fallback_match = RecentIds(DEFAULT_MAX_UNMATCHED_MODEL_IDS)

    def initialize_state(
        self, max_unmatched_model_ids: int = DEFAULT_MAX_UNMATCHED_MODEL_IDS, **kwargs: Any
    ) -> None:
        """Serve calls this with the deployment's ``request_router_kwargs``."""
        super().initialize_state(**kwargs)
        bounded = RecentIds(max_unmatched_model_ids)
        for model_id in self._multiplexed_model_id_fallback_match:
            bounded.add(model_id)
        self._multiplexed_model_id_fallback_match = bounded

    def _remove_pending_request_from_indices(self, pending_request: PendingRequest) -> None:
        super()._remove_pending_request_from_indices(pending_request)
        # Ray's lazy clean-up, run now: pops the finished requests at the head of this
        # id's deque and drops the deque once it is empty.
        self._get_pending_request_matching_multiplexed_model_id(pending_request.metadata)
