"""What Celery shows of a received, reserved, scheduled or running task: never its kwargs.

Celery's remote control (``celery inspect active/reserved/scheduled/query_task``, hence
Flower) answers with ``Request.info()``, which holds the raw kwargs (the job's token)
unless the caller passes ``safe=True`` (only ``active`` takes it; ``reserved``,
``scheduled`` and ``query_task`` never do). The ``argsrepr``/``kwargsrepr`` a message
carries come from its producer: an outside producer using Celery's defaults puts the
whole kwargs, token included, there; Celery reuses them in the "Received task" log
line, the ``task-received`` event (Flower), ``repr(request)`` and the failure log of
``celery.app.trace``.

``SafeRequest`` replaces both reprs, at receipt, with ones computed from the kwargs
(the job id, tenant and model; never a token), and its ``info()`` always returns them.
The task's own ``self.request`` keeps the real kwargs: the task needs the token.

Wiring: ``Request = "worker.request:SafeRequest"`` on a task class, or every task of
an app at once: ``Celery(..., task_cls="worker.request:SafeTask")`` (Celery has no
setting for a default Request class; ``task_cls`` is the app's default task base).
"""

from __future__ import annotations

from typing import Any

from celery import Task
from celery.worker.request import Request

from worker.message import safe_kwargsrepr


def safe_argsrepr(args: Any) -> str:
    return "()" if not args else f"({len(args)} args)"


class SafeRequest(Request):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        argsrepr = safe_argsrepr(self._args)
        kwargsrepr = safe_kwargsrepr(self._kwargs if isinstance(self._kwargs, dict) else None)
        self._argsrepr, self._kwargsrepr = argsrepr, kwargsrepr
        # What celery.app.trace logs on a failure (task_request.kwargsrepr).
        self._request_dict["argsrepr"] = argsrepr
        self._request_dict["kwargsrepr"] = kwargsrepr

    def info(self, safe: bool = False) -> dict[str, Any]:
        return super().info(safe=True)


class SafeTask(Task):
    """A task base whose requests are ``SafeRequest``s (the app's ``task_cls``)."""

    Request = "worker.request:SafeRequest"


__all__ = ["SafeRequest", "SafeTask", "safe_argsrepr"]
