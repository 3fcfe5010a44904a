"""What the server renders, as the CLI does: a request's settings (and uploaded images) through
commands.generate / img2img / inpaint with the worker's held model; the images kept in memory.
Names a request gives (model, VAE) resolve only to what the models folders list."""
from __future__ import annotations

import base64
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

from ldm_cli import commands, control_units, model_lookup, render
from ldm_cli.commands import RunOptions, Upload
from ldm_cli.control_units import ControlUnit
from ldm_cli.errors import LdmError
from ldm_cli.loading import LoadOptions
from ldm_cli.networks.lookup import NetworkOptions
from ldm_cli.server.jobs import Job, Stopped
from ldm_cli.settings import Settings


@dataclass
class Config:
    """How the server was started: what it serves and where its models are."""
    model: str | None = None  # --model, as the operator gave it (None: the built-in model)
    models_dir: str | None = None
    load: LoadOptions = field(default_factory=LoadOptions)
    listed: dict[str, dict[str, str]] = field(default_factory=dict)  # by kind, read once until refresh()

    def listing(self, kind: str) -> dict[str, str]:
        """The models folders' files of `kind` by name, read on first use (every request names
        one: a large folder is not walked per request), as A1111 lists them until a refresh."""
        if kind not in self.listed:
            self.listed[kind] = {name: str(path) for name, path in model_lookup.listing(kind, self.models_dir).items()}
        return self.listed[kind]

    def refresh(self) -> None:
        """Read the folders again (refresh-checkpoints): files added since are listed."""
        from ldm_cli.networks import lookup

        self.listed.clear()
        lookup.index.cache_clear()  # LoRAs found by name are looked for again too

    def networks(self) -> NetworkOptions:
        """LoRAs and embeddings from the models folders (A1111's Lora, ComfyUI's loras...)."""
        return NetworkOptions(allow_pickle=self.load.allow_pickle, models_dir=self.models_dir)

    def checkpoints(self) -> dict[str, str | None]:
        """Every model a request may name, by name: the one served at start, then the folders'."""
        first = {model_name(self.model): self.model}
        listed = self.listing("checkpoints")
        return {**first, **{k: v for k, v in listed.items() if k not in first}}

    def controlnet(self, name: object) -> str:
        """The ControlNet a unit's `model` means: a listed name, or sd-webui-controlnet's `name [hash]`."""
        listed = self.listing("controlnet")
        bare = name.rsplit(" [", 1)[0] if isinstance(name, str) and name.endswith("]") else name
        if not isinstance(bare, str) or bare not in listed:
            raise LdmError(f"unknown ControlNet {str(name)[:80]!r}; the server lists: {', '.join(listed) or 'none'}")
        return listed[bare]

    def vaes(self) -> dict[str, str]:
        return self.listing("vae")

    def checkpoint(self, name: object) -> str | None:
        """The model a request's name means: a listed name, or A1111's title `name [hash]`."""
        listed = self.checkpoints()
        if not isinstance(name, str):
            raise LdmError(f"sd_model_checkpoint must be a listed name; the server lists: {', '.join(listed)}")
        bare = name.rsplit(" [", 1)[0] if name.endswith("]") else name
        for key in (name, bare, bare.removesuffix(Path(bare).suffix)):
            if key in listed:
                return listed[key]
        raise LdmError(f"unknown checkpoint {name!r}; the server lists: {', '.join(listed)}")

    def vae(self, name: object) -> str | None:
        """The VAE file a name means; None (A1111's Automatic or None): the model's own."""
        if name is None or name in ("Automatic", "None", ""):
            return None
        listed = self.vaes()
        if not isinstance(name, str):
            raise LdmError(f"sd_vae must be a listed name; the server lists: {', '.join(['Automatic', 'None', *listed])}")
        key = name.removesuffix(Path(name).suffix) if name not in listed else name
        if key not in listed:
            raise LdmError(f"unknown VAE {name!r}; the server lists: {', '.join(['Automatic', 'None', *listed])}")
        return listed[key]


def model_name(model: str | None) -> str:
    if model is None:
        return model_lookup.BUILTIN_NAME
    path = Path(model)
    return path.name if path.is_dir() else path.stem


@dataclass
class Request:
    """One request's render: its settings, how many images, and its images, if any."""
    settings: Settings
    count: int = 1
    batch_size: int = 1
    init: Upload | None = None
    mask: Upload | None = None
    vae: str | None = None  # a listed VAE's file, replacing the model's own
    controls: list[tuple[ControlUnit, Upload]] = field(default_factory=list)  # units, their images still in memory


def run(request: Request, config: Config, slot, job: Job) -> list[render.Result]:
    """Render `request` with the worker's slot. An interrupt keeps the images done before it."""
    options = RunOptions(num_images=request.count, batch_size=request.batch_size, out=None, quiet=True,
                         load=replace(config.load, vae=request.vae or config.load.vae),
                         networks=config.networks(), watch=job.watch)
    if not request.controls:
        return _collected(_results(request, request.settings, options, slot))
    with tempfile.TemporaryDirectory(prefix="ldm-serve-") as folder:  # the control images, for this job only
        s = _with_controls(request.settings, request.controls, Path(folder))
        return _collected(_results(request, s, options, slot))


def _with_controls(s: Settings, controls: list[tuple[ControlUnit, Upload]], folder: Path) -> Settings:
    """The settings with the units, each image written where the server chose (never a request's path)."""
    units = []
    for i, (unit, upload) in enumerate(controls):
        path = folder / f"control-{i}.png"
        path.write_bytes(upload.data)
        units.append(replace(unit, image=str(path)))
    return s.merged(controlnet=control_units.to_text(units))


def _results(request: Request, s: Settings, options: RunOptions, slot):
    if request.mask is not None:
        return commands.inpaint(s, request.init, request.mask, options, slot)
    if request.init is not None:
        return commands.img2img(s, request.init, options, slot)
    return commands.generate(s, options, slot)


def _collected(results) -> list[render.Result]:
    done: list[render.Result] = []
    try:
        for result in results:
            done.append(result)
    except Stopped:
        pass
    return done


def b64_png(result: render.Result) -> str:
    """The image as `ldm generate` saves it (pixels and metadata), base64."""
    return base64.b64encode(render.png_bytes(result)).decode("ascii")


def decoded_b64(text: object, name: str) -> Upload:
    """An image sent as base64 (A1111's bodies), with or without a data: URL's head."""
    if not isinstance(text, str):
        raise LdmError(f"{name} must be a base64 image")
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return Upload(base64.b64decode(text, validate=True), name)
    except ValueError:
        raise LdmError(f"{name} is not valid base64") from None
