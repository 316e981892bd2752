"""The layers import downward only (jobs -> pipeline -> gq, kernels) and no module imports itself back
through others, lazy imports inside functions included: read from the source, nothing is imported."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("gq", "kernels", "pipeline", "jobs")
MAY_IMPORT = {  # each layer and the layers below it
    "gq": {"gq", "kernels"},
    "kernels": {"kernels"},
    "pipeline": {"pipeline", "gq", "kernels"},
    "jobs": {"jobs", "pipeline", "gq", "kernels"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module of this repository that the file imports, at any depth of its code."""
    found = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in found if m.split(".")[0] in MAY_IMPORT["jobs"]}


def graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")]
    modules = {module_name(p): p for p in files}
    edges = {}
    for name, path in modules.items():
        # `from pkg import name` is an edge to pkg.name when that is a module, else to pkg
        edges[name] = {m for m in imports(path) if m in modules} - {name}
    return edges


def test_layers_import_downward_only():
    wrong = [
        f"{src} imports {dst}"
        for src, targets in graph().items()
        for dst in targets
        if dst.split(".")[0] not in MAY_IMPORT[src.split(".")[0]]
    ]
    assert not wrong, wrong


def test_no_import_cycles():
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


def test_repository_is_self_contained():
    """Users and a clone have only this repository: no file of it points at the team's shared folder."""
    roots = [
        REPO / "README.md",
        *(REPO / d for d in ("docs", "gq", "kernels", "pipeline", "jobs", "benchmarks")),
    ]
    files = [
        p for r in roots for p in ([r] if r.is_file() else r.rglob("*")) if p.suffix in (".py", ".md", ".sh")
    ]
    outside = ("../shared", "GQ_NOTES", "DESIGN.md")
    hits = [
        f"{p.relative_to(REPO)}:{number}"
        for p in files
        for number, line in enumerate(p.read_text().splitlines(), 1)
        if any(name in line for name in outside)
    ]
    assert not hits, hits


# Inside pipeline/: the top modules (cli, memory) and io/ (URLs, atomic writes, the resumable output
# directory) serve every part and import none; data/ is images in, tokens/ the token files; the jobs' parts
# use those and never each other; pack/ (make_shards) sits beside data/.
PIPELINE_MAY_IMPORT = {
    "io": {"io"},
    "data": {"io", "data"},
    "pack": {"io", "pack", "data"},
    "tokens": {"io", "tokens", "data"},
    "tokenize": {"io", "tokenize", "tokens", "data"},
    "train": {"io", "train", "data"},
    "evaluate": {"io", "evaluate", "tokens", "data"},
    "convert": {"io", "convert", "evaluate", "data"},
}


def pipeline_part(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "pipeline" and len(parts) > 2 else None


def test_pipeline_parts_import_downward_only():
    assert set(PIPELINE_MAY_IMPORT) == {
        p.name for p in (REPO / "pipeline").iterdir() if (p / "__init__.py").exists()
    }
    wrong = [
        f"{src} imports {dst}"
        for src, targets in graph().items()
        if (part := pipeline_part(src))
        for dst in targets
        if pipeline_part(dst) and pipeline_part(dst) not in PIPELINE_MAY_IMPORT[part]
    ]
    assert not wrong, wrong


def test_pipeline_top_holds_at_most_three_modules():
    top = sorted(p.name for p in (REPO / "pipeline").glob("*.py") if p.name != "__init__.py")
    assert len(top) <= 3, top
