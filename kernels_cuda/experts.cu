// MoE experts on MXFP4 weights, decode-sized batches (CUDA twin of kernels_metal/experts.metal).
//
// Weights as OpenAI ships them and MLX's mxfp4 packs them: w [E, rows, cols / 8] uint32 (8 e2m1
// codes per word), scales [E, rows, cols / 32] uint8 (e8m0). A warp owns whole rows; lane l holds
// the 32-element groups l, l + 32, ... of the input vector in registers (NC = ceil(cols / 1024)
// groups per lane), so each weight row is read once with 16-byte loads, coalesced across the warp.
//
// gate_up_swiglu: h[s, i] = swiglu(gate_i, up_i) for each (token, expert) slot s = n * K + j, where
//   gate_i = W[e][2i] . x[n] + b[e][2i] and up_i = W[e][2i + 1] . x[n] + b[e][2i + 1] (rows
//   interleaved, as shipped), swiglu = min(g, L) * sigmoid(alpha * min(g, L)) * (clip(u, -L, L) + 1).
//   inputs  x [N, H], ids [N * K] uint32, w [E, 2I, H/8] uint32, scales [E, 2I, H/32] uint8,
//           bias [E, 2I], consts [2] float32 (alpha, limit)
//   outputs h [N * K, I] (T)
//   template T, H, I, K, NC, COLS (columns per warp, <= 32); 4 warps per block
//   grid (128 * ceil(I / (4 * COLS)), N * K, 1), threadgroup (128, 1, 1)
//
// down_combine: y[n, r] = res[n, r] + sum_j wts[n, j] * (W[e_j][r] . h[n * K + j] + b[e_j][r]).
//   inputs  h [N * K, I], ids [N * K] uint32, wts [N * K] float32, w [E, HP, I/8] uint32,
//           scales [E, HP, I/32] uint8 (HP >= H: rows padded for prefill), bias [E, H], res [N, H]
//   outputs y [N, H] (T)
//   template T, H, HP, I, K, NC, ROWS (rows per block); 4 warps per block, warp w takes experts w, w + 4, ...
//   grid (128 * ceil(H / ROWS), N, 1), threadgroup (128, 1, 1)
//
// moe_gemm: a prefill chunk's experts as one grouped GEMM on the matrix units (mma.sync m16n8k16,
//   16-bit T, fp32 accumulation), rows grouped by expert by moe_group. Block: BM = 64 rows of one
//   expert x BN = 128 weight rows (outputs), 8 warps of 32 x 32; per 32-wide k step (one MXFP4 group)
//   the A rows and the weight rows, dequantized to T (exact: e2m1 x 2^k), are staged in shared memory
//   (rows padded to 20 words: the fragment loads hit 32 distinct banks). Why: MLX's gather_qmm ran at
//   ~55 TFLOP/s on an H200 at 2,047 tokens, 80% of the MoE block's time (docs/PERFORMANCE.md).
//   MODE 0 (gate_up): A row r is x[perm[r] / K]; the epilogue adds the bias, rounds as the reference
//     does and applies the clamped SwiGLU to each (gate, up) pair of columns, which the mma's output
//     layout hands one lane side by side; out [NK, NOUT = I] in sorted-row order.
//   MODE 1 (down): A row r is a[r] (moe_gemm's MODE 0 output); the epilogue adds the bias and writes
//     row r to out[perm[r]], i.e. back in (token, expert) order; out [NK, NOUT = H].
//   inputs  a [rows, KD] (T), perm [NK] uint32, offsets [E + 1] uint32, tiles [E + 1] uint32,
//           w [E, N, KD/8] uint32, scales [E, N, KD/32] uint8, bias [E, N] (MODE 0) or [E, NOUT]
//           (MODE 1), consts [2] float32 (alpha, limit)
//   outputs out [NK, NOUT] (T)
//   template T (bf16 or f16), KD (% 32 == 0), N (weight rows, padded ones included), NOUT, E, K,
//            MODE, BM (= 64)
//   grid (256 * ceil(N / 128), ceil(NK / BM) + E, 1), threadgroup (256, 1, 1); row tiles past
//   tiles[E] return at once
// @@kernel gate_up_swiglu
  constexpr int G = H / 32;  // groups per weight row
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int slot = blockIdx.y;
  const int n = slot / K;
  const int col0 = (blockIdx.x * 4 + warp) * COLS;
  if (col0 >= I) return;
  const uint e = ids[slot];
  const float alpha = consts[0], limit = consts[1];

  float xr[NC][32];
  load_groups<NC, G>(x + (long long)n * H, lane, xr);
  const long long row_words = H / 8;
  // Biases first and every store last: a load after the reduction, or a store between columns,
  // would put a memory round trip between one column's weights and the next.
  float bg[COLS], bu[COLS], hv[COLS];
#pragma unroll
  for (int cc = 0; cc < COLS; ++cc) {
    const long long r0 = (long long)e * (2 * I) + 2 * min(col0 + cc, I - 1);
    bg[cc] = to_f(bias[r0]);
    bu[cc] = to_f(bias[r0 + 1]);
  }
#pragma unroll
  for (int cc = 0; cc < COLS; ++cc) {
    const int col = min(col0 + cc, I - 1);  // past the end: recomputes the last column, not stored
    const long long r0 = (long long)e * (2 * I) + 2 * col;  // gate row; r0 + 1 is the up row
    const uint* wg = w + r0 * row_words;
    const uint* wu = wg + row_words;
    const uint8_t* sg = scales + r0 * G;
    const uint8_t* su = sg + G;
    float ag = 0.f, au = 0.f;
#pragma unroll
    for (int c = 0; c < NC; ++c) {
      const int g = min(lane + 32 * c, G - 1);  // past the end: xr is zero
      const uint4 vg = load_u4(wg + 4 * g);
      const uint4 vu = load_u4(wu + 4 * g);
      ag = fmaf(dot32_fp4(vg, xr[c]), e8m0_scale(sg[g]), ag);
      au = fmaf(dot32_fp4(vu, xr[c]), e8m0_scale(su[g]), au);
    }
    ag = warp_sum(ag);
    au = warp_sum(au);
    // The reference rounds the matmul and the bias add to T; so do we, then SwiGLU in float.
    float gt = round_to<T>(round_to<T>(ag) + bg[cc]);
    float up = round_to<T>(round_to<T>(au) + bu[cc]);
    gt = fminf(gt, limit);
    up = fminf(fmaxf(up, -limit), limit);
    hv[cc] = gt / (1.f + fast_exp(-alpha * gt)) * (up + 1.f);
  }
#pragma unroll
  for (int cc = 0; cc < COLS; ++cc) {
    if (lane == cc && col0 + cc < I) h[(long long)slot * I + col0 + cc] = from_f<T>(hv[cc]);
  }
// @@kernel down_combine
  constexpr int G = I / 32;
  OSS_SHARED float part[4][ROWS];
  const int tid = threadIdx.x;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int n = blockIdx.y;
  const int row0 = blockIdx.x * ROWS;
  const long long row_words = I / 8;
  float acc[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) acc[r] = 0.f;
  // Warp w takes the experts w, w + 4, ... of the token; partial sums meet in shared memory.
  for (int j = warp; j < K; j += 4) {
    const int slot = n * K + j;
    const uint e = ids[slot];
    const float wt = wts[slot];
    float hr[NC][32];
    load_groups<NC, G>(h + (long long)slot * I, lane, hr);
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      const int row = min(row0 + r, H - 1);  // past the end: computed, not stored
      const long long ri = (long long)e * HP + row;  // weight rows per expert: HP >= H (padded)
      const uint* wr = w + ri * row_words;
      const uint8_t* sr = scales + ri * G;
      float a = 0.f;
#pragma unroll
      for (int c = 0; c < NC; ++c) {
        const int g = min(lane + 32 * c, G - 1);  // past the end: hr is zero
        a = fmaf(dot32_fp4(load_u4(wr + 4 * g), hr[c]), e8m0_scale(sr[g]), a);
      }
      // lane 0 adds the bias (loaded by every lane: one broadcast load, issued with the weights)
      const float bb = to_f(bias[(long long)e * H + row]);
      acc[r] = fmaf(wt, lane == 0 ? a + bb : a, acc[r]);
    }
  }
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    const float total = warp_sum(acc[r]);
    if (lane == 0) part[warp][r] = total;
  }
  OSS_BARRIER();
  if (tid < ROWS && row0 + tid < H) {
    const long long at = (long long)n * H + row0 + tid;
    y[at] = from_f<T>(to_f(res[at]) + part[0][tid] + part[1][tid] + part[2][tid] + part[3][tid]);
  }
// @@kernel moe_gemm
  static_assert(BM == 64, "moe_gemm: 64-row tiles (2 x 4 warps of 32 x 32)");
  constexpr int BN = 128, LD = 20;  // LD: words per staged row, 16 + 4 of padding
  OSS_SHARED OSS_ALIGN16 uint sa[BM * LD];
  OSS_SHARED OSS_ALIGN16 uint sw[BN * LD];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3, wm = warp >> 2, wn = warp & 3;
  const int tile = blockIdx.y, n0 = blockIdx.x * BN;
  if (tile >= (int)tiles[E]) return;
  int e = 0, hi = E;  // the expert whose tiles hold this one: the last e with tiles[e] <= tile
  while (hi - e > 1) {
    const int mid = (e + hi) / 2;
    if ((int)tiles[mid] <= tile) e = mid; else hi = mid;
  }
  const int row0 = (int)offsets[e] + (tile - (int)tiles[e]) * BM, row_end = (int)offsets[e + 1];

  // This thread stages A row ar (its 8 k values ac) and half wh of weight row wr each k step.
  const int ar = tid >> 2, ac = tid & 3, wr = tid >> 1, wh = tid & 1;
  const bool a_ok = row0 + ar < row_end;
  const int a_row = min(row0 + ar, row_end - 1);
  const T* a_src = a + (long long)(MODE == 0 ? perm[a_row] / K : a_row) * KD + 8 * ac;
  const long long w_row = (long long)e * N + min(n0 + wr, N - 1);  // past N: a valid row, never stored
  const uint* w_src = w + w_row * (KD / 8) + 2 * wh;
  const uint8_t* s_src = scales + w_row * (KD / 32);

  float acc[2][4][4];
#pragma unroll
  for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
    for (int ni = 0; ni < 4; ++ni) acc[mi][ni][0] = acc[mi][ni][1] = acc[mi][ni][2] = acc[mi][ni][3] = 0.f;
  }
  for (int k0 = 0; k0 < KD; k0 += 32) {
    const uint4 av = a_ok ? *reinterpret_cast<const uint4*>(a_src + k0) : make_uint4(0, 0, 0, 0);
    const uint2 wv = *reinterpret_cast<const uint2*>(w_src + k0 / 8);
    const float sc = e8m0_scale(s_src[k0 / 32]);
    float f[16];
    fp4x8_scaled(wv.x, sc, f);
    fp4x8_scaled(wv.y, sc, f + 8);
    OSS_BARRIER();  // the previous step's fragment loads are done
    *reinterpret_cast<uint4*>(&sa[ar * LD + 4 * ac]) = av;
    *reinterpret_cast<uint4*>(&sw[wr * LD + 8 * wh]) =
        make_uint4(Mma<T>::pack(f[0], f[1]), Mma<T>::pack(f[2], f[3]), Mma<T>::pack(f[4], f[5]), Mma<T>::pack(f[6], f[7]));
    *reinterpret_cast<uint4*>(&sw[wr * LD + 8 * wh + 4]) = make_uint4(
        Mma<T>::pack(f[8], f[9]), Mma<T>::pack(f[10], f[11]), Mma<T>::pack(f[12], f[13]), Mma<T>::pack(f[14], f[15]));
    OSS_BARRIER();
#pragma unroll
    for (int ks = 0; ks < 2; ++ks) {
      uint af[2][4];
#pragma unroll
      for (int mi = 0; mi < 2; ++mi) {
        const int r = 32 * wm + 16 * mi + g;
        af[mi][0] = sa[r * LD + 8 * ks + t];
        af[mi][1] = sa[(r + 8) * LD + 8 * ks + t];
        af[mi][2] = sa[r * LD + 8 * ks + 4 + t];
        af[mi][3] = sa[(r + 8) * LD + 8 * ks + 4 + t];
      }
#pragma unroll
      for (int ni = 0; ni < 4; ++ni) {
        const int c = 32 * wn + 8 * ni + g;
        const uint b0 = sw[c * LD + 8 * ks + t], b1 = sw[c * LD + 8 * ks + 4 + t];
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) Mma<T>::run(acc[mi][ni], af[mi][0], af[mi][1], af[mi][2], af[mi][3], b0, b1);
      }
    }
  }
  // Lane (g, t) holds rows g and g + 8 of each 16 x 8 tile, columns 2t and 2t + 1 of it.
  const float alpha = consts[0], limit = consts[1];
#pragma unroll
  for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
    for (int ni = 0; ni < 4; ++ni) {
      const int c = n0 + 32 * wn + 8 * ni + 2 * t;
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const int r = row0 + 32 * wm + 16 * mi + g + 8 * hh;
        if (r >= row_end) continue;
        const float v0 = acc[mi][ni][2 * hh], v1 = acc[mi][ni][2 * hh + 1];
        if (MODE == 0) {  // (gate, up) of output column c / 2; rounded as the reference rounds
          if (c >= N) continue;
          float gt = round_to<T>(round_to<T>(v0) + to_f(bias[(long long)e * N + c]));
          float up = round_to<T>(round_to<T>(v1) + to_f(bias[(long long)e * N + c + 1]));
          gt = fminf(gt, limit);
          up = fminf(fmaxf(up, -limit), limit);
          out[(long long)r * NOUT + c / 2] = from_f<T>(gt / (1.f + fast_exp(-alpha * gt)) * (up + 1.f));
        } else {
          const long long dst = (long long)perm[r] * NOUT;
          if (c < NOUT) out[dst + c] = from_f<T>(round_to<T>(v0) + to_f(bias[(long long)e * NOUT + c]));
          if (c + 1 < NOUT) out[dst + c + 1] = from_f<T>(round_to<T>(v1) + to_f(bias[(long long)e * NOUT + c + 1]));
        }
      }
    }
  }
