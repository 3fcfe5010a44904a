"""What a checkpoint file really is, judged by its first bytes rather than its name, and the
only way ldm ever unpickles one: torch.load(weights_only=True), and only when asked.

A pickle can run any code while it is read, so a `.ckpt` (or a pickle renamed `.safetensors`)
from the internet is refused by default.
"""
from __future__ import annotations

import pickle
import re
import warnings
import zipfile
from pathlib import Path

from ldm_cli import files
from ldm_cli.errors import LdmError

GGUF_MAGIC = b"GGUF"  # llama.cpp's format (quantized FLUX and T5 files)
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's archive format (a zip holding a pickle)
PICKLE_PROTOCOLS = range(2, 6)  # b"\x80" then the protocol byte opens every modern pickle


def sniff(path: Path) -> str:
    """'safetensors', 'gguf', 'pickle' or 'unknown', from the first bytes."""
    with files.open_input(path) as f:  # every checkpoint, LoRA and embedding is first opened here
        head = f.read(9)
    if head.startswith(GGUF_MAGIC):
        return "gguf"
    if head.startswith(ZIP_MAGIC) or (head[:1] == b"\x80" and len(head) > 1 and head[1] in PICKLE_PROTOCOLS):
        return "pickle"
    # safetensors: an 8-byte little-endian header length, then the JSON header itself
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    return "unknown"


def refusal(path: Path) -> LdmError:
    return LdmError(
        f"{path.name} is a pickle checkpoint, a format that can run code when loaded, so ldm does not load it; "
        "use a .safetensors version of the model, or if you trust this file pass --allow-pickle "
        "(ldm then reads tensors only, with torch.load(weights_only=True))")


def load_pickle(path: Path, tensors_only: bool = True) -> dict:
    """The tensors of a pickle checkpoint, unpickled with torch's weights-only unpickler;
    `tensors_only=False`: the whole dict as stored (an embedding nests its tensor)."""
    import torch

    try:
        # a file object, because torch.load hands a *.safetensors name to safetensors
        with open(path, "rb") as f, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's remarks on pickle protocols: ldm says what matters
            obj = torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        what = f" (it calls {found[1]})" if found else ""
        raise LdmError(f"{path.name} holds more than tensors{what}, which the weights-only unpickler refused; "
                       "ldm will not run code from a checkpoint") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        raise LdmError(f"{path.name} is truncated or corrupt ({str(e).splitlines()[0]}); download it again") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # Lightning-style checkpoints nest the weights
    if not isinstance(obj, dict):
        raise LdmError(f"{path.name} is a pickle but not a state dict of tensors; ldm cannot use it")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor) or not tensors_only}
