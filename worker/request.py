"""What Celery's remote control shows of a running or reserved task: never its kwargs.

``inspect active/reserved/scheduled`` (hence Flower) return ``Request.info()``, which
holds the raw kwargs unless the caller asks for ``safe``; the job's token is in them.
"""

from __future__ import annotations

from typing import Any

from celery.worker.request import Request


class SafeRequest(Request):
    def info(self, safe: bool = False) -> dict[str, Any]:
        return super().info(safe=True)
