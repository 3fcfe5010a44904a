"""Z-Image (Tongyi's Turbo and Base): a single-stream flow transformer (ZImageTransformer2DModel)
conditioned on Qwen3's hidden states, as diffusers' ZImagePipeline conditions it.

The prompt is put in Qwen3's chat template as a user turn (thinking on, the assistant's turn
opened: llm_text.py), padded to --max-sequence-length tokens, and the second-to-last hidden layer read; the
transformer takes each prompt's states without the padding. Those differ in length from prompt
to prompt, so the conditioning keeps them padded with their mask (every prompt at one length,
the loop stacks them as any other) and predict cuts each row back to its tokens.

The transformer takes a list of (C, 1, h, w) latents (a frame axis) at t = 1 - sigma and
predicts the velocity from noise to image, the negative of what the flow schedulers take; both
are turned around inside predict, so the loop keeps (N, C, h, w) latents and its sign. Its CFG
is pos + g (pos - neg): ldm's --cfg c (uncond + c (cond - uncond)) is the pipeline's g = c - 1,
and 1 is off (Turbo's default; the pipeline's guidance_scale 0). A1111's emphasis
weighs Qwen3's input embeddings (llm_text.py). Text encoders: [Qwen3].
A ControlNet (ZImageControlNetModel) reads the same inputs plus the control image's latents and
returns samples the transformer adds after the layers its config names, keyed by layer.
"""
from __future__ import annotations

import torch

from ldm_cli import vae
from ldm_cli.families import flux, llm_text
from ldm_cli.families.family import Cond, Family
from ldm_cli.settings import Settings

MAX_SEQUENCE_LENGTH = 512  # diffusers' ZImagePipeline default
HIDDEN_LAYER = -2  # the pipeline's hidden_states[-2]
PATCH = 2  # latent pixels per token side (the transformer's all_patch_size)
TURBO = {"steps": 9, "cfg": 1.0}  # Tongyi's model card: 9 steps (8 transformer calls' worth), no CFG
BASE = {"steps": 50, "cfg": 5.0}  # Tongyi's: 50 steps at guidance_scale 4, ldm's cfg 5


def defaults(name: str, scheduler_config: dict) -> dict:
    """The variant's (turbo or base, as loading/zimage.py tells them) steps and CFG, with flow Euler
    at the scheduler's own shift (Turbo's 3)."""
    dynamic = scheduler_config.get("use_dynamic_shifting", False)
    return {**(TURBO if name == "turbo" else BASE), "scheduler": "euler", "schedule": "default",
            "shift": None if dynamic else scheduler_config.get("shift", 1.0),
            "max_sequence_length": MAX_SEQUENCE_LENGTH}


def encode(model, texts: list[str], s: Settings, negative: bool) -> Cond:
    tokenizer, encoder = model.tokenizers[0], model.text_encoders[0]
    length = s.max_sequence_length or MAX_SEQUENCE_LENGTH
    [states], mask = llm_text.hidden_states(tokenizer, encoder, texts, length, (HIDDEN_LAYER,), thinking=True)
    states = states.masked_fill(~mask[..., None], 0)  # padding is cut off in predict; zeros keep it inert
    return {"encoder_hidden_states": states.to(model.device, model.dtype), "mask": mask.to(model.device)}


def _inputs(model, latents: torch.Tensor, t: torch.Tensor, cond: Cond) -> tuple[list, torch.Tensor, list]:
    """What the transformer and its ControlNets both read: framed latents, 1 - sigma, each prompt's tokens."""
    frames = list(latents.to(model.dtype).unsqueeze(2).unbind(0))
    context = [states[mask] for states, mask in zip(cond["encoder_hidden_states"], cond["mask"])]
    return frames, (1000 - t.expand(latents.shape[0])) / 1000, context


def predict(model, latents: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
    out = model.denoiser(*_inputs(model, latents, t, cond), controlnet_block_samples=cond.get(CONTROL_KEY),
                         return_dict=False)[0]
    return -torch.stack(out).squeeze(2).to(latents.dtype)


CONTROL_KEY = "controlnet_block_samples"  # {transformer layer: sample}, put in the conditioning by the loop


def control_input(model, net, images: torch.Tensor, generators: list) -> torch.Tensor:
    """The control image's latents (the posterior's mode, as ZImageControlNetPipeline encodes it),
    zero channels added up to the net's control_in_dim (Fun ControlNet 2.0 reads 33)."""
    z = vae.encode(model, images * 2 - 1, None)
    extra = net.config.control_in_dim - z.shape[1]
    return torch.cat([z, z.new_zeros(z.shape[0], extra, *z.shape[2:])], dim=1) if extra > 0 else z


def control_residuals(model, net, x: torch.Tensor, t: torch.Tensor, cond: Cond, image: torch.Tensor,
                      scale: float, mode: int | None = None) -> dict:
    controls = list(image.to(model.dtype).unsqueeze(2).unbind(0))
    return {CONTROL_KEY: net(*_inputs(model, x, t, cond), controls, conditioning_scale=scale)}


# bf16: Tongyi ship Z-Image in bf16, and Qwen3 is trained in it
ZIMAGE = Family("zimage", encode, predict, cuda_dtype="bf16", flow=True, patch_size=PATCH,
                sample_size=128, sigmas=flux.sigmas, control_input=control_input, control_residuals=control_residuals)
