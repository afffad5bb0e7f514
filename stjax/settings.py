"""What every stjax config shares: settings that document themselves, a strict YAML reader, checks of
allowed values and a resume guard.

A setting is a dataclass field made by `setting(default, help, choices=..., least=...)`. Its help line
and allowed values live in the field's metadata, the one place that `--help` (`help_lines`) and the
check of allowed values and ranges (`check_fields`) read them from. A config is a tree of such
dataclasses ("sections"); `from_dict` fills it from YAML, refusing unknown keys, and says what to type
instead of a renamed key (`hints`). `changed` is the resume guard's comparison.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
from collections.abc import Iterator
from dataclasses import fields
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A setting or a config file that cannot run; raised before any large work starts."""


def setting(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    choices: tuple = (),
    least: float | None = None,
    aliases: dict | None = None,
    factory: Any = dataclasses.MISSING,
) -> Any:
    """A documented field: `help` is its one-line meaning, `choices` its allowed values (each item's, for a
    list), `least` its smallest allowed value, `aliases` YAML values read as others (true -> "full")."""
    meta = {"help": help, "choices": tuple(choices), "least": least, "aliases": aliases or {}}
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _listed(values: tuple, sep: str) -> str:
    return sep.join(repr(v) if v == "" else str(v) for v in values)


def _default(f: dataclasses.Field) -> Any:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def help_lines(cls: type, prefix: str = "") -> Iterator[str]:
    """'key = default: meaning (one of a | b)' for every setting of a config tree, sections flattened."""
    for f in fields(cls):
        default = _default(f)
        if dataclasses.is_dataclass(default):
            yield from help_lines(type(default), f"{prefix}{f.name}.")
            continue
        meta = f.metadata
        allowed = f" (one of {_listed(meta['choices'], ' | ')})" if meta.get("choices") else ""
        least = f" (>= {meta['least']})" if meta.get("least") is not None else ""
        shown = list(default) if isinstance(default, tuple) else default
        yield f"  {prefix}{f.name} = {shown!r}: {meta.get('help', '')}{allowed}{least}"


def choices(cls: type, prefix: str = "") -> dict[str, tuple]:
    """Every setting's allowed values, by dotted key."""
    out = {}
    for f in fields(cls):
        default = _default(f)
        if dataclasses.is_dataclass(default):
            out |= choices(type(default), f"{prefix}{f.name}.")
        elif f.metadata.get("choices"):
            out[prefix + f.name] = f.metadata["choices"]
    return out


# How `check_fields` words a bad setting: {key} is its dotted key, {flag} the same as a command-line flag
# (max_new_tokens: --max-new-tokens), {value} the value, {allowed} and {least} the rule it breaks.
MESSAGES = {
    "finite": "{key}={value} must be a finite number",
    "choices": "{key}={value!r} is not one of {allowed}",
    "least": "{key}={value} must be >= {least}",
}


def check_fields(section: Any, prefix: str = "", messages: dict[str, str] = MESSAGES) -> None:
    """The section's own settings (not its subsections) against their allowed values, ranges and finiteness,
    a bad one reported in `messages`' words. None is a setting left unset (to be filled later): it passes."""
    for f in fields(section):
        value, meta, key = getattr(section, f.name), f.metadata, prefix + f.name
        if dataclasses.is_dataclass(value) or value is None:
            continue
        items = value if isinstance(value, (list, tuple)) else [value]
        say = functools.partial(
            str.format, key=key, flag="--" + key.replace("_", "-"), allowed=_listed(meta.get("choices", ()), ", ")
        )
        if any(isinstance(v, float) and not math.isfinite(v) for v in items):  # NaN passes every range check
            raise ConfigError(say(messages["finite"], value=value))
        allowed = meta.get("choices")
        bad = [v for v in items if v not in allowed] if allowed else []
        if bad:
            raise ConfigError(say(messages["choices"], value=value if isinstance(value, str) else bad[0]))
        least = meta.get("least")
        if least is not None and any(v is not None and v < least for v in items):
            raise ConfigError(say(messages["least"], value=value, least=least))


def _coerce(value: Any, kind: Any, key: str, meta: dict, hints: dict[str, str]) -> Any:
    """A YAML value as the field's type (ints for floats, lists for tuples), or a ConfigError."""
    if dataclasses.is_dataclass(kind):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} is a section; give it a mapping, not {value!r}")
        return from_dict(kind, value, key + ".", hints)
    aliases = meta.get("aliases") or {}
    if not isinstance(value, (list, dict)) and value in aliases:
        return aliases[value]
    origin, args = get_origin(kind), get_args(kind)
    if origin in (Union, types.UnionType):  # Optional[X], X | None
        if value is None and type(None) in args:
            return None
        kind = next(a for a in args if a is not type(None))
        origin, args = get_origin(kind), get_args(kind)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} takes a list, got {value!r}")
        return origin(_coerce(v, args[0], key, {}, hints) for v in value)
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str):
        try:
            return float(value)  # YAML reads 1e-5 as a string
        except ValueError:
            pass
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{key} takes a {kind.__name__}, got {value!r}")
    return value


def from_dict(cls: type, values: dict, prefix: str = "", hints: dict[str, str] | None = None) -> Any:
    """The dataclass `cls` from a (nested) mapping. An unknown key is an error that lists the known ones;
    a key in `hints` (dotted: a renamed key, or another tool's) is an error that says what to type instead."""
    hints = hints or {}
    known = {f.name: f for f in fields(cls)}
    for key in sorted(set(values) - set(known)):
        if prefix + key in hints:
            raise ConfigError(f"`{prefix}{key}` {hints[prefix + key]}")
        raise ConfigError(
            f"unknown config key {prefix}{key}; {prefix or 'the top level '}takes {', '.join(sorted(known))}"
        )
    types = get_type_hints(cls)
    return cls(**{k: _coerce(v, types[k], prefix + k, known[k].metadata, hints) for k, v in values.items()})


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """`key.sub=value` strings applied to a nested mapping (values read as YAML)."""
    values = {k: dict(v) if isinstance(v, dict) else v for k, v in values.items()}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"--set takes key=value, got {item!r}")
        *parents, name = key.strip().split(".")
        node = values
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {p} is not a section")
        node[name] = yaml.safe_load(text)
    return values


def merge(values: dict, changes: dict) -> dict:
    """`values` with `changes` applied; a section given as a mapping changes only the keys it names."""
    out = dict(values)
    for key, value in changes.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = merge(out[key], value) if both else value
    return out


def flat(values: dict, prefix: str = "") -> dict:
    """A nested mapping as dotted keys (tuples as lists, as JSON gives them back)."""
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = list(value) if isinstance(value, tuple) else value
    return out


def changed(before: dict, now: dict, keys: tuple[str, ...]) -> dict[str, tuple[Any, Any]]:
    """The resume guard's comparison (a training run's and an evaluation's): {key: (recorded, current)}
    for each of `keys` (dotted) whose recorded value differs; a key missing from `before` counts as changed."""
    before, now = flat(before), flat(now)
    return {k: (before.get(k), now.get(k)) for k in keys if before.get(k) != now.get(k)}
