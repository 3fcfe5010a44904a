"""Original single-file layout <-> diffusers modules, both through keymap's one mapping.

Loading plans every component (plan.py: each weight's original key and shape, checked against
the header alone), so a file that does not match fails at once; the tensors, each read once and
cast straight to the target dtype and device (prefetch.py), are then assigned into modules
built on the meta device: no second full copy of the model ever exists.
"""
from __future__ import annotations

import os
import sys
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch

from ldm_cli.errors import LdmError
from ldm_cli.loading import keymap, plan, quantized, weight_table
from ldm_cli.loading.keymap import Slot
from ldm_cli.loading.origin import Origin


def to_original(family: str, unet, vae, text_encoders: list) -> dict[str, torch.Tensor]:
    """diffusers modules -> an original-layout state dict (what A1111 and ComfyUI load)."""
    slots = keymap.LAYOUTS[family]
    modules = [unet, vae, *text_encoders]
    if len(modules) != len(slots):
        raise ValueError(f"{family} has {len(slots) - 2} text encoder(s), got {len(text_encoders)}")
    out: dict[str, torch.Tensor] = {}
    for slot, module in zip(slots, modules):
        out.update(export(slot, module))
    return out


def export(slot: Slot, module) -> dict[str, torch.Tensor]:
    mapping = keymap.mapper(slot.kind, module.config)
    out, fused = {}, defaultdict(dict)
    for name, tensor in module.state_dict().items():
        origin = mapping(name)
        if origin.eye:
            continue
        t = tensor.detach()
        t = t.T if origin.transpose else t
        t = t[..., None, None] if origin.conv else t
        t = swapped(t) if origin.swap else t
        if origin.part is None:
            out[slot.prefix + origin.key] = t
        else:
            fused[slot.prefix + origin.key][origin.part] = t
    for key, parts in fused.items():
        out[key] = torch.cat([parts[i] for i in range(len(parts))])
    return out


def save_single_file(state_dict: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write a .safetensors file atomically (a reader never sees half a file)."""
    from safetensors.torch import save_file

    if not all(isinstance(v, str) for v in metadata.values()):
        raise TypeError("safetensors metadata values must be strings (JSON-encode them)")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    try:
        tmp.touch()  # made under the umask like any file; safetensors replaces it with a private (0600) one
        mode = tmp.stat().st_mode & 0o777
        save_file(tensors, str(tmp), metadata=metadata)
        tmp.chmod(mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def empty(name: str, config: dict) -> torch.nn.Module:
    """A component with its weights on the meta device: built in milliseconds, filled by assignment."""
    from accelerate import init_empty_weights

    try:
        # SD3's one buffer, its position table, is in the file: computing it (0.9 GB for SD3.5
        # medium) only to replace it would cost seconds; other components' buffers are not stored
        # (Chroma's modulation index table is computed, and small)
        build = constructor(name, config)  # its classes imported first: uninitialised() patches them
        sd3 = name == "transformer" and config.get("_class_name", "SD3Transformer2DModel") == "SD3Transformer2DModel"
        with init_empty_weights(include_buffers=sd3), uninitialised():
            module = build(config)
    except (TypeError, ValueError, KeyError) as e:
        raise LdmError(f"the {name} config does not describe a model ldm can build ({e})") from None
    weight_table.keep(name, config, module)  # so `ldm info` checks this architecture's files without torch
    return module


INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
                  "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_",
                  "sparse_")


@contextmanager
def uninitialised():
    """Layers built without drawing their random initial weights: every weight is assigned from
    the file, and drawing into meta tensors runs torch's Python reference ops, which import its
    compiler (seconds). transformers' own initialisation is skipped too; tying shared weights
    (T5's embedding) still happens in post_init."""
    import torch.nn.init as init

    saved = {name: getattr(init, name) for name in INIT_FUNCTIONS if hasattr(init, name)}
    pretrained = sys.modules.get("transformers.modeling_utils")
    model_class = getattr(pretrained, "PreTrainedModel", None)
    initialize = model_class.__dict__.get("initialize_weights") if model_class else None
    for name in saved:
        setattr(init, name, _skip)
    if initialize is not None:
        model_class.initialize_weights = _skip
    try:
        yield
    finally:
        for name, function in saved.items():
            setattr(init, name, function)
        if initialize is not None:
            model_class.initialize_weights = initialize


def _skip(*args, **kwargs) -> None:
    return None


TEXT_MODELS = {"CLIPTextModel": "CLIPTextConfig", "CLIPTextModelWithProjection": "CLIPTextConfig",
               "T5EncoderModel": "T5Config", "Qwen3Model": "Qwen3Config", "Qwen2_5_VLTextModel": "Qwen2_5_VLTextConfig",
               "MistralModel": "MistralConfig"}
# a language model's config: only its hidden states are read (Qwen2.5-VL's text model: not its vision tower)
BASE_MODELS = {"Qwen3ForCausalLM": "Qwen3Model", "Qwen2_5_VLForConditionalGeneration": "Qwen2_5_VLTextModel",
               "Mistral3ForConditionalGeneration": "MistralModel", "MistralForCausalLM": "MistralModel"}


DENOISERS = ("UNet2DConditionModel", "SD3Transformer2DModel", "FluxTransformer2DModel", "ChromaTransformer2DModel",
             "ZImageTransformer2DModel", "Flux2Transformer2DModel", "QwenImageTransformer2DModel")
VAES = ("AutoencoderKL", "AutoencoderKLFlux2", "AutoencoderKLQwenImage")


def constructor(name: str, config: dict):
    if name in ("unet", "transformer", "vae"):
        import diffusers

        default = {"unet": "UNet2DConditionModel", "transformer": "SD3Transformer2DModel", "vae": "AutoencoderKL"}[name]
        cls = config.get("_class_name") or default  # the transformer's config names SD3's, FLUX's or Chroma's
        if cls not in (*DENOISERS, *VAES):
            raise LdmError(f"the {name} config describes a {cls}; ldm runs {', '.join(DENOISERS)} denoisers "
                           f"and {', '.join(VAES)} VAEs")
        return getattr(diffusers, cls).from_config
    import transformers

    # the config names its class; configs without one are SD's: SDXL's second encoder projects
    default = "CLIPTextModelWithProjection" if name == "text_encoder_2" else "CLIPTextModel"
    cls = (config.get("architectures") or [default])[0]
    cls = BASE_MODELS.get(cls, cls)
    if cls not in TEXT_MODELS:
        raise LdmError(f"the {name} config describes a {cls}; ldm runs {', '.join(TEXT_MODELS)} text encoders")
    model_class, config_class = getattr(transformers, cls), getattr(transformers, TEXT_MODELS[cls])
    return lambda c: model_class(config_class.from_dict(c))


def fill(module, planned: dict[str, plan.Planned], tensors: dict[str, torch.Tensor]):
    """Assign the read tensors (already in the target dtype and device) into `module`, which
    was built with empty weights."""
    state = {}
    like = next(iter(tensors.values()), torch.empty(0))
    for name, (key, origin, shape) in planned.items():
        if origin.eye:
            # the identity: a matrix's, or a norm's scale of ones
            state[name] = (torch.eye(*shape, dtype=like.dtype, device=like.device) if len(shape) == 2
                           else torch.ones(shape, dtype=like.dtype, device=like.device))
            continue
        t = tensors[key]
        t = part_of(t, origin)
        t = t.T if origin.transpose else t
        t = t.reshape(t.shape[:2]) if origin.conv else t
        t = swapped(t) if origin.swap else t
        state[name] = t.contiguous()
    rest = quantized.place(module, state)  # GGUF weights go in as they are, the rest by assignment
    missing, unexpected = module.load_state_dict(rest, strict=False, assign=True)
    if set(missing) - set(state) or unexpected:
        raise ValueError(f"{type(module).__name__}: no weights for {sorted(set(missing) - set(state))[:3]}, "
                         f"none wanted for {unexpected[:3]}")
    if any(t.is_meta for t in module.buffers()):
        raise ValueError(f"{type(module).__name__} has buffers no file fills; build it with its buffers")
    if hasattr(module, "tie_weights"):  # T5: `shared` and the encoder's embedding are one tensor again
        module.tie_weights()
    return module


def part_of(t: torch.Tensor, origin: Origin) -> torch.Tensor:
    """The module's rows of a fused stored tensor (rows split stay whole blocks of a quantized one)."""
    if origin.part is None:
        return t
    return (t.split(list(origin.split)) if origin.split else t.chunk(3))[origin.part]


def swapped(t: torch.Tensor) -> torch.Tensor:
    """(shift, scale) <-> (scale, shift): the halves of an adaptive norm's projection."""
    first, second = t.chunk(2)
    return torch.cat([second, first])
