// The decode batch's experts on the matrix units, CUDA (its Metal counterpart:
// kernels_metal/decode_moe.metal; interfaces: SPECS in oss_mlx/kernels/sources.py; launcher:
// oss_mlx/kernels/decode_moe.py). Written per dialect because the matrix units differ: mma.sync
// m16n8k16 here, simdgroup_matrix 8 x 8 on Metal.
//
// Why: the per-slot kernels (decode_moe.gpu) cost about five instructions per weight element and
// (token, expert) slot, so a batch of 16 tokens was bound by instruction issue, not by the bytes of the
// experts it reads (docs/PERFORMANCE.md "Concurrency"). Here each weight is dequantized once a step
// for all the slots that chose its expert (about 2.5 instructions per element), and the slots are the
// mma's narrow side: a tile is 16 weight rows x 8 slots, the weights the A operand, the slots' inputs
// the B operand, so the tensor cores do the multiplies and a slot's result does not depend on the
// other slots of its tile (each output of an mma is its own dot product).
//
// The slots come grouped by expert (moe_group, prefill_moe.gpu; SORTED 0, for one token, whose k
// slots have k distinct experts: one block row per slot, no grouping). One block of 4 warps per
// (expert, tile of RT x 16 weight rows); the 4 warps split the k range (warp w: 128-wide k blocks w, w + 4, ...)
// and meet in shared memory, summed in warp order (the same bits every run). The expert's slots go 8
// at a time (a second pass re-reads the weights: rare at decode sizes).
//
// Fragments (matrix.cuh, g = lane / 4, t = lane % 4): in a 128-wide k block lane t owns the 32-element
// group t of its rows (16 bytes of codes, one scale), so its loads are whole groups and every value a
// lane multiplies carries one scale. A group's word q (8 codes) fills two mmas: fp4x8_bf16 pairs codes
// (i, i + 4), so mma 2q takes codes (0, 4) as the k positions (2t, 2t + 1) and (1, 5) as (2t + 8,
// 2t + 9), mma 2q + 1 codes (2, 6) and (3, 7); the B operand pairs the inputs the same way
// (pair_halves), so every k position means the same input element in A and in B.
//
// gate_up_mma: h[s, i] = swiglu(W[e][2i] . x[n] + b[e][2i], W[e][2i + 1] . x[n] + b[e][2i + 1]) for the
//   slots s = perm[offsets[e] ..] (n = s / K), as gate_up_swiglu rounds it. A tile's rows 0..7 are
//   the gate rows of 8 columns and rows 8..15 their up rows, so the lane holding a gate output holds
//   its up output too (d0 / d2, d1 / d3) and applies SwiGLU there.
// down_mma: d[s, r] = wts[s] * (W[e][r] . h[s] + b[e][r]) in float32 (down_grouped's), then
//   moe_combine adds each token's K outputs to the residual in order.
// down_mma_combine: one token's down_mma and moe_combine in one kernel, y = res + d[0] + ... + d[K -
//   1] with d as down_mma makes it: a block of K x 4 warps per 16 rows, warps 4j .. 4j + 3 being
//   down_mma's block for slot j (the same k split, summed in the same order), then the K results
//   added to the residual in slot order as moe_combine adds them. The same bits as the two kernels,
//   one launch and one graph node fewer a layer (batch 1 decode is partly bound by MLX's host work
//   per node, docs/PERFORMANCE.md).

// The A operand of one mma for rows (g, g + 8) from their words q of a group: codes placed as bf16
// bits (fp4x8_bf16), times the rows' 2^126 * scale multipliers.
OSS_DEV void a_frags(uint w0, uint w1, uint m0, uint m1, bool big, uint big0, uint big1, uint* a) {
  uint r0[4], r1[4];
  fp4x8_bf16(w0, big ? OSS_BF16X2_2POW126 : m0, r0);
  fp4x8_bf16(w1, big ? OSS_BF16X2_2POW126 : m1, r1);
  if (big) {  // a scale past 2^1: 2^126 * scale would overflow bf16, so two exact multiplies
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      r0[i] = bf16x2_mul(r0[i], big0);
      r1[i] = bf16x2_mul(r1[i], big1);
    }
  }
  // mma 2q: (a0, a1, a2, a3) = (r0[0], r1[0], r0[1], r1[1]); mma 2q + 1: the pairs 2 and 3
  a[0] = r0[0]; a[1] = r1[0]; a[2] = r0[1]; a[3] = r1[1];
  a[4] = r0[2]; a[5] = r1[2]; a[6] = r0[3]; a[7] = r1[3];
}
// One warp's part of a tile: rows rw0[rt], rw1[rt] (lane rows g, g + 8 of tile rt), against the
// inputs of slot column g (xin: its row of KD elements), for the warp's k blocks; acc[rt] += D.
// NI of the warp's k blocks have their weights loaded together before any is multiplied: a warp
// that loads one block, waits for it and multiplies it waits one memory round trip per block (~6 at
// the 20b's 2880). The blocks are summed in the same order whatever NI (the same bits).
template <int KD, int RT, int NI>
OSS_DEV void mma_rows(const uint* const* rw0, const uint* const* rw1, const uint8_t* const* rs0,
                      const uint8_t* const* rs1, const __nv_bfloat16* xin, int warp, int t, float (*acc)[4]) {
  constexpr int G = KD / 32, KB = (G + 3) / 4;
  for (int kb0 = warp; kb0 < KB; kb0 += 4 * NI) {
    uint4 w0[NI][RT], w1[NI][RT];
    uint s0[NI][RT], s1[NI][RT];
#pragma unroll
    for (int i = 0; i < NI; ++i) {
      const int gi = 4 * min(kb0 + 4 * i, KB - 1) + t, gc = min(gi, G - 1);  // past the end: not used
#pragma unroll
      for (int rt = 0; rt < RT; ++rt) {
        w0[i][rt] = load_u4(rw0[rt] + 4 * gc);
        w1[i][rt] = load_u4(rw1[rt] + 4 * gc);
        s0[i][rt] = rs0[rt][gc];
        s1[i][rt] = rs1[rt][gc];
      }
    }
#pragma unroll
    for (int i = 0; i < NI; ++i) {
      const int kb = kb0 + 4 * i;
      if (kb >= KB) break;  // warp-uniform
      const int gi = 4 * kb + t, gc = min(gi, G - 1);  // past the end: the last group, its codes zeroed
      uint4 xq[4];
#pragma unroll
      for (int q = 0; q < 4; ++q) xq[q] = *reinterpret_cast<const uint4*>(xin + 32 * gc + 8 * q);
      bool big = false;
#pragma unroll
      for (int rt = 0; rt < RT; ++rt) {
        if (gi >= G) w0[i][rt] = w1[i][rt] = make_uint4(0, 0, 0, 0);
        big |= s0[i][rt] > 128u || s1[i][rt] > 128u;
      }
      big = __any_sync(0xffffffffu, big);
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const uint xw[4] = {xq[q].x, xq[q].y, xq[q].z, xq[q].w};
        const uint b[4] = {pair_halves(xw[0], xw[2], 0), pair_halves(xw[0], xw[2], 1), pair_halves(xw[1], xw[3], 0),
                           pair_halves(xw[1], xw[3], 1)};
#pragma unroll
        for (int rt = 0; rt < RT; ++rt) {
          uint a[8];
          a_frags(u4_word(w0[i][rt], q), u4_word(w1[i][rt], q), bf16x2_scale(s0[i][rt]), bf16x2_scale(s1[i][rt]), big,
                  bf16x2_pow2(s0[i][rt]), bf16x2_pow2(s1[i][rt]), a);
          Mma<__nv_bfloat16>::run(acc[rt], a[0], a[1], a[2], a[3], b[0], b[1]);
          Mma<__nv_bfloat16>::run(acc[rt], a[4], a[5], a[6], a[7], b[2], b[3]);
        }
      }
    }
  }
}
// The 4 warps' partial tiles summed in warp order into warp 0's acc (every warp calls it).
template <int RT> OSS_DEV void split_k_sum(float (*acc)[4], float* red, int warp, int lane) {
  if (warp > 0) {
#pragma unroll
    for (int rt = 0; rt < RT; ++rt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) red[((warp - 1) * RT * 4 + rt * 4 + i) * 32 + lane] = acc[rt][i];
    }
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int w = 0; w < 3; ++w) {
#pragma unroll
      for (int rt = 0; rt < RT; ++rt) {
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[rt][i] += red[(w * RT * 4 + rt * 4 + i) * 32 + lane];
      }
    }
  }
  __syncthreads();  // red is reused by the next pass
}
// @@kernel gate_up_mma
  static_assert(sizeof(T) == 2, "gate_up_mma: bf16 inputs");
  __shared__ float red[3 * RT * 4 * 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  int e, first, last;
  if (!expert_slots(perm, offsets, blockIdx.y, SORTED, e, first, last)) return;  // no slot chose e
  const int col0 = blockIdx.x * 8 * RT;
  // Lane rows: tile rt's row g is the gate row of column col0 + 8 rt + g, row g + 8 its up row.
  const uint* rw0[RT];
  const uint* rw1[RT];
  const uint8_t* rs0[RT];
  const uint8_t* rs1[RT];
#pragma unroll
  for (int rt = 0; rt < RT; ++rt) {
    const long long r = (long long)e * (2 * I) + 2 * min(col0 + 8 * rt + g, I - 1);  // past I: not stored
    rw0[rt] = w + r * (H / 8);
    rw1[rt] = rw0[rt] + H / 8;
    rs0[rt] = scales + r * (H / 32);
    rs1[rt] = rs0[rt] + H / 32;
  }
  const float alpha = consts[0], limit = consts[1];
  for (int p = first; p < last; p += 8) {  // the expert's slots, 8 at a time
    float acc[RT][4];
#pragma unroll
    for (int rt = 0; rt < RT; ++rt) acc[rt][0] = acc[rt][1] = acc[rt][2] = acc[rt][3] = 0.f;
    const int xs = slot_at(perm, min(p + g, last - 1), SORTED);  // slot column g (past the last: not stored)
    mma_rows<H, RT, NI>(rw0, rw1, rs0, rs1, x + (long long)(xs / K) * H, warp, t, acc);
    split_k_sum<RT>(acc, red, warp, lane);
    if (warp != 0) continue;
#pragma unroll
    for (int rt = 0; rt < RT; ++rt) {
      const int col = col0 + 8 * rt + g;
      const long long r = (long long)e * (2 * I) + 2 * min(col, I - 1);
      const float bg = to_f(bias[r]), bu = to_f(bias[r + 1]);
#pragma unroll
      for (int j = 0; j < 2; ++j) {  // slot columns 2t, 2t + 1
        if (col >= I || p + 2 * t + j >= last) continue;
        // The reference rounds the matmul and the bias add to T; so do we, then SwiGLU in float.
        float gt = round_to<T>(round_to<T>(acc[rt][j]) + bg);
        float up = round_to<T>(round_to<T>(acc[rt][2 + j]) + bu);
        gt = fminf(gt, limit);
        up = fminf(fmaxf(up, -limit), limit);
        h[(long long)slot_at(perm, p + 2 * t + j, SORTED) * I + col] = from_f<T>(gt / (1.f + fast_exp(-alpha * gt)) * (up + 1.f));
      }
    }
  }
// @@kernel down_mma
  static_assert(sizeof(T) == 2, "down_mma: bf16 inputs");
  __shared__ float red[3 * RT * 4 * 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  int e, first, last;
  if (!expert_slots(perm, offsets, blockIdx.y, SORTED, e, first, last)) return;
  const int row0 = blockIdx.x * 16 * RT;
  const uint* rw0[RT];
  const uint* rw1[RT];
  const uint8_t* rs0[RT];
  const uint8_t* rs1[RT];
#pragma unroll
  for (int rt = 0; rt < RT; ++rt) {  // tile rt: rows row0 + 16 rt + g and + 8 (past H: not stored)
    const long long r0 = (long long)e * HP + min(row0 + 16 * rt + g, H - 1);
    const long long r1 = (long long)e * HP + min(row0 + 16 * rt + g + 8, H - 1);
    rw0[rt] = w + r0 * (I / 8);
    rw1[rt] = w + r1 * (I / 8);
    rs0[rt] = scales + r0 * (I / 32);
    rs1[rt] = scales + r1 * (I / 32);
  }
  for (int p = first; p < last; p += 8) {
    float acc[RT][4];
#pragma unroll
    for (int rt = 0; rt < RT; ++rt) acc[rt][0] = acc[rt][1] = acc[rt][2] = acc[rt][3] = 0.f;
    const int xs = slot_at(perm, min(p + g, last - 1), SORTED);
    mma_rows<I, RT, NI>(rw0, rw1, rs0, rs1, h + (long long)xs * I, warp, t, acc);
    split_k_sum<RT>(acc, red, warp, lane);
    if (warp != 0) continue;
#pragma unroll
    for (int rt = 0; rt < RT; ++rt) {
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {  // rows g, g + 8
        const int row = row0 + 16 * rt + g + 8 * hh;
        if (row >= H) continue;
        const float bb = to_f(bias[(long long)e * H + row]);
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          if (p + 2 * t + j >= last) continue;
          const int s = slot_at(perm, p + 2 * t + j, SORTED);
          d[(long long)s * H + row] = wts[s] * (acc[rt][2 * hh + j] + bb);
        }
      }
    }
  }
// @@kernel down_mma_combine
  static_assert(sizeof(T) == 2, "down_mma_combine: bf16 inputs");
  __shared__ float red[K][3 * 4 * 32];
  __shared__ float part[K][16];
  const int lane = threadIdx.x & 31, slot = threadIdx.x >> 7, warp = (threadIdx.x >> 5) & 3;
  const int g = lane >> 2, t = lane & 3;
  const int row0 = blockIdx.x * 16;
  const long long e = ids[slot];  // one token: slot j's expert is the router's j-th
  const long long r0 = e * HP + min(row0 + g, H - 1), r1 = e * HP + min(row0 + g + 8, H - 1);  // past H: not stored
  const uint* rw0[1] = {w + r0 * (I / 8)};
  const uint* rw1[1] = {w + r1 * (I / 8)};
  const uint8_t* rs0[1] = {scales + r0 * (I / 32)};
  const uint8_t* rs1[1] = {scales + r1 * (I / 32)};
  float acc[1][4] = {{0.f, 0.f, 0.f, 0.f}};
  mma_rows<I, 1, NI>(rw0, rw1, rs0, rs1, h + (long long)slot * I, warp, t, acc);
  split_k_sum<1>(acc, red[slot], warp, lane);
  if (warp == 0 && t == 0) {  // slot column 0 (every column holds this slot's input)
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {  // rows g, g + 8
      const int row = min(row0 + g + 8 * hh, H - 1);
      part[slot][g + 8 * hh] = wts[slot] * (acc[0][2 * hh] + to_f(bias[e * H + row]));
    }
  }
  __syncthreads();
  if (threadIdx.x < 16 && row0 + (int)threadIdx.x < H) {
    const int row = row0 + threadIdx.x;
    float a = to_f(res[row]);
#pragma unroll
    for (int j = 0; j < K; ++j) a += part[j][threadIdx.x];
    y[row] = from_f<T>(a);
  }
