"""Work done on background threads while a checkpoint loads: reading its weights (while the
main thread imports diffusers and transformers and builds the empty modules), and hashing it.

A CLI reloads its model on every run. Importing the libraries is Python work holding the GIL;
reading is page faults and dtype conversion inside torch, which releases it; on two cores the
two together take about as long as the longer of them. The copies run on one intra-op thread
while reading: they are bound by memory, and more threads only spin (measured on 2 cores:
3.9 s of CPU instead of 5.9 for a 2 GB SD1.5 file, and sooner done).
"""
from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable

import torch

from ldm_cli.loading import quantized
from ldm_cli.loading.tensors import Checkpoint


def in_background(function: Callable, *args) -> Callable[[], Any]:
    """Start function(*args) on a daemon thread (a failed load exits without waiting for it);
    the returned callable waits for the result, or raises what the function raised."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = function(*args)
        except BaseException as e:  # noqa: BLE001 - re-raised by wait()
            outcome["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def wait():
        thread.join()
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]
    return wait


class Prefetch:
    """The weights under `prefixes`, each copied once into `dtype` on `device` (dequantized,
    or still quantized: quantized.read).

    A background thread starts reading at once; the thread that asks for the result joins in
    until every key is taken (it has nothing else to do by then), so once the imports are done
    both cores copy.

    Use as a context manager: leaving it early (an error elsewhere) stops the reading rather
    than finishing a few GB for nothing."""

    def __init__(self, checkpoint: Checkpoint, prefixes: list[str], dtype: torch.dtype, device: torch.device):
        keys = quantized.weight_keys(checkpoint, prefixes)
        # in the order of `prefixes` (the file's within each): a part wanted first is read first
        self._keys = iter(sorted(keys, key=lambda k: next(i for i, p in enumerate(prefixes) if k.startswith(p))))
        self._lock = threading.Lock()
        self._tensors: dict[str, torch.Tensor] = {}
        self._source = (checkpoint, dtype, device)
        self._stop = threading.Event()
        self._threads = torch.get_num_threads()
        torch.set_num_threads(1)
        self._wait = in_background(self._drain)

    def _drain(self) -> None:
        while not self._stop.is_set() and self._read_one():
            pass

    def _read_one(self) -> bool:
        """Read the next key not yet taken; False when every key is taken."""
        checkpoint, dtype, device = self._source
        with self._lock:
            key = next(self._keys, None)
        if key is None:
            return False
        self._tensors[key] = quantized.read(checkpoint, key, dtype, device)
        checkpoint.release(key)
        return True

    def until(self, keys: set[str]) -> dict[str, torch.Tensor]:
        """The weights read so far, once `keys` are among them; this thread reads beside the
        background one meanwhile (the rest of the file is still being read when it returns)."""
        while not keys <= self._tensors.keys():
            if not self._read_one():  # every key is taken: the other thread finishes its last one
                self._wait()
                break
        return dict(self._tensors)  # a copy: the other thread goes on adding to its own

    def result(self) -> dict[str, torch.Tensor]:
        try:
            self._drain()
            self._wait()
            return self._tensors
        finally:
            torch.set_num_threads(self._threads)

    def __enter__(self) -> Prefetch:
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        with contextlib.suppress(Exception):  # an error is raised by result(), or is already on its way
            self._wait()
        torch.set_num_threads(self._threads)
