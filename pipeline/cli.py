"""Command-line options from a config dataclass: one option per field, its help the field's end-of-line
comment, so a job never re-declares its config field by field."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import typing
from typing import Any

_TYPES = {"int": int, "float": float, "str": str}


def field_docs(cls: type) -> dict[str, str]:
    """Each field's end-of-line comment in the class source (the config's documentation)."""
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    docs = {}
    for node in ast.parse(source).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            line = lines[node.end_lineno - 1]
            if "  # " in line:
                docs[node.target.id] = line.split("  # ", 1)[1].strip()
    return docs


def add_dataclass_arguments(
    parser: argparse.ArgumentParser | Any, cls: type, skip: tuple[str, ...] = (), **overrides: dict
) -> None:
    """`--field-name` for every field of `cls` (but `skip`): required without a default, a flag pair for
    booleans; `overrides[field]` adds or replaces argparse keywords (choices, help)."""
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        kind = str(f.type).replace(" | None", "").replace("Optional[", "").rstrip("]")
        default = f.default if f.default is not dataclasses.MISSING else None
        options: dict = {"help": docs.get(f.name, ""), "default": default}
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            options["required"] = True
        if kind == "bool":
            options["action"] = argparse.BooleanOptionalAction
        elif kind in _TYPES:
            options["type"] = _TYPES[kind]
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: no command-line type for {f.type!r}")
        parser.add_argument(f"--{f.name.replace('_', '-')}", **(options | overrides.get(f.name, {})))


def dataclass_from_args(cls: type, args: argparse.Namespace, **given: Any) -> Any:
    """`cls` built from the parsed options of its fields, `given` ones taking precedence."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**(values | given))


def components(cls: type) -> dict[str, type]:
    """The fields of `cls` whose type is itself a dataclass: name -> that class."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name])}


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, **overrides: dict) -> None:
    """Options for the plain fields of `cls` and, in an argument group titled by its docstring, for the
    fields of each component dataclass; option names are the field names, so they must not repeat."""
    parts = components(cls)
    add_dataclass_arguments(parser, cls, skip=tuple(parts), **overrides)
    for name, kind in parts.items():
        group = parser.add_argument_group(name, (kind.__doc__ or "").strip().splitlines()[0])
        add_dataclass_arguments(group, kind, **overrides)


def config_from_args(cls: type, args: argparse.Namespace) -> Any:
    """`cls` built from options added by `add_config_arguments`, each component from its own fields."""
    parts = {name: dataclass_from_args(kind, args) for name, kind in components(cls).items()}
    return dataclass_from_args(cls, args, **parts)
