"""Command-line options from a config dataclass: one option per field, its help the field's end-of-line
comment, so a job never re-declares its config field by field.

A field whose type is itself a dataclass is a component: its fields become options too (in an argument
group titled by its docstring), recursively, and `config_from_args` builds it back. A field may declare
how its option is spelled with `dataclasses.field(metadata=option(...))`: argparse keywords (choices,
nargs, type=None for argparse's own strings) and `negated=True`, a boolean that defaults to True shown
as the single flag `--no-<name>`.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import typing
from typing import Any

_TYPES = {"int": int, "float": float, "str": str}


def option(*, negated: bool = False, **argparse_keywords: Any) -> dict:
    """`metadata` for a field's option: argparse keywords it adds or replaces; `negated`: a True-by-default
    boolean given as `--no-<name>` (stored as `no_<name>`, read back inverted)."""
    return {"cli": {"negated": negated, **argparse_keywords}}


NO_OPTION = {"cli": None}  # `metadata` of a field that is no command-line option (set by code, not users)


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


def _fields(cls: type) -> list[dataclasses.Field]:
    # a field derived in __post_init__ is no option, nor one marked NO_OPTION
    return [f for f in dataclasses.fields(cls) if f.init and f.metadata.get("cli", {}) is not None]


def _cli(f: dataclasses.Field) -> dict:
    return dict(f.metadata.get("cli", {}))


def _dest(f: dataclasses.Field) -> str:
    return f"no_{f.name}" if _cli(f).get("negated") else f.name


def _argument(cls: type, f: dataclasses.Field, doc: str) -> tuple[str, dict]:
    """The option string and argparse keywords of one plain field."""
    given = _cli(f)
    if given.pop("negated", False):
        if f.default is not True:
            raise TypeError(f"{cls.__name__}.{f.name}: a negated option needs a boolean defaulting to True")
        flag = f"--no-{f.name.replace('_', '-')}"
        return flag, {"action": "store_true", "dest": _dest(f), "help": doc} | given
    kind = str(f.type).replace(" | None", "").replace("Optional[", "").rstrip("]")
    default = f.default if f.default is not dataclasses.MISSING else None
    options: dict = {"help": doc, "default": default}
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
        options["required"] = True
    if kind == "bool":
        options["action"] = argparse.BooleanOptionalAction
    elif kind in _TYPES:
        options["type"] = _TYPES[kind]
    elif "type" not in given and "action" not in given:
        raise TypeError(f"{cls.__name__}.{f.name}: no command-line type for {f.type!r}")
    return f"--{f.name.replace('_', '-')}", options | given


def add_dataclass_arguments(
    parser: argparse.ArgumentParser | Any, cls: type, skip: tuple[str, ...] = (), **overrides: dict
) -> None:
    """`--field-name` for every field of `cls` (but `skip`): required without a default, a flag pair for
    booleans, as the field's `option(...)` metadata says; `overrides[field]` adds or replaces argparse
    keywords (choices, help)."""
    docs = field_docs(cls)
    for f in _fields(cls):
        if f.name not in skip:
            flag, options = _argument(cls, f, docs.get(f.name, ""))
            parser.add_argument(flag, **(options | overrides.get(f.name, {})))


def _read(f: dataclasses.Field, args: argparse.Namespace) -> Any:
    value = getattr(args, _dest(f))
    if _dest(f) != f.name:  # --no-<name>
        return not value
    return tuple(value) if isinstance(value, list) else value  # nargs: the configs are frozen


def dataclass_from_args(cls: type, args: argparse.Namespace, **given: Any) -> Any:
    """`cls` built from the parsed options of its fields, `given` ones taking precedence."""
    values = {f.name: _read(f, args) for f in _fields(cls) if hasattr(args, _dest(f))}
    return cls(**(values | given))


def components(cls: type) -> dict[str, type]:
    """The fields of `cls` whose type is itself a dataclass: name -> that class."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in _fields(cls) if dataclasses.is_dataclass(hints[f.name])}


def add_config_arguments(
    parser: argparse.ArgumentParser, cls: type, group: Any = None, **overrides: dict
) -> None:
    """Options for the plain fields of `cls` (in `group`, else the parser) and, in an argument group
    titled by its docstring, for the fields of each component dataclass, at any depth; option names are
    the field names, so they must not repeat."""
    parts = components(cls)
    add_dataclass_arguments(group or parser, cls, skip=tuple(parts), **overrides)
    for name, kind in parts.items():
        title = (kind.__doc__ or "").strip().splitlines()[0]
        add_config_arguments(parser, kind, parser.add_argument_group(name, title), **overrides)


def config_from_args(cls: type, args: argparse.Namespace) -> Any:
    """`cls` built from options added by `add_config_arguments`, each component from its own fields."""
    parts = {name: config_from_args(kind, args) for name, kind in components(cls).items()}
    return dataclass_from_args(cls, args, **parts)
