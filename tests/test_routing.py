"""The HTTP proxy's router stays bounded however many distinct multiplexing ids it routes.

In compatible mode the multiplexing header is the caller's JWT; with a TTL each one
is new. Ray's default router remembers every such id in the proxy, forever.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from bench.proxy_memory import proxy_router_stats
from config import get_settings
from serve_runtime.routing import DEFAULT_MAX_UNMATCHED_MODEL_IDS, RecentIds
from serve_runtime.tokens import MODEL_TOKEN_HEADER, create_serve_multiplexed_model_id
from tests.conftest import TOKENS

ROWS = [[5.0, 3.4, 1.5, 0.2]]
IN_FLIGHT = 16


def distinct_jwts(n: int) -> list[str]:
    """``n`` JWTs for one user and model, each new (``exp`` one second apart), as with a TTL."""
    s = get_settings()
    key = s.signing_key.get_secret_value() if s.signing_key else None
    return [
        create_serve_multiplexed_model_id(
            12, TOKENS["alice"], s.require_backend_url(), "acme", signing_key=key, ttl_s=3600 + i
        )
        for i in range(n)
    ]


async def post_all(url: str, headers: list[dict[str, str]]) -> dict[int, int]:
    """Every call, ``IN_FLIGHT`` at a time; counts by status."""
    statuses: dict[int, int] = {}
    todo = iter(headers)
    async with httpx.AsyncClient(timeout=60.0) as client:

        async def lane() -> None:
            for h in todo:
                status = (await client.post(url, json={"inputs": ROWS}, headers=h)).status_code
                statuses[status] = statuses.get(status, 0) + 1

        await asyncio.gather(*(lane() for _ in range(IN_FLIGHT)))
    return statuses


@pytest.mark.slow
def test_distinct_compatible_tokens_do_not_grow_the_proxy_router(
    example_app: Any, serve_env: dict[str, str]
) -> None:
    n = DEFAULT_MAX_UNMATCHED_MODEL_IDS + 200
    url = f"{serve_env['SYNAPSE_SERVE_URL']}{example_app.route_prefix}/"
    statuses = asyncio.run(post_all(url, [{MODEL_TOKEN_HEADER: t} for t in distinct_jwts(n)]))
    assert statuses == {200: n}

    stats = proxy_router_stats(example_app.route_prefix)
    assert stats, "no HTTP proxy found"
    for proxy in stats:
        # Ray's default router: one entry per JWT in each (n + earlier tests' ids).
        assert proxy["fallback_ids"] <= DEFAULT_MAX_UNMATCHED_MODEL_IDS, proxy
        assert proxy["pending_model_ids"] == 0, proxy


def test_recent_ids_forget_the_least_recently_added() -> None:
    ids = RecentIds(3)
    for x in ("a", "b", "c"):
        ids.add(x)
    ids.add("a")  # refreshed: "b" is now the oldest
    ids.add("d")
    assert list(ids) == ["c", "a", "d"]
    assert "b" not in ids and "d" in ids
    ids.discard("c")
    ids.discard("never-added")
    assert list(ids) == ["a", "d"]
    with pytest.raises(ValueError):
        RecentIds(0)
