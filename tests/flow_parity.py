"""What the flow-matching parity tests (SD3, FLUX) share: ldm and diffusers loading the same
tiny folder, diffusers' scheduler built independently of ldm's table, and the 2/255 comparison."""
import numpy as np
import torch

from ldm_cli import loading


def load_pairs(pipeline_class, folders: dict) -> dict:
    """variant -> (ldm's Model, diffusers' pipeline) from the same folder."""
    out = {}
    for variant, folder in folders.items():
        theirs = pipeline_class.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
        theirs.set_progress_bar_config(disable=True)
        theirs.original_scheduler_config = theirs.scheduler.config  # tests swap the scheduler
        out[variant] = (loading.load(str(folder)), theirs)
    return out


def their_scheduler(pipe, table: dict, name: str, **extra):
    """Built from diffusers' classes directly (`table`: name -> (class, overrides))."""
    import diffusers

    cls, overrides = table[name]
    return getattr(diffusers, cls).from_config(pipe.original_scheduler_config, **{**overrides, **extra})


def pixels(image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def as_pixels(ref: np.ndarray) -> np.ndarray:
    return (ref * 255).round().astype(np.int16)


def close(mine: np.ndarray, ref: np.ndarray) -> bool:
    assert mine.shape == ref.shape
    assert mine.std() > 1  # a real image, not a flat one that would match anything
    return np.abs(mine - ref).max() <= 2
