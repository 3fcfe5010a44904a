"""Stable Diffusion 1.x and 2.x: one CLIP text encoder, its last hidden state as context, read
as A1111 reads prompts (clip_text.py).

SD2's OpenCLIP encoder is stored with 23 layers (the 24th is unused), so its last hidden state
is the penultimate layer SD2 was trained on. --clip-skip N applies to SD1 only (the states N-1
layers before the last, through the final layer norm); A1111 ignores it for SD2 as for SDXL.
"""
from __future__ import annotations

from ldm_cli.families import clip_text, unet
from ldm_cli.families.family import Cond, Family
from ldm_cli.notes import note_once
from ldm_cli.settings import Settings


def encode_sd1(model, texts: list[str], s: Settings, negative: bool) -> Cond:
    return _encode(model, texts, clip_text.Layer(skip=s.clip_skip or 1))


def encode_sd2(model, texts: list[str], s: Settings, negative: bool) -> Cond:
    ignored_clip_skip(s, "SD2")
    return _encode(model, texts, clip_text.Layer())


def _encode(model, texts: list[str], layer: clip_text.Layer) -> Cond:
    states, _ = clip_text.encode(model.text_encoders[0], model.tokenizers[0], texts, layer, model.embeddings)
    return {"encoder_hidden_states": states.to(model.dtype)}


def ignored_clip_skip(s: Settings, family: str) -> None:
    if (s.clip_skip or 1) > 1:
        note_once(f"--clip-skip applies to SD1 models only; ignored for this {family} model, as A1111 ignores it")


SD1 = Family("sd1", encode_sd1, unet.predict, control_input=unet.control_input,
             control_residuals=unet.control_residuals)
SD2 = Family("sd2", encode_sd2, unet.predict, control_input=unet.control_input,
             control_residuals=unet.control_residuals)
