"""Qwen-Image (Qwen-Image, Qwen-Image-2512): a double-stream flow transformer
(QwenImageTransformer2DModel) conditioned on Qwen2.5-VL-7B's last hidden states, as diffusers'
QwenImagePipeline conditions it.

The prompt goes in the pipeline's template (a system turn asking for a detailed description of
the image, the prompt as the user's turn, the assistant's turn opened), Qwen2.5-VL's text model
reads it, and the template's first 34 tokens (system turn and user header) are dropped from its
last hidden layer; --max-sequence-length counts the tokens after them. The conditioning keeps
every prompt padded to that length with its mask (zeros, as the pipeline pads), so rows stack as
any family's; predict cuts the columns no row uses, and gives the transformer no mask when every
token is real (as the pipeline does for a single prompt).

Latents are FLUX's 2x2 patches (flux.pack) with the image's (frames, rows, columns) for the
transformer's rotary positions; the VAE's frame axis is vae.py's. CFG is the pipeline's true
CFG: ldm's --cfg c is its true_cfg_scale (uncond + c (cond - uncond)), 1 is off, and the guided
output is rescaled, token by token, to the norm of the conditional one (`renorm`). A1111's
emphasis weighs Qwen2.5-VL's input embeddings (llm_text.py, Forge Neo's way), the template's
tokens at weight 1. Text encoders: [Qwen2.5-VL].
A ControlNet (QwenImageControlNetModel) reads the same inputs plus the control image's packed
latents and returns one sample per block of its own, which the transformer spreads over its blocks.
"""
from __future__ import annotations

import torch

from ldm_cli import vae
from ldm_cli.families import flux, llm_text, qwen_edit
from ldm_cli.families.family import Cond, Family
from ldm_cli.notes import note
from ldm_cli.settings import Settings

TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
            "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
            "<|im_start|>assistant\n")  # QwenImagePipeline.prompt_template_encode
DROP = 34  # the template's tokens before the prompt (prompt_template_encode_start_idx)
MAX_SEQUENCE_LENGTH = 512  # the pipeline's default
STEPS, CFG = 50, 4.0  # the pipeline's defaults (num_inference_steps, true_cfg_scale), as Qwen's model cards run


def defaults(scheduler_config: dict) -> dict:
    """The pipeline's steps and true CFG with flow Euler; the shift is computed from the image size
    (None) where the schedule shifts dynamically, as Qwen-Image's does."""
    dynamic = scheduler_config.get("use_dynamic_shifting", False)
    return {"steps": STEPS, "cfg": CFG, "scheduler": "euler", "schedule": "default",
            "shift": None if dynamic else scheduler_config.get("shift", 1.0),
            "max_sequence_length": MAX_SEQUENCE_LENGTH}


def note_cut(tokenizer, prompts: list[str], length: int) -> None:
    """The pipeline keeps `length` tokens after the template's head (its tail with the rest): say so."""
    for ids in tokenizer(prompts).input_ids:
        if len(ids) > DROP + length:
            note(f"the prompt is {len(ids) - DROP} Qwen2.5-VL tokens with its template, more than "
                 f"--max-sequence-length {length}; cut off: {tokenizer.decode(ids[DROP + length:])[:60]!r}")


def encode(model, texts: list[str], s: Settings, negative: bool) -> Cond:
    inputs = qwen_edit.prompt_inputs(model, s)
    if inputs is not None:  # an edit: the prompt read with its images (Qwen-Image-Edit)
        return qwen_edit.encode(model, texts, s, inputs)
    tokenizer, encoder = model.tokenizers[0], model.text_encoders[0]
    length = s.max_sequence_length or MAX_SEQUENCE_LENGTH
    parts = [llm_text.fragments(t) for t in texts]
    if any(w != 1.0 for part in parts for _, w in part):
        [states], mask = llm_text.weighted_hidden_states(tokenizer, encoder, parts, DROP + length, (-1,),
                                                         TEMPLATE.format(llm_text.MARK), dropped=DROP)
        states, mask = states[:, DROP:], mask[:, DROP:]
    else:
        states, mask = _states(tokenizer, encoder, ["".join(f for f, _ in part) for part in parts], length)
    states = states.masked_fill(~mask[..., None], 0)  # the pipeline's padding is zeros
    pad = length - states.shape[1]
    states, mask = torch.nn.functional.pad(states, (0, 0, 0, pad)), torch.nn.functional.pad(mask, (0, pad))
    return {"encoder_hidden_states": states.to(model.device, model.dtype), "mask": mask.to(model.device)}


def _states(tokenizer, encoder, texts: list[str], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the last hidden states after the template's head, their mask) for prompts without weights."""
    prompts = [TEMPLATE.format(t) for t in texts]
    note_cut(tokenizer, prompts, length)
    # cut before reading, where the pipeline cuts the states after: Qwen is causal, so the kept
    # tokens' states are the same; read at the longest prompt's length (a 7B model need not read
    # padding); encode pads them to `length` so every prompt's conditioning stacks with every other's
    tokens = tokenizer(prompts, padding="longest", max_length=DROP + length, truncation=True, return_tensors="pt")
    with torch.inference_mode():
        states = encoder(input_ids=tokens.input_ids.to(encoder.device),
                         attention_mask=tokens.attention_mask.to(encoder.device),
                         output_hidden_states=True).hidden_states[-1][:, DROP:]
    return states, tokens.attention_mask[:, DROP:].to(states.device).bool()


def _inputs(model, latents: torch.Tensor, t: torch.Tensor, cond: Cond) -> dict:
    """What the transformer and its ControlNets both read for these latents."""
    n, _, h, w = latents.shape
    mask = cond["mask"]
    used = int(mask.sum(1).max())  # the longest prompt's tokens: later columns are padding in every row
    states, mask = cond["encoder_hidden_states"][:, :used], mask[:, :used]
    tokens, shapes = flux.pack(latents.to(model.dtype)), [(1, h // flux.PATCH, w // flux.PATCH)]
    if "reference_tokens" in cond:  # an edit's input images after the noise, each with its shape
        tokens = torch.cat([tokens, cond["reference_tokens"].to(model.dtype)], dim=1)
        shapes += [tuple(shape) for shape in cond["reference_shapes"][0].tolist()]
    return dict(hidden_states=tokens, timestep=t.expand(n).to(model.dtype) / 1000,
                encoder_hidden_states=states, encoder_hidden_states_mask=None if mask.all() else mask,
                img_shapes=[shapes] * n)


def predict(model, latents: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
    h, w = latents.shape[-2:]
    out = model.denoiser(**_inputs(model, latents, t, cond), controlnet_block_samples=cond.get(CONTROL_KEY),
                         return_dict=False)[0]
    return flux.unpack(out[:, :(h // flux.PATCH) * (w // flux.PATCH)], h, w).to(latents.dtype)  # the noise's tokens


CONTROL_KEY = "controlnet_block_samples"  # one sample per net block, put in the conditioning by the loop


def control_input(model, net, images: torch.Tensor, generators: list) -> torch.Tensor:
    """The control image's VAE latents, sampled from the images' generators before the starting
    noise, as QwenImageControlNetPipeline draws them."""
    return vae.encode(model, images * 2 - 1, generators)


def control_residuals(model, net, x: torch.Tensor, t: torch.Tensor, cond: Cond, image: torch.Tensor,
                      scale: float, mode: int | None = None) -> dict:
    samples = net(**_inputs(model, x, t, cond), controlnet_cond=flux.pack(image.to(model.dtype)),
                  conditioning_scale=scale, return_dict=False)
    return {CONTROL_KEY: samples}


def renorm(positive: torch.Tensor, guided: torch.Tensor) -> torch.Tensor:
    """The guided output scaled, each 2x2 patch (the transformer's token) on its own, to the norm of
    the conditional one, as QwenImagePipeline does after its true CFG."""
    h, w = guided.shape[-2:]
    cond, comb = flux.pack(positive), flux.pack(guided)
    scale = torch.norm(cond, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True)
    return flux.unpack(comb * scale, h, w)


# bf16: Qwen ship Qwen-Image and Qwen2.5-VL in bf16
# default_sample_size 128: 1024 pixels; Edit and Edit Plus are variants (loading/qwen_image.py tells them)
QWEN_IMAGE = Family("qwen-image", encode, predict, cuda_dtype="bf16", flow=True, patch_size=flux.PATCH,
                    sample_size=128, sigmas=flux.sigmas, guided=renorm, control_input=control_input,
                    control_residuals=control_residuals, edit={"edit": qwen_edit.EDIT, "edit-plus": qwen_edit.EDIT_PLUS})
