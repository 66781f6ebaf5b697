"""A numpy model of moe_group + moe_gemm's index maps (kernels_shared/prefill_moe.gpu,
kernels_cuda/prefill_moe.cu), against the reference experts on a small random layer. No GPU: it
checks the design (which shared-memory word each lane stages and reads for the mma.sync m16n8k16
fragments, the tile -> expert search, the epilogue's rows and columns), not the compiled kernel,
which the GPU tests check.

Each thread's staging and each lane's fragment loads are written as in the CUDA source; an
m16n8k16 product is A (16 x 16, from the lanes' a0..a3) times B (16 x 8, from b0, b1) with the PTX
fragment layouts: a0 (row g, k 2t..2t+1), a1 (row g+8), a2 (k + 8), a3 (row g+8, k + 8); b0 (k 2t..2t+1,
column g), b1 (k + 8); c0, c1 (row g, columns 2t, 2t+1), c2, c3 (row g+8).

    python benchmarks/probes/moe_gemm_layout_model.py
"""

from __future__ import annotations

import numpy as np

BM, BN, LD = 64, 128, 20


def moe_group(ids: np.ndarray, E: int, rng) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    counts = np.bincount(ids, minlength=E)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    tiles = np.concatenate([[0], np.cumsum((counts + BM - 1) // BM)])
    perm = np.empty(len(ids), dtype=np.int64)
    cursor = offsets[:-1].copy()
    for s in rng.permutation(len(ids)):  # atomics: any order within an expert
        perm[cursor[ids[s]]] = s
        cursor[ids[s]] += 1
    return perm, offsets, tiles


def moe_gemm(a, perm, offsets, tiles, w, bias, E, K, mode, nout, alpha=1.702, limit=7.0):
    """w: dequantized weights [E, N, KD] (float); the kernel's loops, one thread / lane at a time."""
    N, KD = w.shape[1], w.shape[2]
    NK = len(perm)
    out = np.full((NK, nout), np.nan)
    for tile in range(-(-NK // BM) + E):
        if tile >= tiles[E]:
            continue
        e, hi = 0, E
        while hi - e > 1:
            mid = (e + hi) // 2
            e, hi = (mid, hi) if tiles[mid] <= tile else (e, mid)
        row0, row_end = offsets[e] + (tile - tiles[e]) * BM, offsets[e + 1]
        for n0 in range(0, N, BN):
            acc = np.zeros((8, 2, 4, 32, 4))
            for k0 in range(0, KD, 32):
                sa = np.zeros((BM * LD, 2))
                sw = np.zeros((BN * LD, 2))
                for tid in range(256):
                    ar, ac, wr, wh = tid >> 2, tid & 3, tid >> 1, tid & 1
                    a_row = min(row0 + ar, row_end - 1)
                    src = perm[a_row] // K if mode == 0 else a_row
                    av = a[src, k0 + 8 * ac : k0 + 8 * ac + 8] if row0 + ar < row_end else np.zeros(8)
                    sa[ar * LD + 4 * ac : ar * LD + 4 * ac + 4] = av.reshape(4, 2)
                    f = w[e, min(n0 + wr, N - 1), k0 + 16 * wh : k0 + 16 * wh + 16]
                    sw[wr * LD + 8 * wh : wr * LD + 8 * wh + 8] = f.reshape(8, 2)
                for warp in range(8):
                    wm, wn = warp >> 2, warp & 3
                    for ks in range(2):
                        for mi in range(2):
                            for ni in range(4):
                                A, B = np.zeros((16, 16)), np.zeros((16, 8))
                                for lane in range(32):
                                    g, t = lane >> 2, lane & 3
                                    r = 32 * wm + 16 * mi + g
                                    c = 32 * wn + 8 * ni + g
                                    A[g, 2 * t : 2 * t + 2] = sa[r * LD + 8 * ks + t]
                                    A[g + 8, 2 * t : 2 * t + 2] = sa[(r + 8) * LD + 8 * ks + t]
                                    A[g, 2 * t + 8 : 2 * t + 10] = sa[r * LD + 8 * ks + 4 + t]
                                    A[g + 8, 2 * t + 8 : 2 * t + 10] = sa[(r + 8) * LD + 8 * ks + 4 + t]
                                    B[2 * t : 2 * t + 2, g] = sw[c * LD + 8 * ks + t]
                                    B[2 * t + 8 : 2 * t + 10, g] = sw[c * LD + 8 * ks + 4 + t]
                                D = A @ B
                                for lane in range(32):
                                    g, t = lane >> 2, lane & 3
                                    acc[warp, mi, ni, lane] += [
                                        D[g, 2 * t],
                                        D[g, 2 * t + 1],
                                        D[g + 8, 2 * t],
                                        D[g + 8, 2 * t + 1],
                                    ]
            for warp in range(8):
                wm, wn = warp >> 2, warp & 3
                for mi in range(2):
                    for ni in range(4):
                        for lane in range(32):
                            g, t = lane >> 2, lane & 3
                            c = n0 + 32 * wn + 8 * ni + 2 * t
                            for hh in range(2):
                                r = row0 + 32 * wm + 16 * mi + g + 8 * hh
                                if r >= row_end:
                                    continue
                                v0, v1 = acc[warp, mi, ni, lane, 2 * hh : 2 * hh + 2]
                                if mode == 0:
                                    if c >= N:
                                        continue
                                    gt = min(v0 + bias[e, c], limit)
                                    up = np.clip(v1 + bias[e, c + 1], -limit, limit)
                                    out[r, c // 2] = gt / (1 + np.exp(-alpha * gt)) * (up + 1)
                                else:
                                    for cc, v in ((c, v0), (c + 1, v1)):
                                        if cc < nout:
                                            out[perm[r], cc] = v + bias[e, cc]
    return out


def main() -> None:
    import mlx.core as mx

    from oss_mlx.config import ModelConfig
    from oss_mlx.moe import Experts

    rng = np.random.default_rng(0)
    E, K, H, I, N = 5, 2, 64, 96, 90  # 180 rows: uneven experts, partial row and column tiles
    config = ModelConfig(
        num_layers=1,
        num_experts=E,
        experts_per_token=K,
        vocab_size=16,
        hidden_size=H,
        intermediate_size=I,
        head_dim=16,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    experts = Experts(config, quantized=True)
    for name, rows, cols in (("gate_up", 2 * I, H), ("down", H, I)):
        wq, scales = mx.quantize(mx.random.normal((E, rows, cols)) * 0.2, group_size=32, bits=4, mode="mxfp4")
        setattr(experts, f"{name}_weight", wq)
        setattr(experts, f"{name}_scales", scales)
        setattr(experts, f"{name}_bias", mx.random.normal((E, rows)) * 0.1)
    x = mx.random.normal((N, H))
    ids = np.array([rng.choice([0, 1, 1, 3, 3, 3, 4], K, replace=False) for _ in range(N)])  # expert 2 empty
    want = np.array(experts(x, mx.array(ids, dtype=mx.uint32)))  # [N, K, H]

    def dq(name):
        w, s = getattr(experts, f"{name}_weight"), getattr(experts, f"{name}_scales")
        return np.array(mx.dequantize(w, s, group_size=32, bits=4, mode="mxfp4", dtype=mx.float32))

    perm, offsets, tiles = moe_group(ids.reshape(-1), E, rng)
    assert sorted(perm) == list(range(N * K)) and (np.diff(ids.reshape(-1)[perm]) >= 0).all()
    h = moe_gemm(np.array(x), perm, offsets, tiles, dq("gate_up"), np.array(experts.gate_up_bias), E, K, 0, I)
    y = moe_gemm(h, perm, offsets, tiles, dq("down"), np.array(experts.down_bias), E, K, 1, H).reshape(
        N, K, H
    )
    err = np.abs(y - want).max() / np.abs(want).max()
    print(
        f"rows {N * K}, experts {E} (one empty), tiles {tiles.tolist()}: "
        f"max |model - reference| / max = {err:.2e}"
    )
    assert not np.isnan(y).any() and err < 1e-4, err


if __name__ == "__main__":
    main()
