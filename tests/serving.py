"""A live `ldm serve` app on a free loopback port, in a thread of the test process."""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Iterator

import uvicorn

from ldm_cli.server import app as application
from ldm_cli.server import jobs, main, renders


class Live:
    def __init__(self, url: str, workers: jobs.Workers, app):
        self.url, self.workers, self.app = url, workers, app

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])


@contextmanager
def live(config: renders.Config | None = None, security: application.Security | None = None,
         devices: tuple[str, ...] = ("cpu",), queue: int = 8) -> Iterator[Live]:
    config = config or renders.Config()
    workers = jobs.Workers(list(devices), queue)
    app = application.create(config, workers, security or application.Security())
    sock = main.bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        yield Live(f"http://127.0.0.1:{sock.getsockname()[1]}", workers, app)
    finally:
        server.should_exit = True
        workers.interrupt()
        thread.join(timeout=20)
        workers.close()
        sock.close()
