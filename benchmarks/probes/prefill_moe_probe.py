"""One 20b layer's prefill pieces at 2,047 tokens, warm, on this machine's MLX (GPU machine: CUDA).

What takes a prefill chunk's time: the MoE block and its parts (MLX's MXFP4 `gather_qmm` for gate_up
and down, the SwiGLU), a full-attention block, and the alternative of dequantizing every expert to
bf16 for MLX's `gather_mm` (CUTLASS grouped GEMM on CUDA). Each figure is the mean of 5 evaluations
after one untimed one; where the card takes them, our grouped GEMM (moe_group + moe_gemm) is timed
beside MLX's path. Numbers: docs/PERFORMANCE.md, "Where prefill's time goes".

    python benchmarks/probes/prefill_moe_probe.py
"""

from __future__ import annotations

import dataclasses
import time

import mlx.core as mx

from oss_mlx.bench import preset_config, random_model
from oss_mlx.kernels import prefill_moe
from oss_mlx.moe import clamped_swiglu, gather_qmm_mxfp4, mxfp4_weights


def timed(name: str, fn, reps: int = 5) -> float:
    mx.eval(fn())
    mx.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        mx.eval(fn())
    mx.synchronize()
    ms = 1000 * (time.perf_counter() - t) / reps
    print(f"{name:48s} {ms:8.2f} ms", flush=True)
    return ms


def main() -> None:
    full = preset_config("20b")
    config = dataclasses.replace(full, num_layers=2, layer_types=full.layer_types[:2])
    model = random_model(config)
    mlp, ex = model.blocks[0].mlp, model.blocks[0].mlp.experts
    N, k = 2047, config.experts_per_token
    x = mx.random.normal((N, config.hidden_size)).astype(mx.bfloat16)
    _, indices = mlp.router(x)
    flat = indices.flatten()
    order = mx.argsort(flat)
    rows, experts = x[order // k][:, None, :], flat[order]  # as Experts.__call__ sorts them
    mx.eval(rows, experts)

    def qmm(h, name):
        w, s = getattr(ex, f"{name}_weight"), getattr(ex, f"{name}_scales")
        return gather_qmm_mxfp4(h, w, s, experts, True)

    def dequantized(name):
        w, s = getattr(ex, f"{name}_weight"), getattr(ex, f"{name}_scales")
        return mx.dequantize(w, s, group_size=32, bits=4, mode="mxfp4", dtype=mx.bfloat16)

    def experts_with(gemm: bool):
        def run():
            prefill_moe.MOE_GEMM = gemm
            try:
                return ex(x, indices)
            finally:
                prefill_moe.MOE_GEMM = True

        return run

    timed("experts (gather_qmm x2 + SwiGLU)", experts_with(False))
    if prefill_moe.moe_prefill_ok(mxfp4_weights(ex), x, indices):
        timed("experts (moe_group + moe_gemm x2)", experts_with(True))
        a, b = experts_with(False)(), experts_with(True)()
        print(f"{'  max |moe_gemm - gather_qmm|':48s} {mx.abs(a - b).max().item():8.4f}", flush=True)
    timed("  gather_qmm gate_up", lambda: qmm(rows, "gate_up"))
    gate_up = qmm(rows, "gate_up")
    act = clamped_swiglu(gate_up, ex.alpha, ex.limit)
    mx.eval(act)
    timed("  SwiGLU", lambda: clamped_swiglu(gate_up, ex.alpha, ex.limit))
    timed("  gather_qmm down", lambda: qmm(act, "down"))
    timed("  dequantize gate_up (every expert)", lambda: dequantized("gate_up"))
    timed("  dequantize down (every expert)", lambda: dequantized("down"))
    w_gate_up, w_down = dequantized("gate_up"), dequantized("down")
    mx.eval(w_gate_up, w_down)
    mm = lambda h, w: mx.gather_mm(h, w.swapaxes(-1, -2), rhs_indices=experts, sorted_indices=True)  # noqa: E731
    timed("  gather_mm gate_up (bf16, sorted)", lambda: mm(rows, w_gate_up))
    timed("  gather_mm down (bf16, sorted)", lambda: mm(act, w_down))
    timed(
        "dequantize + gather_mm x2 + SwiGLU",
        lambda: mm(clamped_swiglu(mm(rows, dequantized("gate_up")), ex.alpha, ex.limit), dequantized("down")),
    )
    timed("full-attention block, 2,047 tokens, no cache", lambda: model.blocks[1].attn(x[None], "causal"))
    timed("MoE block, 2,047 tokens", lambda: mlp(x[None]))


if __name__ == "__main__":
    main()
