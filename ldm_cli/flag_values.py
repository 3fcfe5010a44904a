"""Flag values made Python values with str, int, float and Path, not pydantic.

typer 0.29 coerces each value through a pydantic TypeAdapter it builds on first use; importing
pydantic for that cost every command ~0.05 s before it did anything (a third of `ldm schedulers`,
and part of every load's path to torch). Every ldm flag and argument is plain: a string, an
integer (some with a minimum), a float, a flag, a path, or a list of one of these.
Within `plain()` each such parameter gets a coercer of ldm's, with click's messages ("'abc' is not
a valid integer."); a parameter of any other kind, and a typer without per-parameter coercers,
keep typer's own.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, get_args, get_origin

import typer.core

try:  # typer >= 0.29: a coercer per parameter, typer.core has imported this already
    from typer._click.exceptions import BadParameter
    from typer._coercion import RuntimeParam
except ImportError:  # pragma: no cover - older typer: click's own types, no pydantic to avoid
    RuntimeParam = None
if RuntimeParam is not None and (getattr(RuntimeParam, "__abstractmethods__", None) != {"_coerce_value"} or [
        f.name for f in getattr(RuntimeParam, "__dataclass_fields__", {}).values()] != ["parameter_info", "annotation"]):
    RuntimeParam = None  # pragma: no cover - a typer whose coercers differ from 0.29's: its own throughout


def _flag(value: Any) -> bool:
    if isinstance(value, bool):  # a flag gives one; typer skips those, but not a flag's absent None
        return value
    raise ValueError(value)


KINDS: dict[type, tuple[Callable[[Any], Any], str]] = {
    str: (str, "string"), int: (int, "integer"), float: (float, "float"), Path: (Path, "path"),
    bool: (_flag, "boolean")}


@contextmanager
def plain() -> Iterator[None]:
    """While ldm's command line is parsed and run, typer builds `Plain` coercers for plain
    parameters (the help option's among them, which typer makes as it parses) and its own for
    the rest; other typer programs in the process are left as they are afterwards."""
    typers = getattr(typer.core, "build_runtime_param", None)
    if RuntimeParam is None or typers is None:
        yield
        return

    def build(descriptor: Any) -> Any:
        return Plain(descriptor.parameter_info, descriptor.annotation) if _is_plain(descriptor) else typers(descriptor)

    typer.core.build_runtime_param = build
    try:
        yield
    finally:
        typer.core.build_runtime_param = typers


def _is_plain(descriptor: Any) -> bool:
    """Whether `Plain` can coerce the parameter: typer's own coercion is kept for anything more."""
    annotation, info = descriptor.annotation, descriptor.parameter_info
    kind = get_args(annotation)[0] if get_origin(annotation) is list else annotation
    if kind not in KINDS or descriptor.file_annotation is not None or info.parser is not None or info.clamp:
        return False
    if kind is Path and (info.exists or info.resolve_path or info.allow_dash or info.path_type is not None
                         or not (info.file_okay and info.dir_okay) or info.writable):
        return False  # typer's checks of the path itself
    return kind in (int, float) or (info.min is None and info.max is None)


if RuntimeParam is not None:
    class Plain(RuntimeParam):
        """One parameter's values converted as click converts them, and checked against its range."""

        def _coerce_value(self, value: Any, param: Any, ctx: Any) -> Any:
            if get_origin(self.annotation) is list:
                return [self._one(item, get_args(self.annotation)[0], param, ctx) for item in value]
            return self._one(value, self.annotation, param, ctx)

        def _one(self, value: Any, kind: type, param: Any, ctx: Any) -> Any:
            convert, what = KINDS[kind]
            try:
                converted = convert(value)
            except (TypeError, ValueError):
                raise BadParameter(f"{value!r} is not a valid {what}.", ctx=ctx, param=param) from None
            low, high = self.parameter_info.min, self.parameter_info.max
            if (low is None or converted >= low) and (high is None or converted <= high):
                return converted
            bounds = f"{low}<=x<={high}" if low is not None and high is not None else \
                f"x>={low}" if low is not None else f"x<={high}"
            raise BadParameter(f"{converted} is not in the range {bounds}.", ctx=ctx, param=param)
