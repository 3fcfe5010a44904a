"""Prompts read by a chat LLM as a text encoder (Qwen3 for Z-Image and FLUX.2 klein, Mistral Small
for FLUX.2 dev): the prompt put in the model's chat template as one user turn (after a system
turn where the pipeline writes one), padded to a fixed length, and hidden layers read with the
padding masked in the encoder's attention. What each family then takes of the
states (one layer, several stacked; the padding kept or cut) is its own.

A1111's emphasis is applied as Forge Neo applies it to these encoders: the weighted fragments
(prompt_syntax.emphasis) tokenized one by one between the template's own tokens (weight 1), each
token's input embedding multiplied by its weight and the prompt's embeddings scaled back to their
former mean ("Original"), the encoder then reading those embeddings. BREAK is dropped (one
sequence). A prompt whose fragments all weigh 1 is the template around its text, tokenized
whole: the pipelines' tokens exactly.
"""
from __future__ import annotations

import torch

from ldm_cli.notes import note
from ldm_cli.prompt_syntax import BREAK, BREAK_WEIGHT, emphasis

MARK = "\ue000"  # a private-use character standing for the prompt in the rendered template


def chat(tokenizer, text: str, thinking: bool, system: str | None = None) -> str:
    """The prompt as one user turn of the chat template, the assistant's turn opened; `thinking`
    is the template's enable_thinking switch (Z-Image's pipeline turns it on, FLUX.2's off);
    `system` a system turn before it (FLUX.2 dev's)."""
    turns = [{"role": "system", "content": system}] if system is not None else []
    return tokenizer.apply_chat_template([*turns, {"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=thinking)


NAMES = {"qwen3": "Qwen3", "mistral": "Mistral", "qwen2_5_vl_text": "Qwen2.5-VL"}  # an encoder's model_type, as a note names its tokens


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
    parts = [fragments(t) for t in texts]
    if any(w != 1.0 for part in parts for _, w in part):
        return weighted_hidden_states(tokenizer, encoder, parts, length, layers, chat(tokenizer, MARK, thinking, system))
    prompts = [chat(tokenizer, "".join(f for f, _ in part), thinking, system) for part in parts]
    note_cut(tokenizer, prompts, length, NAMES.get(encoder.config.model_type, "text encoder"))
    tokens = tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt",
                       add_special_tokens=False)
    mask = tokens.attention_mask.to(encoder.device).bool()
    with torch.inference_mode():
        states = encoder(input_ids=tokens.input_ids.to(encoder.device), attention_mask=mask,
                         output_hidden_states=True, use_cache=False).hidden_states
    return [states[i] for i in layers], mask


def fragments(text: str) -> list[tuple[str, float]]:
    """The prompt's emphasis fragments, BREAK dropped (an LLM reads one sequence)."""
    return [(f, w) for f, w in emphasis(text) if (f, w) != (BREAK, BREAK_WEIGHT)] or [("", 1.0)]


def weighted_ids(tokenizer, part: list[tuple[str, float]], template: str, length: int, name: str,
                 dropped: int = 0) -> tuple[list, list, int]:
    """(ids, weights, how many are not padding), `length` long: the template's head, each
    fragment's tokens at its weight, the template's tail (weight 1), cut at `length` or padded after.
    `dropped`: leading tokens the family drops, not counted in --max-sequence-length (Qwen-Image's)."""
    head, tail = (tokenizer(t, add_special_tokens=False).input_ids for t in template.split(MARK))
    pieces = tokenizer([f for f, _ in part], add_special_tokens=False).input_ids
    ids = head + [t for piece in pieces for t in piece] + tail
    weights = [1.0] * len(head) + [w for piece, (_, w) in zip(pieces, part) for _ in piece] + [1.0] * len(tail)
    if len(ids) > length:
        note(f"the prompt is {len(ids) - dropped} {name} tokens with its chat template, more than "
             f"--max-sequence-length {length - dropped}; cut off: {tokenizer.decode(ids[length:])[:60]!r}")
    pad = max(0, length - len(ids))
    return ids[:length] + [tokenizer.pad_token_id] * pad, weights[:length] + [1.0] * pad, min(len(ids), length)


def weighted_hidden_states(tokenizer, encoder, parts: list, length: int, layers: tuple[int, ...], template: str,
                           dropped: int = 0) -> tuple[list[torch.Tensor], torch.Tensor]:
    """hidden_states for prompts with weights (`parts`: their fragments), `template` with MARK
    where the prompt goes."""
    name = NAMES.get(encoder.config.model_type, "text encoder")
    rows = [weighted_ids(tokenizer, part, template, length, name, dropped) for part in parts]
    ids = torch.tensor([r[0] for r in rows], device=encoder.device)
    weights = torch.tensor([r[1] for r in rows], device=encoder.device)
    counts = torch.tensor([r[2] for r in rows], device=encoder.device)
    mask = torch.arange(length, device=encoder.device)[None] < counts[:, None]
    with torch.inference_mode():
        embeds = encoder.get_input_embeddings()(ids)
        real = mask[..., None].to(embeds.dtype)
        scaled = embeds * weights[..., None].to(embeds.dtype)
        width = embeds.shape[-1]
        before = (embeds * real).sum((1, 2)) / (real.sum((1, 2)) * width)
        after = (scaled * real).sum((1, 2)) / (real.sum((1, 2)) * width)
        scaled = scaled * (before / after)[:, None, None]  # each prompt back to its mean, as Forge's "Original"
        states = encoder(inputs_embeds=scaled, attention_mask=mask, output_hidden_states=True,
                         use_cache=False).hidden_states
    return [states[i] for i in layers], mask
