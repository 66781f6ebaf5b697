"""The kernels' source text and interfaces: where each kernel's Metal and CUDA source lives, its inputs
and outputs (SPECS), and the text MLX compiles for it (kernel_sources).

Each family's file (kernels_metal/<family>.metal, kernels_cuda/<family>.cu) holds a comment block, shared
helpers, then `// @@kernel NAME` bodies; each dialect's common header (common.h / common.cuh) holds the
helpers of every family. A kernel is compiled from its body plus the helpers it reaches, comments and
layout removed (see _code_only and _used_helpers for why). oss_mlx/kernels.py compiles and launches them.
"""

from __future__ import annotations

import functools
import importlib.resources
import re
from dataclasses import dataclass
from pathlib import Path

_SOURCE_PACKAGES = {"metal": "oss_mlx.kernels_metal", "cuda": "oss_mlx.kernels_cuda"}
_SOURCE_DIRS = {"metal": "kernels_metal", "cuda": "kernels_cuda"}
EXT = {"metal": ".metal", "cuda": ".cu"}
_HEADER = {"metal": "common.h", "cuda": "common.cuh"}


_MARK = re.compile(r"^// @@kernel (\w+)\s*$", re.M)


def _source_text(dialect: str, filename: str) -> str:
    try:
        root = importlib.resources.files(_SOURCE_PACKAGES[dialect])
        return root.joinpath(filename).read_text()
    except (ModuleNotFoundError, FileNotFoundError):
        # A source checkout on sys.path without the package mapping (e.g. PYTHONPATH=repo).
        return (Path(__file__).resolve().parent.parent / _SOURCE_DIRS[dialect] / filename).read_text()


def parse_source(text: str) -> tuple[str, dict[str, str]]:
    """Split a kernel file into its preamble (helpers, comments) and `// @@kernel NAME` bodies."""
    parts = _MARK.split(text)
    preamble, bodies = parts[0], {}
    for name, body in zip(parts[1::2], parts[2::2]):
        if name in bodies:  # a pasted section would silently replace the first one
            raise ValueError(f"kernel source: `// @@kernel {name}` appears twice")
        bodies[name] = body
    return preamble, bodies


@dataclass(frozen=True)
class KernelSpec:
    name: str
    file: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    row_contiguous: bool = True


_SDPA_INPUTS = ("q", "kv", "sinks", "scale_log2", "pos")
SPECS = {
    s.name: s
    for s in (
        KernelSpec("route", "routing", ("x", "w", "b"), ("wts", "ids")),
        KernelSpec("norm_route", "routing", ("x", "nw", "w", "b", "eps"), ("h", "wts", "ids")),
        KernelSpec("gate_up_swiglu", "experts", ("x", "ids", "w", "scales", "bias", "consts"), ("h",)),
        KernelSpec("down_combine", "experts", ("h", "ids", "wts", "w", "scales", "bias", "res"), ("y",)),
        KernelSpec("moe_group", "routing", ("ids",), ("perm", "offsets", "tiles")),
        KernelSpec(
            "moe_gemm",
            "experts",
            ("a", "perm", "offsets", "tiles", "w", "scales", "bias", "consts"),
            ("out",),
        ),
        *(
            KernelSpec(name, "attention", _SDPA_INPUTS, ("out", "part"), row_contiguous=False)
            for name in ("sdpa_decode", "sdpa_decode_mma")  # the same interface, two algorithms
        ),
        KernelSpec("sdpa_combine", "attention", ("part", "sinks"), ("out",)),
        KernelSpec("norm_qkv_rope", "projections", ("x", "nw", "w", "b", "wl", "pos", "consts"), ("q", "kv")),
        KernelSpec("out_residual", "projections", ("o", "w", "b", "res"), ("y",)),
    )
}


_COMMENT = re.compile(r"[ \t]*//[^\n]*")


def _code_only(text: str) -> str:
    """The source without its `//` comments, indentation and blank lines. MLX copies header + body
    into a new string for every launch it records, and MLX-CUDA hashes that string again at every
    evaluation to find the compiled module (~140 launches a decode step), so the documentation and
    the layout stay in the files."""
    lines = (line.strip() for line in _COMMENT.sub("", text).splitlines())
    return "\n".join(line for line in lines if line) + "\n"


def _top_level_items(code: str) -> list[str]:
    """Split comment-free C++ into its top-level items: preprocessor lines, declarations ending in
    `;`, and definitions ending in a closing brace (string literals skipped: asm text has braces)."""
    items, start, depth, i, n = [], 0, 0, 0, len(code)
    while i < n:
        c = code[i]
        if c == '"':
            i += 1
            while i < n and code[i] != '"':
                i += 2 if code[i] == "\\" else 1
        elif c == "#" and depth == 0 and not code[start:i].strip():
            end = code.find("\n", i)
            end = n if end < 0 else end
            items.append(code[start:end])
            start = i = end
            continue
        elif c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                end = i + 1
                while end < n and code[end] in " \t":
                    end += 1
                end += end < n and code[end] == ";"
                items.append(code[start:end])
                start = i = end
                continue
        elif c == ";" and depth == 0:
            items.append(code[start : i + 1])
            start = i + 1
        i += 1
    items.append(code[start:])
    return [item.strip() for item in items if item.strip()]


_IDENT = re.compile(r"\b[A-Za-z_]\w*\b")


def _defined_names(item: str) -> set[str] | None:
    """The names a helper item defines (None: always kept - macros, typedefs, using)."""
    if item.startswith(("#", "typedef", "using")):
        return None
    struct = re.match(r"(?:template\s*<[^{;]*?>\s*)?struct\s+(\w+)", item)
    if struct:
        return {struct.group(1)}
    head = item.split("(", 1)[0]
    while re.search(r"<[^<>]*>", head):  # template parameter lists and arguments
        head = re.sub(r"<[^<>]*>", " ", head)
    names = _IDENT.findall(head)
    return {names[-1]} if names else None


def _used_helpers(helpers: str, body: str) -> str:
    """The helper items a kernel body reaches (directly or through other helpers), in file order.

    Why: MLX-CUDA hashes each kernel's whole source at every launch to find its compiled module
    (custom_kernel.cpp, ~170 launches a decode step), so a header of every helper for every kernel
    cost host time per token; each kernel now carries only what it calls."""
    items = _top_level_items(helpers)
    defines = [_defined_names(item) for item in items]
    need = set(_IDENT.findall(body))
    keep = [False] * len(items)
    changed = True
    while changed:
        changed = False
        for k, item in enumerate(items):
            if not keep[k] and (defines[k] is None or defines[k] & need):
                keep[k] = changed = True
                need |= set(_IDENT.findall(item))
    return "\n".join(item for item, kept in zip(items, keep) if kept) + "\n"


@functools.cache  # the files do not change in a process; ~10 ms a dialect, once per kernel otherwise
def kernel_sources(dialect: str) -> dict[str, tuple[str, str]]:
    """name -> (header, body) for every kernel of a dialect, as MLX will compile them: the body, and
    the helpers of the dialect's common header and of the kernel's file that the body uses."""
    common = _code_only(_source_text(dialect, _HEADER[dialect]))
    out = {}
    for file in sorted({s.file for s in SPECS.values()}):
        preamble, bodies = parse_source(_source_text(dialect, file + EXT[dialect]))
        helpers = common + _code_only(preamble)
        for name, body in bodies.items():
            code = _code_only(body)
            out[name] = (_code_only(_used_helpers(helpers, code)), code)
    return out
