"""The Metal kernels, compiled without a Mac.

Each kernel is assembled the way mx.fast.metal_kernel assembles it (tests/metal_emulator/source.py:
our header, MLX's generated signature with the inputs' address spaces, the attributes the body names,
the explicit template instantiation) and compiled by clang (from the `ziglang` package) against the
Metal emulator's shim (tests/metal_emulator/shim.h), in which device / constant / threadgroup are real
clang address spaces. Syntax, names, overloads, templates and address-space mismatches fail here as
they would in Metal, at the 20b's shapes and at small ones; the threadgroup memory a kernel declares
is measured from the compiled library. Behaviour: tests/test_kernels_emulated.py runs them.
"""

from __future__ import annotations

import mlx.core as mx
import pytest
from metal_emulator import build, launch, source, unavailable

from oss_mlx import kernels

pytestmark = pytest.mark.skipif(unavailable() is not None, reason=f"Metal emulator: {unavailable()}")

# mx.fast.metal_kernel's names for dtypes (MLX's get_type_string).
MTYPE = {
    "bf16": "bfloat16_t",
    "f16": "float16_t",
    "f32": "float",
    "u32": "uint32_t",
    "u8": "uint8_t",
    "i32": "int32_t",
}
# name, inputs (dtype, "c" where the array has fewer than 8 elements: MLX passes it in `constant`),
# output dtypes, template arguments: every case of SPECS (the one table of the kernels' interfaces).
CASES = [
    (name, list(case.inputs), list(case.outputs), case.template)
    for name, spec in kernels.SPECS.items()
    for case in spec.cases
]


def translation_unit(
    name: str, ins: list[str], outs: list[str], template: dict, body: str | None = None
) -> str:
    """The kernel's C++ translation unit as the emulator builds it from MLX's text (shim.h first)."""
    header, text = kernels.kernel_sources("metal")[name]
    spec = kernels.SPECS[name]
    k = source.Kernel(f"oss_{name}", spec.inputs, spec.outputs, text if body is None else body, header)
    inst = source.Instance(
        template=tuple((n, _template_value(v)) for n, v in template.items()),
        # "c": fewer than 8 elements (MLX passes them in constant memory)
        inputs=tuple(source.Input(MTYPE[d.rstrip("c")], 1, 1 if d.endswith("c") else 4096) for d in ins),
        output_types=tuple(MTYPE[d] for d in outs),
    )
    return source.cpp_source(k, inst)


def _template_value(v):
    return {"bf16": mx.bfloat16, "f16": mx.float16, "f32": mx.float32}[v] if isinstance(v, str) else v


def test_every_metal_kernel_has_a_case():
    assert {c[0] for c in CASES} == set(kernels.SPECS)


@pytest.mark.parametrize(
    "case", CASES, ids=[f"{c[0]}-{c[3].get('T', c[3].get('LT'))}-{i}" for i, c in enumerate(CASES)]
)
def test_metal_kernel_compiles(case):
    name, ins, outs, template = case
    build.library(translation_unit(name, ins, outs, template))


def test_the_check_catches_an_address_space_mistake():
    """A kernel that hands a threadgroup array to a helper taking device memory must not compile
    (Metal refuses it too): the shim keeps address spaces."""
    name, ins, outs, template = CASES[0]
    body = kernels.kernel_sources("metal")[name][1]
    bad = body.replace(
        "if (warp == 0) top_k_softmax<E, K>(logits, lane, n, wts, ids);",
        "if (warp == 0) { float xv[8]; load8(logits, xv); }",
    )
    assert bad != body
    errors = build.compile_errors(translation_unit(name, ins, outs, template, body=bad))
    assert errors is not None
    assert "no matching function for call to 'load8'" in errors and "address_space(1)" in errors


def threadgroup_bytes(name: str, template: dict, case: tuple | None = None) -> int:
    """Bytes of threadgroup memory the kernel declares at this case (default: the kernel's first, its
    template updated by `template`), measured from its compiled library."""
    name, ins, outs, base = case or next(c for c in CASES if c[0] == name)
    lib = launch.load(str(build.library(translation_unit(name, ins, outs, {**base, **template}))))
    return lib.oss_threadgroup_bytes()


def test_threadgroup_memory_fits_apple_gpus():
    """At the cases above, and at the largest shapes the dispatch predicates let through (Apple GPUs
    give a threadgroup 32 KB; CUDA's 48 KB of static shared memory would not notice)."""
    largest = [
        ("norm_route", dict(H=kernels.KERNEL_MAX_HIDDEN, E=256, K=8)),
        ("norm_qkv_rope", dict(H=kernels.KERNEL_MAX_HIDDEN, D=64, HQ=64, HKV=8, NC=30, PW=4)),
        ("sdpa_decode", dict(D=32, G=16, WINDOW=0)),
        ("sdpa_decode", dict(D=256, G=2, WINDOW=0)),
        ("down_combine", dict(H=2880, I=2880, K=4, NC=3, ROWS=16)),
        ("moe_group", dict(E=1024, BM=64)),  # moe_prefill_ok's largest E
    ]
    for case in CASES:
        assert 0 <= threadgroup_bytes(case[0], {}, case) <= launch.THREADGROUP_MEMORY, case
    for name, template in largest:
        assert 0 <= threadgroup_bytes(name, template) <= launch.THREADGROUP_MEMORY, (name, template)
    assert threadgroup_bytes("moe_group", dict(E=128, BM=64)) == 2 * 4 * 128  # counts and cursors
    assert threadgroup_bytes("norm_route", dict(H=2880, E=32)) == 4 * (32 + 16 + 2880)  # hs, logits, red
