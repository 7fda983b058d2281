"""Retry policy: exponential backoff with full jitter, bounded in count and delay."""

from __future__ import annotations

import random
from dataclasses import dataclass

from config import Settings, get_settings


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = 6
    base_s: float = 1.0
    cap_s: float = 60.0

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> RetryPolicy:
        s = settings or get_settings()
        return cls(max_retries=s.retry_max, base_s=s.retry_base_s, cap_s=s.retry_cap_s)

    def delay(self, retries_done: int, rng: random.Random | None = None) -> float:
        """Seconds before the next try: uniform in [ceiling/2, ceiling], ceiling doubling."""
        # The exponent is bounded: past 2**64 the ceiling is the cap anyway, and an
        # unbounded power of two overflows a float after 1023 retries.
        ceiling = min(self.cap_s, self.base_s * (2 ** min(retries_done, 64)))
        return (rng or random).uniform(ceiling / 2, ceiling)

    def exhausted(self, retries_done: int) -> bool:
        return retries_done >= self.max_retries
