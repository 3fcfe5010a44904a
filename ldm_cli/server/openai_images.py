"""OpenAI's Images API: generations and edits (multipart) -> a render Request; the answer in
its shape. Model names such as dall-e-2 or gpt-image-1 are served by the current model; a
listed checkpoint's name picks that one."""
from __future__ import annotations

import io
import time

from PIL import Image

from ldm_cli.commands import Upload
from ldm_cli.errors import LdmError
from ldm_cli.render import Result
from ldm_cli.server.renders import Config, Request, b64_png
from ldm_cli.settings import Settings

MAX_N = 10  # OpenAI's own bound on n


def _size(size: object) -> tuple[int | None, int | None]:
    """"WxH", or "auto" (and absent): the model's native size."""
    if size in (None, "auto"):
        return None, None
    try:
        width, height = (int(x) for x in str(size).lower().split("x"))
    except ValueError:
        raise LdmError(f"size must be WIDTHxHEIGHT or auto (got {str(size)[:40]!r})") from None
    return width, height


def _n(n: object) -> int:
    try:
        count = int(n if n is not None else 1)
    except (TypeError, ValueError):
        raise LdmError(f"n must be a whole number (got {str(n)[:40]!r})") from None
    if not 1 <= count <= MAX_N:
        raise LdmError(f"n must be between 1 and {MAX_N} (got {count})")
    return count


def _model(name: object, current: str, config: Config) -> str | None:
    listed = config.checkpoints()
    return listed[name] if isinstance(name, str) and name in listed else config.checkpoint(current)


def _settings(fields: dict, current: str, config: Config) -> Settings:
    prompt = fields.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise LdmError("prompt is required")
    width, height = _size(fields.get("size"))
    s = Settings(prompt=prompt, width=width, height=height, model=_model(fields.get("model"), current, config))
    s.validate()
    return s


def generations(body: dict, current: str, config: Config) -> Request:
    """POST /v1/images/generations; quality, style and the rest are accepted and ignored."""
    return Request(_settings(body, current, config), _n(body.get("n")))


def edits(fields: dict, image: Upload, mask: Upload | None, current: str, config: Config) -> Request:
    """POST /v1/images/edits: the mask's (else the image's own) transparent part is repainted;
    an image with no transparency and no mask is redrawn whole (img2img)."""
    s = _settings(fields, current, config)
    count = _n(fields.get("n"))
    source = mask or image
    alpha = _alpha(source)
    if alpha is None:
        if mask is not None:
            raise LdmError("mask must have transparency: its transparent part is what gets edited")
        return Request(s, count, init=image)
    return Request(s, count, init=image, mask=Upload(alpha, source.name))


def _alpha(upload: Upload) -> bytes | None:
    """A mask ldm reads (white repainted) from the transparent part of the upload; None if it has none."""
    from ldm_cli import images

    images.decoded(upload.data, "L", upload.name)  # size bounded and readable, as every image
    with Image.open(io.BytesIO(upload.data)) as im:
        if "A" not in im.getbands() and "transparency" not in im.info:
            return None
        alpha = im.convert("RGBA").getchannel("A")
    mask = alpha.point(lambda a: 255 if a == 0 else 0)
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    return buffer.getvalue()


def response(results: list[Result], response_format: object) -> dict:
    """data[i].b64_json, or a data: URL when `url` is asked (nothing is stored to link to)."""
    encoded = [b64_png(r) for r in results]
    if response_format == "url":
        data = [{"url": f"data:image/png;base64,{e}", "revised_prompt": None} for e in encoded]
    else:
        data = [{"b64_json": e, "revised_prompt": None} for e in encoded]
    return {"created": int(time.time()), "data": data}


def error(message: str, kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


def models(config: Config) -> dict:
    return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "ldm"}
                                       for name in config.checkpoints()]}
