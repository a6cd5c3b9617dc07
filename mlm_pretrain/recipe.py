"""Recipes: YAML files checked against dataclasses, with `key=value` overrides from the command line.

An unknown key, a value of the wrong type or out of its range (`mlm_pretrain.schema` declares them), a
group that does not apply to the recipe's objective or a broken rule between keys is an `InputError`
naming the file (or, for an override, the command line), the key and what is valid. Overrides take
dotted paths (`impl.threads=2`) or, where a leaf name is unique in the schema, the bare name
(`max_steps=12`). Values are parsed as YAML (`corpus=[a.txt, b.txt]`). A number is whatever Python's
`float()` or `int()` reads, in a file and on the command line alike: YAML 1.1 leaves `1e-3` and `1.0e6`
as strings, so a float or int field converts a string that parses; an int field takes an integral value
in any notation (`1e6`) but never 2.5.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from mlm_pretrain.errors import InputError

T = TypeVar("T")


def load_recipe(schema: type[T], path: str | Path | None = None, overrides: list[str] | tuple = ()) -> T:
    """Read `path` (if any), apply `overrides`, check the result against `schema`."""
    data: dict = {}
    typed: dict[str, str] = {}  # dotted key -> the override that set it, so errors name the command line
    where = "recipe"
    if path is not None:
        where = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise InputError(f"recipe not found: {path}") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise InputError(f"{path}: not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise InputError(f"{path}: a recipe is a mapping of keys to values, got {type(data).__name__}")
    for override in overrides:
        key = ".".join(apply_override(schema, data, override))
        # a group set whole (`optim={lr: 1}`) replaces what earlier overrides set inside it
        typed = {k: v for k, v in typed.items() if not k.startswith(f"{key}.")}
        typed[key] = override
    return build(schema, data, where, overrides=typed)


def apply_override(schema: type, data: dict, override: str) -> list[str]:
    """Set `override` (`key=value`) in `data`; returns the dotted path it set."""
    key, sep, raw = override.partition("=")
    if not sep or not key:
        raise InputError(f"override {override!r}: expected key=value")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    path = resolve_key(schema, key.strip())
    hint = _hint(schema, path)
    # YAML 1.1 reads no/yes/on/off as booleans; for a text key (mixed_precision=no) it's the word
    if isinstance(value, bool) and any(arg is str or isinstance(arg, str) for arg in _alternatives(hint)):
        value = raw
    node = data
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise InputError(f"override {override!r}: {part} is not a group")
    node[path[-1]] = value
    return path


def resolve_key(schema: type, key: str) -> list[str]:
    """The dotted path of `key` in `schema`: itself if it is a path, else the one leaf of that name."""
    leaves = list(_leaf_paths(schema))
    if key in (".".join(p) for p in leaves) or key in (".".join(p) for p in _group_paths(schema)):
        return key.split(".")
    matches = [p for p in leaves if p[-1] == key]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise InputError(f"override key {key!r} is ambiguous: {', '.join('.'.join(p) for p in matches)}")
    raise InputError(f"unknown recipe key {key!r}; valid keys: {', '.join('.'.join(p) for p in leaves)}")


def build(
    schema: type[T], data: dict, where: str, prefix: str = "", overrides: dict[str, str] | None = None
) -> T:
    """`schema` from `data`; `overrides` maps the dotted keys set on the command line to their override."""
    overrides = overrides or {}
    fields = {f.name: f for f in dataclasses.fields(schema)}
    hints = typing.get_type_hints(schema)
    unknown = sorted(prefix + name for name in set(data) - set(fields))
    if unknown:
        raise InputError(
            f"{_origin(unknown[0], where, overrides)}: unknown key '{unknown[0]}'; valid keys"
            f"{' in ' + prefix.rstrip('.') if prefix else ''}: {', '.join(fields)}"
        )
    values = {}
    for name, value in data.items():
        hint = hints[name]
        origin = _origin(prefix + name, where, overrides)
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise InputError(
                    f"{origin}: {prefix}{name} is a group of keys ({', '.join(_names(hint))}), got {value!r}"
                )
            values[name] = build(hint, value, where, f"{prefix}{name}.", overrides)
        elif prefix + name in overrides and typing.get_origin(hint) is not list:
            # the override shows the key as typed; a list's items need the key for their index
            values[name] = check_type(value, hint, origin)
        else:
            values[name] = check_type(value, hint, f"{origin}: {prefix}{name}")
        valid = fields[name].metadata.get("range")
        for number in values[name] if isinstance(values[name], list) else [values[name]]:
            if valid is not None and number is not None and number not in valid:
                raise InputError(f"{origin}: {prefix}{name} must be {valid}, got {values[name]!r}")
    _check_groups_apply(fields, data, values, where, prefix, overrides)
    result = schema(**values)
    for key, problem in getattr(result, "problems", list)():
        raise InputError(f"{_origin(prefix + key, where, overrides)}: {prefix}{key} {problem}")
    return result


def _check_groups_apply(
    fields: dict[str, dataclasses.Field], data: dict, values: dict, where: str, prefix: str, overrides: dict
) -> None:
    """Refuse a group the recipe sets (its defaults are fine) that does not apply to its `objective`."""
    if "objective" not in fields:
        return
    objective = values.get("objective", fields["objective"].default)
    for name in data:
        applies = fields[name].metadata.get("objectives")
        if applies and objective not in applies:
            origin = _origin(prefix + name, where, overrides, within=True)
            raise InputError(
                f"{origin}: {prefix}{name} applies to objective {' | '.join(applies)} only, and this "
                f"recipe's objective is {objective}; remove it"
            )


def _origin(key: str, where: str, overrides: dict[str, str], within: bool = False) -> str:
    """Where `key` was set: the override that set it or a group above it (`within`: or a key inside it),
    else the recipe file."""
    if within:
        inside = [override for typed, override in overrides.items() if typed.startswith(f"{key}.")]
        if inside:
            return f"command line: {inside[0]}"
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        override = overrides.get(".".join(parts[:n]))
        if override is not None:
            return f"command line: {override}"
    return where


def check_type(value: Any, hint: Any, where: str) -> Any:
    """`value` if it fits `hint`, else an InputError. Ints are accepted for floats, integral floats for
    ints, and a string that `float()`/`int()` reads for either (YAML 1.1 leaves `1e-3` a string)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            try:
                return check_type(value, arg, where)
            except InputError:
                continue
        raise InputError(f"{where}: expected {_describe(hint)}, got {value!r}")
    if origin is Literal:
        if value in args:
            return value
        quote = (
            " (YAML reads a bare no/yes/on/off as a boolean: quote the word)"
            if isinstance(value, bool)
            else ""
        )
        raise InputError(f"{where}: got {value!r}; valid: {', '.join(map(str, args))}{quote}")
    if origin is list:
        if not isinstance(value, list):
            value = [value]  # a single value where a list is expected: `corpus=file.txt`
        return [check_type(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)] if args else value
    if origin is dict:
        if isinstance(value, dict):
            return value
        raise InputError(f"{where}: expected a mapping, got {value!r}")
    if hint is type(None):
        if value is None:
            return None
    elif hint is float:
        number = _parse_number(value) if isinstance(value, str) else value
        if isinstance(number, (int, float)) and not isinstance(number, bool):
            return float(number)
    elif hint is int:
        number = _parse_number(value) if isinstance(value, str) else value
        if isinstance(number, int) and not isinstance(number, bool):
            return number
        if isinstance(number, float) and number.is_integer():  # `max_tokens=1e9`; YAML reads 1.0e+9 as float
            return int(number)
    elif isinstance(value, hint):
        return value
    raise InputError(f"{where}: expected {_describe(hint)}, got {value!r}")


def _parse_number(text: str) -> int | float | str:
    """`text` as `int()` or else `float()` reads it, or unchanged if neither does."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _alternatives(hint: Any) -> list:
    """The types and words `hint` allows, Unions and Literals flattened: `str | None` -> [str, None]."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType, Literal):
        return [alt for arg in typing.get_args(hint) for alt in _alternatives(arg)]
    return [hint]


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def _names(schema: type) -> list[str]:
    return [f.name for f in dataclasses.fields(schema)]


def _leaf_paths(schema: type, prefix: tuple = ()) -> typing.Iterator[list[str]]:
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _leaf_paths(hints[f.name], (*prefix, f.name))
        else:
            yield [*prefix, f.name]


def _hint(schema: type, path: list[str]):
    """The type of the key at `path` in `schema` (a group's dataclass for a group)."""
    for part in path:
        schema = typing.get_type_hints(schema)[part]
    return schema


def _group_paths(schema: type, prefix: tuple = ()) -> typing.Iterator[list[str]]:
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        if dataclasses.is_dataclass(hints[f.name]):
            yield [*prefix, f.name]
            yield from _group_paths(hints[f.name], (*prefix, f.name))
