"""A model found by the name (and hash) an image recorded: `--from-png` on a PNG whose model is
not at its recorded path (another machine's, or A1111's `Model: sd_xl_base_1.0`).

The models folders are `--models-dir DIR`, else $LDM_MODELS_DIR (several, separated as in PATH),
else none. In each, A1111's `models/Stable-diffusion` and ComfyUI's `models/checkpoints` (or
those folders given themselves) are searched when present, else the folder itself, recursively,
for NAME.safetensors, NAME.ckpt, NAME.gguf or a diffusers folder NAME. When several match, the
recorded `Model hash` (A1111's short sha256) picks. A model that cannot be found is refused,
never replaced by another: only a PNG that recorded no model replays with the built-in one.

Upscaler models (`ldm upscale --upscaler NAME`, a hires fix's `Hires upscaler`) are found the same
way, in A1111's `models/ESRGAN` (and its RealESRGAN, SwinIR, DAT, HAT folders) and ComfyUI's
`models/upscale_models`, as NAME.safetensors, NAME.pth or NAME.pt.
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path

from ldm_cli import files
from ldm_cli.errors import LdmError

MODELS_ENV = "LDM_MODELS_DIR"
SUFFIXES = (".safetensors", ".ckpt", ".gguf")
LAYOUTS = ("models/Stable-diffusion", "models/checkpoints", "Stable-diffusion", "checkpoints")  # A1111's, ComfyUI's
BUILTIN_NAME = "ldm-builtin"  # the name the built-in model records
NAME_MAX = 255  # bytes in one file name, on every file system ldm runs on


@dataclass(frozen=True)
class Kind:
    """A kind of model file: its folders in the known layouts, its file suffixes, whether a
    diffusers folder counts, and the flag that picks one by path."""
    layouts: tuple[str, ...]
    suffixes: tuple[str, ...]
    diffusers_folders: bool
    flag: str


CHECKPOINTS = Kind(LAYOUTS, SUFFIXES, True, "--model")
UPSCALER_FOLDERS = ("ESRGAN", "upscale_models", "RealESRGAN", "SwinIR", "DAT", "HAT")  # A1111's, ComfyUI's, A1111's others
UPSCALERS = Kind(tuple(f"{top}{sub}" for top in ("models/", "") for sub in UPSCALER_FOLDERS),
                 (".safetensors", ".pth", ".pt"), False, "--upscaler FILE")


def folders(models_dir: str | None, kind: Kind = CHECKPOINTS) -> list[Path]:
    """Where models of `kind` are searched: --models-dir, else $LDM_MODELS_DIR, each as its layout has them."""
    given = [models_dir] if models_dir else os.environ.get(MODELS_ENV, "").split(os.pathsep)
    out = []
    for root in (Path(d).expanduser() for d in given if d):
        if models_dir and not root.is_dir():
            raise LdmError(f"--models-dir {models_dir!r} is not a folder")
        out += [root / sub for sub in kind.layouts if (root / sub).is_dir()] or [root]
    return out


# What a models folder holds, by kind: A1111's folder name, then ComfyUI's (`ldm serve` lists them).
KINDS = {"checkpoints": ("Stable-diffusion", "checkpoints", "diffusion_models"), "loras": ("Lora", "loras"),
         "vae": ("VAE", "vae"), "embeddings": ("embeddings",), "controlnet": ("ControlNet", "controlnet"),
         "text_encoders": ("text_encoders", "clip"), "upscalers": UPSCALER_FOLDERS}
KIND_SUFFIXES = {"embeddings": (".safetensors", ".pt", ".bin"), "loras": (".safetensors", ".pt", ".ckpt"),
                 "upscalers": UPSCALERS.suffixes}
# A diffusers folder of a kind, listed by its name as one entry: the file that marks it
FOLDER_MARKERS = {"checkpoints": "model_index.json", "controlnet": "config.json", "vae": "config.json"}


def listing(kind: str, models_dir: str | None) -> dict[str, Path]:
    """Every file of `kind` in the models folders, by its name (the stem, as A1111 shows it; the
    first found wins); diffusers folders too (FOLDER_MARKERS). A request's name means one of these
    and nothing else (ldm serve): a name is never a path."""
    found: dict[str, Path] = {}
    suffixes = KIND_SUFFIXES.get(kind, SUFFIXES)
    for root in kind_folders(kind, models_dir):
        for folder, subfolders, names in os.walk(root):
            here = Path(folder)
            if FOLDER_MARKERS.get(kind) in names and here != root:
                found.setdefault(here.name, here)
                subfolders.clear()  # a diffusers folder's parts are not models of their own
                continue
            subfolders.sort()
            for name in sorted(names):
                if Path(name).suffix.lower() in suffixes and (here / name).is_file():
                    found.setdefault(Path(name).stem, here / name)
    return found


def kind_folders(kind: str, models_dir: str | None) -> list[Path]:
    """The folders of `kind` (KINDS) in the models folders, A1111's and ComfyUI's names alike."""
    given = [models_dir] if models_dir else os.environ.get(MODELS_ENV, "").split(os.pathsep)
    roots = []
    for root in (Path(d).expanduser() for d in given if d):
        for base in (root / "models", root):
            roots += [base / sub for sub in KINDS[kind] if (base / sub).is_dir()]
    return roots


def find(name: str, short_hash: str | None, roots: list[Path], kind: Kind = CHECKPOINTS) -> Path | None:
    """The model called `name` in `roots` (None: not there); among several, the one of `short_hash`."""
    if not name or any(sep in name for sep in "/\\") or name.startswith("."):
        return None  # a name, never a path out of the folders
    matches = sorted({p for root in roots if root.is_dir() for p in _named(root, name, kind)})
    if len(matches) <= 1:
        return matches[0] if matches else None
    from ldm_cli import hashing

    same = [p for p in matches if short_hash and p.is_file() and hashing.short_hash(p) == short_hash.lower()]
    if not same:
        listed = ", ".join(repr(str(p)) for p in matches[:4])
        raise LdmError(f"several models are named {name!r} ({listed}) and none has the recorded hash "
                       f"{short_hash or '(none recorded)'}; pass the one to use with {kind.flag}")
    return same[0]


def _named(root: Path, name: str, kind: Kind) -> list[Path]:
    names = [name + suffix for suffix in kind.suffixes if _possible(name + suffix)]
    files = [p for file in names for p in root.rglob(glob.escape(file)) if p.is_file()]
    folders = root.rglob(glob.escape(name)) if kind.diffusers_folders and _possible(name) else []
    return files + [p for p in folders if (p / "model_index.json").is_file()]


def _possible(name: str) -> bool:
    """Whether a file can have this name; rglob raises on those none can (too long, not text)."""
    try:
        return len(os.fsencode(name)) <= NAME_MAX
    except UnicodeEncodeError:
        return False


def given_model(model: str, models_dir: str | None) -> str:
    """--model as given: a path when one is there (or it names a folder: a path), else the model
    of that name in the models folders (`--model sd_xl_base_1.0`); unchanged when none is, for
    the load to say it is missing."""
    if files.exists(files.user_path(model)) or any(sep in model for sep in "/\\"):
        return model
    listed = listing("checkpoints", models_dir)
    found = listed.get(model) or listed.get(Path(model).stem)
    return str(found) if found else model


def recorded_model(model: str | None, name: str | None, short_hash: str | None, png: Path,
                   models_dir: str | None) -> str | None:
    """The model to replay a PNG with: its recorded path if still there, else the file its recorded
    name (and hash) finds; None (the built-in model) only when it recorded none."""
    if model and files.exists(files.user_path(model)):
        return model
    name = name or (Path(model).name.removesuffix(Path(model).suffix) if model else None)
    if not name or name == BUILTIN_NAME:
        return None
    roots = folders(models_dir)
    found = find(name, short_hash, roots)
    if found is not None:
        return str(found)
    made = f"{str(png)!r} was made with the model {name!r}{f' (hash {short_hash})' if short_hash else ''}"
    gone = f"is not at {model!r} and " if model else ""
    if not roots:
        raise LdmError(f"{made}, which {gone}ldm cannot find without a models folder; pass it with --model, or the "
                       f"folder holding it with --models-dir (or ${MODELS_ENV})")
    raise LdmError(f"{made}, which {gone}is not in {', '.join(repr(str(r)) for r in roots)}; pass it with --model")
