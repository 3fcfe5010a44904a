"""Prompts read by a chat LLM as a text encoder (Qwen3 for Z-Image and FLUX.2 klein, Mistral Small
for FLUX.2 dev): the prompt put in the model's chat template as one user turn (after a system
turn where the pipeline writes one), padded to a fixed length, and hidden layers read with the
padding masked in the encoder's attention. What each family then takes of the
states (one layer, several stacked; the padding kept or cut) is its own.
"""
from __future__ import annotations

import torch

from ldm_cli.notes import note


def chat(tokenizer, text: str, thinking: bool, system: str | None = None) -> str:
    """The prompt as one user turn of the chat template, the assistant's turn opened; `thinking`
    is the template's enable_thinking switch (Z-Image's pipeline turns it on, FLUX.2's off);
    `system` a system turn before it (FLUX.2 dev's)."""
    turns = [{"role": "system", "content": system}] if system is not None else []
    return tokenizer.apply_chat_template([*turns, {"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=thinking)


NAMES = {"qwen3": "Qwen3", "mistral": "Mistral"}  # an encoder's model_type, as a note names its tokens


def note_cut(tokenizer, prompts: list[str], length: int, name: str) -> None:
    """The pipelines cut a templated prompt past `length` tokens (its assistant turn with it): say so."""
    for ids in tokenizer(prompts, add_special_tokens=False).input_ids:
        if len(ids) > length:
            note(f"the prompt is {len(ids)} {name} tokens with its chat template, more than --max-sequence-length "
                 f"{length}; cut off: {tokenizer.decode(ids[length:])[:60]!r}")


def hidden_states(tokenizer, encoder, texts: list[str], length: int, layers: tuple[int, ...],
                  thinking: bool, system: str | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """([each of `layers`' hidden states], the padding mask), for `texts` in the chat template
    padded (or cut) to `length` tokens; all on the encoder's device. The template writes any BOS:
    the tokenizer adds none (Mistral's would add a second)."""
    prompts = [chat(tokenizer, t, thinking, system) for t in texts]
    note_cut(tokenizer, prompts, length, NAMES.get(encoder.config.model_type, "text encoder"))
    tokens = tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt",
                       add_special_tokens=False)
    mask = tokens.attention_mask.to(encoder.device).bool()
    with torch.inference_mode():
        states = encoder(input_ids=tokens.input_ids.to(encoder.device), attention_mask=mask,
                         output_hidden_states=True, use_cache=False).hidden_states
    return [states[i] for i in layers], mask
