"""The Metal emulator itself (tests/metal_emulator): small kernels whose Metal behaviour is known.

What a kernel test through the emulator proves rests on these: the source is the one MLX builds
(checked against MLX's own generated text), the grid is dispatched as MLX dispatches it, barriers
and simdgroup functions behave as on Apple GPUs, simdgroup matrices use their lane layout, bf16 and
half round as Metal's do, and what Metal leaves undefined or forbids (reading threadgroup memory
before writing it, divergent simdgroup operations, barriers some threads skip, invalid accesses,
lost atomic updates) shows as a failure instead of passing by luck.
"""

from __future__ import annotations

import re

import mlx.core as mx
import numpy as np
import pytest
from metal_emulator import EMULATOR, Emulator, MetalEmulatorError, source, unavailable

from oss_mlx import kernel_selftest, kernels

pytestmark = pytest.mark.skipif(unavailable() is not None, reason=f"Metal emulator: {unavailable()}")


def run(body, inputs, outputs, grid, threadgroup, template=None, header="", emulator=EMULATOR, **kw):
    """One launch of a kernel with body `body`; inputs {name: array}, outputs {name: (shape, dtype)}."""
    k = emulator.metal_kernel(
        name="probe", input_names=list(inputs), output_names=list(outputs), source=body, header=header, **kw
    )
    return k(
        inputs=list(inputs.values()),
        template=template,
        grid=grid,
        threadgroup=threadgroup,
        output_shapes=[s for s, _ in outputs.values()],
        output_dtypes=[d for _, d in outputs.values()],
    )


# ---- the source MLX builds, the grid MLX dispatches -------------------------------------------------


def test_the_source_is_the_one_mlx_generates(tmp_path, capfd, monkeypatch):
    """For every kernel in SPECS at a launch of the start-up self-test (the grouped and the
    matrix-unit decode-MoE kernels turned on, from two rows and then from one, so it launches them
    all): the emulator's text of the
    kernel equals what MLX's metal_kernel generates for the same call (its verbose output, recorded
    here by tracing an export: no Metal device needed)."""
    from oss_mlx.kernels import decode_moe

    monkeypatch.setattr(decode_moe, "MOE_GROUPED_FROM", 4)
    monkeypatch.setattr(decode_moe, "MOE_MMA_FROM", 2)
    calls = []

    def recording(**factory):
        kernel = EMULATOR.metal_kernel(**factory)

        def launch(**call):
            calls.append((factory, call, kernel.kernel))
            return kernel(**call)

        return launch

    with kernels.emulated("metal", recording):
        assert kernel_selftest.run() is None
        monkeypatch.setattr(decode_moe, "MOE_MMA_FROM", 1)  # one token on the matrix units too
        assert kernel_selftest.run() is None
    seen = set()
    for i, (factory, call, k) in enumerate(calls):
        if factory["name"] in seen:
            continue
        seen.add(factory["name"])
        real = mx.fast.metal_kernel(**factory)
        inputs = [a if isinstance(a, mx.array) else mx.array(a) for a in call["inputs"]]
        rest = {key: v for key, v in call.items() if key not in ("inputs", "init_value")}

        def traced(*arrays, rest=rest, real=real):
            return real(inputs=list(arrays), verbose=True, **rest)

        capfd.readouterr()
        mx.export_function(str(tmp_path / f"k{i}.mlxfn"), traced, *inputs)
        printed = capfd.readouterr().out
        mlx_text = re.search(r"```\n(.*)\n```", printed, re.S).group(1)
        inst = source.Instance(
            template=tuple(call["template"]),
            inputs=tuple(source.Input(source.type_string(a.dtype), a.ndim, a.size) for a in inputs),
            output_types=tuple(source.type_string(d) for d in call["output_dtypes"]),
        )
        assert source.mlx_source(k, inst) == mlx_text, factory["name"]
    assert {n.removeprefix("oss_") for n in seen} == set(kernels.SPECS)


def test_the_grid_is_dispatched_as_mlx_dispatches_it():
    """dispatchThreads: grid = threads; the edge threadgroups are partial (threads_per_threadgroup
    says how many), a threadgroup larger than the grid shrinks to it (MLX), simdgroups of 32 by the
    linear index."""
    body = """
    const uint i = thread_position_in_grid.x + thread_position_in_grid.y * threads_per_grid.x;
    out[8 * i + 0] = thread_position_in_threadgroup.x;
    out[8 * i + 1] = thread_position_in_threadgroup.y;
    out[8 * i + 2] = threadgroup_position_in_grid.x;
    out[8 * i + 3] = threads_per_threadgroup.x * 100 + threads_per_threadgroup.y;
    out[8 * i + 4] = threadgroups_per_grid.x * 100 + threadgroups_per_grid.y;
    out[8 * i + 5] = simdgroup_index_in_threadgroup * 100 + thread_index_in_simdgroup;
    out[8 * i + 6] = thread_index_in_threadgroup;
    out[8 * i + 7] = dispatch_threads_per_threadgroup.x;
    """
    gx, gy, tx, ty = 70, 3, 32, 2
    (out,) = run(
        body, {"dummy": mx.zeros((8,))}, {"out": ((gx * gy * 8,), mx.uint32)}, (gx, gy, 1), (tx, ty, 1)
    )
    out = np.array(out).reshape(gy, gx, 8)
    for y in range(gy):
        for x in range(gx):
            px, py = x % tx, y % ty
            nx, ny = min(tx, gx - x // tx * tx), min(ty, gy - y // ty * ty)  # partial at the edges
            lin = px + py * nx
            want = [px, py, x // tx, nx * 100 + ny, 3 * 100 + 2, (lin // 32) * 100 + lin % 32, lin, tx]
            assert list(out[y, x]) == want, (x, y)
    (small,) = run(
        "out[thread_position_in_grid.x] = threads_per_threadgroup.x;",
        {"d": mx.zeros((8,))},
        {"out": ((5,), mx.uint32)},
        (5, 1, 1),
        (256, 1, 1),
    )
    assert np.array(small).tolist() == [5] * 5


def test_inputs_outputs_and_strides_as_mlx_passes_them():
    """Small inputs arrive in constant memory, 0-d ones by reference; `_shape`, `_strides`, `_ndim`
    where named; row-contiguous copies only where asked; outputs start as init_value, or as garbage."""
    base = mx.arange(24, dtype=mx.float32).reshape(2, 3, 4)
    view = base.transpose(2, 0, 1)  # strides (1, 12, 4)
    body = """
    const uint i = thread_position_in_grid.x;
    out[i] = x[i * x_strides[2]] + x_shape[0] * 1000 + x_ndim * 100 + s + c[1];
    """
    for contiguous, want_stride in ((False, 4), (True, 1)):
        (out,) = run(
            body,
            {"x": view, "s": mx.array(7.0), "c": mx.array([1.0, 2.0])},
            {"out": ((2,), mx.float32)},
            (2, 1, 1),
            (2, 1, 1),
            ensure_row_contiguous=contiguous,
        )
        flat = np.array(view).reshape(-1) if contiguous else np.array(base).reshape(-1)
        want = [flat[i * want_stride] + 4 * 1000 + 300 + 7 + 2 for i in range(2)]
        assert np.array(out).tolist() == want, contiguous
    k = EMULATOR.metal_kernel("probe", ["x"], ["a", "b"], "if (thread_position_in_grid.x == 0) a[0] = x[0];")
    a, b = k(
        inputs=[mx.ones((4,))],
        grid=(1, 1, 1),
        threadgroup=(1, 1, 1),
        output_shapes=[(2,), (2,)],
        output_dtypes=[mx.float32, mx.float32],
        init_value=-3.0,
    )
    assert np.array(a).tolist() == [1.0, -3.0] and np.array(b).tolist() == [-3.0, -3.0]
    a, _ = k(
        inputs=[mx.ones((4,))],
        grid=(1, 1, 1),
        threadgroup=(1, 1, 1),
        output_shapes=[(2,), (2,)],
        output_dtypes=[mx.float32, mx.float32],
    )
    assert np.isnan(np.array(a)[1])  # never written: garbage, as MLX leaves outputs uninitialised


def test_launch_limits_are_apple_gpus():
    with pytest.raises(MetalEmulatorError, match="greater than the maximum allowed threads per threadgroup"):
        run("out[0] = 1;", {"d": mx.zeros((8,))}, {"out": ((1,), mx.float32)}, (2048, 1, 1), (1025, 1, 1))
    with pytest.raises(MetalEmulatorError, match="36864 bytes of threadgroup memory"):
        run(
            "threadgroup float big[9216]; big[thread_position_in_grid.x] = 0; out[0] = big[0];",
            {"d": mx.zeros((8,))},
            {"out": ((1,), mx.float32)},
            (32, 1, 1),
            (32, 1, 1),
        )


# ---- threadgroups and simdgroups ---------------------------------------------------------------------

SHARED = """
threadgroup float s[128];
const uint t = thread_position_in_threadgroup.x;
s[t] = x[thread_position_in_grid.x];
{barrier}
out[thread_position_in_grid.x] = s[127 - t];
"""


def test_a_barrier_waits_for_every_thread_and_threadgroup_memory_starts_as_garbage():
    x = mx.arange(256, dtype=mx.float32)
    want = np.concatenate([np.arange(127, -1, -1), np.arange(255, 127, -1)])
    barrier = "threadgroup_barrier(mem_flags::mem_threadgroup);"
    for schedule in ("shuffle", "forward", "reverse"):
        (out,) = run(
            SHARED.format(barrier=barrier),
            {"x": x},
            {"out": ((256,), mx.float32)},
            (256, 1, 1),
            (128, 1, 1),
            emulator=Emulator(schedule),
        )
        assert np.array(out).tolist() == want.tolist(), schedule
    (out,) = run(SHARED.format(barrier=""), {"x": x}, {"out": ((256,), mx.float32)}, (256, 1, 1), (128, 1, 1))
    assert np.isnan(np.array(out)).any()  # without the barrier some reads come before the writes


def test_barriers_every_thread_must_reach():
    body = (
        "if (thread_position_in_threadgroup.x == 3) return;"
        "threadgroup_barrier(mem_flags::mem_threadgroup); out[0] = 1;"
    )
    with pytest.raises(MetalEmulatorError, match="every thread of a threadgroup to reach each barrier"):
        run(
            body,
            {"d": mx.zeros((8,))},
            {"out": ((1,), mx.float32)},
            (64, 1, 1),
            (64, 1, 1),
            emulator=Emulator("forward"),
        )
    body = "if (thread_index_in_simdgroup < 16) out[0] = simd_sum(1.f); else out[1] = simd_sum(2.f);"
    with pytest.raises(MetalEmulatorError, match="divergent simdgroup operation"):
        run(body, {"d": mx.zeros((8,))}, {"out": ((2,), mx.float32)}, (32, 1, 1), (32, 1, 1))
    body = """if (simdgroup_index_in_threadgroup == 0 && thread_index_in_simdgroup < 8) {
      threadgroup_barrier(mem_flags::mem_threadgroup);
    } else { out[0] = simd_sum(1.f); threadgroup_barrier(mem_flags::mem_threadgroup); }"""
    with pytest.raises(MetalEmulatorError, match="deadlock"):
        run(body, {"d": mx.zeros((8,))}, {"out": ((1,), mx.float32)}, (64, 1, 1), (64, 1, 1))


SIMD = """
const uint i = thread_position_in_grid.x, lane = thread_index_in_simdgroup;
if (i >= uint(x_shape[0])) return;  // a partial last simdgroup: its lanes past the end return
const float v = x[i];
float* o = out + 12 * i;
o[0] = simd_sum(v);
o[1] = simd_max(v);
o[2] = simd_min(v);
o[3] = simd_prefix_exclusive_sum(v);
o[4] = simd_prefix_inclusive_sum(v);
o[5] = simd_shuffle(v, ushort((lane * 7) % 32));
o[6] = simd_shuffle_xor(v, ushort(5));
o[7] = simd_shuffle_down(v, ushort(3));
o[8] = simd_shuffle_up(v, ushort(3));
o[9] = simd_broadcast(v, ushort(2));
o[10] = float(ulong(simd_ballot(v > 0.f)));
o[11] = float(simd_any(v > 2.f)) + 2 * float(simd_all(v > -5.f));
"""


def test_simdgroup_functions_exchange_among_the_active_lanes():
    n = 40  # one full simdgroup and one of 8 live lanes (the other 24 returned)
    x = mx.array(np.random.default_rng(0).normal(size=n).astype(np.float32))
    (out,) = run(
        SIMD.replace("float* o", "device float* o"),
        {"x": x},
        {"out": ((12 * 64,), mx.float32)},
        (64, 1, 1),
        (64, 1, 1),
    )
    out, xs = np.array(out).reshape(64, 12)[:n], np.array(x)
    for i in range(n):
        sg, lane = divmod(i, 32)
        lanes = xs[32 * sg : min(32 * sg + 32, n)]
        live = len(lanes)

        def at(src, lane=lane, lanes=lanes, live=live):
            return lanes[src] if 0 <= src < live else np.nan  # an inactive lane's value is garbage

        want = [
            lanes.sum(),
            lanes.max(),
            lanes.min(),
            lanes[:lane].sum(),
            lanes[: lane + 1].sum(),
            at(lane * 7 % 32),
            at(lane ^ 5),
            at(lane + 3) if lane + 3 < 32 else lanes[lane],
            at(lane - 3) if lane >= 3 else lanes[lane],
            lanes[2],
            sum(1 << j for j in range(live) if lanes[j] > 0),
            float(any(lanes > 2)) + 2 * all(lanes > -5),
        ]
        np.testing.assert_allclose(out[i], np.array(want, np.float32), rtol=1e-6, atol=1e-6, err_msg=str(i))


def test_atomics_interleave_so_a_split_read_modify_write_loses_updates():
    body = """
    threadgroup atomic_uint n;
    if (thread_position_in_threadgroup.x == 0) atomic_store_explicit(&n, 0u, memory_order_relaxed);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    {add}
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (thread_position_in_threadgroup.x == 0) out[0] = atomic_load_explicit(&n, memory_order_relaxed);
    """
    atomic = "atomic_fetch_add_explicit(&n, 1u, memory_order_relaxed);"
    split = (
        "atomic_store_explicit(&n, atomic_load_explicit(&n, memory_order_relaxed) + 1u, "
        "memory_order_relaxed);"
    )
    for schedule in ("shuffle", "forward", "reverse"):
        emulator = Emulator(schedule)
        (good,) = run(
            body.format(add=atomic),
            {"d": mx.zeros((8,))},
            {"out": ((1,), mx.uint32)},
            (512, 1, 1),
            (512, 1, 1),
            emulator=emulator,
        )
        (bad,) = run(
            body.format(add=split),
            {"d": mx.zeros((8,))},
            {"out": ((1,), mx.uint32)},
            (512, 1, 1),
            (512, 1, 1),
            emulator=emulator,
        )
        assert good.item() == 512 and bad.item() < 512, (schedule, good.item(), bad.item())


def test_invalid_accesses_and_endless_loops_are_errors():
    with pytest.raises(MetalEmulatorError, match=r"SIGSEGV .*past the end of input `x` \(64 bytes\)"):
        run(
            "out[0] = x[thread_position_in_grid.x * 1024];",
            {"x": mx.zeros((16,))},
            {"out": ((1,), mx.float32)},
            (4, 1, 1),
            (4, 1, 1),
        )
    with pytest.raises(MetalEmulatorError, match="CPU-time budget"):
        run(
            "threadgroup atomic_uint n;while (true) atomic_fetch_add_explicit(&n, 1u, memory_order_relaxed);",
            {"d": mx.zeros((8,))},
            {"out": ((1,), mx.uint32)},
            (1, 1, 1),
            (1, 1, 1),
            emulator=Emulator(cpu_seconds=0.5),
        )
    # the process carries on: the next launch runs
    (ok,) = run(
        "out[0] = x[0] + 1;", {"x": mx.ones((16,))}, {"out": ((1,), mx.float32)}, (1, 1, 1), (1, 1, 1)
    )
    assert ok.item() == 2.0


def test_vector_types_operators_and_conversions():
    """Element-wise operators with vectors and scalars, compound assignment, shifts, comparisons to bool
    vectors, constructors from scalars and vectors, as_type reinterpreting bits, float2(half2) converting."""
    body = """
    const uint i = thread_position_in_grid.x;
    const float4 a = float4(x[4 * i], x[4 * i + 1], float2(x[4 * i + 2], x[4 * i + 3]));
    float4 b = a * 2.f + 1.f;
    b -= float4(0.5f);
    b /= 2;
    uint4 u = uint4(3, 5, 7, 9) << 2u;
    u ^= uint4(1u);
    const bool4 gt = a > 0.f;
    const float2 f = float2(as_type<half2>(uint(0x3c004000))) + float2(1.f, 2.f);
    device float* o = out + 8 * i;
    o[0] = b.x + b.y * 10;
    o[1] = b.z;
    o[2] = b.w;
    o[3] = float(u.y + u[3]);
    o[4] = float(all(gt)) + 2 * float(any(gt));
    o[5] = f.x;
    o[6] = f.y;
    o[7] = dot(a, b);
    """
    x = mx.array(np.array([1, -2, 3, 4, 0.5, 1, 2, 3], np.float32))
    (out,) = run(body, {"x": x}, {"out": ((16,), mx.float32)}, (2, 1, 1), (2, 1, 1))
    a = np.array(x).reshape(2, 4)
    b = (a * 2 + 1 - 0.5) / 2
    for i in range(2):
        want = [
            b[i, 0] + 10 * b[i, 1],
            b[i, 2],
            b[i, 3],
            21 + 37,
            (a[i] > 0).all() + 2 * (a[i] > 0).any(),
            3,
            3,
        ]
        assert np.array(out)[8 * i : 8 * i + 7].tolist() == want
        assert np.array(out)[8 * i + 7] == pytest.approx(float(a[i] @ b[i]))


# ---- simdgroup matrices ------------------------------------------------------------------------------


def test_thread_elements_follow_the_apple_lane_layout():
    """Lane l holds (m, n), (m, n + 1) with MLX's BaseMMAFrag::get_coord: q = l / 4, m = (q & 4) +
    (l / 2) % 4, n = (q & 2) * 2 + (l % 2) * 2; a load from memory lands there."""
    body = """
    threadgroup float tile[64];
    const uint l = thread_index_in_simdgroup;
    tile[2 * l] = x[2 * l];
    tile[2 * l + 1] = x[2 * l + 1];
    simdgroup_barrier(mem_flags::mem_threadgroup);
    simdgroup_float8x8 m;
    simdgroup_load(m, tile, 8);
    out[2 * l] = m.thread_elements()[0];
    out[2 * l + 1] = m.thread_elements()[1];
    """
    x = mx.arange(64, dtype=mx.float32)
    (out,) = run(body, {"x": x}, {"out": ((64,), mx.float32)}, (32, 1, 1), (32, 1, 1))
    for lane in range(32):
        q = lane // 4
        m, n = (q & 4) + (lane // 2) % 4, (q & 2) * 2 + (lane % 2) * 2
        assert np.array(out)[2 * lane : 2 * lane + 2].tolist() == [8 * m + n, 8 * m + n + 1], lane


def test_simdgroup_matrix_multiply_accumulate():
    """D = A B + C with A read at an origin with a row pitch, B read transposed, stored at an origin."""
    body = """
    simdgroup_float8x8 a, b, c;
    simdgroup_load(a, x, 12, ulong2(2, 1));              // rows 1.., columns 2.. of a 12-wide source
    simdgroup_load(b, y, 8, ulong2(0, 0), true);        // y holds B's columns as rows
    c = make_filled_simdgroup_matrix<float, 8, 8>(0.5f);
    simdgroup_multiply_accumulate(c, a, b, c);
    simdgroup_store(c, out, 10, ulong2(1, 2));
    """
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(10, 12)).astype(np.float32), rng.normal(size=(8, 8)).astype(np.float32)
    (out,) = run(
        body, {"x": mx.array(x), "y": mx.array(y)}, {"out": ((12, 10), mx.float32)}, (32, 1, 1), (32, 1, 1)
    )
    want = x[1:9, 2:10].astype(np.float64) @ y.T.astype(np.float64) + 0.5
    np.testing.assert_allclose(np.array(out)[2:10, 1:9], want, rtol=1e-5, atol=1e-5)
    with pytest.raises(MetalEmulatorError, match="all 32 lanes"):
        run(
            "if (thread_index_in_simdgroup < 31) { simdgroup_float8x8 a; simdgroup_load(a, x); "
            "simdgroup_multiply(a, a, a); simdgroup_store(a, out); }",
            {"x": mx.array(y)},
            {"out": ((64,), mx.float32)},
            (32, 1, 1),
            (32, 1, 1),
        )


# ---- numbers -----------------------------------------------------------------------------------------


def test_bfloat_and_half_round_as_metal():
    """float -> bfloat16_t / half round to nearest even (as MLX's astype: bit for bit, ties included);
    half arithmetic rounds after every operation (as NumPy's float16)."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=4096).astype(np.float32) * np.float32(2.0) ** rng.integers(-20, 20, 4096)
    ties = (np.arange(1, 257, dtype=np.uint32) << 16 | 0x8000).view(np.float32)  # exactly halfway
    x = mx.array(np.concatenate([x, ties, -ties]))
    n = x.size
    body = """
    const uint i = thread_position_in_grid.x;
    b[i] = bfloat16_t(x[i]);
    h[i] = half(x[i]);
    const half u = half(x[i]), v = half(x[(i + 1) % N]);
    s[i] = u * v + u;  // two roundings to half
    """
    b, h, s = run(
        body,
        {"x": x},
        {"b": ((n,), mx.bfloat16), "h": ((n,), mx.float16), "s": ((n,), mx.float16)},
        (n, 1, 1),
        (256, 1, 1),
        template=[("N", n)],
    )
    assert mx.array_equal(b.view(mx.uint16), x.astype(mx.bfloat16).view(mx.uint16)).item()
    assert mx.array_equal(h.view(mx.uint16), x.astype(mx.float16).view(mx.uint16)).item()
    with np.errstate(over="ignore", invalid="ignore"):
        u = np.array(x).astype(np.float16)
        want = u * np.roll(u, -1) + u
    np.testing.assert_array_equal(np.array(s).view(np.uint16), want.view(np.uint16))
