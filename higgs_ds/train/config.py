"""Run configuration: a small tree of frozen dataclasses, loaded from TOML or YAML with `--key value` overrides.

Precedence is command line > file > defaults. Nested sections are addressed with dots
(`--data.batch_size 8`). Unknown keys are an error that names them and lists the known ones. Field
docstrings (the string literal under each field) are the documentation `higgs-ds train --help` prints.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import textwrap
import typing
from pathlib import Path

import tomllib

from higgs_ds.errors import UserError


class ConfigError(UserError):
    pass


def field_docs(cls) -> dict[str, str]:
    """The docstring under each dataclass field, read from the class source."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    docs, body = {}, tree.body[0].body
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def _coerce(value, hint, key: str):
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"[{key}] must be a table of settings, got {value!r}")
        return build(hint, value, prefix=f"{key}.")
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None or value == "none":
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if isinstance(value, str) and hint is not str:  # from the command line
        if hint is bool:
            if value.lower() in ("true", "1", "yes"):
                return True
            if value.lower() in ("false", "0", "no"):
                return False
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            if origin in (list, tuple):
                value = [v for v in value.split(",") if v]
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            value = [value]
        return origin(_coerce(v, args[0], key) for v in value) if args else origin(value)
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {value!r}")
        return dict(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and not isinstance(value, hint):
        raise ConfigError(f"{key}: expected {hint.__name__}, got {value!r}")
    return value


def build(cls, values: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(
            f"unknown setting(s) {', '.join(prefix + u for u in unknown)}; "
            f"known in this section: {', '.join(prefix + n for n in names)}"
        )
    return cls(**{k: _coerce(v, hints[k], prefix + k) for k, v in values.items()})


def parse_overrides(argv: list[str]) -> dict:
    """['--a.b', '1', '--c=2'] -> {'a': {'b': '1'}, 'c': '2'}"""
    out: dict = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"expected --key value, got {arg!r}")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(argv):
                raise ConfigError(f"{arg} needs a value")
            key, value = arg[2:], argv[i + 1]
            i += 2
        node = out
        *parents, leaf = key.replace("-", "_").split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(cls, path: str | None, argv: list[str]):
    values = _read_file(path) if path else {}
    return build(cls, merge(values, parse_overrides(argv)))


def _read_file(path: str) -> dict:
    """A TOML file, or YAML for a .yaml/.yml name (safe_load: plain data, no Python objects)."""
    try:
        text = Path(path).read_text()
    except (FileNotFoundError, IsADirectoryError):
        raise ConfigError(f"config file {path} not found") from None
    if Path(path).suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            values = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {err}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path} must hold a mapping of settings, not a {type(values).__name__}")
        return values
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path} is not valid TOML (name the file .yaml for YAML): {err}") from None


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def describe(cls, prefix: str = "") -> str:
    """Every setting with its default and docstring, for --help."""
    lines, docs = [], field_docs(cls)
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            lines.append(f"\n[{prefix}{f.name}]")
            lines.append(describe(hint, prefix=f"{prefix}{f.name}."))
            continue
        default = (
            f.default
            if f.default is not dataclasses.MISSING
            else (f.default_factory() if f.default_factory is not dataclasses.MISSING else "(required)")
        )
        lines.append(f"  --{prefix}{f.name} (default {default!r})\n      {docs.get(f.name, '')}")
    return "\n".join(lines)
