"""Facts the package once wrote several times have one home each: read from the source with `ast`
(code only: docstrings and comments may name a fact, a second implementation may not)."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LINKS = {"convert", "kernels_metal", "kernels_cuda", "kernels_shared"}  # oss_mlx/<link> -> the top folders


@functools.cache
def sources() -> dict[str, ast.AST]:
    files = [p for p in (REPO / "oss_mlx").rglob("*.py") if not LINKS & set(p.relative_to(REPO).parts[1:])]
    files += sorted((REPO / "convert").glob("*.py"))
    return {str(p.relative_to(REPO)): ast.parse(p.read_text()) for p in files}


def _docstrings(tree: ast.AST) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


@functools.cache
def _nodes() -> dict[str, list[ast.AST]]:
    out = {}
    for name, tree in sources().items():
        skip = _docstrings(tree)
        out[name] = [n for n in ast.walk(tree) if id(n) not in skip]
    return out


def where(predicate) -> set[str]:
    """The files with a node (docstrings aside) for which predicate(node) holds."""
    out = set()
    for name, nodes in _nodes().items():
        if any(predicate(n) for n in nodes):
            out.add(name)
    return out


def _constant(value) -> callable:
    return lambda n: isinstance(n, ast.Constant) and n.value == value


def _fp4_table(n: ast.AST) -> bool:
    if not isinstance(n, (ast.List, ast.Tuple)):
        return False
    values = {e.value for e in n.elts if isinstance(e, ast.Constant) and isinstance(e.value, float)}
    return {0.5, 1.5, 3.0, 6.0} <= values


def _keyword_or_entry(key: str, value):
    """`key=value` in a call, or `"key": value` in a dict literal."""

    def check(n: ast.AST) -> bool:
        if isinstance(n, ast.keyword):
            return n.arg == key and isinstance(n.value, ast.Constant) and n.value.value == value
        if isinstance(n, ast.Dict):
            return any(
                isinstance(k, ast.Constant)
                and k.value == key
                and isinstance(v, ast.Constant)
                and v.value == value
                for k, v in zip(n.keys, n.values)
            )
        return False

    return check


def _call_of(obj: str, attr: str):
    def check(n: ast.AST) -> bool:
        f = n.func if isinstance(n, ast.Call) else None
        return isinstance(f, ast.Attribute) and f.attr == attr and getattr(f.value, "id", None) == obj

    return check


def test_the_reader_sees_the_package():
    """The scan finds what is plainly there (a check that cannot pass on nothing)."""
    files = sources()
    assert "oss_mlx/mxfp4.py" in files and "convert/writer.py" in files and len(files) > 40
    assert where(_fp4_table) == {"oss_mlx/mxfp4.py"}


@pytest.mark.parametrize(
    "fact, predicate, home",
    [
        ("the FP4 value table", _fp4_table, {"oss_mlx/mxfp4.py"}),
        ("MLX's mxfp4 mode", _keyword_or_entry("mode", "mxfp4"), {"oss_mlx/mxfp4.py"}),
        ("a literal MXFP4 group size (mxfp4.GROUP_SIZE)", _keyword_or_entry("group_size", 32), set()),
        (
            "the safetensors header length (8 bytes, little-endian)",
            _constant("<Q"),
            {"oss_mlx/safetensors_file.py"},
        ),
        ("the safetensors __metadata__ key", _constant("__metadata__"), {"oss_mlx/safetensors_file.py"}),
        ("which variables set offline mode", _constant("HF_HUB_OFFLINE"), {"oss_mlx/hub.py"}),
        ("the scripted-replies hook", _constant("OSS_MLX_SCRIPTED_REPLIES"), {"oss_mlx/testing/scripted.py"}),
        ("size units", _constant("gib"), {"oss_mlx/cli_args.py"}),
        ("the official 120b's shape", _keyword_or_entry("num_experts", 128), {"oss_mlx/config.py"}),
    ],
)
def test_one_home(fact, predicate, home):
    found = where(predicate)
    assert found == home, f"{fact}: written in {sorted(found)}, its one home: {sorted(home) or 'none'}"


def test_nothing_patches_the_sampler_class_wide():
    """Scripted replies come as per-reply options (testing/scripted.py), never by replacing
    SamplingOptions.sampler for everyone."""

    def assigns_sampler(n: ast.AST) -> bool:
        targets = n.targets if isinstance(n, ast.Assign) else []
        return any(isinstance(t, ast.Attribute) and t.attr == "sampler" for t in targets)

    assert where(assigns_sampler) == set()


def test_one_kv_bytes_formula_and_one_safetensors_reader():
    assert where(_call_of("struct", "unpack")) == {"oss_mlx/safetensors_file.py"}
    assert where(_call_of("struct", "pack")) == {"oss_mlx/safetensors_file.py"}
    per_token = where(
        lambda n: isinstance(n, ast.BinOp) and "num_key_value_heads * config.head_dim" in ast.unparse(n)
    )
    assert per_token == {"oss_mlx/memory.py"}, per_token
