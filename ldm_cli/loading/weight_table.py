"""A component's weights for a config: each state-dict name's shape, and which are parameters
(not buffers, not a tied weight's second name). Building the component to learn them takes
torch and diffusers (seconds of imports); the table depends on nothing but the config and the
libraries' versions, so it is kept in ldm's cache whenever a component is built, and `ldm info`
reads a known architecture's file without importing torch."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

from ldm_cli import cache

CONVERT = str(Path(__file__).with_name("convert.py"))  # how configs become modules


@dataclass(frozen=True)
class Table:
    weights: dict[str, tuple[int, ...]]  # state-dict name -> shape
    counted: frozenset[str]  # the names that are parameters
    config: dict  # the component's full config (its class's defaults filled in), as keymap reads it

    @property
    def parameters(self) -> int:
        return sum(math.prod(self.weights[name]) for name in self.counted)


def of_module(module) -> Table:
    """The built component's table (its weights may be on the meta device)."""
    weights = {name: tuple(t.shape) for name, t in module.state_dict().items()}
    counted = frozenset(name for name, _ in module.named_parameters())  # a tied weight once
    config = module.config
    config = dict(config) if isinstance(config, dict) else config.to_dict()
    return Table(weights, counted, config)


def table(name: str, config: dict, build: Callable[[], Any]) -> Table:
    """The table of the component `name` built from `config`: kept, else that of build()'s."""
    return _table(cache.kept(_folder(), _stamp(name, config), lambda: _marshalled(of_module(build()))))


def keep(name: str, config: dict, module) -> None:
    """Keep the table of a component just built from `config`."""
    cache.kept(_folder(), _stamp(name, config), lambda: _marshalled(of_module(module)))


def _folder() -> Path:
    return cache.root() / "weights"


def _stamp(name: str, config: dict) -> list:
    versions = [metadata.version(p) for p in ("diffusers", "transformers")]
    return [name, json.dumps(config, sort_keys=True, default=str), *versions, *cache.stamp(CONVERT)]


def _marshalled(t: Table) -> tuple:
    return t.weights, sorted(t.counted), json.dumps(t.config, default=str)


def _table(kept: tuple) -> Table:
    weights, counted, config = kept
    return Table({k: tuple(v) for k, v in weights.items()}, frozenset(counted), json.loads(config))
