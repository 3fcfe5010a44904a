"""How a load runs: the options the command line gives it, and the libraries' own output kept
quiet. A module of their own below the loaders (folder, single_file, components), which take them
from here, not from the package that imports those loaders."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LoadOptions:
    vae: str | None = None  # a separate VAE file or folder replacing the model's own
    config: str | None = None  # a diffusers-layout folder describing a non-standard checkpoint
    prediction: str | None = None  # "epsilon" or "v", overriding what the model says
    allow_pickle: bool = False
    device: str = "auto"
    dtype: str = "auto"
    text_encoders: list[str] = field(default_factory=list)  # text-encoder files (CLIP-L, CLIP-G, T5), any order
    compile: bool = False  # torch.compile the denoiser (speed.py, compiling.py)
    offload: str = "none"  # none, model or sequential (memory.py)
    weights: str | None = None  # fp8: the denoiser and T5 stored in float8 (memory.py)
    vae_tiling: bool = False
    variant: str | None = None  # --variant: the release where shapes cannot tell (loading/variants.py)
    without_t5: bool = False  # SD3 run wholly with --no-t5: its T5 is not read (FLUX needs T5 and reads it)


def quiet_libraries() -> None:
    """diffusers and transformers draw their own loading bars; ldm draws one bar, its own."""
    import warnings

    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    # diffusers' own ChromaTransformer2DModel builds FluxPosEmbed under its deprecated name: nothing a user can act on
    warnings.filterwarnings("ignore", message="`FluxPosEmbed` is deprecated", category=FutureWarning)
