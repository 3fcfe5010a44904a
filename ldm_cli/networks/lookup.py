"""Where LoRA and embedding files are found, and a name found among them.

A name is a file's stem (`fox` for `loras/animals/fox.safetensors`), searched recursively, as
A1111 lists its Lora and embeddings folders; a LoRA is also found by its alias, the output name
its trainer recorded (A1111's alias), when no stem matches and no other file has that alias.
Folders, first match wins:
  LoRAs:      files given with --lora, then --lora-dir, a `loras` folder beside the model, $LDM_LORA_DIR,
              the models folder's Lora (A1111) or loras (ComfyUI)
  embeddings: --embeddings-dir, an `embeddings` folder beside the model, $LDM_EMBEDDINGS_DIR,
              the models folder's embeddings
(the variables may hold several folders, separated as in PATH; the models folder is
--models-dir, else $LDM_MODELS_DIR).
"""
from __future__ import annotations

import difflib
import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ldm_cli import files, model_lookup
from ldm_cli.errors import LdmError
from ldm_cli.loading.tensors import MAX_HEADER
from ldm_cli.networks import formats, tags

if TYPE_CHECKING:
    from ldm_cli.settings import Settings

LORA_ENV = "LDM_LORA_DIR"
EMBEDDINGS_ENV = "LDM_EMBEDDINGS_DIR"
SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")  # pickles load only with --allow-pickle


@dataclass
class NetworkOptions:
    lora_files: list[str] = field(default_factory=list)  # --lora FILE[:W], as given
    lora_dirs: list[str] = field(default_factory=list)
    embeddings_dirs: list[str] = field(default_factory=list)
    allow_pickle: bool = False
    models_dir: str | None = None  # --models-dir (else $LDM_MODELS_DIR): its Lora and embeddings folders


def lora_folders(options: NetworkOptions, model: str | None) -> list[Path]:
    return _folders(options.lora_dirs, model, "loras", LORA_ENV) + _models_folders("loras", options)


def embedding_folders(options: NetworkOptions, model: str | None) -> list[Path]:
    return _folders(options.embeddings_dirs, model, "embeddings", EMBEDDINGS_ENV) + _models_folders("embeddings", options)


def _models_folders(kind: str, options: NetworkOptions) -> list[Path]:
    """A1111's models/Lora and models/embeddings, ComfyUI's models/loras, searched last."""
    return model_lookup.kind_folders(kind, options.models_dir)


def _folders(given: list[str], model: str | None, sibling: str, variable: str) -> list[Path]:
    folders = [Path(d).expanduser() for d in given]
    if model:  # beside a checkpoint file, or beside a diffusers folder
        folders.append(Path(model).expanduser().absolute().parent / sibling)
    folders += [Path(d).expanduser() for d in os.environ.get(variable, "").split(os.pathsep) if d]
    return list(dict.fromkeys(folders))


def check_folders(options: NetworkOptions) -> None:
    """The folders given as flags exist (the default ones may not)."""
    for flag, folders in (("--lora-dir", options.lora_dirs), ("--embeddings-dir", options.embeddings_dirs)):
        for folder in folders:
            if not Path(folder).expanduser().is_dir():
                raise LdmError(f"{flag} {folder!r} is not a folder")


def check_loras(settings: Settings, options: NetworkOptions) -> None:
    """Before any model loads: the LoRAs the prompt (and hires prompt) names are found and are LoRA files."""
    for tag in tags.lora_tags(settings.prompt) + tags.lora_tags(settings.hires_prompt or ""):
        formats.peek(find_lora(tag.name, options, settings.model), options.allow_pickle)


def find_lora(name: str, options: NetworkOptions, model: str | None) -> Path:
    """The file of the LoRA `name`: a --lora file of that stem, else the first in the folders."""
    for path, _ in map(tags.parse_flag, options.lora_files):
        if path.stem == name:
            if not path.exists():
                raise LdmError(f"--lora {str(path)!r}: no such file")
            return path
    folders = lora_folders(options, model)
    found = index(tuple(folders))
    if name in found:
        return found[name]
    if name in (named := aliases(tuple(folders))):
        return named[name]
    close = difflib.get_close_matches(name, found, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    where = ", ".join(str(f) for f in folders) or "no LoRA folder"
    raise LdmError(f"LoRA {name!r} not found in {where}{hint}; put {name}.safetensors there, "
                   "or pass --lora-dir DIR or --lora FILE")


@functools.lru_cache(maxsize=16)
def aliases(folders: tuple[Path, ...]) -> dict[str, Path]:
    """A1111's second name for a LoRA: the `ss_output_name` its trainer (kohya) wrote into the
    file, where no other file claims the same one. Read only when a name is no file's stem, and
    from .safetensors headers only (a pickle's metadata would run its code)."""
    claims: dict[str, list[Path]] = {}
    for path in index(folders).values():
        if path.suffix == ".safetensors" and files.is_regular(path) and (alias := _output_name(path)):
            claims.setdefault(alias, []).append(path)
    return {alias: paths[0] for alias, paths in claims.items() if len(paths) == 1}


def _output_name(path: Path) -> str | None:
    """The header's ss_output_name, read here (not by safetensors' own code, which blocks on a
    FIFO where no signal can stop it, or by a parser that takes a huge header)."""
    try:
        with files.open_input(path) as f:
            size = int.from_bytes(f.read(8), "little")
            metadata = json.loads(f.read(size)).get("__metadata__") if size <= MAX_HEADER else None
        name = metadata.get("ss_output_name") if isinstance(metadata, dict) else None
        return name if isinstance(name, str) and name else None
    except (OSError, ValueError, AttributeError, RecursionError, LdmError):
        return None  # no alias; named by its stem, the file is still reported


def embedding_files(options: NetworkOptions, model: str | None) -> dict[str, Path]:
    """stem -> file of every embedding in the folders, the first folder's winning a stem."""
    return index(tuple(embedding_folders(options, model)))


@functools.lru_cache(maxsize=16)  # a batch asks once per line; files added during a run are not seen
def index(folders: tuple[Path, ...]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for folder in folders:
        for path in _walk(folder):
            found.setdefault(path.stem, path)
    return found


def _walk(folder: Path) -> list[Path]:
    """The network files under `folder`, recursively, symlinked folders followed once, and never
    one that holds `folder` itself (a link to / or to a parent: a cycle, and the whole machine).
    Listed, not opened: a FIFO among them is refused by name when a prompt names it."""
    out, seen, top = [], set(), os.path.realpath(folder)
    for root, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen or (real != top and _holds(real, top)):
            dirs.clear()
            continue
        seen.add(real)
        dirs.sort()
        out += [Path(root) / n for n in sorted(names) if n.lower().endswith(SUFFIXES) and not n.startswith(".")]
    return out


def _holds(folder: str, path: str) -> bool:
    return os.path.commonpath([folder, path]) == folder
