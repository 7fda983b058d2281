"""This process as a driver of a running Ray cluster, its signal handlers kept.

The worker's handle transport and ``synapse-bridge serve status``/``delete`` join a
cluster that is already there (``RAY_ADDRESS``, else the one ``ray start`` on this
machine named). ``ray.init`` replaces a driver's SIGTERM handler (exit at once, after a
stack dump from Ray's failure handler), which would turn a worker's warm shutdown,
finishing its running jobs, into a kill; so the handlers are put back.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

import ray


def join(address: str | None) -> None:
    """Connect to the cluster at ``address`` (None: "auto"); ``ConnectionError`` when
    none answers there. A no-op once connected."""
    if ray.is_initialized():
        return
    with _signal_handlers_kept():
        ray.init(address=address or "auto", log_to_driver=False, ignore_reinit_error=True)


@contextlib.contextmanager
def _signal_handlers_kept() -> Iterator[None]:
    """Keep the process's SIGTERM and SIGINT handlers across the block (only the main
    thread can set handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    kept = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in kept.items():
            if handler is not None:
                signal.signal(sig, handler)
