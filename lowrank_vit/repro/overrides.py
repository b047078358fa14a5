"""Checking ``--set section.field=value`` assignments against the config's declared types before anything runs.

:meth:`lowrank_vit.repro.registry.RunConfig.override` reads a value as JSON and falls back to the bare text, which is
what makes ``--set compression.decomposition=plain`` work; but it also kept ``'model.kwargs={img_size: 32}'`` (not
JSON) as a string, to fail minutes later with a TypeError, or never. :func:`check_overrides` reads every value the
same way and compares it with the type annotated on the field, so such input fails at once with one line that
says what was expected.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Iterable
from typing import Any

from lowrank_vit.config import CompressionConfig, setting_type
from lowrank_vit.methods.prune import PruningConfig
from lowrank_vit.methods.vmeanba import VMeanbaConfig
from lowrank_vit.repro.registry import HardwareConfig, ModelConfig, QuantizationConfig, RunConfig, RunOptions
from lowrank_vit.stages.data_config import DataConfig
from lowrank_vit.stages.finetune_config import FinetuneConfig


def _sections() -> dict[str, type]:
    """The dataclass behind each section of :meth:`RunConfig.to_dict` (imported lazily: finetune pulls Lightning)."""

    return {"model": ModelConfig, "data": DataConfig, "compression": CompressionConfig, "finetune": FinetuneConfig,
            "quantization": QuantizationConfig, "hardware": HardwareConfig, "run": RunOptions,
            "vmeanba": VMeanbaConfig, "pruning": PruningConfig}


def _field_type(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls).get(name, Any)


def _options(annotation: Any) -> tuple[Any, ...]:
    """The alternatives of ``A | B`` / ``Optional[A]``, or the annotation alone."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return typing.get_args(annotation)
    return (annotation,)


_EXAMPLES: dict[Any, str] = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
                             dict: 'a JSON object, e.g. {"img_size": 32}', list: "a JSON list, e.g. [1, 2]",
                             type(None): "null"}


def _matches(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation) or annotation
    if annotation is Any:
        return True
    if origin is type(None):
        return value is None
    if origin is bool:
        return isinstance(value, bool)
    if origin is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin in (dict, list, tuple, str):
        return isinstance(value, list if origin is tuple else origin)
    return True  # a type this check does not know: the config's own validation has the last word


def _expected(options: tuple[Any, ...]) -> str:
    return " or ".join(_EXAMPLES.get(typing.get_origin(o) or o, str(o)) for o in options)


def parse_value(text: str, raw: str, annotation: Any) -> Any:
    """``raw`` read as JSON (a bare word as a string where the field takes strings), checked against
    ``annotation``.

    Raises:
        ValueError: not JSON where the field needs a number, boolean, object or list, or JSON of the wrong type.
    """
    options = _options(annotation)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as err:
        if str in options or annotation is Any:
            return raw  # a bare word for a string field: compression.decomposition=plain
        raise ValueError(f"bad override {text!r}: {raw!r} is not valid JSON ({err.msg} at character {err.pos}); "
                         f"expected {_expected(options)}") from None
    if any(_matches(value, option) for option in options):
        return value
    if str in options and not isinstance(value, (dict, list)):
        return raw  # JSON that reads as a number or boolean where a string is wanted: the text itself
    raise ValueError(f"bad override {text!r}: expected {_expected(options)}, got {type(value).__name__} "
                     f"{json.dumps(value)}")


def check_overrides(assignments: Iterable[str]) -> None:
    """Every ``section.field=value`` well formed, naming a known field, with a value of the field's type.

    Field names are checked against the dataclasses, not one row's config, so the same overrides can serve a
    whole table (a baseline has no ``compression`` section; :meth:`RunConfig.override` skips those).

    Raises:
        ValueError: one line naming the assignment and what was expected.
    """
    sections = _sections()
    top = {f.name for f in dataclasses.fields(RunConfig)} - set(sections)
    for text in assignments:
        key, sep, raw = text.partition("=")
        path = key.strip().split(".")
        if not sep or not all(path):
            raise ValueError(f"bad override {text!r}: expected section.field=value, e.g. finetune.epochs=1")
        if len(path) == 1 and path[0] in top:
            parse_value(text, raw, _field_type(RunConfig, path[0]))
            continue
        if path[0] not in sections:
            raise ValueError(f"bad override {text!r}: expected section.field=value with a section among "
                             f"{', '.join(sections)}")
        cls = sections[path[0]]
        if cls is CompressionConfig and len(path) == 2 and setting_type(path[1]) is not None:
            parse_value(text, raw, setting_type(path[1]))  # a method's setting: CompressionConfig moves it
            continue
        if path[1] not in {f.name for f in dataclasses.fields(cls)}:
            raise ValueError(f"bad override {text!r}: no field {path[1]!r} in {path[0]} (`lowrank-vit show NAME` "
                             f"lists the fields)")
        annotation = _field_type(cls, path[1])
        if len(path) > 2:  # into a dict field, e.g. model.kwargs.img_size=32: any JSON value (or a bare word)
            if dict not in {typing.get_origin(o) or o for o in _options(annotation)}:
                raise ValueError(f"bad override {text!r}: {path[0]}.{path[1]} is not a mapping; expected "
                                 f"{path[0]}.{path[1]}=VALUE")
            annotation = Any
        parse_value(text, raw, annotation)


__all__ = ["check_overrides", "parse_value"]
