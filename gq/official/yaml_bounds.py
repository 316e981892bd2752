"""The official YAML config, read within bounds: what a hostile config can cost is fixed before expanding it.

A model config is a few KB of mappings, lists and scalars. PyYAML shares an aliased node instead of
copying it, so 2 KB of nested aliases stand for 10^9 values (billion laughs) that only the first walk
over them expands, and a recursive alias never ends; `${a}${a}` interpolations double at every step.
Before anything is expanded, `load_config` refuses with one line: a text over MAX_BYTES, more than
MAX_ALIASES aliases, nesting deeper than MAX_DEPTH, a node graph that loops or stands for more than
MAX_NODES values, keys that are not text, and values other than mappings, lists, text, numbers, booleans
and null. Dates stay text, as OmegaConf (which the official code reads configs with) leaves them.
`resolve_interpolations` expands the OmegaConf-style `${a.b.c}` interpolations, each path once, within
the same value budget, MAX_TEXT characters per string and MAX_INTERPOLATION_DEPTH steps.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

import fsspec
import yaml

from gq.checkpoint import CheckpointError

MAX_BYTES = 1 << 20  # the published configs are ~1.5 KB
MAX_ALIASES = 100  # the published configs use none
MAX_DEPTH = 64  # levels of nesting; the published configs have 7
MAX_NODES = 100_000  # values after every alias and interpolation is expanded
MAX_TEXT = 1 << 16  # characters of one string built by inline interpolation
MAX_INTERPOLATION_DEPTH = 32  # `${a}` -> `${b}` -> ... steps
_SCALARS = (str, int, float, bool, type(None))
_INTERPOLATION = re.compile(r"\$\{([^}]+)\}")


class _Loader(yaml.SafeLoader):
    """SafeLoader that counts aliases and depth while composing, and sizes the node graph before building."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.aliases = 0
        self.depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_ALIASES:
                raise CheckpointError(f"more than {MAX_ALIASES} aliases (*name); a model config needs none")
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise CheckpointError(f"nested deeper than {MAX_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_document(self, node: yaml.Node) -> Any:
        _expanded_size(node, "", _node_children, {}, set(), 0)  # before any value is built
        return super().construct_document(node)


# Dates stay text (OmegaConf's loader drops the same resolver); an explicit !!timestamp is refused below.
_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _node_children(node: Any, where: str) -> Iterable[tuple[str, Any]]:
    if isinstance(node, yaml.SequenceNode):
        return ((f"{where}[{i}]", n) for i, n in enumerate(node.value))
    if isinstance(node, yaml.MappingNode):
        pairs = []
        for key, value in node.value:
            path = f"{where}.{key.value if isinstance(key, yaml.ScalarNode) else '?'}".lstrip(".")
            pairs += [(path, key), (path, value)]
        return pairs
    return ()


def _value_children(value: Any, where: str) -> Iterable[tuple[str, Any]]:
    if isinstance(value, dict):
        for key in value:
            if not isinstance(key, str):
                raise CheckpointError(f"{where or 'the top level'}: key {key!r} is not text")
        return ((f"{where}.{k}".lstrip("."), v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ((f"{where}[{i}]", v) for i, v in enumerate(value))
    if not isinstance(value, _SCALARS):
        raise CheckpointError(
            f"{where}: a {type(value).__name__} value; a config holds mappings, lists, text, numbers, "
            f"booleans and null"
        )
    return ()


def _expanded_size(
    node: Any,
    where: str,
    children: Callable[[Any, str], Iterable[tuple[str, Any]]],
    sizes: dict[int, int],
    open_ids: set[int],
    depth: int,
) -> int:
    """How many values `node` stands for with every shared part copied out; refuses loops and excess."""
    if id(node) in sizes:
        return sizes[id(node)]
    if id(node) in open_ids:
        raise CheckpointError(f"{where or 'the top level'} contains itself (a recursive alias)")
    if depth > MAX_DEPTH:
        raise CheckpointError(f"nested deeper than {MAX_DEPTH} levels")
    open_ids.add(id(node))
    total = 1
    for path, child in children(node, where):
        total += _expanded_size(child, path, children, sizes, open_ids, depth + 1)
        if total > MAX_NODES:
            raise CheckpointError(
                f"{where or 'the config'} expands past {MAX_NODES} values, each alias counted as a copy"
            )
    open_ids.discard(id(node))
    sizes[id(node)] = total
    return total


def check_config_values(config: Any) -> None:
    """Refuse a parsed config that loops, expands past MAX_NODES values or holds other than YAML's plain
    values (raises CheckpointError without the `config:` prefix)."""
    _expanded_size(config, "", _value_children, {}, set(), 0)


def read_config_text(url: str) -> str:
    """A config file's text, refusing one over MAX_BYTES before reading it whole."""
    try:
        with fsspec.open(url, "rb") as f:
            data = f.read(MAX_BYTES + 1)
        if len(data) > MAX_BYTES:
            raise CheckpointError(f"config {url}: larger than {MAX_BYTES} bytes; a model config is a few KB")
        return data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"config {url}: cannot read it: {e}") from None


def load_config(text: str, name: str) -> Any:
    """Parse a config's text within the bounds above; CheckpointError names `name` and the reason."""
    try:
        value = yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
        check_config_values(value)
    except CheckpointError as e:
        raise CheckpointError(f"{name}: {e}") from None
    except yaml.YAMLError as e:
        raise CheckpointError(f"{name}: not valid YAML: {str(e).splitlines()[0]}") from None
    return value


class _Resolver:
    """OmegaConf-style `${a.b.c}`: a whole-string interpolation takes the value, an inline one its text.
    Each path is resolved once; every value built counts against MAX_NODES."""

    def __init__(self, root: dict) -> None:
        self.root, self.built, self.done, self.open = root, 0, {}, []

    def count(self) -> None:
        self.built += 1
        if self.built > MAX_NODES:
            raise CheckpointError(f"config: interpolations expand past {MAX_NODES} values")

    def resolve(self, node: Any, depth: int) -> Any:
        self.count()
        if isinstance(node, dict):
            return {k: self.resolve(v, depth) for k, v in node.items()}
        if isinstance(node, list):
            return [self.resolve(v, depth) for v in node]
        if not isinstance(node, str) or "${" not in node:
            return node
        whole = _INTERPOLATION.fullmatch(node)
        if whole:
            return self.copy(self.target(whole.group(1), depth))
        text = _INTERPOLATION.sub(lambda m: str(self.target(m.group(1), depth)), node)
        if len(text) > MAX_TEXT:
            raise CheckpointError(f"config: interpolation {node[:40]!r} expands past {MAX_TEXT} characters")
        return text

    def copy(self, value: Any) -> Any:
        self.count()
        if isinstance(value, dict):
            return {k: self.copy(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.copy(v) for v in value]
        return value

    def target(self, path: str, depth: int) -> Any:
        """The resolved value `${path}` names."""
        if path in self.done:
            return self.done[path]
        if path in self.open or depth >= MAX_INTERPOLATION_DEPTH:
            raise CheckpointError(f"config: interpolation ${{{path}}} nests too deep or refers to itself")
        self.open.append(path)
        node: Any = self.root
        for part in path.split("."):
            whole = _INTERPOLATION.fullmatch(node) if isinstance(node, str) else None
            if whole:  # a step through another interpolation
                node = self.target(whole.group(1), depth + 1)
            if not isinstance(node, dict) or part not in node:
                raise CheckpointError(f"config: interpolation ${{{path}}} names no field")
            node = node[part]
        self.done[path] = self.resolve(node, depth + 1)
        self.open.pop()
        return self.done[path]


def resolve_interpolations(config: dict) -> dict:
    """`config` with every `${a.b.c}` interpolation expanded (a new tree; `config` is not changed)."""
    return _Resolver(config).resolve(config, 0)
