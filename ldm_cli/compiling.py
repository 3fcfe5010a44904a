"""`--compile`: torch.compile of the denoiser, with the compiled code kept on disk between runs.

Mode. On CUDA, "reduce-overhead": inductor's fused kernels, replayed as a CUDA graph, so a step
is one graph launch instead of about a thousand kernel launches issued from Python (at SD1.5's
512x512 on a fast GPU, issuing them is most of a step); matmuls and convolutions stay with
cuBLAS and cuDNN. "max-autotune" would also time Triton templates for every matmul and
convolution: minutes more per image size on the first run for a few percent. Elsewhere,
"default" (CUDA graphs are CUDA's). LDM_COMPILE_MODE names another mode, for benchmarks.

Shapes. dynamic=False: each input shape (image size, batch size, guidance on or off, inpainting
channels) is compiled once, specialised, and reused for every later batch of that shape; the
recompile limit is raised so a prompts file of many sizes never falls back to eager.

Cache. Inductor's FX graph cache, AOTAutograd's cache and the Triton kernels live in
<ldm cache>/compile (cache.root(): LDM_CACHE_DIR, else $XDG_CACHE_HOME/ldm, else ~/.cache/ldm),
unless TORCHINDUCTOR_CACHE_DIR is set. A later process still traces the model (Dynamo has no
disk cache outside an experimental mode) but compiles nothing, provided it runs with the same
process-wide settings: inductor's cache key also holds the matmul precision (TF32) flags, its
own config and, on the CPU, the thread count. torch.compiler's
save_cache_artifacts ("mega-cache") is not used: it bundles these same on-disk caches to carry
them to another machine, and would keep a second copy of them here.
"""
from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path

import torch

from ldm_cli import cache
from ldm_cli.errors import LdmError

MODE_ENV = "LDM_COMPILE_MODE"
GRAPH_MODES = ("reduce-overhead", "max-autotune")  # the modes that replay CUDA graphs
RECOMPILE_LIMIT = 64  # shapes per model in one process


def cache_dir() -> Path:
    """Where compiled code is kept: TORCHINDUCTOR_CACHE_DIR if the user set it, else <ldm cache>/compile."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if chosen and os.path.abspath(chosen) != os.path.abspath(default_cache_dir()):
        return Path(chosen)
    return cache.root() / "compile"  # torch sets the variable to its default (in /tmp) when first asked


def prepare_cache() -> Path:
    """Point inductor (and through it Triton) at the cache folder, creating it."""
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LdmError(f"cannot create the compile cache {str(folder)!r} ({e.strerror}); "
                       "set LDM_CACHE_DIR to a writable folder") from None
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)  # read at each use, so setting it now works
    return folder


def mode_for(device: torch.device) -> str:
    return os.environ.get(MODE_ENV) or ("reduce-overhead" if device.type == "cuda" else "default")


def check_toolchain(device: torch.device) -> None:
    """What inductor needs to build kernels: Triton on CUDA, a C++ compiler on the CPU."""
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise LdmError("--compile on CUDA needs Triton, which this PyTorch lacks; install the CUDA build of torch")
    elif device.type == "cpu":
        names = (os.environ.get("CXX"), "g++", "clang++", "c++")
        if not any(shutil.which(n) for n in names if n):
            raise LdmError("--compile on the CPU needs a C++ compiler (g++ or clang++) on the PATH")


def configure() -> None:
    """Process-wide settings, the same in every process so their cache entries match."""
    import torch._dynamo.config as dynamo
    import torch._functorch.config as functorch
    import torch._inductor.config as inductor

    from ldm_cli import libraries

    libraries.prepare_compile()  # diffusers' compiler marks, recorded while the compiler was not loaded
    inductor.fx_graph_cache = True  # the defaults of recent torch; older ones had them off
    if hasattr(functorch, "enable_autograd_cache"):  # torch >= 2.6
        functorch.enable_autograd_cache = True
    for name in ("recompile_limit", "cache_size_limit"):  # renamed in torch 2.6
        if hasattr(dynamo, name):
            setattr(dynamo, name, max(getattr(dynamo, name), RECOMPILE_LIMIT))
    inductor.conv_1x1_as_mm = True  # a 1x1 convolution is a matmul; cuBLAS runs it faster


def compile_denoiser(model) -> None:
    """Compile `model.denoiser` in place (once): its own object, config and weights stay as they are."""
    denoiser = model.denoiser
    if getattr(denoiser.forward, "ldm_compiled", False):
        return
    check_toolchain(model.device)
    prepare_cache()
    configure()
    mode = mode_for(model.device)
    compiled = torch.compile(denoiser.forward, mode=mode, dynamic=False)
    graphs = model.device.type == "cuda" and mode in GRAPH_MODES
    denoiser.forward = _replaying(compiled) if graphs else compiled
    denoiser.forward.ldm_compiled = True


def _replaying(compiled):
    """A CUDA graph's outputs are overwritten by its next replay: each call starts a new replay
    and hands back copies (a latent's worth), so a scheduler may keep an output across steps."""
    from torch.utils._pytree import tree_map_only

    @functools.wraps(compiled, updated=())  # its signature, not torch.compile's own attributes
    def forward(*args, **kwargs):
        torch.compiler.cudagraph_mark_step_begin()
        return tree_map_only(torch.Tensor, torch.clone, compiled(*args, **kwargs))
    return forward
