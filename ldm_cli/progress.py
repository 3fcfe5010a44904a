"""A progress bar on stderr over denoising steps (or an upscaler's tiles), showing images done;
silent for short work."""
from __future__ import annotations

import sys
from typing import Callable

from tqdm import tqdm


class Progress:
    def __init__(self, total_steps: int, total_images: int, quiet: bool = False, unit_label: str = "images",
                 unit: str = "step", watch: Callable[[int, int], None] | None = None):
        self.images_total = total_images
        self.total_steps, self.watch = total_steps, watch  # watch: (steps done, in all) after each step
        self.steps_done = 0  # counted here: a disabled (quiet) bar counts nothing
        self.images_done = 0
        self.unit_label = unit_label
        # delay: nothing is drawn for work that ends within a second
        self.bar = tqdm(total=total_steps, unit=unit, file=sys.stderr, disable=quiet, delay=1.0,
                        dynamic_ncols=True, leave=False)
        self._describe()

    def _describe(self) -> None:
        self.bar.set_description(f"{self.images_done}/{self.images_total} {self.unit_label}", refresh=False)

    def step(self) -> None:
        self.bar.update(1)
        self.steps_done += 1
        if self.watch is not None:
            self.watch(self.steps_done, self.total_steps)

    def grow(self, more: int) -> None:
        """More steps than planned (an upscale started again with smaller tiles)."""
        self.bar.total += more
        self.bar.refresh()

    def image_done(self, count: int = 1) -> None:
        self.images_done += count
        self._describe()

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
