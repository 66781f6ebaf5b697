"""Every custom kernel against its pure-MLX reference, on random inputs over many shapes.

The kernels run where MLX has a GPU backend: the CUDA twins on the project's GPU machine, the Metal
sources on Apple Silicon (the macOS CI workflow). On a CPU-only machine those tests skip with the
reason; the source and dispatch tests below run everywhere. Outputs are pre-filled with NaN before
every kernel launch (kernels.poison_outputs), so an element a kernel forgot to write fails the test.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import replace

# MLX-CUDA runs float32 matmuls in TF32 by default: the float32 references (router logits, attention
# projections) would then carry ~1e-3 errors. Read once, at the first matmul of the process.
os.environ.setdefault("MLX_ENABLE_TF32", "0")

import mlx.core as mx
import numpy as np
import pytest

from oss_mlx import kernel_selftest, kernels
from oss_mlx.attention import sdpa_with_sinks
from oss_mlx.cache import FullCache, WindowCache
from oss_mlx.config import ModelConfig
from oss_mlx.kernels import decode_attention, decode_moe, dispatch, prefill_moe, routing, sources
from oss_mlx.loader import CUDA_GATHER_QMM_ROWS, pad_down_rows, prepare_for_backend
from oss_mlx.moe import MLPBlock, clamped_swiglu, mxfp4_weights, route_reference

GPU = kernels.available_backend() != "reference" and mx.default_device() == mx.gpu
needs_gpu = pytest.mark.skipif(
    not GPU,
    reason=f"no GPU kernel backend here (MLX backend: {kernels.available_backend()}, device "
    f"{mx.default_device()}); the CUDA expansion runs on the GPU machine, the Metal one in macOS CI",
)


@pytest.fixture(autouse=True)
def _kernels_on(monkeypatch):
    monkeypatch.delenv(kernels.ENV, raising=False)
    with kernels.poison_outputs(float("nan")):
        yield


def _np(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32))


def rel_err(a: mx.array, b: mx.array) -> float:
    a, b = _np(a).astype(np.float64), _np(b).astype(np.float64)
    assert np.isfinite(a).all(), "kernel output has NaN/inf (an unwritten element?)"
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


TOL = {mx.float32: 2e-5, mx.bfloat16: 1.5e-2, mx.float16: 4e-3}


@contextlib.contextmanager
def recording_launches():
    """The names of the kernels launched inside, the kernels themselves real: this machine's
    dialect through kernels.emulated with a factory that wraps MLX's."""
    dialect = kernels.available_backend()
    # inside kernels.emulated (the Metal emulator's tests), the factory in use; else MLX's
    make = dispatch.RUNTIME.make_kernel or (
        mx.fast.metal_kernel if dialect == "metal" else mx.fast.cuda_kernel
    )
    launched = []

    def recording(**kw):
        kernel = make(**kw)

        def call(*args, **kwargs):
            launched.append(kw["name"].removeprefix("oss_"))
            return kernel(*args, **kwargs)

        return call

    with kernels.emulated(dialect, recording):
        yield launched


# ---- sources and dispatch (everywhere) ------------------------------------------------------------


@pytest.mark.parametrize("dialect", ["metal", "cuda"])
def test_every_kernel_has_a_source_in_both_dialects(dialect):
    texts = kernels.kernel_sources(dialect)
    assert set(texts) == set(kernels.SPECS), f"{dialect}: {sorted(texts)} vs {sorted(kernels.SPECS)}"
    for name, (header, body) in texts.items():
        assert body.strip(), name
        assert "//" not in header + body, f"{name}: comments travel to MLX with every launch"
        assert "$" not in header + body, f"{name}: a dialect word left unexpanded"
        for arg in (*kernels.SPECS[name].inputs, *kernels.SPECS[name].outputs):
            assert arg in body, f"{dialect} {name}: body never uses {arg!r}"


def test_every_case_matches_its_interface():
    """SPECS is the one table of the kernels' interfaces; the offline compile checks (clang for the
    Metal text, nvcc for the CUDA text) build its cases: one dtype per input and output, the
    template arguments in the spec's order, at least one case a kernel."""
    dtypes = {"bf16", "f16", "f32", "u32", "u8", "i32"}
    for name, spec in kernels.SPECS.items():
        assert spec.cases, name
        assert len(set(spec.inputs + spec.outputs)) == len(spec.inputs) + len(spec.outputs), name
        for case in spec.cases:
            assert len(case.inputs) == len(spec.inputs) and len(case.outputs) == len(spec.outputs), name
            assert {d.removesuffix("c") for d in case.inputs} | set(case.outputs) <= dtypes, (name, case)
            assert tuple(case.template) == spec.template, (name, case.template, spec.template)


def test_the_offline_compile_check_covers_every_cuda_kernel():
    """benchmarks/compile_cuda_kernels.py (nvcc, no GPU) builds each case of SPECS as MLX does."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "compile_cuda_kernels.py"
    spec = importlib.util.spec_from_file_location("compile_cuda_kernels", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    cases = list(tool.cases())
    assert {name for name, _ in cases} == set(kernels.SPECS)
    assert len(cases) == sum(len(s.cases) for s in kernels.SPECS.values())
    for name, case in cases:
        func, unit = tool.translation_unit(name, case)
        assert func.startswith(f"custom_kernel_oss_{name}_")  # MLX's name for the specialization
        assert f"__global__ void {func}(" in unit and "$" not in unit


def test_comments_are_dropped_code_is_kept():
    text = "#define A 1  // why\n\n  // only a comment\n  int x = A; // trailing\n"
    assert sources._code_only(text) == "#define A 1\nint x = A;\n"


def test_each_kernel_carries_only_the_helpers_it_calls():
    """MLX-CUDA hashes a kernel's whole source at every launch, so each kernel gets the helpers its
    body reaches (transitively), not the whole header; macros and typedefs always travel."""
    code = sources._code_only(
        "#define OSS_DEV inline\ntypedef unsigned int uint;\n"
        "OSS_DEV float sq(float x) { return x * x; }\n"
        "template <typename T> OSS_DEV T twice(T x) { return sq(x) + sq(x); }\n"
        "template <> OSS_DEV float twice<float>(float x) { return 2 * x; }\n"
        'struct Asm { static OSS_DEV void run() { asm volatile("{ x }" ::); } };\n'
        "OSS_DEV float unused(float x) { return x; }\n"
    )
    items = sources._top_level_items(code)
    assert len(items) == 7  # the braces inside the asm string do not split or join items
    kept = sources._used_helpers(code, "y = twice<T>(v); Asm::run();")
    assert "OSS_DEV float sq(" in kept and kept.count("twice") == 2 and "struct Asm" in kept
    assert "unused" not in kept and "#define OSS_DEV" in kept and "typedef unsigned int uint;" in kept
    for dialect in ("cuda", "metal"):
        texts = kernels.kernel_sources(dialect)
        out_header = texts["out_residual"][0]
        assert "dot2_rows" in out_header and "load8" in out_header
        assert "merge_warps" not in out_header and "dot8_fp4" not in out_header
        mma_header = texts["sdpa_decode_mma"][0]  # the shared family helpers, then the dialect's
        assert "merge_warps" in mma_header and "dot2_rows" not in mma_header
        assert mma_header.index("merge_warps") < mma_header.index("mma_keys")


def test_a_kernel_section_pasted_twice_is_refused():
    text = "// helpers\n// @@kernel a\n  int x = 1;\n// @@kernel a\n  int y = 2;\n"
    with pytest.raises(ValueError, match="appears twice"):
        sources.parse_source(text)
    preamble, bodies = sources.parse_source(text.replace("kernel a\n  int y", "kernel b\n  int y"))
    assert preamble.strip() == "// helpers" and set(bodies) == {"a", "b"}


def test_dialect_words_are_replaced_as_text():
    """A shared source's `$words` become each dialect's spelling; what MLX scans a Metal body for
    (its attributes) is in the text itself; CUDA's spellings are renamed for Metal."""
    src = (
        "const int tid = $tid.x, lane = $lane(tid), w = $warp($tid.x);\n"
        "const $device float* p = part + ($group.y * (long long)n);\n"
        "#pragma unroll\n"
        "for (;;) acc = fmaf(a, $atomic_add(cnt[ids[s]], 1u), fmaxf(b, c));\n"
    )
    assert sources.expand(src, "cuda") == (
        "const int tid = threadIdx.x, lane = tid & 31, w = threadIdx.x >> 5;\n"
        "const float* p = part + (blockIdx.y * (long long)n);\n"
        "#pragma unroll\n"
        "for (;;) acc = fmaf(a, atomicAdd(&cnt[ids[s]], 1u), fmaxf(b, c));\n"
    )
    assert sources.expand(src, "metal") == (
        "const int tid = thread_position_in_threadgroup.x, lane = thread_index_in_simdgroup, "
        "w = simdgroup_index_in_threadgroup;\n"
        "const device float* p = part + (threadgroup_position_in_grid.y * (long)n);\n"
        "for (;;) acc = fma(a, atomic_fetch_add_explicit(&cnt[ids[s]], 1u, memory_order_relaxed), "
        "max(b, c));\n"
    )
    with pytest.raises(ValueError, match=r"unknown dialect word \$lanes"):
        sources.expand("x = $lanes;", "cuda")
    with pytest.raises(ValueError, match=r"\$lane takes arguments"):
        sources.expand("x = $lane;", "metal")


def test_one_source_per_simt_kernel():
    """Every kernel but the five matrix-unit ones is written once, in kernels_shared/; those four are
    written per dialect; no kernel is defined twice (kernel_sources refuses that)."""
    shared, per_dialect = set(), {d: set() for d in sources.DIALECTS}
    for family in {s.family for s in kernels.SPECS.values()}:
        for dialect in sources.DIALECTS:
            for where, _, bodies in sources._family_code(dialect, family):
                (shared if where.startswith("kernels_shared/") else per_dialect[dialect]).update(bodies)
        for spec in kernels.SPECS.values():
            assert spec.family in {"routing", "decode_moe", "prefill_moe", "decode_attention"}, spec
    matrix_units = {"sdpa_decode_mma", "moe_gemm", "gate_up_mma", "down_mma", "down_mma_combine"}
    assert per_dialect["metal"] == per_dialect["cuda"] == matrix_units
    assert shared == set(kernels.SPECS) - matrix_units
    metal = kernels.kernel_sources("metal")
    for name in shared:  # CUDA's names are gone from the Metal expansion
        header, body = metal[name]
        for cuda_word in ("threadIdx", "blockIdx", "gridDim", "fmaf", "long long", "#pragma unroll", "__"):
            assert cuda_word not in header + body, (name, cuda_word)


def test_reference_is_forced_by_the_environment(monkeypatch, fake_factory):
    """OSS_MLX_KERNELS=reference (or use_backend) wins over a GPU backend: no kernel launches, the
    model's reference path runs."""
    launches, make = fake_factory
    model = _tiny_model(mx.bfloat16)
    cache = model.make_cache()
    mx.eval(model(mx.array([[1, 2, 3]]), cache=cache))
    x = mx.random.normal((3, 128)).astype(mx.bfloat16)
    router = model.blocks[0].mlp.router
    monkeypatch.setenv(kernels.ENV, "reference")
    with kernels.emulated("cuda", make):
        assert kernels.backend() == "reference" and kernels.available_backend() == "cuda"
        got = router(x)
        mx.eval(model(mx.array([[4]]), cache=cache))
        assert launches == []
        monkeypatch.setenv(kernels.ENV, "auto")
        assert kernels.backend() == "cuda"
        with kernels.use_backend("reference"):
            assert kernels.backend() == "reference"
            mx.eval(model(mx.array([[5]]), cache=cache))
            assert launches == []
        mx.eval(model(mx.array([[6]]), cache=cache))
        assert launches  # now the kernels run
    ref = route_reference(x, router.weight, router.bias, router.top_k)
    assert all(mx.array_equal(a, r).item() for a, r in zip(got, ref))
    assert kernels.backend() == kernels.available_backend()


def test_an_unknown_kernels_value_is_warned_about_once(monkeypatch, recwarn):
    """OSS_MLX_KERNELS=metl: the reference path runs, and one warning names the accepted values."""
    import warnings

    monkeypatch.setenv(kernels.ENV, "metl-typo")
    warnings.simplefilter("always")
    assert kernels.backend() == "reference" and kernels.backend() == "reference"
    said = [str(w.message) for w in recwarn if "OSS_MLX_KERNELS" in str(w.message)]
    assert said == ["OSS_MLX_KERNELS='metl-typo' is not one of auto, metal, cuda, reference (or off): the "
                    "reference path runs"]  # fmt: skip
    monkeypatch.setenv(kernels.ENV, "cuda" if kernels.available_backend() != "cuda" else "metal")
    assert kernels.backend() == "reference" and len(recwarn) == len(said)  # another machine's: no warning


def test_emulated_stands_in_for_the_machine(fake_factory):
    """kernels.emulated(dialect, make_kernel): the dialect is this machine's, the device counts as
    the GPU, kernels come from make_kernel with the text of that dialect, the compiled-kernel cache
    is empty on entry and on exit, and everything is as before afterwards."""
    launches, make = fake_factory
    before = (kernels.available_backend(), kernels.backend(), dispatch.on_gpu())
    dispatch.RUNTIME.compiled[("metal", "route")] = object()
    x, w, b = mx.zeros((2, 64)), mx.zeros((8, 64)), mx.zeros((8,))
    with kernels.emulated("metal", make):
        assert not dispatch.RUNTIME.compiled
        assert kernels.available_backend() == kernels.backend() == "metal" and dispatch.on_gpu()
        assert routing.route_ok(x, w, 2)
        routing.route(x, w, b, 2)
        assert [n for n, *_ in launches] == ["route"] and dispatch.RUNTIME.compiled
        assert make.built["route"]["source"] == kernels.kernel_sources("metal")["route"][1]
    assert not dispatch.RUNTIME.compiled
    assert (kernels.available_backend(), kernels.backend(), dispatch.on_gpu()) == before
    with pytest.raises(ValueError, match="metal or cuda"):
        with kernels.emulated("reference", make):
            pass


def test_cpu_stream_takes_the_reference(monkeypatch, fake_factory):
    """Work placed on the CPU stream never takes a GPU kernel, even where a GPU kernel backend is."""
    monkeypatch.setattr(dispatch.RUNTIME, "machine", "cuda")
    q, kv = mx.random.normal((1, 4, 1, 16)), mx.random.normal((2, 1, 2, 9, 16))
    with mx.stream(mx.cpu):
        assert not decode_attention.sdpa_decode_ok(q, kv)
    with kernels.emulated("cuda", fake_factory[1]):
        assert decode_attention.sdpa_decode_ok(q, kv)  # the shapes themselves are the kernel's


# ---- routing --------------------------------------------------------------------------------------


@needs_gpu
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("E,k", [(4, 1), (4, 4), (32, 4), (32, 2), (128, 4), (128, 3)])
@pytest.mark.parametrize("N,H", [(3, 2880), (17, 96)])
def test_route(dtype, E, k, N, H):
    x = mx.random.normal((N, H)).astype(dtype)
    w = (mx.random.normal((E, H)) / math.sqrt(H)).astype(dtype)
    b = (0.1 * mx.random.normal((E,))).astype(dtype)
    assert routing.route_ok(x, w, k)
    wts, ids = routing.route(x, w, b, k)
    if dtype == mx.float32:  # float64 math (MLX's GPU float32 matmul may run in TF32)
        logits = _np(x).astype(np.float64) @ _np(w).astype(np.float64).T + _np(b).astype(np.float64)
        slack = 1e-5
    else:  # the reference's bf16 logits; near-ties there depend on summation order: 2 ulps
        logits = _np(mx.addmm(b, x, w.T))
        slack = 2 * 2.0**-8
    ids_np, wts_np = np.array(ids), np.array(wts)
    assert ids.dtype == mx.uint32 and wts.dtype == mx.float32 and ids.shape == (N, k)
    for n in range(N):
        assert len(set(ids_np[n])) == k
        kth = np.sort(logits[n])[-k]
        chosen = logits[n][ids_np[n]]
        assert (chosen >= kth - slack * max(1.0, abs(kth)) - 1e-6).all(), (n, chosen, kth)
        want = np.exp(chosen - chosen.max())
        # bf16: the kernel's and the reference's logits may round 1 ulp apart (2^-8 relative)
        rtol = 1e-4 if dtype == mx.float32 else 3e-2
        np.testing.assert_allclose(wts_np[n], want / want.sum(), rtol=rtol, atol=1e-5)


# ---- experts --------------------------------------------------------------------------------------


def _config(E: int, k: int, H: int, I: int) -> ModelConfig:
    return ModelConfig(
        num_layers=1,
        num_experts=E,
        experts_per_token=k,
        vocab_size=16,
        hidden_size=H,
        intermediate_size=I,
        head_dim=16,
        num_attention_heads=2,
        num_key_value_heads=1,
    )


def random_mlp(E: int, k: int, H: int, I: int, dtype) -> MLPBlock:
    """An MoE block with random MXFP4 experts (random codes, e8m0 scales near the fan-in centre)."""
    from oss_mlx.testing.random_model import random_codes, random_scales

    block = MLPBlock(_config(E, k, H, I))
    ex = block.experts
    ex.gate_up_weight = random_codes(ex.gate_up_weight.shape)
    ex.gate_up_scales = random_scales(ex.gate_up_scales.shape, H)
    ex.down_weight = random_codes(ex.down_weight.shape)
    ex.down_scales = random_scales(ex.down_scales.shape, I)
    ex.gate_up_bias = (0.05 * mx.random.normal(ex.gate_up_bias.shape)).astype(dtype)
    ex.down_bias = (0.05 * mx.random.normal(ex.down_bias.shape)).astype(dtype)
    block.router.weight = (mx.random.normal((E, H)) / math.sqrt(H)).astype(dtype)
    block.router.bias = (0.1 * mx.random.normal((E,))).astype(dtype)
    block.norm.weight = (1 + 0.05 * mx.random.normal((H,))).astype(dtype)
    mx.eval(block.parameters())
    return block


def moe_reference(block: MLPBlock, x: mx.array, weights: mx.array, indices: mx.array) -> mx.array:
    """The model's reference path for the MoE sum + residual, given the routing."""
    with kernels.use_backend("reference"):
        h = block.norm(x)
        y = block.experts(h, indices)
        y = (y * weights[..., None].astype(y.dtype)).sum(axis=-2)
        return x + y


MOE_SHAPES = [
    # E, k, H, I, N
    (4, 1, 64, 64, 1),
    (4, 2, 64, 96, 3),
    (8, 4, 96, 64, 2),
    (32, 4, 2880, 2880, 1),
    (32, 3, 2880, 2880, 5),
    (128, 4, 2880, 2880, 1),
    (128, 4, 1088, 1120, 7),  # groups per lane not a multiple of 32
]


def moe_decode_inputs(dtype, E, k, H, I, N):
    """(block, x, its normed rows, indices, weights, the MXFP4 experts) for a decode MoE of N tokens;
    routing drawn independently of the kernel: k distinct experts per token, random weights."""
    block = random_mlp(E, k, H, I, dtype)
    x = mx.random.normal((N, H)).astype(dtype)
    indices = mx.argsort(mx.random.uniform(shape=(N, E)), axis=-1)[:, :k].astype(mx.uint32)
    weights = mx.softmax(mx.random.normal((N, k)), axis=-1)
    return block, x, block.norm(x), indices, weights, mxfp4_weights(block.experts)


@needs_gpu
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("E,k,H,I,N", MOE_SHAPES)
def test_moe_decode_matches_reference(dtype, E, k, H, I, N):
    block, x, h, indices, weights, experts = moe_decode_inputs(dtype, E, k, H, I, N)
    assert decode_moe.moe_decode_ok(experts, h, indices)
    out = decode_moe.moe_decode(experts, h, weights, indices, x)
    assert out.shape == (N, H) and out.dtype == dtype
    ref = moe_reference(block, x, weights, indices)
    assert rel_err(out, ref) < TOL[dtype], rel_err(out, ref)


def _prefill_indices(N: int, E: int, k: int, used: int) -> mx.array:
    """k distinct experts per token drawn from the first `used` of E (the rest get no rows), skewed so
    the experts' row counts differ."""
    scores = mx.random.uniform(shape=(N, E)) + mx.concatenate(
        [mx.linspace(1, 0, used), -10 * mx.ones((E - used,))]
    )
    return mx.argsort(-scores, axis=-1)[:, :k].astype(mx.uint32)


@needs_gpu
@pytest.mark.parametrize(
    "E,k,N,used", [(4, 2, 40, 3), (32, 4, 700, 32), (128, 4, 517, 100), (8, 1, 65, 8), (16, 3, 101, 12)]
)
def test_moe_group_groups_rows_by_expert(E, k, N, used):
    ids = _prefill_indices(N, E, k, used).reshape(-1)
    BM = prefill_moe.MOE_GEMM_ROWS
    shapes = [(N * k,), (E + 1,), (E + 1,)]
    grid = (1024, 1, 1)
    perm, offsets, tiles = dispatch.launch(
        "moe_group", [ids], [("E", E), ("BM", BM)], grid, grid, shapes, [mx.uint32] * 3
    )
    ids, perm, offsets, tiles = (np.array(a).astype(np.int64) for a in (ids, perm, offsets, tiles))
    counts = np.bincount(ids, minlength=E)
    assert sorted(perm) == list(range(N * k))  # a permutation of the rows
    assert (np.diff(ids[perm]) >= 0).all()  # grouped by expert, in expert order
    assert (offsets == np.concatenate([[0], np.cumsum(counts)])).all()
    assert (tiles == np.concatenate([[0], np.cumsum(-(-counts // BM))])).all()


@needs_gpu
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
@pytest.mark.parametrize(
    "E,k,H,I,N,used",
    [
        (4, 2, 64, 96, 40, 3),  # an expert with no rows; partial row and column tiles
        (8, 1, 96, 64, 65, 8),
        (16, 3, 64, 96, 50, 12),  # k = 3: rows of a token three apart
        (32, 4, 2880, 2880, 517, 32),  # gpt-oss-20b's experts
        (128, 4, 2880, 2880, 300, 90),  # gpt-oss-120b's: many experts with a row or two, some none
    ],
)
def test_moe_prefill_matches_reference(dtype, E, k, H, I, N, used):
    """The prefill experts (moe_group, then moe_gemm for gate_up + SwiGLU and for down) against the
    reference's sorted gather_qmm path, each selected expert's output [N, k, H]."""
    block = random_mlp(E, k, H, I, dtype)
    x = mx.random.normal((N, H)).astype(dtype)
    indices = _prefill_indices(N, E, k, used)
    experts = mxfp4_weights(block.experts)
    assert prefill_moe.moe_prefill_ok(experts, x, indices)
    got = prefill_moe.moe_prefill(experts, x, indices)
    with kernels.use_backend("reference"):
        want = block.experts(x, indices)
    assert got.shape == want.shape == (N, k, H) and got.dtype == dtype
    assert rel_err(got, want) < TOL[dtype], rel_err(got, want)
    pad_down_rows(block.experts, CUDA_GATHER_QMM_ROWS)  # as the loader does on CUDA
    assert rel_err(prefill_moe.moe_prefill(mxfp4_weights(block.experts), x, indices), want) < TOL[dtype]


@needs_gpu
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("E,k,H,I,N", MOE_SHAPES[:4])
def test_gate_up_swiglu_matches_dequantized_math(dtype, E, k, H, I, N):
    """The first kernel alone, against float64 math on mx.dequantize'd weights."""
    block = random_mlp(E, k, H, I, dtype)
    ex = block.experts
    x = mx.random.normal((N, H)).astype(dtype)
    indices = mx.argsort(mx.random.uniform(shape=(N, E)), axis=-1)[:, :k].astype(mx.uint32)
    (h,) = dispatch.launch(
        "gate_up_swiglu",
        [
            x,
            indices.reshape(-1),
            ex.gate_up_weight,
            ex.gate_up_scales,
            ex.gate_up_bias,
            dispatch.const(ex.alpha, ex.limit),
        ],
        [("T", dtype), ("H", H), ("I", I), ("K", k), ("NC", -(-H // 1024)), ("COLS", 2)],
        (128 * N * k, -(-I // 8), 1),
        (128, 1, 1),
        [(N * k, I)],
        [dtype],
    )
    xs = _np(x).astype(np.float64)
    b = _np(ex.gate_up_bias).astype(np.float64)
    idx = np.array(indices)
    ref = np.zeros((N * k, I))
    for n in range(N):
        for j in range(k):
            e = int(idx[n, j])
            w = mx.dequantize(
                ex.gate_up_weight[e], ex.gate_up_scales[e], None, group_size=32, bits=4, mode="mxfp4"
            )
            gu = np.array(w.astype(mx.float32), np.float64) @ xs[n] + b[e]
            ref[n * k + j] = np.array(clamped_swiglu(mx.array(gu.astype(np.float32)), ex.alpha, ex.limit))
    assert rel_err(h, mx.array(ref.astype(np.float32))) < TOL[dtype]


@needs_gpu
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("E,k,H,I,N", [MOE_SHAPES[0], MOE_SHAPES[2], MOE_SHAPES[4], MOE_SHAPES[5]])
def test_mlp_block_fused_matches_reference(dtype, E, k, H, I, N):
    """norm_route + gate_up_swiglu + down_combine (the decode MoE block) vs the reference block."""
    block = random_mlp(E, k, H, I, dtype)
    x = (3 * mx.random.normal((N, H))).astype(dtype)
    router, experts = block.router, mxfp4_weights(block.experts)
    assert decode_moe.moe_block_ok(x, router.weight, k, experts)
    fused = decode_moe.moe_block(x, block.norm.weight, block.norm.eps, router.weight, router.bias, k, experts)
    assert fused.shape == x.shape
    with kernels.use_backend("reference"):
        ref = block(x[None])[0]
    # near-tie routing in bf16 may pick another expert for a token: compare token by token and
    # allow at most one such token
    errs = [rel_err(fused[n], ref[n]) for n in range(N)]
    tol = 1e-4 if dtype == mx.float32 else TOL[dtype]  # float32: the routing weights' own rounding
    bad = [e for e in errs if e >= tol]
    assert len(bad) <= (0 if dtype == mx.float32 else 1), errs


@pytest.mark.parametrize("N", [1, 3, 40])
def test_padded_down_rows_change_nothing(N):
    """The loader pads the down projection's rows for MLX-CUDA's tensor-core gather_qmm: the
    block's output must not change (zero rows, cut off) on the decode kernels (GPU), the token-order
    and the expert-sorted reference paths (N * k >= 64). Bit-identical, except where the padding
    moves a GPU's sorted gather_qmm to another kernel (another summation order: bf16 tolerance)."""
    block = random_mlp(8, 4, 96, 64, mx.bfloat16)
    x = (3 * mx.random.normal((1, N, 96))).astype(mx.bfloat16)
    before = block(x)
    mx.eval(before)
    pad_down_rows(block.experts, 128)
    assert block.experts.down_weight.shape[1] == 128 and block.experts.down_scales.shape[1] == 128
    after = block(x)
    assert after.shape == before.shape
    if GPU and N * 4 >= 64:
        assert rel_err(after, before) < TOL[mx.bfloat16]
    else:
        assert mx.array_equal(after, before).item()


# ---- attention ------------------------------------------------------------------------------------


def sdpa_kernel(q, k, v, sinks, scale, window=None, kv=None, pos=None) -> mx.array:
    """sdpa_decode for q [B, Hq, 1, D] over k, v [B, Hkv, S, D] (stacked into the caches' joint
    layout) or a joint buffer kv, at position pos (default: the last key) -> [B, Hq, 1, D]."""
    kv = mx.stack([k, v]) if kv is None else kv
    assert decode_attention.sdpa_decode_ok(q, kv)
    B, Hq, _, D = q.shape
    pos = kv.shape[3] - 1 if pos is None else pos
    out = decode_attention.sdpa_decode(mx.contiguous(q.reshape(B, Hq, D)), kv, sinks, scale, window, pos)
    return out.reshape(B, Hq, 1, D)


def sdpa_math(q, k, v, sinks, scale, window=None) -> mx.array:
    """Float64 numpy: softmax over [q.k * scale, sink] per head (GQA), the last `window` keys."""
    q, k, v = (_np(a).astype(np.float64) for a in (q, k, v))
    s = _np(sinks).astype(np.float64)
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = Hq // Hkv
    lo = max(0, S - window) if window else 0
    out = np.zeros((B, Hq, T, D))
    for b in range(B):
        for h in range(Hq):
            sc = k[b, h // G, lo:] @ q[b, h, 0] * scale
            m = max(sc.max(), s[h])
            p = np.exp(sc - m)
            out[b, h, 0] = p @ v[b, h // G, lo:] / (p.sum() + np.exp(s[h] - m))
    return mx.array(out.astype(np.float32))


ATTN_SHAPES = [
    # B, Hkv, G, D, S
    (1, 8, 8, 64, 1),
    (1, 8, 8, 64, 7),
    (1, 8, 8, 64, 128),
    (1, 8, 8, 64, 300),
    (1, 8, 8, 64, 5000),
    (2, 2, 2, 16, 33),
    (2, 1, 4, 128, 777),
    (1, 4, 1, 32, 2049),
    (1, 4, 16, 32, 260),
    (1, 3, 5, 32, 1000),  # odd G; 8 key groups in P.V
    # more for sdpa_decode_mma (64-dim heads, G <= 8): batches, odd G, ragged tiles
    (2, 2, 4, 64, 33),
    (1, 3, 5, 64, 1000),
    (1, 1, 1, 64, 2049),
    (3, 4, 8, 64, 131),
]


@needs_gpu
@pytest.mark.parametrize("mma", [True, False], ids=["mma", "simt"])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
@pytest.mark.parametrize("B,Hkv,G,D,S", ATTN_SHAPES)
def test_sdpa_decode(monkeypatch, mma, dtype, B, Hkv, G, D, S):
    """Both attention kernels: sdpa_decode_mma (matrix units) where its shapes apply, and the SIMT
    sdpa_decode, which takes every shape (SDPA_MMA off)."""
    if mma and not decode_attention.sdpa_mma_ok(dtype, D, G):
        pytest.skip("sdpa_decode_mma takes 16-bit, 64-dim heads, G <= 8")
    monkeypatch.setattr(decode_attention, "SDPA_MMA", mma)
    assert kernels.backend() != "reference"
    q = mx.random.normal((B, Hkv * G, 1, D)).astype(dtype)
    k = mx.random.normal((B, Hkv, S, D)).astype(dtype)
    v = mx.random.normal((B, Hkv, S, D)).astype(dtype)
    sinks = mx.random.normal((Hkv * G,)).astype(dtype)
    scale = 1 / math.sqrt(D)
    with recording_launches() as launched:
        out = sdpa_kernel(q, k, v, sinks, scale)
        mx.eval(out)
    assert launched[0] == ("sdpa_decode_mma" if mma else "sdpa_decode")
    assert out.shape == q.shape and out.dtype == dtype
    assert rel_err(out, sdpa_math(q, k, v, sinks, scale)) < TOL[dtype]
    assert rel_err(out, sdpa_with_sinks(q, k, v, sinks, scale, None)) < TOL[dtype]


@needs_gpu
@pytest.mark.parametrize("S,window", [(300, 128), (128, 128), (5, 128), (4000, 1000)])
def test_sdpa_decode_window(S, window):
    q = mx.random.normal((1, 16, 1, 64)).astype(mx.bfloat16)
    k = mx.random.normal((1, 2, S, 64)).astype(mx.bfloat16)
    v = mx.random.normal((1, 2, S, 64)).astype(mx.bfloat16)
    sinks = mx.random.normal((16,))
    out = sdpa_kernel(q, k, v, sinks, 0.125, window=window)
    assert rel_err(out, sdpa_math(q, k, v, sinks, 0.125, window)) < TOL[mx.bfloat16]


@needs_gpu
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("prompt", [1, 5, 127, 300, 2100])
def test_sdpa_decode_reads_the_caches_in_place(dtype, prompt):
    """The kernels read a cache's joint buffer as a decode step hands it over (batch_cache.py
    `state`): a full layer's buffer with unwritten slots past the position, a window layer's ring in
    slot order; against the keys and values in position order."""
    from oss_mlx.attention import _write_row

    Hkv, G, D, window = 2, 4, 64, 128
    for cache in (FullCache(), WindowCache(window)):
        keys = mx.random.normal((1, Hkv, prompt, D)).astype(dtype)
        values = (0.5 * keys).astype(dtype)
        cache.update_and_fetch(keys, values)
        w = window if isinstance(cache, WindowCache) else None
        batch = one_layer_batch(cache, Hkv, D, dtype)
        for _ in range(3):
            q = mx.random.normal((1, Hkv * G, 1, D)).astype(dtype)
            row = mx.random.normal((2, 1, Hkv, 1, D)).astype(dtype)
            pos = batch.positions()
            kv = _write_row(batch.state()[0], row, kernels.ring_slots(pos, window) if w else pos)
            batch.commit([kv])
            keys, values = mx.concatenate([keys, row[0]], axis=2), mx.concatenate([values, row[1]], axis=2)
            sinks = mx.random.normal((Hkv * G,))
            out = sdpa_kernel(q, None, None, sinks, 0.125, w, kv=kv, pos=pos)
            ref = sdpa_math(q, keys, values, sinks, 0.125, window=w)
            assert rel_err(out, ref) < TOL[dtype], (type(cache).__name__, prompt)


def one_layer_batch(cache, kv_heads: int, head_dim: int, dtype):
    """A decode batch of one layer holding `cache` (a FullCache or WindowCache) as its only row."""
    from oss_mlx.batch_cache import BatchCache
    from oss_mlx.cache import ModelCache

    batch = BatchCache([getattr(cache, "window", None)], kv_heads, head_dim, dtype)
    batch.join(0, ModelCache([cache]))
    return batch


# ---- attention projections (decode) ---------------------------------------------------------------


def random_attention(H: int, D: int, hq: int, hkv: int, dtype, window: int | None = None):
    """An attention block (full, or sliding with `window`) with random weights of realistic scale."""
    from oss_mlx.attention import AttentionBlock

    config = ModelConfig(
        num_layers=2,
        num_experts=4,
        experts_per_token=2,
        vocab_size=16,
        hidden_size=H,
        intermediate_size=32,
        head_dim=D,
        num_attention_heads=hq,
        num_key_value_heads=hkv,
        sliding_window=window or 128,
    )
    block = AttentionBlock(config, layer=0 if window else 1)
    block.norm.weight = (1 + 0.05 * mx.random.normal((H,))).astype(dtype)
    block.qkv.weight = (mx.random.normal(block.qkv.weight.shape) / math.sqrt(H)).astype(dtype)
    block.qkv.bias = (0.1 * mx.random.normal(block.qkv.bias.shape)).astype(dtype)
    block.out.weight = (mx.random.normal(block.out.weight.shape) / math.sqrt(hq * D)).astype(dtype)
    block.out.bias = (0.1 * mx.random.normal(block.out.bias.shape)).astype(dtype)
    block.sinks = mx.random.normal((hq,)).astype(dtype)
    mx.eval(block.parameters())
    return block


PROJ_SHAPES = [
    # H, D, hq, hkv, B
    (2880, 64, 64, 8, 1),  # gpt-oss
    (128, 64, 8, 2, 1),
    (224, 32, 4, 4, 2),  # 28 chunks of 8: lanes past the end
    (96, 16, 6, 2, 3),
]


@needs_gpu
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("H,D,hq,hkv,B", PROJ_SHAPES)
@pytest.mark.parametrize("offset", [0, 37, 30000])
def test_norm_qkv_rope_matches_reference(dtype, H, D, hq, hkv, B, offset):
    block = random_attention(H, D, hq, hkv, dtype)
    x = (3 * mx.random.normal((B, 1, H))).astype(dtype)
    w = block.decode_weights()
    assert decode_attention.attention_decode_ok(w, x)
    q, kv = decode_attention.norm_qkv_rope(w, x, offset)
    assert q.shape == (B, hq, D) and kv.shape == (2, B, hkv, 1, D)  # the caches' joint layout
    k, v = kv[0, ...], kv[1, ...]
    qkv = block.qkv(block.norm(x))
    rq = qkv[..., : hq * D].reshape(B, 1, hq, D).transpose(0, 2, 1, 3)
    rk = qkv[..., hq * D : (hq + hkv) * D].reshape(B, 1, hkv, D).transpose(0, 2, 1, 3)
    rv = qkv[..., (hq + hkv) * D :].reshape(B, 1, hkv, D).transpose(0, 2, 1, 3)
    rq, rk = block.rope(rq, offset), block.rope(rk, offset)
    # float32 angles of ~30000 rad carry ~2e-3 rad of their own rounding in any implementation
    tol = TOL[dtype] if dtype != mx.float32 else (2e-5 if offset < 1000 else 3e-3)
    assert rel_err(q, rq[:, :, 0]) < tol
    assert rel_err(k, rk) < tol
    assert rel_err(v, rv) < TOL[dtype]


@needs_gpu
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("H,D,hq,hkv,B", PROJ_SHAPES)
def test_out_residual_matches_reference(dtype, H, D, hq, hkv, B):
    block = random_attention(H, D, hq, hkv, dtype)
    x = (3 * mx.random.normal((B, 1, H))).astype(dtype)
    o = mx.random.normal((B, 1, hq * D)).astype(dtype)
    y = decode_attention.out_residual(o, block.out.weight, block.out.bias, x)
    assert y.shape == x.shape and y.dtype == dtype
    assert rel_err(y, x + block.out(o)) < TOL[dtype]


@needs_gpu
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("window", [None, 16])
@pytest.mark.parametrize("prompt", [1, 9, 40])
def test_attention_block_decode_matches_reference(dtype, window, prompt):
    """The block's decode step (3 kernels around the cache's scatter, on the cache's joint buffer)
    vs its reference path (the plain forward on the caches' own update), each on its own cache filled
    by the same prompt, over several steps."""
    from oss_mlx.attention import attention_mask

    H, D, hq, hkv = 256, 64, 8, 2
    block = random_attention(H, D, hq, hkv, dtype, window)
    caches = [WindowCache(window) if window else FullCache() for _ in range(2)]
    x = (3 * mx.random.normal((1, prompt, H))).astype(dtype)
    with kernels.use_backend("reference"):
        for c in caches:
            mask = attention_mask(prompt, 0, prompt, window)
            mx.eval(block(x, mask, c))
    batch = one_layer_batch(caches[0], hkv, D, dtype)
    for step in range(4):
        xt = (3 * mx.random.normal((1, 1, H))).astype(dtype)
        assert decode_attention.attention_decode_ok(block.decode_weights(), xt)
        pos = batch.positions()
        slot = kernels.ring_slots(pos, window) if window else pos
        fast, kv = block.step(xt, pos, slot, batch.state()[0])
        batch.commit([kv])
        with kernels.use_backend("reference"):
            ref = block(xt, None, caches[1])
        assert rel_err(fast, ref) < TOL[dtype], (step, rel_err(fast, ref))
        assert batch.lengths[0] == caches[1].offset == prompt + step + 1


@needs_gpu
def test_decode_step_is_a_few_ops_per_layer():
    """The point of the decode kernels: at batch 1 every op costs dispatch time, so a decode step
    must stay a handful of primitives per layer (it was ~47 before the attention kernels; the
    attention now reads the cache's joint buffer itself, no views of it)."""
    import collections
    import io
    import re

    from oss_mlx.decode import DecodeStep, decode_one

    model = _tiny_model(mx.bfloat16)
    cache = model.make_cache()
    mx.eval(model(mx.array([list(range(40))]), cache=cache))
    logits = decode_one(DecodeStep(model, compile=False), mx.array([[1]]), cache)
    buf = io.StringIO()
    mx.export_to_dot(buf, logits)
    ops = collections.Counter(re.findall(r'label ="([^"]+)", shape=rectangle', buf.getvalue()))
    per_layer = (sum(ops.values()) - 12) / len(model.blocks)  # ~12 for embedding, norm, unembedding
    # 13 on the H100 with 7 kernels a layer (norm_qkv_rope, sdpa_decode, out_residual; the bf16 MoE's
    # norm_route, gate_up_mma, down_mma, moe_combine), the cache scatter, views and casts; one token's
    # down_mma and moe_combine are one kernel now (down_mma_combine: 6 a layer in the 20b's step).
    assert per_layer <= 13, ops
    assert ops["CustomKernel"] <= 7 * len(model.blocks), ops


# ---- the whole model ------------------------------------------------------------------------------


def _tiny_model(dtype, window=16):
    from oss_mlx.bench import random_model

    config = ModelConfig(
        num_layers=4,
        num_experts=8,
        experts_per_token=4,
        vocab_size=512,
        hidden_size=128,
        intermediate_size=96,
        head_dim=64,
        num_attention_heads=8,
        num_key_value_heads=2,
        sliding_window=window,
    )
    return random_model(config, seed=3, dtype=dtype)


@needs_gpu
@pytest.mark.parametrize(
    "dtype,prompt",
    [(mx.float32, p) for p in (1, 7, 15, 100)] + [(mx.bfloat16, p) for p in (1, 7, 100)],
)
def test_model_logits_with_kernels_equal_reference(dtype, prompt):
    """Prefill (odd, under and well over the window) then decode: kernels on vs the reference.

    In bf16 the two paths round at different places (summation order, the fused norm: the kernels
    accumulate in float32 and round once), and on this tiny random model that moves the logits by
    1-5% either way (the reference on the GPU and on the CPU differ as much). So in bf16 both are
    measured against the same model run in float32 (its bf16 weights, exactly), and the kernels must
    be at least about as close to it as the reference is. Every router gets a clear favourite set of
    experts (bias +8 on k of them): the routing kernel still runs and weighs them, but no near-tie
    can flip an expert (expert choice under ties is tested by test_route).
    """
    from mlx.utils import tree_map

    model = _tiny_model(dtype)
    mx.random.seed(100 + prompt)  # the favourites and tokens: the same on every run
    for block in model.blocks:
        router = block.mlp.router
        favourites = mx.random.permutation(router.bias.shape[0])[: router.top_k]
        router.bias = router.bias + mx.zeros_like(router.bias).at[favourites].add(8.0)
    mx.eval(model.parameters())
    tokens = mx.random.randint(0, 512, (prompt,)).tolist()

    from oss_mlx.decode import DecodeStep, decode_one

    def run(m):
        cache, step = m.make_cache(), DecodeStep(m, compile=False)
        outs = [m(mx.array([tokens]), cache=cache, last_logits_only=True)[0, -1]]
        for t in (3, 141, 7, 500, 22, 9):
            outs.append(decode_one(step, mx.array([[t]]), cache)[0, -1])
        mx.eval(outs)
        return outs

    fast = run(model)
    with kernels.use_backend("reference"):
        ref = run(model)
    if dtype == mx.float32:
        for i, (a, b) in enumerate(zip(fast, ref)):
            assert rel_err(a, b) < 1e-4, (i, rel_err(a, b))
        return
    exact = _tiny_model(mx.float32)
    exact.update(tree_map(lambda p: p.astype(mx.float32) if p.dtype == dtype else p, model.parameters()))
    with kernels.use_backend("reference"):
        truth = run(exact)
    for i, (a, b, t) in enumerate(zip(fast, ref, truth)):
        kernel_err, reference_err = rel_err(a, t), rel_err(b, t)
        assert kernel_err < max(2 * reference_err, 1e-2), (i, kernel_err, reference_err)


ONE_TOKEN_MOE = {  # decode_moe.MOE_MMA_FROM -> the experts' kernels of one token
    1: ["gate_up_mma", "down_mma_combine"],  # the default: a batch's gate_up_mma (SORTED 0), down fused
    None: ["gate_up_swiglu", "down_combine"],  # the per-slot kernels
}


@needs_gpu
@pytest.mark.parametrize("mma_from", [1, None])
def test_kernel_paths_are_taken(monkeypatch, mma_from):
    """Guard against silently falling back: the decode shapes of gpt-oss hit every kernel."""
    from oss_mlx.decode import DecodeStep, decode_one

    monkeypatch.setattr(decode_moe, "MOE_MMA_FROM", mma_from)
    with recording_launches() as calls:
        model = _tiny_model(mx.bfloat16)
        cache = model.make_cache()
        mx.eval(model(mx.array([list(range(40))]), cache=cache))
        assert "route" in calls  # prefill: 40 tokens x 4 experts take the grouped GEMM
        calls.clear()
        mx.eval(decode_one(DecodeStep(model, compile=False), mx.array([[1]]), cache))
    attention = {"norm_qkv_rope", "sdpa_decode_mma", "out_residual"}  # bf16, 64-dim heads: matrix units
    assert attention | {"norm_route", *ONE_TOKEN_MOE[mma_from]} <= set(calls), calls


def test_dtype_config_copy_is_harmless():
    # replace() on the frozen config keeps validation (used by the bench's presets)
    c = replace(_config(4, 2, 64, 64), experts_per_token=1)
    assert c.experts_per_token == 1


def test_self_test_runs_clean_here():
    """The start-up self-test's code path (on this machine every op takes the reference)."""
    assert kernel_selftest.run() is None


class Factory:
    """A stand-in for mx.fast.cuda_kernel / metal_kernel (kernels.emulated): each kernel it makes
    checks its launch against SPECS, records (name, template, grid, output shapes) and returns
    zeros of the declared shapes, or raises `error` if one is set."""

    def __init__(self, launches: list, error: Exception | None = None):
        self.launches, self.error, self.built = launches, error, {}

    def __call__(self, name, input_names, output_names, source, header, ensure_row_contiguous):
        kernel = name.removeprefix("oss_")
        spec = kernels.SPECS[kernel]
        assert (tuple(input_names), tuple(output_names)) == (spec.inputs, spec.outputs)
        assert ensure_row_contiguous == spec.row_contiguous
        self.built[kernel] = {"source": source, "header": header}

        def launch(inputs, template, grid, threadgroup, output_shapes, output_dtypes, **kw):
            if self.error is not None:
                raise self.error
            assert len(inputs) == len(spec.inputs) and len(output_shapes) == len(spec.outputs), kernel
            assert tuple(k for k, _ in template) == spec.template, (kernel, template)
            self.launches.append((kernel, dict(template), grid, [tuple(s) for s in output_shapes]))
            return [mx.zeros(s, dtype=d) for s, d in zip(output_shapes, output_dtypes)]

        return launch


@pytest.fixture
def fake_factory():
    launches = []
    return launches, Factory(launches)


@contextlib.contextmanager
def fake_gpu():
    """The kernel path's Python with the GPU faked: the CUDA backend emulated, every kernel a fake
    (Factory). Yields the record of launches."""
    launches = []
    with kernels.emulated("cuda", Factory(launches)):
        yield launches


@pytest.fixture
def fresh_self_test(monkeypatch):
    monkeypatch.setattr(kernel_selftest, "_verdicts", {})


def test_a_failing_kernel_turns_the_kernels_off_with_a_warning(fresh_self_test):
    """A kernel that does not compile (or disagrees) on the user's machine: reference path, warned."""
    error = RuntimeError("[metal::Device] Unable to build metal library from source\nerror: ...")
    with kernels.emulated("metal", Factory([], error)):
        assert kernels.backend() == "metal"
        with pytest.warns(RuntimeWarning, match="metal kernels disabled.*Unable to build metal library"):
            kernel_selftest.check()
        assert kernels.backend() == "reference"
        assert "RuntimeError" in kernel_selftest.check()  # decided once: no second run, no warning
        assert "RuntimeError" in kernels.disabled()
    assert kernels.disabled() is None and kernels.backend() == kernels.available_backend()


def test_the_loader_pads_for_cuda_and_runs_the_self_test(fresh_self_test):
    """loader.prepare_for_backend (load_model's last step; the bench's random models too): on CUDA the
    experts' down rows padded to 128, then the self-test, whose failure turns the kernels off."""
    from oss_mlx.bench import random_model

    config = replace(_tiny_model(mx.float32).config, hidden_size=96, head_dim=16)
    model = random_model(config, seed=1)  # prepared as the loader prepares: padded on a CUDA machine
    cuda_here = kernels.available_backend() == "cuda"
    assert model.blocks[0].mlp.experts.down_weight.shape[1] == (CUDA_GATHER_QMM_ROWS if cuda_here else 96)
    kernel_selftest._verdicts.clear()  # on a card random_model's own preparation ran the real self-test
    with kernels.emulated("cuda", Factory([], RuntimeError("NVRTC compilation failed"))):
        with pytest.warns(RuntimeWarning, match="cuda kernels disabled.*NVRTC"):
            prepare_for_backend(model)
        assert kernels.backend() == "reference"
    experts = model.blocks[0].mlp.experts
    assert experts.down_weight.shape[1] == experts.down_scales.shape[1] == CUDA_GATHER_QMM_ROWS


# ---- the kernel path's Python, run here with the GPU faked ------------------------------------------


@pytest.mark.parametrize(
    "grouped_from,mma_from",
    [(None, 1), (None, 2), (4, 2), (None, None), (4, None)],
    ids=["default", "grouped-off", "grouped-on", "mma-off", "mma-off-grouped-on"],
)
def test_the_self_test_launches_every_kernel(monkeypatch, grouped_from, mma_from):
    """The start-up self-test is what turns the kernels off where one fails to compile (a Metal source
    on a Mac nobody here has): a kernel it left out would fail at a user's first prompt instead.
    The grouped and the matrix-unit decode-MoE kernels are tested when they can run (their
    thresholds set)."""
    monkeypatch.setattr(decode_moe, "MOE_GROUPED_FROM", grouped_from)
    monkeypatch.setattr(decode_moe, "MOE_MMA_FROM", mma_from)
    with fake_gpu() as launches:
        kernel_selftest.run()  # the fakes return zeros: only which kernels it launches is checked here
    unused = set()
    if grouped_from is None:
        unused |= {"gate_up_grouped", "down_grouped"}
    if mma_from is None:
        unused |= {"gate_up_mma", "down_mma", "down_mma_combine"}
    if mma_from != 1:  # one token takes the per-slot kernels
        unused.add("down_mma_combine")
    if grouped_from is None and mma_from is None:
        unused.add("moe_combine")
    assert decode_moe.unused_kernels() == unused
    assert {name for name, *_ in launches} == set(kernels.SPECS) - unused


@pytest.mark.parametrize("mma_from", [1, None])
def test_decode_launches_with_the_gpu_faked(monkeypatch, mma_from):
    """The kernel path's Python (predicates, launch arguments, output shapes) runs in CI: the GPU
    backend and the compiled kernels are faked, each fake recording its launch and returning arrays of
    the shapes it declared. A decode step must launch the attention's and the MoE's kernels per layer
    (the experts' on the matrix units by default, per-slot with MOE_MMA_FROM off) with grids that
    follow the work sizes, plus sdpa_combine where the keys are split (a full layer past
    SDPA_KEYS_PER_SPLIT keys; the window layers never are)."""
    monkeypatch.setattr(decode_moe, "MOE_MMA_FROM", mma_from)
    model = _tiny_model(mx.bfloat16)  # H 128, I 96, E 8, k 4, D 64, 8 query / 2 KV heads, window 16
    cache = model.make_cache()
    prompt = decode_attention.SDPA_KEYS_PER_SPLIT + 100
    mx.eval(model(mx.array([[i % 500 for i in range(prompt)]]), cache=cache))  # reference prefill

    from oss_mlx.decode import DecodeStep, decode_one

    with fake_gpu() as launches:
        logits = decode_one(DecodeStep(model, compile=False), mx.array([[3]]), cache)
    assert logits.shape == (1, 1, 512)

    per_layer = [
        "norm_qkv_rope",
        "sdpa_decode_mma",  # bf16, 64-dim heads, 4 query heads per KV head: the matrix units
        "out_residual",
        "norm_route",
        *ONE_TOKEN_MOE[mma_from],
    ]
    full = per_layer[:2] + ["sdpa_combine"] + per_layer[2:]
    want = [full if block.attn.window is None else per_layer for block in model.blocks]
    assert [n for n, *_ in launches] == [n for layer in want for n in layer]

    by_name = {}
    for name, template, grid, shapes in launches:
        by_name.setdefault(name, []).append((template, grid, shapes))
    template, grid, shapes = by_name["norm_qkv_rope"][0]
    assert shapes == [(1, 8, 64), (2, 1, 2, 1, 64)]
    assert grid == (128, -(-((8 + 2 * 2) * 64 // 2) // (4 * decode_attention.QKV_PAIRS_PER_WARP)), 1)
    assert template["RB"] == 1 and by_name["out_residual"][0][0]["RB"] == 1
    splits = -(-(prompt + 1) // decode_attention.SDPA_KEYS_PER_SPLIT)
    sdpa = by_name["sdpa_decode_mma"]
    assert sdpa[0][1] == (128, 2, 1)  # window layer: its 16 keys, one split
    assert sdpa[1][1] == (128 * splits, 2, 1)
    assert sdpa[1][2][1] == (1, 8, splits, 64 + 2)  # the partials sdpa_combine merges
    assert by_name["out_residual"][0][2] == [(1, 1, 128)]
    assert by_name["norm_route"][0][2] == [(1, 128), (4,), (4,)]
    if mma_from is None:
        assert by_name["gate_up_swiglu"][0][1] == (128 * 4, -(-96 // (4 * decode_moe.MOE_COLS_PER_WARP)), 1)
        assert by_name["down_combine"][0][1] == (128, -(-128 // decode_moe.MOE_ROWS_PER_BLOCK), 1)
        assert by_name["down_combine"][0][2] == [(1, 1, 128)]
    else:  # one token: a block row per slot (k = 4), one tile a warp, no grouping; down + combine fused
        assert "moe_group" not in by_name and "down_mma" not in by_name and "moe_combine" not in by_name
        assert by_name["gate_up_mma"][0][0]["SORTED"] == 0 and by_name["gate_up_mma"][0][0]["RT"] == 1
        assert by_name["gate_up_mma"][0][1][1] == 4 and by_name["gate_up_mma"][0][2] == [(4, 96)]
        assert by_name["down_mma_combine"][0][1] == (128 * 4 * (128 // 16), 1, 1)  # K x 4 warps, 16 rows
        assert by_name["down_mma_combine"][0][2] == [(1, 1, 128)]


def test_a_decode_batch_launches_with_the_gpu_faked(monkeypatch):
    """Five rows at their own positions (a bucket of 8): the attention kernel takes the rows'
    positions, the projections the fused kernels in blocks of rows (MLX's matmuls past
    ATTENTION_KERNEL_MAX_ROWS rows), the experts
    are grouped (moe_group, gate_up_grouped over the experts, down_grouped, moe_combine) with the
    grouped kernels on from 4 tokens, on the matrix units (moe_group, gate_up_mma, down_mma,
    moe_combine) from MOE_MMA_FROM rows, per-slot with both off or for one row; two rows keep the
    fused projections."""
    from oss_mlx.batch_cache import BatchCache
    from oss_mlx.decode import DecodeStep

    model = _tiny_model(mx.bfloat16)  # E 8, k 4, H 128, I 96
    assert decode_moe.MOE_GROUPED_FROM is None  # off by default (decode_moe says why)
    cases = ((5, 4, 2, 16), (5, None, 2, 16), (2, 4, 2, 16), (5, None, None, 4), (1, None, 2, 16))
    for rows, grouped_from, mma_from, attention_rows in cases:
        monkeypatch.setattr(decode_attention, "ATTENTION_KERNEL_MAX_ROWS", attention_rows)
        monkeypatch.setattr(decode_moe, "MOE_GROUPED_FROM", grouped_from)
        monkeypatch.setattr(decode_moe, "MOE_MMA_FROM", mma_from)
        batch = BatchCache.for_model(model)
        for i in range(rows):
            c = model.make_cache()
            mx.eval(model(mx.array([[j % 500 for j in range(3 + 50 * i)]]), cache=c))
            batch.join(i, c)
        R = batch.rows  # the bucket: 8 for 5 sequences
        with fake_gpu() as launches:
            logits = DecodeStep(model, compile=False)(mx.array([[3]] * R), batch)
        assert logits.shape == (R, 1, 512)
        names = [n for n, *_ in launches]
        by_name = {}
        for name, template, grid, shapes in launches:
            by_name.setdefault(name, []).append((template, grid, shapes))
        if R <= attention_rows:
            assert by_name["norm_qkv_rope"][0][2] == [(R, 8, 64), (2, R, 2, 1, 64)]
            rb = by_name["norm_qkv_rope"][0][0]["RB"]
            assert rb == decode_attention.rows_per_block(R, 128, mx.bfloat16)
            assert by_name["norm_qkv_rope"][0][1][0] == 128 * -(-R // rb)  # blocks of RB rows
            assert by_name["out_residual"][0][1][0] == 128 * -(-R // by_name["out_residual"][0][0]["RB"])
            assert names.count("out_residual") == len(model.blocks)
        else:
            assert "norm_qkv_rope" not in names and "out_residual" not in names
        attention = [t for n, t, *_ in launches if n.startswith("sdpa_decode")]
        assert len(attention) == len(model.blocks)
        if grouped_from is not None and rows >= grouped_from:
            assert "gate_up_swiglu" not in names and "down_combine" not in names
            per_layer = ["moe_group", "gate_up_grouped", "down_grouped", "moe_combine"]
            assert [n for n in names if n in per_layer] == per_layer * len(model.blocks)
            assert by_name["moe_group"][0][2] == [(R * 4,), (9,), (9,)]
            assert by_name["gate_up_grouped"][0][1] == (
                256 * -(-96 // (8 * decode_moe.MOE_GROUPED_COLS)),
                8,
                1,
            )
            assert by_name["down_grouped"][0][2] == [(R * 4, 128)]
            assert by_name["moe_combine"][0][1] == (256, R, 1)
        elif mma_from is not None and R >= mma_from:  # the matrix-unit kernels (RT tiles a warp)
            assert "gate_up_swiglu" not in names and "gate_up_grouped" not in names
            per_layer = ["moe_group", "gate_up_mma", "down_mma", "moe_combine"]
            assert [n for n in names if n in per_layer] == per_layer * len(model.blocks)
            rt = decode_moe.MOE_MMA_TILES
            assert by_name["gate_up_mma"][0][1] == (128 * -(-96 // (8 * rt)), 8, 1)
            assert by_name["gate_up_mma"][0][2] == [(R * 4, 96)]
            assert by_name["down_mma"][0][1] == (128 * -(-128 // (16 * rt)), 8, 1)
            assert by_name["down_mma"][0][2] == [(R * 4, 128)]
            assert by_name["moe_combine"][0][1] == (256, R, 1)
        else:
            assert "gate_up_grouped" not in names and "gate_up_mma" not in names
            assert names.count("down_combine") == len(model.blocks)


@pytest.mark.parametrize(
    "H,fused", [(kernels.KERNEL_MAX_HIDDEN, True), (kernels.KERNEL_MAX_HIDDEN + 256, False)]
)
def test_rows_staged_in_threadgroup_memory_stop_at_the_apple_limit(H, fused):
    """norm_route and norm_qkv_rope keep a whole hidden row in threadgroup memory (32 KB on Apple
    GPUs): past KERNEL_MAX_HIDDEN the MoE and attention blocks take the reference path."""
    mlp = random_mlp(4, 2, H, 64, mx.bfloat16)
    attn = random_attention(H, 64, 4, 2, mx.bfloat16)
    x = mx.zeros((1, 1, H), dtype=mx.bfloat16)
    pos = kernels.position_array(0)
    with fake_gpu() as launches:
        mx.eval(mlp(x))
        mx.eval(attn.step(x, pos, pos, mx.zeros((2, 1, 2, 1, 64), dtype=mx.bfloat16)))
    names = {name for name, *_ in launches}
    assert ("norm_route" in names) is fused and ("norm_qkv_rope" in names) is fused, names


def test_compiled_decode_step_launches_with_the_gpu_faked():
    """The decode step of generation (decode.py, here uncompiled so the fakes see each call) runs
    the same kernels on the fixed-shape buffers: the window layers' sdpa_decode reads the ring of
    `window` slots, the full layers' the whole grown buffer (its splits follow the buffer, the kernel
    reads the position to know how many keys are written)."""
    from oss_mlx.cache import FullCache
    from oss_mlx.decode import DecodeStep, decode_one

    model = _tiny_model(mx.bfloat16)  # window 16
    cache = model.make_cache()
    prompt = 300
    mx.eval(model(mx.array([[i % 500 for i in range(prompt)]]), cache=cache))  # reference prefill
    with fake_gpu() as launches:
        logits = decode_one(DecodeStep(model, compile=False), mx.array([[3]]), cache)
    assert logits.shape == (1, 1, 512) and cache.offset == prompt + 1
    moe = len(ONE_TOKEN_MOE[1 if decode_moe.MOE_MMA_FROM == 1 else None])  # the default's kernels
    full_len = [c.keys.shape[2] for c in cache if isinstance(c, FullCache)][0]
    assert full_len >= prompt + 1
    splits = max(
        1, min(decode_attention.SDPA_MAX_SPLITS, -(-full_len // decode_attention.SDPA_KEYS_PER_SPLIT))
    )
    sdpa = [(t, g) for n, t, g, _ in launches if n == "sdpa_decode_mma"]
    assert [g for _, g in sdpa] == [
        (128, 2, 1) if b.attn.window else (128 * splits, 2, 1) for b in model.blocks
    ]
    per_layer = (4 + moe) * len(model.blocks) + (splits > 1) * sum(
        b.attn.window is None for b in model.blocks
    )
    assert len(launches) == per_layer


def test_prefill_experts_launch_with_the_gpu_faked():
    """The prefill experts' Python in CI: where moe_prefill applies (16-bit, from 64 rows on), and its
    three launches' templates, grids and shapes (moe_group, then moe_gemm for gate_up and for down)."""
    block = random_mlp(4, 2, 64, 96, mx.bfloat16)
    x = mx.random.normal((40, 64)).astype(mx.bfloat16)
    indices = _prefill_indices(40, 4, 2, 3)
    experts = mxfp4_weights(block.experts)
    with fake_gpu() as launches:
        assert prefill_moe.moe_prefill_ok(experts, x, indices)
        assert not prefill_moe.moe_prefill_ok(
            experts, x.astype(mx.float32), indices
        )  # the matrix units: 16-bit
        assert not prefill_moe.moe_prefill_ok(experts, x[:31], indices[:31])  # 62 rows: decode's kernels
        out = prefill_moe.moe_prefill(experts, x, indices)
        with kernels.use_backend("reference"):
            assert not prefill_moe.moe_prefill_ok(experts, x, indices)
    assert out.shape == (40, 2, 64)
    assert [n for n, *_ in launches] == ["moe_group", "moe_gemm", "moe_gemm"]
    (
        (_, group_t, group_grid, group_shapes),
        (_, up_t, up_grid, up_shapes),
        (_, down_t, down_grid, down_shapes),
    ) = launches
    assert (
        group_t == {"E": 4, "BM": 64} and group_grid == (1024, 1, 1) and group_shapes == [(80,), (5,), (5,)]
    )
    row_tiles = -(-80 // 64) + 4  # at most one partial tile per expert
    assert up_t["MODE"] == 0 and (up_t["KD"], up_t["N"], up_t["NOUT"]) == (64, 192, 96)
    assert up_grid == (256 * 2, row_tiles, 1) and up_shapes == [(80, 96)]
    assert down_t["MODE"] == 1 and (down_t["KD"], down_t["N"], down_t["NOUT"]) == (96, 64, 64)
    assert down_grid == (256, row_tiles, 1) and down_shapes == [(80, 64)]


# ---- the decode batch: rows at their own positions, experts grouped ---------------------------------


@needs_gpu
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize(
    "E,k,H,I,N",
    [
        (4, 2, 64, 96, 5),
        (32, 4, 2880, 2880, 4),
        (32, 4, 2880, 2880, 15),
        # a decode batch of 16 / 40 / 63 streams (MOE_BATCH_MAX_SLOTS): 64, 160 and 252 slots
        (32, 4, 2880, 2880, 16),
        (32, 4, 2880, 2880, 40),
        (32, 4, 2880, 2880, 63),
        (128, 4, 1088, 1120, 9),
    ],
)
def test_grouped_experts_are_the_per_slot_kernels_bits(monkeypatch, dtype, E, k, H, I, N):
    """From MOE_GROUPED_FROM tokens (when set) the decode MoE groups the slots by expert (each
    expert's weights read once a step); for k <= 4 its result is the per-slot kernels' to the bit (a
    sequence decodes the same in a batch as alone), and the reference's within tolerance."""
    block, x, h, indices, weights, experts = moe_decode_inputs(dtype, E, k, H, I, N)
    monkeypatch.setattr(decode_moe, "MOE_GEMM_FROM", None)  # the kernels of this module, at any N
    monkeypatch.setattr(decode_moe, "MOE_GROUPED_FROM", 1)
    with recording_launches() as launched:
        grouped = decode_moe.moe_decode(experts, h, weights, indices, x)
        mx.eval(grouped)
    assert "gate_up_grouped" in launched and "gate_up_swiglu" not in launched
    monkeypatch.setattr(decode_moe, "MOE_GROUPED_FROM", None)
    per_slot = decode_moe.moe_decode(experts, h, weights, indices, x)
    assert mx.array_equal(grouped, per_slot).item()
    assert rel_err(grouped, moe_reference(block, x, weights, indices)) < TOL[dtype]


MMA_LAUNCHES = ("moe_group", "gate_up_mma", "down_mma", "moe_combine")


def _skewed_indices(N: int, E: int, k: int) -> mx.array:
    """k distinct experts a token, expert 0 chosen by every token (more than 8 slots: a second pass)."""
    rest = mx.argsort(mx.random.uniform(shape=(N, E - 1)), axis=-1)[:, : k - 1] + 1
    return mx.concatenate([mx.zeros((N, 1), dtype=rest.dtype), rest], axis=1).astype(mx.uint32)


@needs_gpu
@pytest.mark.parametrize(
    "E,k,H,I,N,case",
    [
        (8, 4, 96, 64, 5, "uniform"),  # H: 3 groups, the k block's fourth lane past the end
        (8, 4, 96, 64, 12, "skewed"),  # expert 0: 12 slots, two passes of 8
        (8, 2, 64, 96, 6, "large scales"),  # scales past 2^1: the two-multiply path
        (32, 4, 2880, 2880, 4, "uniform"),  # the 20b's rows: 22.5 k blocks
        (32, 4, 2880, 2880, 16, "skewed"),
        (128, 4, 1088, 1120, 9, "uniform"),
    ],
)
def test_experts_on_the_matrix_units(monkeypatch, E, k, H, I, N, case):
    """From MOE_MMA_FROM tokens a bf16 decode batch's experts take gate_up_mma and down_mma (slots
    grouped by expert, each weight dequantized once for 8 slots): the reference's result within bf16
    tolerance, and every token's result the same bits as that token alone through the same kernels (a
    sequence decodes the same in a batch as alone: an mma's outputs are each their own dot product;
    alone, one tile a warp and no grouping)."""
    block, x, h, indices, weights, experts = moe_decode_inputs(mx.bfloat16, E, k, H, I, N)
    if case == "skewed":
        indices = _skewed_indices(N, E, k)
    if case == "large scales":  # e8m0 129..131 and 0 in some groups: weights x 4..16 and x 2^-127
        ex = block.experts
        big = mx.random.uniform(shape=ex.gate_up_scales.shape) < 0.2
        ex.gate_up_scales = mx.where(big, mx.array(130, mx.uint8), ex.gate_up_scales)
        tiny = mx.random.uniform(shape=ex.down_scales.shape) < 0.2
        ex.down_scales = mx.where(tiny, mx.array(0, mx.uint8), ex.down_scales)
        experts = mxfp4_weights(ex)
    monkeypatch.setattr(decode_moe, "MOE_GEMM_FROM", None)
    monkeypatch.setattr(decode_moe, "MOE_MMA_FROM", 1)
    with recording_launches() as launched:
        out = decode_moe.moe_decode(experts, h, weights, indices, x)
        mx.eval(out)
    assert [n for n in launched if n in MMA_LAUNCHES] == list(MMA_LAUNCHES), launched
    assert "gate_up_swiglu" not in launched
    assert out.shape == (N, H) and out.dtype == mx.bfloat16
    if case == "large scales":  # weights x 16: the bf16 reference's own rounding moves rows by 1-8%,
        monkeypatch.setattr(decode_moe, "MOE_MMA_FROM", None)  # so the per-slot kernels' float32 math
        want = decode_moe.moe_decode(experts, h, weights, indices, x)
        monkeypatch.setattr(decode_moe, "MOE_MMA_FROM", 1)
    else:
        want = moe_reference(block, x, weights, indices)
    assert rel_err(out, want) < TOL[mx.bfloat16]
    for n in sorted({0, N // 2, N - 1}):
        alone = decode_moe.moe_decode(
            experts, h[n : n + 1], weights[n : n + 1], indices[n : n + 1], x[n : n + 1]
        )
        assert mx.array_equal(alone[0], out[n]).item(), n


@needs_gpu
@pytest.mark.parametrize("N", [1, 5])
def test_the_matrix_unit_experts_issue_setting_changes_no_bit(monkeypatch, N):
    """MOE_MMA_ISSUE (k blocks a warp loads before it multiplies them) at the 20b's rows: every value
    gives the bits of one block at a time (the same sums in the same order), one token and a batch."""
    block, x, h, indices, weights, experts = moe_decode_inputs(mx.bfloat16, 32, 4, 2880, 2880, N)
    monkeypatch.setattr(decode_moe, "MOE_GEMM_FROM", None)
    monkeypatch.setattr(decode_moe, "MOE_MMA_FROM", 1)
    outs = {}
    for ni in (1, 2, 3, 6):
        monkeypatch.setattr(decode_moe, "MOE_MMA_ISSUE", ni)
        with recording_launches() as launched:
            outs[ni] = decode_moe.moe_decode(experts, h, weights, indices, x)
            mx.eval(outs[ni])
        assert "gate_up_mma" in launched and ("down_mma" if N > 1 else "down_mma_combine") in launched, (
            launched
        )
    assert rel_err(outs[1], moe_reference(block, x, weights, indices)) < TOL[mx.bfloat16]
    for ni in (2, 3, 6):
        assert mx.array_equal(outs[ni], outs[1]).item(), ni


@needs_gpu
@pytest.mark.parametrize("E,k,H,I,N", [(8, 4, 96, 64, 5), (32, 4, 2880, 2880, 16), (32, 4, 2880, 2880, 63)])
def test_a_decode_batch_on_the_grouped_gemm(monkeypatch, E, k, H, I, N):
    """From MOE_GEMM_FROM tokens a decode batch's experts take the prefill's grouped GEMM (moe_group,
    moe_gemm for gate_up and for down): the reference's result within bf16 tolerance."""
    block, x, h, indices, weights, experts = moe_decode_inputs(mx.bfloat16, E, k, H, I, N)
    monkeypatch.setattr(decode_moe, "MOE_GEMM_FROM", 4)
    with recording_launches() as launched:
        out = decode_moe.moe_decode(experts, h, weights, indices, x)
        mx.eval(out)
    assert "moe_gemm" in launched and "gate_up_swiglu" not in launched
    assert out.shape == (N, H) and out.dtype == mx.bfloat16
    assert rel_err(out, moe_reference(block, x, weights, indices)) < TOL[mx.bfloat16]


@needs_gpu
@pytest.mark.parametrize("mma", [True, False], ids=["mma", "simt"])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_sdpa_decode_rows_at_their_own_positions(monkeypatch, mma, dtype):
    """One buffer, rows at positions 0, 5, 300 and 2,100: each row attends its own first pos + 1 keys,
    and gets the bits it gets alone in a buffer of its own length (splits follow the row's length)."""
    monkeypatch.setattr(decode_attention, "SDPA_MMA", mma)
    Hkv, G, D, S = 2, 4, 64, 2304
    positions = [0, 5, 300, 2100]
    B = len(positions)
    q = mx.random.normal((B, Hkv * G, 1, D)).astype(dtype)
    kv = mx.random.normal((2, B, Hkv, S, D)).astype(dtype)
    sinks = mx.random.normal((Hkv * G,))
    pos = kernels.device_ints(positions)[:B]
    out = sdpa_kernel(q, None, None, sinks, 0.125, kv=kv, pos=pos)
    for b, p in enumerate(positions):
        alone_kv = mx.contiguous(kv[:, b : b + 1, :, : 256 * -(-(p + 1) // 256)])
        alone = sdpa_kernel(q[b : b + 1], None, None, sinks, 0.125, kv=alone_kv, pos=p)
        assert mx.array_equal(out[b : b + 1], alone).item(), (b, p)
        want = sdpa_math(
            q[b : b + 1], kv[0, b : b + 1, :, : p + 1], kv[1, b : b + 1, :, : p + 1], sinks, 0.125
        )
        assert rel_err(out[b : b + 1], want) < TOL[dtype]


@needs_gpu
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("H,D,hq,hkv", [(256, 64, 8, 2), (2880, 64, 64, 8)], ids=["small", "gpt-oss"])
@pytest.mark.parametrize("rows", [2, 6, 9])
def test_projection_rows_get_their_bits_alone(dtype, H, D, hq, hkv, rows):
    """norm_qkv_rope and out_residual on a batch (blocks of rows_per_block rows sharing each weight
    load; 6 and 9 rows end in a part-filled block) give each row, at its own position, exactly the
    bits it gets alone (one row: the register path). So a batched decode step is bit-for-bit each
    sequence alone wherever the rest of the step is too."""
    block = random_attention(H, D, hq, hkv, dtype)
    positions = [0, 37, 900, 5, 30000, 2, 64, 131, 7][:rows]
    x = (3 * mx.random.normal((rows, 1, H))).astype(dtype)
    o = mx.random.normal((rows, 1, hq * D)).astype(dtype)
    w = block.decode_weights()
    assert decode_attention.attention_decode_ok(w, x)
    assert decode_attention.rows_per_block(rows, H, dtype) > 1
    with recording_launches() as launched:
        q, kv = decode_attention.norm_qkv_rope(w, x, kernels.device_ints(positions)[:rows])
        y = decode_attention.out_residual(o, w.out_weight, w.out_bias, x)
        mx.eval(q, kv, y)
    assert {"norm_qkv_rope", "out_residual"} <= set(launched)
    for b, p in enumerate(positions):
        qb, kvb = decode_attention.norm_qkv_rope(w, x[b : b + 1], p)
        yb = decode_attention.out_residual(o[b : b + 1], w.out_weight, w.out_bias, x[b : b + 1])
        assert mx.array_equal(q[b : b + 1], qb).item() and mx.array_equal(kv[:, b : b + 1], kvb).item(), b
        assert mx.array_equal(y[b : b + 1], yb).item(), b
    assert rel_err(y, x + block.out(o)) < TOL[dtype]


def test_projection_rows_per_block():
    """One row keeps its inputs in registers; a batch takes one block size (one compile for every
    batch), smaller where the staged rows would pass the threadgroup budget, 1 past it."""
    per = decode_attention.ATTENTION_ROWS_PER_BLOCK
    assert decode_attention.rows_per_block(1, 2880, mx.bfloat16) == 1
    assert {decode_attention.rows_per_block(r, 2880, mx.bfloat16) for r in (2, 5, 16)} == {per}
    for width, dtype in ((2880, mx.bfloat16), (4096, mx.bfloat16), (2880, mx.float32), (7680, mx.float32)):
        rb = decode_attention.rows_per_block(8, width, dtype)
        assert rb == 1 or rb * -(-width // 256) * 256 * dtype.size <= decode_attention.STAGED_BYTES
        assert rb >= 1


@needs_gpu
@pytest.mark.parametrize("attention_rows", [64, 1], ids=["fused-projections", "matmul-projections"])
def test_a_batched_decode_step_equals_each_row_alone(monkeypatch, attention_rows):
    """The whole step on the kernels, five rows at their own positions (the default decode MoE) against each
    sequence decoded alone: the attention and MoE kernels give each row its lone bits; only the
    unembedding's matmul (M rows against one) may round otherwise, so the logits agree to bf16 noise
    and their argmax everywhere. With the attention's projections in MLX's matmuls for a batch
    (ATTENTION_KERNEL_MAX_ROWS 1) the rows agree with each alone (on the fused kernels) to float32
    rounding: in float32, since bf16's different rounding there can flip a random model's routing."""
    from oss_mlx.batch_cache import BatchCache
    from oss_mlx.decode import DecodeStep, decode_one

    monkeypatch.setattr(decode_attention, "ATTENTION_KERNEL_MAX_ROWS", attention_rows)
    dtype = mx.bfloat16 if attention_rows > 1 else mx.float32
    model = _tiny_model(dtype)
    step = DecodeStep(model)
    lengths = [3, 40, 17, 300, 9]
    caches = []
    for n in lengths:
        c = model.make_cache()
        mx.eval(model(mx.array([[i % 500 for i in range(n)]]), cache=c))
        caches.append(c)
    alone_caches = []
    for n in lengths:
        c = model.make_cache()
        mx.eval(model(mx.array([[i % 500 for i in range(n)]]), cache=c))
        alone_caches.append(c)
    batch = BatchCache.for_model(model)
    for i, c in enumerate(caches):
        batch.join(i, c)
    # a token for every row of the batch's bucket (8), the free ones' too, as the scheduler feeds it
    tokens = mx.array([[7], [99], [3], [250], [41]] + [[0]] * (batch.rows - len(lengths)))
    for _ in range(3):
        with recording_launches() as launched:
            together = step(tokens, batch)
            mx.eval(together)
        assert ("gate_up_swiglu" if decode_moe.MOE_GROUPED_FROM is None else "gate_up_grouped") in launched
        for i, c in enumerate(alone_caches):
            alone = decode_one(step, tokens[i : i + 1], c)
            assert rel_err(together[i], alone[0]) < TOL[dtype]
            assert mx.argmax(together[i, -1]).item() == mx.argmax(alone[0, -1]).item()
        tokens = mx.argmax(together[:, -1, :], axis=-1)[:, None]
