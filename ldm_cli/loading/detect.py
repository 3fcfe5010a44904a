"""Which model a checkpoint holds, from its tensor names and shapes alone (the safetensors
header), so that nothing is read or built before ldm knows what to build.

The text encoders' key layout names the family (SD1's Hugging Face CLIP under
cond_stage_model.transformer, SD2's OpenCLIP under cond_stage_model.model, SDXL's two under
conditioner.embedders); the UNet's first convolution says whether it is an inpainting model
(latents + mask + masked-image latents in); and the UNet's cross-attention width must equal the
text encoders' combined width, or the file mixes parts of different models. SD3's MMDiT names
itself (joint_blocks), FLUX's transformer too (double_blocks), Chroma's by its approximator
(distilled_guidance_layer) beside FLUX's blocks, so it is never taken for FLUX, FLUX.2's by its
shared modulations (single_stream_modulation) beside FLUX's block names, Z-Image's by its
caption embedder and one-Linear adaptive norms, in Tongyi's layout or diffusers', Qwen-Image's by
its text input norm beside its image input (diffusers' names; never diffusers' own single-file
guess, which takes it for SD1); their text encoders may be in the file or in files of their own.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from ldm_cli.errors import LdmError
from ldm_cli.loading import chroma, flux, flux2, keymap, mmdit, qwen_image, variants, zimage
from ldm_cli.loading.tensors import Checkpoint

UNET_IN = keymap.UNET.prefix + "input_blocks.0.0.weight"
UNET_OUT = keymap.UNET.prefix + "out.2.weight"
EMA_PREFIX = "model_ema."


@dataclass(frozen=True)
class Found:
    family: str  # sd1, sd2, sdxl, sd3, flux, chroma, zimage, flux2, qwen-image
    in_channels: int
    latent_channels: int
    ema: bool
    variant: str | None = None  # sd3: sd3, sd35-medium or sd35-large; flux: dev or schnell; zimage: turbo or base;
    # flux2: distilled, base or dev; qwen-image: edit or edit-plus
    denoiser_slot: keymap.Slot = keymap.UNET  # where the denoiser's keys start
    denoiser_config: dict = field(default_factory=dict, compare=False)  # what its shapes say (SD3)

    @property
    def inpainting(self) -> bool:
        return self.in_channels == 2 * self.latent_channels + 1


def detect(checkpoint: Checkpoint, variant: str | None = None) -> Found:
    """The model the file holds; `variant` (--variant) says its release where shapes cannot."""
    found = _detect(checkpoint)
    told = variants.told(found.family, found.variant, variant)
    return found if told == found.variant else replace(found, variant=told)


def _detect(checkpoint: Checkpoint) -> Found:
    shapes = checkpoint.shapes
    if (prefix := mmdit.prefix_of(shapes)) is not None:
        return sd3(shapes, prefix)
    if (prefix := flux2.prefix_of(shapes)) is not None:  # FLUX's block names too: asked first
        return flux2_found(shapes, prefix, checkpoint.name, checkpoint.metadata)
    if (prefix := chroma.prefix_of(shapes)) is not None:  # FLUX's blocks too: asked first
        return chroma_found(shapes, prefix)
    if (prefix := flux.prefix_of(shapes)) is not None:
        return flux_found(shapes, prefix)
    if (prefix := zimage.prefix_of(shapes)) is not None:
        return zimage_found(shapes, prefix, checkpoint.name)
    if (prefix := qwen_image.prefix_of(shapes)) is not None:
        return qwen_image_found(shapes, prefix)
    if UNET_IN not in shapes or UNET_OUT not in shapes:
        raise LdmError(not_a_model(checkpoint))
    family = family_of(shapes)
    if family is None:
        raise LdmError(unknown_text_encoder(checkpoint))
    in_channels, latent = shapes[UNET_IN][1], shapes[UNET_OUT][0]
    if in_channels not in (latent, 2 * latent + 1):
        raise LdmError(f"{checkpoint.name}: its UNet takes {in_channels} input channels; ldm runs text-to-image "
                       f"({latent}) and inpainting ({2 * latent + 1}) models, not this variant")
    check_context(checkpoint, family)
    # an EMA copy of the weights, not just the bookkeeping scalars (decay, num_updates) pruned files keep
    ema = any(k.startswith(EMA_PREFIX) and len(shape) > 0 for k, shape in shapes.items())
    return Found(family, in_channels, latent, ema)


def sd3(shapes: dict, prefix: str) -> Found:
    config = mmdit.config(shapes, prefix)
    return Found("sd3", config["in_channels"], config["out_channels"], False, mmdit.variant(shapes, prefix),
                 replace(keymap.MMDIT, prefix=prefix), config)


def flux_found(shapes: dict, prefix: str) -> Found:
    config = flux.config(shapes, prefix)
    latent = config["in_channels"] // 4  # packed in 2x2 patches
    return Found("flux", latent, latent, False, flux.variant(shapes, prefix), replace(keymap.FLUX, prefix=prefix), config)


def chroma_found(shapes: dict, prefix: str) -> Found:
    config = chroma.config(shapes, prefix)
    latent = config["in_channels"] // 4  # packed in 2x2 patches, as FLUX's
    return Found("chroma", latent, latent, False, None, replace(keymap.CHROMA, prefix=prefix), config)


def flux2_found(shapes: dict, prefix: str, name: str, metadata: dict) -> Found:
    config = flux2.config(shapes, prefix)
    latent = config["in_channels"] // 4  # the VAE's channels, packed in 2x2 patches
    return Found("flux2", latent, latent, False, flux2.variant_of(shapes, prefix, name, metadata),
                 replace(keymap.FLUX2, prefix=prefix), config)


def zimage_found(shapes: dict, prefix: str, name: str) -> Found:
    config = zimage.config(shapes, prefix)
    slot = replace(keymap.ZIMAGE, prefix=prefix, kind="zimage" if zimage.original(shapes, prefix) else "diffusers")
    latent = config["in_channels"]
    return Found("zimage", latent, latent, False, zimage.variant(name), slot, config)


def qwen_image_found(shapes: dict, prefix: str) -> Found:
    config = qwen_image.config(shapes, prefix)
    latent = config["in_channels"] // 4  # packed in 2x2 patches
    return Found("qwen-image", latent, latent, False, None, replace(keymap.QWEN_IMAGE, prefix=prefix), config)


def text_slots(family: str) -> list[keymap.Slot]:
    return [s for s in keymap.LAYOUTS[family] if s.kind in keymap.TEXT_KINDS]


def slots(found: Found) -> list[keymap.Slot]:
    """Where each component's weights would lie in the file, the denoiser where it was found."""
    return [found.denoiser_slot, *keymap.LAYOUTS[found.family][1:]]


def family_of(shapes: dict) -> str | None:
    families = ("sdxl", "sd2", "sd1")  # most specific first
    prefixes = {s.prefix for f in families for s in text_slots(f)}
    present = {p for p in prefixes if any(k.startswith(p) for k in shapes)}
    for family in families:
        if all(s.prefix in present for s in text_slots(family)):
            return family
    return None


def text_width(shapes: dict, slot: keymap.Slot) -> int | None:
    key = slot.prefix + keymap.mapper(slot.kind, {})("embeddings.token_embedding.weight").key
    return shapes[key][-1] if key in shapes else None


def check_context(checkpoint: Checkpoint, family: str) -> None:
    """The UNet's cross-attention reads what the text encoders write: their widths must add up."""
    widths = [text_width(checkpoint.shapes, s) for s in text_slots(family)]
    context = next((shape[-1] for key, shape in checkpoint.shapes.items()
                    if key.startswith(keymap.UNET.prefix) and key.endswith("attn2.to_k.weight")), None)
    if None in widths or context is None:
        raise LdmError(f"{checkpoint.name} lacks its text encoder's embeddings or the UNet's cross-attention; "
                       "the file is incomplete")
    if context != sum(widths):
        raise LdmError(f"{checkpoint.name}: its UNet reads {context}-wide text features but its text encoder(s) "
                       f"give {'+'.join(map(str, widths))}; the file mixes parts of different models")


# ControlNets, by what only they hold: a U-Net one's hint encoder (diffusers' layout), a FLUX
# one's input projection, lllyasviel's originals' prefix (1.0) and hint encoder (1.1)
CONTROLNET_HINT = "controlnet_cond_embedding.conv_in.weight"
FLUX_CONTROLNET_KEY = "controlnet_x_embedder.weight"
ORIGINAL_CONTROLNET_PREFIX = "control_model."
ORIGINAL_CONTROLNET_HINT = "input_hint_block.0.weight"
# the modules of those (and SD3's input projection) a file given as a model is told apart by
CONTROLNET_KEYS = ("controlnet_cond_embedding.", "controlnet_x_embedder.", "pos_embed_input.",
                   ORIGINAL_CONTROLNET_PREFIX, "input_hint_block.")


def not_a_model(checkpoint: Checkpoint) -> str:
    keys = list(checkpoint.shapes)
    if any("lora" in k.lower() for k in keys[:50]):
        return f"{checkpoint.name} is a LoRA, not a full checkpoint; ldm loads full Stable Diffusion checkpoints"
    if any(k.startswith(CONTROLNET_KEYS) for k in keys):
        return f"{checkpoint.name} is a ControlNet, not a model; pass it with --controlnet next to a model"
    # conv1, conv2: Wan's names for the quant convs (Qwen-Image's VAE)
    if keys and all(k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "first_stage_model.", "model_ema.",
                                  "conv1.", "conv2.")) for k in keys):
        return f"{checkpoint.name} holds only a VAE; pass it with --vae next to a full model"
    if any(k.endswith(tuple(keymap.TEXT_SIGNATURES.values())) for k in keys):
        return f"{checkpoint.name} holds only a text encoder; pass it with --text-encoder next to a model (SD3, FLUX, Chroma, Z-Image, FLUX.2, Qwen-Image)"
    return (f"{checkpoint.name} is not a Stable Diffusion checkpoint ldm recognises (no "
            f"{keymap.UNET.prefix}* UNet weights); ldm loads SD1.x, SD2.x, SDXL, SD3/3.5, FLUX.1, Chroma, Z-Image, FLUX.2 (klein, dev) and Qwen-Image single files and diffusers folders")


def unknown_text_encoder(checkpoint: Checkpoint) -> str:
    if any(k.startswith("conditioner.embedders.0.model.") for k in checkpoint.shapes):
        return (f"{checkpoint.name} is an SDXL refiner's single file, which ldm does not read yet; pass the "
                "refiner's diffusers folder (stabilityai/stable-diffusion-xl-refiner-1.0) with --refiner")
    return (f"{checkpoint.name} has a UNet but no text encoder ldm recognises (SD1 CLIP, SD2 OpenCLIP or SDXL's two); "
            "ldm cannot run it")


def turbo(checkpoint: Checkpoint) -> bool:
    """A distilled few-step model, as its ModelSpec metadata says (SD3.5 large turbo's shapes are large's)."""
    return any("turbo" in value.lower() for key, value in checkpoint.metadata.items()
               if key.startswith("modelspec.") and isinstance(value, str))
