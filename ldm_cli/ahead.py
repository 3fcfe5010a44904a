"""A run's prompts encoded before its images are denoised, so the text encoders can go.

FLUX's T5-XXL is 4.9B parameters (9.5 GB in bf16), SD3's the same: kept beside the denoiser it
decides whether a model fits. A run (`ldm generate -n`, `ldm batch`) knows all its batches
before the first one is denoised, so it encodes every prompt of them first, then frees the
text encoders (memory.free_text_encoders) and denoises from the encoded conditioning.

Three things bound how far ahead it reads:
- the LoRA set: a LoRA merged into the text encoders changes what they compute, so prompts are
  encoded ahead only while the LoRAs' text-encoder parts equal those merged now (batches come
  grouped by set; sets of denoiser-only LoRAs, most FLUX LoRAs, do not stop it);
- memory: the encoded conditioning stays on the model's device (FLUX: 4 MiB per prompt at 512
  tokens), so no more than BUDGET bytes of it are encoded at once;
- the count: a stretch holds at most FIRST_STRETCH images, doubling with each stretch up to
  MOST_STRETCH, so the first image of a 100,000-line file comes within seconds (and a kill
  loses little), while later stretches are long enough that moving the encoders on and off
  the GPU stays rare.
When either stops it short, the encoders stay (moved off the GPU where offloaded) and the next
batch not yet encoded encodes the next stretch; they are freed once no batch is left to encode.
"""
from __future__ import annotations

from ldm_cli import conditioning, memory
from ldm_cli.guidance import Parts, Schedule
from ldm_cli.settings import Settings

BUDGET = 2**30  # bytes of encoded conditioning held at once
FIRST_STRETCH = 16  # images encoded ahead by the first stretch
MOST_STRETCH = 1024  # images encoded ahead by any stretch


class Ahead:
    """Encodes the planned batches in stretches: `groups[start:end]` are encoded now; batches
    render in the planned order (some may be skipped: another run took them)."""

    def __init__(self, model, groups: list[list[Settings]]):
        self.model, self.groups = model, groups
        self.end = 0
        self.stretch = FIRST_STRETCH  # the images the next stretch may encode
        self.cache = _Held()

    def encode(self, group: list[Settings]) -> tuple[list[Parts], list[Schedule] | None]:
        """`group`'s conditioning (`group`: a planned batch, or part of one)."""
        wanted = conditioning.keys(self.model, group)
        if not wanted <= self.cache.keys():
            start = next((i for i in range(self.end, len(self.groups))
                          if wanted <= conditioning.keys(self.model, self.groups[i])), None)
            if start is None or not self.model.text_encoders:
                raise RuntimeError("a batch came that was not planned, or after the text encoders were freed")
            self._encode_stretch(start)
        return conditioning.encode(self.model, group, self.cache)

    def _encode_stretch(self, start: int) -> None:
        """The planned batches from `start` on whose LoRA sets change the text encoders as its
        does (the one merged now), within the budget and the count; what earlier stretches encoded
        is done with."""
        self.cache.clear()
        lora, end, count = self._text_lora(start), start, 0
        while end < len(self.groups) and self._text_lora(end) == lora and (
                end == start or (self.cache.bytes < BUDGET and count < self.stretch)):
            conditioning.encode(self.model, self.groups[end], self.cache)
            count += len(self.groups[end])
            end += 1
        self.end, self.stretch = end, min(2 * self.stretch, MOST_STRETCH)
        if end < len(self.groups) or self.model.kept:
            memory.release_text_encoders(self.model)  # off the GPU where offloaded: the denoiser takes its place
        else:
            memory.free_text_encoders(self.model)

    def _text_lora(self, index: int) -> tuple:
        return conditioning.text_lora_key(self.model, self.groups[index][0].prompt)


class _Held(dict):
    """A stretch's encoded schedules by key, counting the bytes their tensors hold as they come
    (a schedule's rows share their encode call's storage: counted once)."""

    def __init__(self):
        super().__init__()
        self.bytes, self._storages = 0, set()

    def __setitem__(self, key: tuple, schedule: Schedule) -> None:
        super().__setitem__(key, schedule)
        for cond in schedule.conds:
            for tensor in cond.values():
                storage = tensor.untyped_storage()
                if storage.data_ptr() not in self._storages:
                    self._storages.add(storage.data_ptr())
                    self.bytes += storage.nbytes()

    def clear(self) -> None:
        super().clear()
        self.bytes, self._storages = 0, set()
