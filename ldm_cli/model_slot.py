"""A loaded Model kept between runs (`ldm serve`'s workers): one per device, keyed by what
loaded it. Asking for another model frees the held one first, so two never share the memory."""
from __future__ import annotations

import gc
import threading
from dataclasses import replace
from typing import Any

from ldm_cli.loading import LoadOptions
from ldm_cli.networks.lookup import NetworkOptions

# One load at a time in a process: building modules empty (accelerate's init_empty_weights) patches
# torch.nn.Module for every thread while it runs, so two workers loading at once break each other.
_LOADING = threading.Lock()


class ModelSlot:
    def __init__(self, device: str = "auto"):
        self.device = device  # overrides the load options' own: a slot serves one device
        self.key: tuple | None = None
        self.model: Any = None

    def get(self, source: str | None, without_t5: bool, load: LoadOptions, networks: NetworkOptions):
        """The model `source` loaded with `load` (on this slot's device), its LoRA and embedding
        session attached; the one held already when it was loaded alike."""
        options = replace(load, device=self.device, without_t5=without_t5)
        key = (source, repr(options), repr(networks))
        if key != self.key:
            self.clear()
            from ldm_cli import loading
            from ldm_cli.networks import session

            with _LOADING:
                model = loading.load(source, options)
            model.kept = True  # its text encoders stay for the next run (ahead.py)
            session.attach(model, networks, source)
            self.model, self.key = model, key
        return self.model

    @staticmethod
    def loading() -> threading.Lock:
        """Held around any other load into a held model (its ControlNets), for the same reason."""
        return _LOADING

    def clear(self) -> None:
        """Let go of the held model, its memory back before anything else loads."""
        if self.model is None:
            return
        self.model, self.key = None, None
        gc.collect()  # offload hooks make cycles only the collector frees
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
