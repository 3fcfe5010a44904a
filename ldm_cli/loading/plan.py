"""Where each of a component's weights lies in a checkpoint, every shape checked against the
header before a byte is read. Needs only the component's weight table (weight_table.py), not the
component itself, so `ldm info` checks a file without torch."""
from __future__ import annotations

from typing import NamedTuple

from ldm_cli.errors import LdmError
from ldm_cli.loading import keymap, weight_table
from ldm_cli.loading.keymap import Slot
from ldm_cli.loading.origin import Origin
from ldm_cli.loading.tensors import Checkpoint


class Planned(NamedTuple):
    key: str  # full key in the file
    origin: Origin
    shape: tuple[int, ...] = ()  # the module's, for weights not read (Origin.eye)


def plan(slot: Slot, weights: dict[str, tuple[int, ...]], config, checkpoint: Checkpoint) -> dict[str, Planned]:
    """Each of the component's weights (state-dict name -> shape; `config` as the built component
    holds it) -> where it lies in the checkpoint, shapes checked."""
    mapping = keymap.mapper(slot.kind, config)
    planned = {}
    for name, shape in weights.items():
        if name.endswith(".num_batches_tracked"):
            continue  # a BatchNorm's count of training batches (FLUX.2's VAE): it sets it itself as it loads
        origin = mapping(name)
        key = slot.prefix + origin.key
        if origin.eye:
            planned[name] = Planned(key, origin, tuple(shape))
            continue
        if key not in checkpoint.shapes:
            raise LdmError(f"{checkpoint.name} has no weight {key!r}, which a {slot.name} of this model needs; "
                           "the file is incomplete or not the model ldm took it for (--config DIR describes unusual ones)")
        found = stored_shape(checkpoint.shapes[key], origin, len(shape))
        if found != tuple(shape):
            raise LdmError(f"{checkpoint.name}: {key!r} has shape {list(checkpoint.shapes[key])} but this {slot.name} "
                           f"needs {list(shape)}; pass --config DIR with the model's diffusers configs")
        planned[name] = Planned(key, origin)
    return planned


def for_module(slot: Slot, module, checkpoint: Checkpoint) -> dict[str, Planned]:
    """plan() for a component already built (its weights may be on the meta device)."""
    table = weight_table.of_module(module)
    return plan(slot, table.weights, table.config, checkpoint)


def stored_shape(shape: tuple[int, ...], origin: Origin, ndim: int) -> tuple[int, ...]:
    """The shape a stored tensor has once turned into the module's form."""
    shape = tuple(shape)
    if origin.part is not None and origin.split:
        return (origin.split[origin.part], *shape[1:]) if shape and shape[0] == sum(origin.split) else shape
    if origin.part is not None:
        return (shape[0] // 3, *shape[1:]) if shape and shape[0] % 3 == 0 else shape
    if origin.transpose:
        return shape[::-1]
    if origin.conv and len(shape) > ndim and all(s == 1 for s in shape[ndim:]):
        return shape[:ndim]
    return shape
