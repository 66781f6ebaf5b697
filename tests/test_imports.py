"""The package's layering, read from the source with `ast` (every import, at module level or inside a
function): the kernels sit below the model and import nothing of it, and no modules import each other
in a circle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "oss_mlx"
# The model and the layers right under it (the cycle check covers the whole package besides).
MODEL = {"oss_mlx.model", "oss_mlx.attention", "oss_mlx.moe", "oss_mlx.cache", "oss_mlx.decode"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    # Through the links that map convert/ and the kernel folders into the checkout's package
    # (they hold no Python of ours but the converter's, which is outside the layering checked here).
    return {
        _module_name(p): p
        for p in ROOT.rglob("*.py")
        if not (
            {"convert", "kernels_metal", "kernels_cuda", "kernels_shared"} & set(p.relative_to(ROOT).parts)
        )
    }


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules `name` imports, anywhere in its file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from X import y`: y is a module of package X, or a name X defines (then X is imported)
            submodules = [f"{base}.{alias.name}" for alias in node.names]
            targets = submodules + ([base] if any(m not in known for m in submodules) else [])
        else:
            continue
        found |= {t for t in targets if t in known}
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: imports_of(name, path, known) for name, path in modules.items()}


def test_the_graph_is_read():
    """The reader finds what is plainly there (a check that cannot pass on an empty graph)."""
    graph = import_graph()
    assert {"oss_mlx.kernels", "oss_mlx.kernels.dispatch", "oss_mlx.kernels.routing"} <= set(graph)
    assert "oss_mlx.kernels.decode_attention" in graph["oss_mlx.attention"]
    assert "oss_mlx.kernels.dispatch" in graph["oss_mlx.kernels.routing"]
    assert "oss_mlx.streaming" in graph["oss_mlx.decode"]  # an import inside a function counts


def test_the_kernels_import_nothing_of_the_model():
    graph = import_graph()
    kernel_layer = {m for m in graph if m == "oss_mlx.kernels" or m.startswith("oss_mlx.kernels.")}
    assert len(kernel_layer) >= 6
    for module in kernel_layer:
        outside = graph[module] - kernel_layer
        assert not outside, f"{module} imports {sorted(outside)}: launchers take arrays, not modules"


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_circle():
    """Among the model, attention, MoE, cache, decode step and kernel modules, and in the whole
    package."""
    graph = import_graph()
    layers = {m for m in graph if m in MODEL or m.startswith("oss_mlx.kernel")}
    assert MODEL <= layers and "oss_mlx.kernel_selftest" in layers
    sub = {m: graph[m] & layers for m in layers}
    assert _cycle(sub) is None, " -> ".join(_cycle(sub))
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize(
    "source,want",
    [
        ("from . import kernels", {"oss_mlx.kernels"}),
        ("from .kernels import routing, ExpertWeights", {"oss_mlx.kernels", "oss_mlx.kernels.routing"}),
        ("import oss_mlx.moe as m", {"oss_mlx.moe"}),
        ("def f():\n    from .streaming import X", {"oss_mlx.streaming"}),
    ],
)
def test_imports_are_resolved(tmp_path, source, want):
    path = tmp_path / "attention.py"
    path.write_text(source)
    known = {"oss_mlx.kernels", "oss_mlx.kernels.routing", "oss_mlx.moe", "oss_mlx.streaming"}
    assert imports_of("oss_mlx.attention", path, known) == want
