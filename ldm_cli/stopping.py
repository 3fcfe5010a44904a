"""Stopping a run from outside: Ctrl-C (SIGINT) and SIGTERM (`kill`, a launcher stopping its
workers) both raise a KeyboardInterrupt in the main thread, so every cleanup written for Ctrl-C
runs for both; the CLI then says which signal stopped it and exits 128 + its number."""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator


class Stopped(KeyboardInterrupt):
    """A stop by a signal other than Ctrl-C's (a plain KeyboardInterrupt is Ctrl-C's)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def signal_of(interrupt: KeyboardInterrupt) -> int:
    return getattr(interrupt, "signum", signal.SIGINT)


def message(signum: int) -> str:
    what = "interrupted" if signum == signal.SIGINT else "terminated"
    return f"ldm: {what}; images already saved are kept"


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()  # signal handlers live there only


def _stop(signum: int, frame) -> None:
    raise Stopped(signum)


@contextmanager
def sigterm_stops() -> Iterator[None]:
    """Inside, SIGTERM stops the run the way Ctrl-C does (raises Stopped)."""
    if not _in_main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def signals_held() -> Iterator[None]:
    """Ctrl-C or SIGTERM arriving inside takes effect just after, so work that must not be cut
    in two (an image saved and recorded) finishes first."""
    if not _in_main_thread():
        yield
        return
    caught: list[int] = []
    previous = {s: signal.signal(s, lambda n, f: caught.append(n)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if caught:
            raise KeyboardInterrupt if caught[0] == signal.SIGINT else Stopped(caught[0])
