"""A FIFO for tests that check ldm never blocks on one."""
import contextlib
import os
import threading
from pathlib import Path


@contextlib.contextmanager
def unblocking_fifo(path: Path):
    """A FIFO at `path`; should a read of it block, a writer comes after 60 s, so a test fails
    rather than hangs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    done = threading.Event()

    def unblock():
        if not done.wait(60):
            with open(path, "wb"):
                pass
    threading.Thread(target=unblock, daemon=True).start()
    try:
        yield path
    finally:
        done.set()
