"""`ldm serve` itself: check the address and credentials, start one worker per device, bind,
say the URL, serve until Ctrl-C or SIGTERM, then stop the running job and exit cleanly."""
from __future__ import annotations

import ipaddress
import signal
import socket
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import uvicorn

from ldm_cli import limits
from ldm_cli.errors import LdmError
from ldm_cli.server import app as application
from ldm_cli.server import jobs, renders


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 7860
    api_key: str | None = None
    api_auth: str | None = None
    cors: tuple[str, ...] = ()
    queue: int = limits.MAX_QUEUED_JOBS


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check(options: ServeOptions) -> None:
    """Refusals before anything starts: each is one line."""
    if not is_loopback(options.host) and not (options.api_key or options.api_auth):
        raise LdmError(f"--host {options.host} would let anyone on the network render: give --api-key KEY "
                       "or --api-auth USER:PASS with it")
    if options.api_auth is not None and ":" not in options.api_auth:
        raise LdmError("--api-auth must be USER:PASS")
    if not 0 <= options.port <= 65535:
        raise LdmError(f"--port must be between 0 and 65535 (got {options.port})")
    if not 1 <= options.queue <= 10_000:
        raise LdmError(f"--queue must be between 1 and 10000 (got {options.queue})")


def devices(device: str) -> list[str]:
    """One worker per device: `cuda:0,cuda:1` as listed; auto: every GPU, else the one device."""
    listed = [d.strip() for d in device.split(",") if d.strip()]
    if listed != ["auto"]:
        return listed or ["auto"]
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [f"cuda:{i}" for i in range(count)] if count > 1 else ["auto"]


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise LdmError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    sock.listen(128)
    return sock


class _Server(uvicorn.Server):
    """uvicorn's server whose Ctrl-C and SIGTERM stop the running jobs first, then end it; they are
    not raised again afterwards (uvicorn's own way), so `ldm serve` exits 0."""

    def __init__(self, config: uvicorn.Config, workers: jobs.Workers):
        super().__init__(config)
        self.workers = workers

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        def stop(signum, frame) -> None:
            self.workers.interrupt()
            self.handle_exit(signum, frame)
        previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def serve(config: renders.Config, options: ServeOptions, device: str) -> None:
    check(options)
    config.checkpoints()  # the models folder read once before the URL is given
    sock = bind(options.host, options.port)
    workers = jobs.Workers(devices(device), options.queue)
    security = application.Security(options.api_key, options.api_auth, list(options.cors), is_loopback(options.host))
    app = application.create(config, workers, security)
    server = _Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=10), workers)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"ldm serve: http://{shown}:{port} (A1111 API /sdapi/v1, OpenAI API /v1, routes at /docs); "
          "Ctrl-C stops it", flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        workers.close()
        sock.close()
    print("ldm serve: stopped", file=sys.stderr, flush=True)
