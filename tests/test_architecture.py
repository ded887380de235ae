"""The house rules of docs/architecture.md, read from the source (ast; nothing is imported): which folder may
import which, no import circles (imports inside functions count), and each folder says what it holds."""
from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Folder -> the package it installs as (pyproject.toml's package-dir).
FOLDERS = {"edgelora": "edgelora", "protos": "edgelora.protos", "codec": "edgelora.codec",
           "server": "edgelora.server", "edge_client": "edgelora.edge_client"}
# Room -> the rooms it must never import (module prefixes), and the third-party packages it must not use.
CORE_ABOVE = ("edgelora.server", "edgelora.edge_client", "edgelora.simulation", "edgelora.experiments",
              "edgelora.cli", "edgelora.protos")
RULES = {
    "core": (CORE_ABOVE, ("grpc", "ray")),
    "codec": (("edgelora.",), ("grpc", "torch")),
    "protos": (("edgelora.server", "edgelora.edge_client", "edgelora.simulation", "edgelora.experiments",
                "edgelora.cli", "edgelora.codec"), ("torch",)),
    "server": (("edgelora.edge_client", "edgelora.simulation", "edgelora.experiments", "edgelora.cli"), ()),
    "edge_client": (("edgelora.server", "edgelora.simulation", "edgelora.experiments", "edgelora.cli"), ()),
    "simulation": (("edgelora.experiments", "edgelora.cli"), ()),
    "experiments": (("edgelora.cli",), ()),
    "cli": ((), ()),
}


def modules() -> dict[str, Path]:
    out = {}
    for folder, pkg in FOLDERS.items():
        for p in (REPO / folder).rglob("*.py"):
            parts = list(p.relative_to(REPO / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([pkg, *parts])] = p
    return out


def room(module: str) -> str:
    for name in ("codec", "protos", "server", "edge_client", "simulation", "experiments", "cli"):
        if module == f"edgelora.{name}" or module.startswith(f"edgelora.{name}."):
            return name
    return "core"


def imports(module: str, path: Path, known: frozenset[str] = frozenset()) -> list[tuple[str, int]]:
    """(imported module, line) for every import in the file, relative ones resolved; `from X import name` is
    X.name where that is one of the `known` modules, else X."""
    is_pkg = path.name == "__init__.py"
    package = module if is_pkg else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known]
            out += [(t, node.lineno) for t in subs] if len(subs) == len(node.names) else [(target, node.lineno)] + \
                [(t, node.lineno) for t in subs]
    return out


def test_every_room_imports_only_what_it_may():
    mods = modules()
    broken = []
    for m, p in mods.items():
        banned, third = RULES[room(m)]
        for target, line in imports(m, p, frozenset(mods)):
            if room(target) == room(m):
                continue
            if (target in mods or target.startswith("edgelora")) and any(
                    target == b.rstrip(".") or target.startswith(b if b.endswith(".") else b + ".") or target == b
                    for b in banned):
                broken.append(f"{p.relative_to(REPO)}:{line} imports {target}")
            if target.split(".")[0] in third:
                broken.append(f"{p.relative_to(REPO)}:{line} uses {target}")
    assert broken == []


def test_the_rule_check_sees_a_violation():
    assert room("edgelora.data") == "core" and room("edgelora.server.driver") == "server"
    assert ("edgelora.server.engine", 1) in imports("edgelora.data", _tmp("from edgelora.server import engine\n"),
                                                    frozenset({"edgelora.server.engine"}))


def _tmp(text: str) -> Path:
    import tempfile

    f = Path(tempfile.mkdtemp()) / "m.py"
    f.write_text(text)
    return f


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), or a module importing itself."""
    index, low, stack, on, out, n = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = n[0]
        n[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_circles_lazy_imports_included():
    mods = modules()
    graph = {m: {t for t, _ in imports(m, p, frozenset(mods)) if t in mods and t != m} for m, p in mods.items()}
    assert circles(graph) == []
    assert circles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]  # it would see one


# Our modules that may be imported inside a function: an optional backend (Ray).
OPTIONAL = {"edgelora.simulation.ray_devices"}


def test_imports_inside_functions_are_only_for_optional_heavy_dependencies():
    """A lazy import of one of our own modules only ever dodged a circle. Third-party ones (Ray, plotting,
    peft's loader) may wait inside a function, and so may the CLI's subcommands, so that `edgelora --help` and
    a client's start do not import torch, grpc and Ray for commands they do not run."""
    mods = modules()
    lazy = []
    for m, p in mods.items():
        if room(m) == "cli":
            continue
        for fn in ast.walk(ast.parse(p.read_text())):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    if isinstance(node, (ast.Import, ast.ImportFrom)):
                        lazy += [f"{p.relative_to(REPO)}:{node.lineno} {t}"
                                 for t, _ in imports(m, _one(node), frozenset(mods)) if t in mods and t not in OPTIONAL]
    assert lazy == []


def _one(node) -> Path:
    return _tmp(ast.unparse(ast.Module(body=[node], type_ignores=[])))


def test_every_folder_opens_with_a_docstring_saying_what_it_holds():
    pkgs = [REPO / f / "__init__.py" for f in FOLDERS] + \
           [p for f in ("edgelora",) for p in (REPO / f).glob("*/__init__.py")]
    missing = [str(p.relative_to(REPO)) for p in pkgs if not ast.get_docstring(ast.parse(p.read_text()))]
    assert missing == []
    assert all(re.search(r"(?i)import", ast.get_docstring(ast.parse(p.read_text())) or "") for p in
               [REPO / f / "__init__.py" for f in ("edgelora", "server", "edge_client", "protos", "codec")])
