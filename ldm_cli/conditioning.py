"""A batch's prompts as the conditioning the sampling loop reads, built as A1111 builds it.

For each image: the positive prompt without its `<lora:...>` tags, split into AND parts with
their weights; each part, and the negative prompt, turned into its prompt-editing schedule
(prompt_syntax.py), whose prompts are encoded together by the model's family (one A1111 batch);
an image's parts brought to one token length. A prompt that several images share is encoded
once. The negative is encoded only where guidance needs it.
"""
from __future__ import annotations

from ldm_cli import guidance, prompt_syntax
from ldm_cli.guidance import Parts, Schedule
from ldm_cli.settings import Settings

_Cache = dict[tuple, Schedule]


def positive_text(prompt: str) -> str:
    """What of a positive prompt is encoded: all but its extra-network tags."""
    return prompt_syntax.extra_networks(prompt)[0]


def uses_negative(s: Settings) -> bool:
    """Whether the negative prompt is encoded and guides: always at cfg != 1, and at cfg 1 for a
    prompt of several AND parts or a weight other than 1."""
    parts = prompt_syntax.and_parts(positive_text(s.prompt))
    return guidance.needs_negative(s.cfg, [[(weight, None) for _, weight in parts]])


def encode(model, group: list[Settings]) -> tuple[list[Parts], list[Schedule] | None]:
    """(each image's weighted parts, each image's negative schedule or None when unguided)."""
    cache: _Cache = {}
    positive = [_parts(model, s, cache) for s in group]
    if not guidance.needs_negative(group[0].cfg, positive):
        return positive, None
    return positive, [_schedule(model, s.negative, s, True, cache) for s in group]


def _parts(model, s: Settings, cache: _Cache) -> Parts:
    parts = prompt_syntax.and_parts(positive_text(s.prompt))
    return guidance.padded_parts([(w, _schedule(model, text, s, False, cache)) for text, w in parts])


def _schedule(model, text: str, s: Settings, negative: bool, cache: _Cache) -> Schedule:
    key = (text, negative, s.clip_skip)
    if key not in cache:
        plan = prompt_syntax.schedule(text, s.steps)
        cond = model.family.encode(model, [prompt for _, prompt in plan], s, negative)
        cache[key] = Schedule([end for end, _ in plan], guidance.rows_of(cond))
    return cache[key]
