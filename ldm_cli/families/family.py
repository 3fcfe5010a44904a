"""What a model family is: data plus two functions, how a prompt becomes conditioning and how
the denoiser is called.

Conditioning is a dict of tensors batched along dim 0, so the loop can stack the negative and
positive halves for classifier-free guidance without knowing what is inside.

`flow` says how the denoiser was trained. Noise-prediction families (SD1, SD2, SDXL) predict
noise or v over a DDPM beta schedule; flow-matching families (SD3) predict the velocity from
image to noise along x_s = (1 - s) x + s noise, sigma s in [0, 1]. It picks the scheduler
classes (schedulers.py) and nothing else: the loop only asks the scheduler. A family whose
denoiser takes latents in another layout (FLUX's packed 2x2 patches) converts them inside its
`predict`, so the loop, the schedulers and inpainting all keep the (N, C, h, w) layout.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from ldm_cli.settings import Settings

Cond = dict[str, "torch.Tensor"]
# what each family is called to a user; here, beside no torch, so `ldm info` names a file's family
# without importing the family's code
LABELS = {"sd1": "Stable Diffusion 1.x", "sd2": "Stable Diffusion 2.x", "sdxl": "Stable Diffusion XL",
          "sd3": "Stable Diffusion 3", "flux": "FLUX.1", "chroma": "Chroma", "zimage": "Z-Image", "flux2": "FLUX.2",
          "qwen-image": "Qwen-Image"}


@dataclass(frozen=True)
class Editing:
    """How a model edits by instruction (`ldm edit`, edit.py): the loop starts from noise as in
    text-to-image, and the input images (the edited one first, then references) reach the
    denoiser as extra conditioning of each image's rows, which its `predict` reads."""
    label: str  # the model kind, as messages name it ("FLUX.1 Kontext")
    max_images: int  # the edited image and its references together
    # (the inputs' sizes, size multiple) -> the output size when none is asked (Kontext: its
    # preferred resolution nearest the first input's aspect)
    size: Callable[[list[tuple[int, int]], int], tuple[int, int]]
    # (model, each output image's inputs, already at their VAE sizes, settings) -> conditioning
    # batched per output image, added to every denoiser call's rows (both CFG halves)
    references: Callable[[Any, list[list[Image.Image]], Settings], Cond]
    # settings an edit takes unless asked otherwise (Kontext: guidance 2.5)
    defaults: dict = field(default_factory=dict)
    # (an input's size, the output size, size multiple) -> the size the VAE reads it at (Qwen:
    # about 1 MP whatever the output); None: the output's area at the input's own aspect
    input_size: Callable[[tuple[int, int], tuple[int, int], int], tuple[int, int]] | None = None
    # (model, the run's inputs) -> the images its text encoder reads beside the prompt, which
    # encode finds in model.edit_inputs (Qwen-Image-Edit's vision tower); None: text alone
    prompt_images: Callable[[Any, list[Image.Image]], list[Image.Image]] | None = None
    # `--mask`: the edit restricted as inpaint restricts (the image noised by strength, the kept
    # part blended back each step), its references the edited image at the output size with the
    # other inputs at their VAE sizes (FluxKontextInpaintPipeline; FLUX.2 klein alike); False: refused
    masks: bool = False
    # with --mask, (model, the edited image's latents as inpainting encodes them, a VAE sample) ->
    # the references, for a pipeline that conditions on that sample (QwenImageEditInpaintPipeline);
    # None: `references` of the images, the image's latents the VAE's mode (Kontext's)
    masked_references: Callable[[Any, torch.Tensor], Cond] | None = None


@dataclass(frozen=True)
class Family:
    name: str  # a key of LABELS
    # The `Any` below is the loaded ldm_cli.model.Model, left untyped because a Model holds its Family.
    # (model, texts, settings, negative) -> conditioning for each text; the texts are one A1111
    # batch (the prompts of one prompt's schedule, conditioning.py), the settings that image's:
    # its size (SDXL's size conditioning) and text options (SD3's T5 length, SD1's clip skip)
    encode: Callable[[Any, list[str], Settings, bool], Cond]
    # (model, latents, timestep, conditioning) -> the denoiser's raw output
    predict: Callable[[Any, torch.Tensor, torch.Tensor, Cond], torch.Tensor]
    # dtype on CUDA when none is asked for
    cuda_dtype: str = "fp16"
    flow: bool = False  # trained with flow matching (velocity over sigma in [0, 1])
    # latent pixels per token side when the denoiser packs patches itself (FLUX's transformer
    # says patch_size 1 but predict packs 2x2); None: its config's patch_size, if any
    patch_size: int | None = None
    # native latent side when the denoiser's config has no sample_size (FLUX: 128, 1024 pixels)
    sample_size: int | None = None
    # steps -> the sigmas before the shift that the family's diffusers pipeline gives the
    # scheduler (FLUX: 1 to 1/steps); None: the scheduler's own spacing (SD3)
    sigmas: Callable[[int], list[float]] | None = None
    # (image tokens, steps) -> the size-dependent shift's mu where the family's pipeline fits its
    # own (FLUX.2's empirical one, step-dependent too); None: the scheduler config's linear one
    mu: Callable[[int, int], float] | None = None
    # the VAE's latents as the loop sees them, where they are not (z - shift) * scale: FLUX.2 packs
    # them into 2x2 patches (4x the channels, half the side) normalised by the VAE's BatchNorm
    # statistics. latent_patch: the side of those patches; to_latents (vae, its posterior,
    # generators or None for the mode) -> loop latents; from_latents (vae, loop latents) -> what
    # the VAE decodes
    latent_patch: int = 1
    to_latents: Callable[[Any, Any, list | None], torch.Tensor] | None = None
    from_latents: Callable[[Any, torch.Tensor], torch.Tensor] | None = None
    # ControlNets, for a family that takes them (None: it does not): how one reads its control
    # images (model, net, images in [0, 1] batched, generators) -> its control input (pixels for
    # a U-Net's, VAE latents for FLUX's, drawn before the starting noise as diffusers draws them);
    # and what it adds to a denoiser call (model, net, latents, timestep, conditioning, its
    # control input for those rows, scale, a union net's mode) -> the denoiser's extra inputs,
    # summed over the units
    control_input: Callable[[Any, Any, torch.Tensor, list], torch.Tensor] | None = None
    control_residuals: Callable[[Any, Any, torch.Tensor, torch.Tensor, Cond, torch.Tensor, float, int | None],
                                dict] | None = None
    # (the conditional output, the guided one) -> what the scheduler steps with, for a family whose
    # pipeline adjusts its CFG (Qwen-Image rescales it to the conditional output's norm, token by
    # token); None: the guided output as it is. Only called when the step is guided (cfg != 1)
    guided: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    # instruction editing with input images (Editing above), by the model's variant (its
    # Model.options["variant"]: FLUX.1 "dev" runs as Kontext, schnell is absent); a variant
    # absent here cannot edit (`ldm edit` refuses it, suggesting img2img)
    edit: dict[str | None, Editing] = field(default_factory=dict)
    # the variant of this family that finishes its images' last steps (`--refiner`: SDXL's
    # "refiner", loaded as a second Model and switched to at --refiner-switch-at); None: none
    refiner: str | None = None

    @property
    def label(self) -> str:
        return LABELS[self.name]
