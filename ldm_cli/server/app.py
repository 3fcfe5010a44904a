"""The HTTP application: routes (A1111's /sdapi/v1, OpenAI's /v1), authentication on every
route, cross-origin refusal unless --cors, the body size limit, and errors in each API's shape.
Parsing is a1111.py's and openai_images.py's; rendering is the engine's, run by jobs.py."""
from __future__ import annotations

import asyncio
import base64
import binascii
import secrets
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from fastapi import Body, FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from ldm_cli import limits, schedulers
from ldm_cli.commands import Upload
from ldm_cli.errors import LdmError
from ldm_cli.server import a1111, jobs, openai_images, renders

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class Security:
    api_key: str | None = None  # Bearer, on every route
    api_auth: str | None = None  # USER:PASS, Basic, on A1111's routes
    cors: list[str] = field(default_factory=list)  # origins whose pages may call it
    loopback: bool = True  # bound to loopback: only loopback Host names (a rebound DNS name is refused)

    def allows(self, header: str, openai: bool) -> bool:
        """Whether an Authorization header passes; an empty one (Open WebUI's) is none."""
        if not self.api_key and not self.api_auth:
            return True
        scheme, _, value = header.strip().partition(" ")
        value = value.strip()
        if scheme.lower() == "bearer" and self.api_key:
            return secrets.compare_digest(value.encode(), self.api_key.encode())
        if scheme.lower() == "basic" and self.api_auth and not openai:
            try:
                given = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                return False
            return secrets.compare_digest(given, self.api_auth.encode())
        return False


class Guard:
    """ASGI middleware before every route: the Host name (when bound to loopback), the Origin
    (another site's page is refused unless --cors names it), the credentials, the body's size."""

    def __init__(self, app: ASGIApp, security: Security):
        self.app, self.security = app, security

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        openai = scope["path"].startswith("/v1/")
        problem = self._refusal(scope, headers, openai)
        if problem is not None:
            return await problem(scope, receive, send)
        await self.app(scope, _bounded(receive), send)

    def _refusal(self, scope: Scope, headers: dict, openai: bool) -> JSONResponse | None:
        host = urlsplit("//" + headers.get("host", "")).hostname or ""
        if self.security.loopback and host not in LOOPBACK:
            return _error(403, f"host {host!r} is not this machine's loopback name", openai)
        origin = headers.get("origin")
        if origin and origin not in self.security.cors and urlsplit(origin).netloc != headers.get("host"):
            return _error(403, "requests from another site's page are refused (start ldm serve with --cors ORIGIN "
                               "to allow one)", openai)
        if not self.security.allows(headers.get("authorization", ""), openai):
            response = _error(401, "missing or wrong credentials", openai)
            if not openai and self.security.api_auth:
                response.headers["WWW-Authenticate"] = 'Basic realm="ldm"'
            return response
        length = headers.get("content-length") or "0"
        if not length.isdigit() or int(length) > limits.MAX_REQUEST_BYTES:
            return _error(413, f"the request body is larger than {limits.MAX_REQUEST_BYTES:,} bytes", openai)
        return None


def _bounded(receive: Receive) -> Receive:
    """A body sent without its length (chunked) is cut off at the same limit."""
    seen = 0

    async def bounded() -> dict:
        nonlocal seen
        message = await receive()
        seen += len(message.get("body", b""))
        if seen > limits.MAX_REQUEST_BYTES:
            raise HTTPException(413, f"the request body is larger than {limits.MAX_REQUEST_BYTES:,} bytes")
        return message
    return bounded


def _error(status: int, message: str, openai: bool, headers: dict | None = None) -> JSONResponse:
    body = openai_images.error(message) if openai else {"error": "LdmError", "detail": message, "body": "",
                                                             "errors": message}
    return JSONResponse(body, status_code=status, headers=headers)


def create(config: renders.Config, workers: jobs.Workers, security: Security) -> FastAPI:
    app = FastAPI(title="ldm", version=_version(), description="A1111's and OpenAI's image APIs in front of ldm.")
    app.state.options = {"sd_model_checkpoint": renders.model_name(config.model), "sd_vae": "Automatic",
                         "CLIP_stop_at_last_layers": 1}
    _handlers(app)
    _a1111_routes(app, config, workers)
    _openai_routes(app, config, workers)
    app.add_middleware(Guard, security=security)
    if security.cors:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=security.cors, allow_methods=["*"], allow_headers=["*"])
    return app


def _version() -> str:
    from ldm_cli import __version__

    return __version__


def _handlers(app: FastAPI) -> None:
    def openai(request: Request) -> bool:
        return request.url.path.startswith("/v1/")

    @app.exception_handler(LdmError)
    async def user_error(request: Request, e: LdmError):
        return _error(400, str(e), openai(request))

    @app.exception_handler(jobs.QueueFull)
    async def queue_full(request: Request, e: jobs.QueueFull):
        return _error(503, "the queue is full; try again shortly", openai(request),
                      {"Retry-After": str(jobs.RETRY_AFTER_S)})

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        return _error(e.status_code, str(e.detail), openai(request), e.headers)

    @app.exception_handler(RequestValidationError)
    async def malformed(request: Request, e: RequestValidationError):
        # where and what only: the values sent are not echoed (bodies can hold credentials)
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        return _error(422, problems, openai(request))


async def _done(request: Request, job: jobs.Job):
    """The job's result; a client that goes away cancels it (dropped if queued, stopped if running)."""
    future = asyncio.wrap_future(job.future)
    try:
        while True:
            finished, _ = await asyncio.wait({future}, timeout=0.25)
            if finished:
                return future.result()
            if await request.is_disconnected():
                job.cancel()
                return JSONResponse({}, status_code=499)  # nobody reads it
    except asyncio.CancelledError:
        job.cancel()
        raise


def _a1111_routes(app: FastAPI, config: renders.Config, workers: jobs.Workers) -> None:
    api = "/sdapi/v1"

    async def render(request: Request, parsed: renders.Request, body: dict, defaults: dict):
        job = workers.submit(lambda slot, job: a1111.response(renders.run(parsed, config, slot, job), body,
                                                              defaults, parsed), "a1111")
        return await _done(request, job)

    @app.post(f"{api}/txt2img")
    async def txt2img(request: Request, body: dict = Body(...)):
        return await render(request, a1111.txt2img(body, app.state.options, config), body, a1111.TXT2IMG)

    @app.post(f"{api}/img2img")
    async def img2img(request: Request, body: dict = Body(...)):
        return await render(request, a1111.img2img(body, app.state.options, config), body, a1111.IMG2IMG)

    @app.get(f"{api}/options")
    def get_options():
        return a1111.options(app.state.options)

    @app.post(f"{api}/options")
    def set_options(body: dict = Body(...)):
        app.state.options = a1111.posted_options(app.state.options, body, config)
        return None

    @app.get(f"{api}/sd-models")
    def sd_models():
        return [{"title": name, "model_name": name, "hash": None, "sha256": None, "filename": path or name,
                 "config": None} for name, path in config.checkpoints().items()]

    @app.post(f"{api}/refresh-checkpoints")
    def refresh_checkpoints():
        config.refresh()
        return None

    @app.get(f"{api}/sd-vae")
    def sd_vae():
        return [{"model_name": name, "filename": path} for name, path in config.vaes().items()]

    @app.get(f"{api}/samplers")
    def samplers():
        return [{"name": spec.label, "aliases": [spec.name], "options": {}} for spec in schedulers.SCHEDULERS.values()]

    @app.get(f"{api}/schedulers")
    def schedule_types():
        return [{"name": name, "label": label, "aliases": None, "default_rho": -1, "need_inner_model": False}
                for name, label in a1111.SCHEDULE_LABELS.items()]

    @app.get(f"{api}/upscalers")
    def upscalers():
        from ldm_cli import hires_plan

        resizers = [{"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": 4}
                    for name in hires_plan.IMAGE_UPSCALERS]
        return resizers + [{"name": name, "model_name": name, "model_path": None, "model_url": None, "scale": 4}
                           for name in config.listing("upscalers")]  # a path is the server's to know

    @app.get(f"{api}/latent-upscale-modes")
    def latent_upscale_modes():
        from ldm_cli import hires_plan

        return [{"name": name} for name in hires_plan.LATENT_MODES]

    @app.get(f"{api}/loras")
    def loras():
        return [{"name": name, "alias": name, "path": str(path), "metadata": {}}
                for name, path in config.listing("loras").items()]

    @app.get(f"{api}/embeddings")
    def embeddings():
        found = config.listing("embeddings")
        return {"loaded": {name: {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": None,
                                  "vectors": None} for name in found}, "skipped": {}}

    @app.get(f"{api}/progress")
    def progress():
        running = workers.jobs_running()
        job = running[0] if running else None
        fraction = job.steps_done / job.steps_total if job and job.steps_total else 0.0
        return {"progress": fraction, "eta_relative": 0.0, "current_image": None, "textinfo": None,
                "state": {"skipped": False, "interrupted": workers.interrupted, "job": job.kind if job else "",
                          "job_count": len(running) + workers.waiting(), "job_timestamp": "0", "job_no": 0,
                          "sampling_step": job.steps_done if job else 0,
                          "sampling_steps": job.steps_total if job else 0}}

    @app.post(f"{api}/interrupt")
    def interrupt():
        workers.interrupt()
        return None

    @app.post(f"{api}/skip")
    def skip():
        workers.interrupt()  # ldm stops the running job: A1111 would go on to its next image
        return None

    @app.post(f"{api}/png-info")
    def png_info(body: dict = Body(...)):
        return a1111.png_info(body)

    @app.get(f"{api}/memory")
    def memory():
        return _memory()

    @app.get(f"{api}/scripts")
    def scripts():
        return {"txt2img": [], "img2img": []}


def _memory() -> dict:
    import os

    pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    free = os.sysconf("SC_AVPHYS_PAGES") * size
    ram = {"free": free, "used": pages * size - free, "total": pages * size}
    import torch

    if not torch.cuda.is_available():
        return {"ram": ram, "cuda": {"error": "no CUDA device"}}
    free_gpu, total = torch.cuda.mem_get_info()
    return {"ram": ram, "cuda": {"system": {"free": free_gpu, "used": total - free_gpu, "total": total}}}


def _openai_routes(app: FastAPI, config: renders.Config, workers: jobs.Workers) -> None:
    async def render(request: Request, parsed: renders.Request, response_format):
        job = workers.submit(lambda slot, job: openai_images.response(renders.run(parsed, config, slot, job),
                                                                      response_format), "openai")
        return await _done(request, job)

    @app.post("/v1/images/generations")
    async def generations(request: Request, body: dict = Body(...)):
        current = app.state.options["sd_model_checkpoint"]
        return await render(request, openai_images.generations(body, current, config), body.get("response_format"))

    @app.post("/v1/images/edits")
    async def edits(request: Request, prompt: str = Form(""), model: str | None = Form(None), n: int = Form(1),
                    size: str | None = Form(None), response_format: str | None = Form(None),
                    image: list[UploadFile] | None = File(None), image_list: list[UploadFile] | None = File(None, alias="image[]"),
                    mask: UploadFile | None = File(None)):
        given = (image or []) + (image_list or [])
        if not given:
            raise LdmError("image is required")
        upload = Upload(await given[0].read(), "image")
        masked = Upload(await mask.read(), "mask") if mask is not None else None
        fields = {"prompt": prompt, "model": model, "n": n, "size": size}
        parsed = openai_images.edits(fields, upload, masked, app.state.options["sd_model_checkpoint"], config)
        return await render(request, parsed, response_format)

    @app.get("/v1/models")
    def models():
        return openai_images.models(config)
