"""The Metal kernels, compiled without a Mac.

Nobody on this project can run Metal (no Mac; the macOS CI workflow is the only place the kernels
run). What can be checked here is what a compiler checks: each kernel is assembled the way
mx.fast.metal_kernel assembles it (its header, a generated signature with the inputs' address spaces,
the attributes the body names, an explicit template instantiation) and compiled by clang (from the
`ziglang` package) against tests/metal_shim.h, a C++ stand-in for the Metal builtins the kernels use
in which device / constant / threadgroup are real clang address spaces. Syntax, names, overloads,
templates and address-space mismatches fail here as they would in Metal; behaviour is not tested.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from oss_mlx import kernels

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("ziglang") is None, reason="clang comes from the `ziglang` package (test extra)"
)

SHIM = Path(__file__).resolve().parent / "metal_shim.h"

# mx.fast.metal_kernel's names for dtypes (MLX's get_type_string).
MTYPE = {
    "bf16": "bfloat16_t",
    "f16": "float16_t",
    "f32": "float",
    "u32": "uint32_t",
    "u8": "uint8_t",
    "i32": "int32_t",
}
# The attributes MLX adds to the signature when the body names them (metal_kernel.cpp), with types.
ATTRIBUTES = {
    "simdgroup_index_in_threadgroup": "uint",
    "thread_index_in_simdgroup": "uint",
    "thread_index_in_threadgroup": "uint",
    "thread_position_in_grid": "uint3",
    "thread_position_in_threadgroup": "uint3",
    "threadgroup_position_in_grid": "uint3",
    "threadgroups_per_grid": "uint3",
    "threads_per_threadgroup": "uint3",
}
# name, inputs (dtype, "c" where the array has fewer than 8 elements: MLX passes it in `constant`),
# output dtypes, template arguments: every case of SPECS (the one table of the kernels' interfaces).
CASES = [
    (name, list(case.inputs), list(case.outputs), case.template)
    for name, spec in kernels.SPECS.items()
    for case in spec.cases
]


def translation_unit(name: str, ins: list[str], outs: list[str], template: dict) -> str:
    """The kernel as MLX's write_signature() builds it (minus MLX's own prelude: the shim)."""
    header, body = kernels.kernel_sources("metal")[name]
    spec = kernels.SPECS[name]
    # Threadgroup arrays are declared inside the kernel; C++ allows an address space on a static only.
    header = header.replace("#define OSS_SHARED threadgroup", "#define OSS_SHARED static threadgroup")
    body = re.sub(r"(?m)^(\s*)threadgroup\s", r"\1static threadgroup ", body)
    params, index = [], 0
    for arg, dtype in zip(spec.inputs, ins):
        space = "constant" if dtype.endswith("c") else "device"
        params.append(f"const {space} {MTYPE[dtype.rstrip('c')]}* {arg} [[buffer({index})]]")
        index += 1
        for extra, ctype in (("shape", "int"), ("strides", "int64_t")):
            if f"{arg}_{extra}" in body:
                params.append(f"const constant {ctype}* {arg}_{extra} [[buffer({index})]]")
                index += 1
    for arg, dtype in zip(spec.outputs, outs):
        params.append(f"device {MTYPE[dtype]}* {arg} [[buffer({index})]]")
        index += 1
    params += [f"{t} {attr} [[{attr}]]" for attr, t in ATTRIBUTES.items() if attr in body]
    formal = ", ".join(f"typename {k}" if isinstance(v, str) else f"int {k}" for k, v in template.items())
    actual = ", ".join(MTYPE[v] if isinstance(v, str) else str(v) for v in template.values())
    fn = f"custom_kernel_{name}"
    return (
        f"{header}\ntemplate <{formal}>\n[[kernel]] void {fn}(\n  "
        + ",\n  ".join(params)
        + f") {{\n{body}\n}}\n"
        # MLX writes `template [[host_name(..)]] [[kernel]] decltype(..) ..;`: C++ takes no attributes there
        + f"template decltype({fn}<{actual}>) {fn}<{actual}>;\n"
    )


def clang(source: str, tmp_path: Path) -> subprocess.CompletedProcess:
    path = tmp_path / "kernel.cpp"
    path.write_text(source)
    # zig's driver caches an object file, so compile one (-fsyntax-only leaves none, and zig fails)
    cmd = [sys.executable, "-m", "ziglang", "c++", "-std=c++17", "-c", "-o", str(path.with_suffix(".o"))]
    cmd += ["-Werror", "-Wno-unknown-attributes"]
    cmd += ["-Wno-unused-command-line-argument", "-include", str(SHIM), str(path)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_every_metal_kernel_has_a_case():
    assert {c[0] for c in CASES} == set(kernels.SPECS)


@pytest.mark.parametrize(
    "case", CASES, ids=[f"{c[0]}-{c[3].get('T', c[3].get('LT'))}-{i}" for i, c in enumerate(CASES)]
)
def test_metal_kernel_compiles(case, tmp_path):
    name, ins, outs, template = case
    result = clang(translation_unit(name, ins, outs, template), tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]


def test_the_check_catches_an_address_space_mistake(tmp_path):
    """A kernel that hands a threadgroup array to a helper taking device memory must not compile
    (Metal refuses it too): the shim keeps address spaces."""
    name, ins, outs, template = CASES[0]
    source = translation_unit(name, ins, outs, template)
    bad = source.replace(
        "if (warp == 0) top_k_softmax<E, K>(logits, lane, n, wts, ids);",
        "if (warp == 0) { float xv[8]; load8(logits, xv); }",
    )
    assert bad != source
    result = clang(bad, tmp_path)
    assert result.returncode != 0
    assert "no matching function for call to 'load8'" in result.stderr and "address_space(1)" in result.stderr


# Apple GPUs give a threadgroup at most 32 KB of threadgroup memory; a kernel declaring more fails
# to launch on a Mac (CUDA's 48 KB of static shared memory would not notice).
APPLE_THREADGROUP_BYTES = 32 * 1024
_DECL = re.compile(
    r"(?:threadgroup|OSS_SHARED)(?:\s+OSS_ALIGN16)?\s+(?:float|uint|atomic_uint)\s+\w+((?:\[[^\]]+\])+);"
)  # 4-byte elements: every threadgroup array the kernels declare


def threadgroup_bytes(name: str, template: dict) -> int:
    """Bytes of the threadgroup arrays a kernel declares, at these template values."""
    _header, body = kernels.kernel_sources("metal")[name]
    names = dict(template)
    for decl in re.findall(r"constexpr int ([^;]+);", body):  # e.g. NT = 512, NWARP = NT / 32
        for const, expr in (d.split("=", 1) for d in decl.split(",")):
            names[const.strip()] = eval(expr.replace("/", "//"), {}, names)
    total = 0
    for dims in _DECL.findall(body):
        n = 1
        for expr in re.findall(r"\[([^\]]+)\]", dims):
            n *= eval(expr, {}, names)  # the dims are template names and integer arithmetic
        total += 4 * n
    return total


def test_threadgroup_memory_fits_apple_gpus():
    """At the cases above, and at the largest shapes the dispatch predicates let through."""
    largest = [
        ("norm_route", dict(H=kernels.KERNEL_MAX_HIDDEN, E=256, K=8)),
        ("norm_qkv_rope", dict(H=kernels.KERNEL_MAX_HIDDEN, D=64, HQ=64, HKV=8, NC=1, PW=4)),
        ("sdpa_decode", dict(D=32, G=16, WINDOW=0)),
        ("sdpa_decode", dict(D=256, G=2, WINDOW=0)),
        ("down_combine", dict(H=2880, I=2880, K=4, NC=3, ROWS=16)),
        ("moe_group", dict(E=1024, BM=64)),  # moe_prefill_ok's largest E
    ]
    for name, template in [(c[0], c[3]) for c in CASES] + largest:
        used = threadgroup_bytes(name, template)
        assert 0 <= used <= APPLE_THREADGROUP_BYTES, (name, template, used)
    assert threadgroup_bytes("moe_group", dict(E=128, BM=64)) == 2 * 4 * 128  # counts and cursors
    assert threadgroup_bytes("norm_route", dict(H=2880, E=32)) == 4 * (32 + 16 + 2880)  # the parser counts
