"""Fitting big models (FLUX's 12B transformer and 4.9B T5) in the memory people have: where the
weights live, in what dtype, and how large a VAE decode may be. All of it is diffusers' and
accelerate's own machinery, wired to ldm's model:

- `--offload model`: accelerate's cpu_offload_with_hook on each component, chained in the
  order they run (text encoders, denoiser, VAE) as diffusers' enable_model_cpu_offload chains
  them: a component moves to the GPU when called and sends the one before it back to the CPU.
- `--offload sequential`: accelerate's cpu_offload on the denoiser, as diffusers'
  enable_sequential_cpu_offload: its weights stay in CPU memory and each layer visits the GPU
  for its forward. The text encoders are offloaded as with `model` (whole, one at a time: their
  weights stay real CPU tensors, so the families' `encoder.device` stays meaningful); the VAE
  (a few hundred MB) stays on the GPU.
- Either way the text encoders go back to the CPU once a batch's prompts are encoded
  (`release_text_encoders`); their hooks bring them back if another batch needs them.
- Once every prompt of a run is encoded (ahead.py) the text encoders are freed, offloaded or
  not (`free_text_encoders`): their memory, GPU or CPU, is the system's again.
- `--weights fp8`: diffusers' layerwise casting on the denoiser and T5: weights stored in float8
  e4m3fn, each layer cast to the compute dtype (bf16 on GPUs) for its forward. It combines with
  either offload (the float8 weights are what moves).
- `--vae-tiling`: diffusers' tiled VAE; also switched on for a decode whose estimated memory
  exceeds what the GPU has free.

A model with any of these is loaded into CPU memory first and placed here, so the full-size
weights never have to fit the GPU at once. On a machine without a GPU the hooks run with the
CPU as their execution device: the same wiring, nothing saved.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ldm_cli.errors import LdmError
from ldm_cli.notes import note

if TYPE_CHECKING:  # torch is imported where it is used: check() runs before anything heavy loads
    import torch

OFFLOADS = ("none", "model", "sequential")
WEIGHTS = ("fp8",)
# a VAE decode's peak, in elements per output pixel, estimated from the decoder's layout (not
# measured): the last upsampler holds a few 256-channel tensors at full size at once
DECODE_ELEMENTS_PER_PIXEL = 1200


def check(offload: str, weights: str | None, compile: bool = False) -> None:
    if offload not in OFFLOADS:
        raise LdmError(f"unknown --offload {offload!r}; choose none, model or sequential")
    if weights not in (None, *WEIGHTS):
        raise LdmError(f"unknown --weights {weights!r}; choose fp8 (or leave it out for the model's dtype)")
    if compile and offload != "none":
        raise LdmError("--compile does not combine with --offload: the offload hooks move weights between calls, "
                       "which compiled code and CUDA graphs cannot follow; leave one out")


def keeps_on_cpu(options) -> bool:
    """Whether the loader leaves the weights in CPU memory for `place` to put where they run."""
    return options.offload != "none" or options.weights is not None


def load_device(device: torch.device, options) -> torch.device:
    """Where a loader puts the weights it reads (the dtype still follows `device`)."""
    import torch

    return torch.device("cpu") if keeps_on_cpu(options) else device


def place(model, device: torch.device, options) -> None:
    """Put a loaded model where it runs, as `options` ask. Its modules are where the loader left
    them: on the CPU when keeps_on_cpu(options), else already on `device`."""
    model.run_device, model.run_dtype = device, model.dtype  # before fp8 storage changes the weights'
    if options.weights == "fp8":
        store_fp8(model, model.run_dtype)
    if options.offload == "model":
        offload_models(model, device)
    elif options.offload == "sequential":
        offload_layers(model, device)
    elif keeps_on_cpu(options):
        for module in modules(model):
            module.to(device)
    if options.vae_tiling:
        model.vae.enable_tiling()


def modules(model) -> list[torch.nn.Module]:
    """The components in the order a run calls them."""
    return [m for m in (*model.text_encoders, model.denoiser, model.vae) if m is not None]


def fp8_skipped(module: torch.nn.Module) -> tuple[str, ...]:
    """The layers left in the compute dtype: diffusers' default patterns (position and patch
    embeddings, the in/out projections) and the model's own (Z-Image's timestep and caption
    embedders, which cast their input to their weights' dtype) less "norm", and the module's fp32
    layers. Real norms hold no Linear to cast; "norm" would keep the adaLN modulation linears
    (norm1.linear ...: 3.2B of FLUX's 11.9B parameters) in bf16, and float8 storage would save a
    third, not half."""
    from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

    own = tuple(getattr(module, "_skip_layerwise_casting_patterns", None) or ())
    keep = tuple(getattr(module, "_keep_in_fp32_modules", None) or ())
    return tuple(dict.fromkeys(p for p in (*DEFAULT_SKIP_MODULES_PATTERN, *own) if p != "norm")) + keep


def store_fp8(model, compute_dtype: torch.dtype) -> None:
    """The denoiser's and T5's weights in float8, each layer cast for its forward by diffusers'
    layerwise casting. T5 casts its input to `wo`'s stored dtype itself, so `wo` (kept in fp32
    under fp16 by transformers) stays in the compute dtype."""
    import torch
    from diffusers.hooks import apply_layerwise_casting

    from ldm_cli.speed import plain_weights

    t5 = [e for e in model.text_encoders if e is not None and e.config.model_type == "t5"]
    for module in (model.denoiser, *t5):
        if not plain_weights(module):
            raise LdmError(f"--weights fp8 stores fp16/bf16/fp32 weights in float8, but this model's "
                           f"{type(module).__name__} is stored quantized already; leave --weights out")
        apply_layerwise_casting(module, torch.float8_e4m3fn, compute_dtype, fp8_skipped(module))


def offload_models(model, device: torch.device, chain: list[torch.nn.Module] | None = None) -> None:
    """Each module of `chain` (all of them by default) to the GPU when called, sending the one before it back."""
    from accelerate import cpu_offload_with_hook

    hook = None
    for module in modules(model) if chain is None else chain:
        _, hook = cpu_offload_with_hook(module, device, prev_module_hook=hook)


def offload_layers(model, device: torch.device) -> None:
    from accelerate import cpu_offload

    offload_models(model, device, [e for e in model.text_encoders if e is not None])
    # buffers too when the module holds parameters of its own, as diffusers does
    cpu_offload(model.denoiser, device, offload_buffers=len(model.denoiser._parameters) > 0)
    model.vae.to(device)


def release_text_encoders(model) -> None:
    """Text encoders off the GPU once prompts are encoded, where an offload hook will bring them
    back if they are called again (a model without offload keeps them: it fits as it is)."""
    for encoder in model.text_encoders:
        if encoder is not None and hasattr(encoder, "_hf_hook"):
            encoder.to("cpu")


def set_aside(model) -> None:
    """The denoiser off the GPU where offloaded by model (its hook brings it back when called),
    so another model's (a refiner's) takes its place; sequential offload keeps none there."""
    if _offload_hooks(model.denoiser):
        model.denoiser.to("cpu")


def free_text_encoders(model) -> None:
    """Drop the model's text encoders and every reference ldm holds to them: the offload chain's
    (the denoiser's hook sends the encoder before it back to the CPU) and the LoRA session's.
    The model keeps an empty list: encoding with it again fails at once, never silently."""
    import gc

    import torch

    freed = [e for e in model.text_encoders if e is not None]
    for module in (model.denoiser, model.vae):
        for hook in _offload_hooks(module):
            if getattr(hook.prev_module_hook, "model", None) in freed:
                hook.prev_module_hook = None
    if model.networks is not None:
        model.networks.drop_text_encoders()
    model.text_encoders = []
    hooked = any(_hooked(m) for e in freed for m in e.modules())
    del freed
    if hooked:  # a hook's wrapped forward refers back to its module: a cycle only the collector frees
        gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _hooked(module: torch.nn.Module) -> bool:
    return hasattr(module, "_hf_hook") or hasattr(module, "_diffusers_hook")


def _offload_hooks(module: torch.nn.Module) -> list:
    """The accelerate CpuOffload hooks on `module` (cpu_offload_with_hook appends them)."""
    from accelerate.hooks import CpuOffload, SequentialHook

    hook = getattr(module, "_hf_hook", None)
    hooks = hook.hooks if isinstance(hook, SequentialHook) else [hook]
    return [h for h in hooks if isinstance(h, CpuOffload)]


def tile_if_needed(vae, latents: torch.Tensor, scale: int, dtype: torch.dtype) -> None:
    """Switch on tiling for a decode that would not fit in the GPU's free memory (estimated)."""
    import torch

    if latents.device.type != "cuda" or getattr(vae, "use_tiling", True):
        return
    n, _, h, w = latents.shape
    need = DECODE_ELEMENTS_PER_PIXEL * n * h * w * scale * scale * dtype.itemsize
    free = torch.cuda.mem_get_info(latents.device)[0]
    if need > free:
        note(f"decoding {w * scale}x{h * scale} needs about {need / 2**30:.1f} GB, more than the "
             f"{free / 2**30:.1f} GB free on the GPU: tiling the VAE, as --vae-tiling does")
        vae.enable_tiling()
