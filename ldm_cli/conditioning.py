"""A batch's prompts as the conditioning the sampling loop reads, built as A1111 builds it.

For each image: the positive prompt without its `<lora:...>` tags, split into AND parts with
their weights; each part, and the negative prompt, turned into its prompt-editing schedule
(prompt_syntax.py), whose prompts are encoded together by the model's family (one A1111 batch);
an image's parts brought to one token length. A prompt that several images share is encoded
once (per `Cache`: a batch's, or a whole run's when encoded ahead, ahead.py). The negative is
encoded only where guidance needs it.
"""
from __future__ import annotations

from ldm_cli import guidance, prompt_syntax, schedulers
from ldm_cli.guidance import Parts, Schedule
from ldm_cli.networks import session
from ldm_cli.settings import Settings

# every Settings field a family's encode (or the prompt schedule) reads: two prompts with the same
# text and these are the same conditioning (tests/test_ahead.py watches the families)
ENCODING_FIELDS = ("steps", "clip_skip", "width", "height", "max_sequence_length", "no_t5", "guidance",
                   "edit_images")  # a text encoder may read an edit's images (Qwen-Image-Edit)

Cache = dict[tuple, Schedule]


def positive_text(prompt: str) -> str:
    """What of a positive prompt is encoded: all but its extra-network tags."""
    return prompt_syntax.extra_networks(prompt)[0]


def uses_negative(s: Settings) -> bool:
    """Whether the negative prompt is encoded and guides: always at cfg != 1 or with CFG++ (which
    steps along the negative's prediction), and at cfg 1 for a prompt of several AND parts or a
    weight other than 1."""
    parts = prompt_syntax.and_parts(positive_text(s.prompt))
    return guidance.needs_negative(s.cfg, [[(weight, None) for _, weight in parts]]) or schedulers.cfg_pp(s.scheduler)


def encode(model, group: list[Settings], cache: Cache | None = None) -> tuple[list[Parts], list[Schedule] | None]:
    """(each image's weighted parts, each image's negative schedule or None when unguided);
    schedules found in `cache` are not encoded again, those encoded are added to it."""
    cache = {} if cache is None else cache
    positive = [_parts(model, s, cache) for s in group]
    if not guidance.needs_negative(group[0].cfg, positive) and not schedulers.cfg_pp(group[0].scheduler):
        return positive, None
    return positive, [_schedule(model, s.negative, s, True, cache) for s in group]


def keys(model, group: list[Settings]) -> set[tuple]:
    """The cache keys `encode` reads for `group`: what must be encoded to render it."""
    out = {_key(model, text, s, False) for s in group
           for text, _ in prompt_syntax.and_parts(positive_text(s.prompt))}
    if any(uses_negative(s) for s in group):
        out |= {_key(model, s.negative, s, True) for s in group}
    return out


def text_lora_key(model, prompt: str) -> tuple:
    """What of a prompt's LoRA set changes its encoding (all of it when the model has no session to ask)."""
    return model.networks.text_key(prompt) if model.networks is not None else session.lora_key(prompt)


def _key(model, text: str, s: Settings, negative: bool) -> tuple:
    return (text, negative, schedulers.prompt_steps(s.scheduler, s.steps), *(getattr(s, f) for f in ENCODING_FIELDS),
            text_lora_key(model, s.prompt))


def _parts(model, s: Settings, cache: Cache) -> Parts:
    parts = prompt_syntax.and_parts(positive_text(s.prompt))
    return guidance.padded_parts([(w, _schedule(model, text, s, False, cache)) for text, w in parts])


def _schedule(model, text: str, s: Settings, negative: bool, cache: Cache) -> Schedule:
    key = _key(model, text, s, negative)
    if key not in cache and key in model.prepared:
        cache[key] = model.prepared.pop(key)
    if key not in cache:
        plan = prompt_syntax.schedule(text, schedulers.prompt_steps(s.scheduler, s.steps))
        cond = model.family.encode(model, [prompt for _, prompt in plan], s, negative)
        cache[key] = Schedule([end for end, _ in plan], guidance.rows_of(cond))
    return cache[key]
