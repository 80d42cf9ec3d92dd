"""Graceful shutdown: on SIGTERM, report not ready first, keep serving, then stop.

uvicorn alone, on SIGTERM, closes its listening socket at once and waits for the requests in
flight (``ANOMALY_GRACEFUL_SHUTDOWN_SECONDS``); ``/readyz`` never answers 503, new connections
are refused instead. A load balancer or the Kubernetes endpoints controller may still send new
requests for a moment after SIGTERM, so the service wraps uvicorn's SIGTERM handler:

1. SIGTERM: the registry starts *draining*: ``/readyz`` and ``/v2/health/ready`` say not
   ready, ``anomaly_ready`` is 0, and every request, old or new, is still served;
2. after ``ANOMALY_SHUTDOWN_DRAIN_SECONDS`` (default 0) uvicorn's own handler runs: it stops
   accepting connections, lets the in-flight requests finish, then runs the lifespan shutdown.

A second SIGTERM during the drain stops at once (step 2 now). SIGINT (Ctrl-C) is uvicorn's, as
before. The wrapper is installed only when the app runs in the main thread under a server that
handles SIGTERM itself (uvicorn); elsewhere (tests' TestClient) it does nothing.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable

log = logging.getLogger("anomaly.service")


def install_drain_handler(drain: Callable[[], None], seconds: float) -> Callable[[], None]:
    """Wrap the current SIGTERM handler; returns a function that puts the old one back.

    Args:
        drain: called on the event loop when SIGTERM arrives (the registry's ``drain``).
        seconds: how long to keep serving, not ready, before the server's handler runs.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.getsignal(signal.SIGTERM)
    if not callable(previous):  # SIG_DFL / SIG_IGN: no server handler to hand over to
        return lambda: None
    loop = asyncio.get_running_loop()
    state = {"draining": False}

    def begin(sig: int) -> None:  # on the event loop, never inside the signal handler
        if state["draining"]:  # second SIGTERM: stop now
            previous(sig, None)
            return
        state["draining"] = True
        drain()
        log.info("SIGTERM: not ready, serving for %.1f s more, then shutting down", seconds)
        loop.call_later(max(seconds, 0.0), previous, sig, None)

    def handler(sig: int, frame) -> None:
        # A signal handler may interrupt code holding a lock (metrics); hand over to the loop.
        loop.call_soon_threadsafe(begin, sig)

    signal.signal(signal.SIGTERM, handler)

    def restore() -> None:
        if signal.getsignal(signal.SIGTERM) is handler:
            signal.signal(signal.SIGTERM, previous)

    return restore
