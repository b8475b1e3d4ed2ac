"""Preset overrides from the command line (`--set lora_rank=8 embedder.lr=1e-4`), checked against
the fields' declared types, so that a typo or a wrong type is a one-line error naming the field
(and listing the valid ones) rather than a TypeError deep in training.

Values arrive parsed as JSON where they parse, else as text. Rules: an integer field takes an
integer (2.0 and 1e3 are whole numbers; 2.5 is refused, never rounded); a number field takes a
number, not true/false; a tuple of names takes a list or one text, split at commas
(`lora_targets=blocks.0.ffn.0` is one target, `q,k` two); `null` sets an optional field to None.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from ae_adapt.errors import PresetError


def _fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _kind(tp: Any) -> str:
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "text"
    return f"a value of type {getattr(tp, '__name__', tp)}"


def coerce(value: Any, tp: Any, where: str) -> Any:
    """`value` as the type `tp` (int, float, bool, str, tuples of them, `X | None`), else PresetError."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return coerce(value, inner, where)
    if origin is tuple:
        if isinstance(value, str) and args[-1] is Ellipsis:
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise PresetError(f"{where}: expected a list, got {value!r}")
        if args[-1] is Ellipsis:
            return tuple(coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise PresetError(f"{where}: expected a list of {len(args)} values, got {value!r}")
        return tuple(coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, float):
            raise PresetError(f"{where}: expected an integer, got {value!r} (not rounded: give a whole number)")
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        return value
    raise PresetError(f"{where}: expected {_kind(tp)}, got {value!r}")


def _replace_checked(current: Any, given: dict[str, Any], where: str) -> Any:
    fields = _fields(type(current))
    kwargs = {}
    for name, value in given.items():
        path = f"{where}.{name}"
        if name not in fields:
            raise PresetError(f"unknown field {path}; the fields of {where} are: {', '.join(fields)}")
        if isinstance(value, dict):
            raise PresetError(f"{path} is a single value, not a section")
        kwargs[name] = coerce(value, fields[name], path)
    try:
        return dataclasses.replace(current, **kwargs)
    except (TypeError, ValueError) as err:
        raise PresetError(f"{where}: {err}") from err


def preset_overrides(preset: Any, overrides: dict[str, Any]) -> dict[str, Any]:
    """Nested overrides ({"lora_rank": 8, "embedder": {"lr": 1e-4}}) -> checked keyword arguments
    of `get_preset`/`AdaptPreset.replace` (sections replaced field-wise). `preset` is an
    AdaptPreset or a preset name. Raises PresetError naming the field; the result is validated by
    building the preset once."""
    from ae_adapt.stages import get_preset

    base = get_preset(preset) if isinstance(preset, str) else preset
    fields = _fields(type(base))
    kwargs: dict[str, Any] = {}
    for key, value in overrides.items():
        if key not in fields:
            raise PresetError(f"unknown ae-adapt preset field {key!r}; valid fields: {', '.join(fields)}")
        current = getattr(base, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise PresetError(
                    f"{key} is a section: set its fields as {key}.FIELD=VALUE "
                    f"({', '.join(_fields(type(current)))})"
                )
            kwargs[key] = _replace_checked(current, value, key)
        elif isinstance(value, dict):
            raise PresetError(f"{key} is a single value, not a section (got {key}.{next(iter(value), '')}=...)")
        else:
            kwargs[key] = coerce(value, fields[key], key)
    try:
        base.replace(**kwargs)
    except (TypeError, ValueError) as err:
        raise PresetError(str(err)) from err
    return kwargs


__all__ = ["coerce", "preset_overrides"]
