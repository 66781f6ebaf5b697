// MoE experts on MXFP4 weights, decode-sized batches (Metal; CUDA twin: kernels_cuda/experts.cu).
//
// Weights as OpenAI ships them and MLX's mxfp4 packs them: w [E, rows, cols / 8] uint32 (8 e2m1
// codes per word), scales [E, rows, cols / 32] uint8 (e8m0). A simdgroup owns whole rows; lane l
// holds the 32-element groups l, l + 32, ... of the input vector in registers (NC = ceil(cols /
// 1024) groups per lane), so each weight row is read once with 16-byte loads, coalesced across the
// simdgroup.
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
// moe_gemm: a prefill chunk's experts as one grouped GEMM on the matrix units (simdgroup_matrix
//   8 x 8, fp32), rows grouped by expert by moe_group. Threadgroup: BM = 64 rows of one expert x
//   BN = 128 weight rows (outputs), 8 simdgroups of 32 x 32 (4 x 4 matrices); per 32-wide k step (one
//   MXFP4 group) the A rows and the weight rows, dequantized (exact: e2m1 x 2^k), are staged in
//   threadgroup memory as floats (rows padded to 36), the weights read transposed as the B operand.
//   Why: MLX's gather_qmm is most of a prefill chunk's MoE time (docs/PERFORMANCE.md, on CUDA).
//   MODE 0 (gate_up): A row r is x[perm[r] / K]; the epilogue adds the bias, rounds as the reference
//     does and applies the clamped SwiGLU to each (gate, up) pair of columns, which a lane holds side
//     by side in the matrix layout; out [NK, NOUT = I] in sorted-row order.
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
  const int lane = thread_index_in_simdgroup, warp = simdgroup_index_in_threadgroup;
  const int slot = threadgroup_position_in_grid.y;
  const int n = slot / K;
  const int col0 = (int(threadgroup_position_in_grid.x) * 4 + warp) * COLS;
  if (col0 >= I) return;
  const uint e = ids[slot];
  const float alpha = consts[0], limit = consts[1];

  float xr[NC][32];
  load_groups<NC, G>(x + (long)n * H, lane, xr);
  const long row_words = H / 8;
  // Biases first and every store last: a load after the reduction, or a store between columns,
  // would put a memory round trip between one column's weights and the next.
  float bg[COLS], bu[COLS], hv[COLS];
  for (int cc = 0; cc < COLS; ++cc) {
    const long r0 = (long)e * (2 * I) + 2 * min(col0 + cc, I - 1);
    bg[cc] = to_f(bias[r0]);
    bu[cc] = to_f(bias[r0 + 1]);
  }
  for (int cc = 0; cc < COLS; ++cc) {
    const int col = min(col0 + cc, I - 1);  // past the end: recomputes the last column, not stored
    const long r0 = (long)e * (2 * I) + 2 * col;  // gate row; r0 + 1 is the up row
    const device uint32_t* wg = w + r0 * row_words;
    const device uint32_t* wu = wg + row_words;
    const device uint8_t* sg = scales + r0 * G;
    const device uint8_t* su = sg + G;
    float ag = 0.f, au = 0.f;
    for (int c = 0; c < NC; ++c) {
      const int g = min(lane + 32 * c, G - 1);  // past the end: xr is zero
      const uint4 vg = load_u4(wg + 4 * g);
      const uint4 vu = load_u4(wu + 4 * g);
      ag = fma(dot32_fp4(vg, xr[c]), e8m0_scale(sg[g]), ag);
      au = fma(dot32_fp4(vu, xr[c]), e8m0_scale(su[g]), au);
    }
    ag = warp_sum(ag);
    au = warp_sum(au);
    // The reference rounds the matmul and the bias add to T; so do we, then SwiGLU in float.
    float gt = round_to<T>(round_to<T>(ag) + bg[cc]);
    float up = round_to<T>(round_to<T>(au) + bu[cc]);
    gt = min(gt, limit);
    up = min(max(up, -limit), limit);
    hv[cc] = gt / (1.f + fast_exp(-alpha * gt)) * (up + 1.f);
  }
  for (int cc = 0; cc < COLS; ++cc) {
    if (lane == cc && col0 + cc < I) h[(long)slot * I + col0 + cc] = from_f<T>(hv[cc]);
  }
// @@kernel down_combine
  constexpr int G = I / 32;
  OSS_SHARED float part[4][ROWS];
  const int tid = thread_position_in_threadgroup.x;
  const int lane = thread_index_in_simdgroup, warp = simdgroup_index_in_threadgroup;
  const int n = threadgroup_position_in_grid.y;
  const int row0 = int(threadgroup_position_in_grid.x) * ROWS;
  const long row_words = I / 8;
  float acc[ROWS];
  for (int r = 0; r < ROWS; ++r) acc[r] = 0.f;
  // Warp w takes the experts w, w + 4, ... of the token; partial sums meet in shared memory.
  for (int j = warp; j < K; j += 4) {
    const int slot = n * K + j;
    const uint e = ids[slot];
    const float wt = wts[slot];
    float hr[NC][32];
    load_groups<NC, G>(h + (long)slot * I, lane, hr);
    for (int r = 0; r < ROWS; ++r) {
      const int row = min(row0 + r, H - 1);  // past the end: computed, not stored
      const long ri = (long)e * HP + row;  // weight rows per expert: HP >= H (padded)
      const device uint32_t* wr = w + ri * row_words;
      const device uint8_t* sr = scales + ri * G;
      float a = 0.f;
      for (int c = 0; c < NC; ++c) {
        const int g = min(lane + 32 * c, G - 1);  // past the end: hr is zero
        a = fma(dot32_fp4(load_u4(wr + 4 * g), hr[c]), e8m0_scale(sr[g]), a);
      }
      // lane 0 adds the bias (loaded by every lane: one broadcast load, issued with the weights)
      const float bb = to_f(bias[(long)e * H + row]);
      acc[r] = fma(wt, lane == 0 ? a + bb : a, acc[r]);
    }
  }
  for (int r = 0; r < ROWS; ++r) {
    const float total = warp_sum(acc[r]);
    if (lane == 0) part[warp][r] = total;
  }
  OSS_BARRIER();
  if (tid < ROWS && row0 + tid < H) {
    const long at = (long)n * H + row0 + tid;
    y[at] = from_f<T>(to_f(res[at]) + part[0][tid] + part[1][tid] + part[2][tid] + part[3][tid]);
  }
// @@kernel moe_gemm
  static_assert(BM == 64, "moe_gemm: 64-row tiles (2 x 4 simdgroups of 32 x 32)");
  constexpr int BN = 128, LDF = 36;  // LDF: floats per staged row, 32 + 4 of padding
  threadgroup float sa[BM * LDF];
  threadgroup float sw[BN * LDF];
  const int tid = thread_position_in_threadgroup.x;
  const int lane = thread_index_in_simdgroup, warp = simdgroup_index_in_threadgroup;
  const int wm = warp >> 2, wn = warp & 3;
  const int tile = threadgroup_position_in_grid.y, n0 = threadgroup_position_in_grid.x * BN;
  if (tile >= int(tiles[E])) return;
  int e = 0, hi = E;  // the expert whose tiles hold this one: the last e with tiles[e] <= tile
  while (hi - e > 1) {
    const int mid = (e + hi) / 2;
    if (int(tiles[mid]) <= tile) e = mid; else hi = mid;
  }
  const int row0 = int(offsets[e]) + (tile - int(tiles[e])) * BM, row_end = int(offsets[e + 1]);

  // This thread stages A row ar (its 8 k values ac) and half wh of weight row wr each k step.
  const int ar = tid >> 2, ac = tid & 3, wr = tid >> 1, wh = tid & 1;
  const bool a_ok = row0 + ar < row_end;
  const int a_row = min(row0 + ar, row_end - 1);
  const device T* a_src = a + long(MODE == 0 ? perm[a_row] / K : a_row) * KD + 8 * ac;
  const long w_row = long(e) * N + min(n0 + wr, N - 1);  // past N: a valid row, never stored
  const device uint32_t* w_src = w + w_row * (KD / 8) + 2 * wh;
  const device uint8_t* s_src = scales + w_row * (KD / 32);

  frag8 acc[4][4];
  for (int i = 0; i < 4; ++i) {
    for (int j = 0; j < 4; ++j) acc[i][j] = make_filled_simdgroup_matrix<float, 8, 8>(0.f);
  }
  for (int k0 = 0; k0 < KD; k0 += 32) {
    float av[8];
    if (a_ok) {
      load8(a_src + k0, av);
    } else {
      for (int i = 0; i < 8; ++i) av[i] = 0.f;
    }
    const float sc = e8m0_scale(s_src[k0 / 32]);
    float f[16];
    fp4x8_scaled(w_src[k0 / 8], sc, f);
    fp4x8_scaled(w_src[k0 / 8 + 1], sc, f + 8);
    OSS_BARRIER();  // the previous step's matrix loads are done
    for (int i = 0; i < 8; ++i) sa[ar * LDF + 8 * ac + i] = av[i];
    for (int i = 0; i < 16; ++i) sw[wr * LDF + 16 * wh + i] = round_to<T>(f[i]);
    OSS_BARRIER();
    for (int kk = 0; kk < 32; kk += 8) {
      frag8 af[4], bf[4];
      for (int i = 0; i < 4; ++i) simdgroup_load(af[i], sa + (32 * wm + 8 * i) * LDF + kk, LDF);
      for (int j = 0; j < 4; ++j) simdgroup_load(bf[j], sw + (32 * wn + 8 * j) * LDF + kk, LDF, ulong2(0, 0), true);
      for (int i = 0; i < 4; ++i) {
        for (int j = 0; j < 4; ++j) simdgroup_multiply_accumulate(acc[i][j], af[i], bf[j], acc[i][j]);
      }
    }
  }
  // Lane (fm, fn) holds row fm, columns fn and fn + 1 of each 8 x 8 result.
  const float alpha = consts[0], limit = consts[1];
  const int fm = frag_row(lane), fn = frag_col(lane);
  for (int i = 0; i < 4; ++i) {
    const int r = row0 + 32 * wm + 8 * i + fm;
    if (r >= row_end) continue;
    for (int j = 0; j < 4; ++j) {
      const int c = n0 + 32 * wn + 8 * j + fn;
      const float2 v = elems(acc[i][j]);
      if (MODE == 0) {  // (gate, up) of output column c / 2; rounded as the reference rounds
        if (c >= N) continue;
        float gt = round_to<T>(round_to<T>(v.x) + to_f(bias[long(e) * N + c]));
        float up = round_to<T>(round_to<T>(v.y) + to_f(bias[long(e) * N + c + 1]));
        gt = min(gt, limit);
        up = min(max(up, -limit), limit);
        out[long(r) * NOUT + c / 2] = from_f<T>(gt / (1.f + fast_exp(-alpha * gt)) * (up + 1.f));
      } else {
        const long dst = long(perm[r]) * NOUT;
        if (c < NOUT) out[dst + c] = from_f<T>(round_to<T>(v.x) + to_f(bias[long(e) * NOUT + c]));
        if (c + 1 < NOUT) out[dst + c + 1] = from_f<T>(round_to<T>(v.y) + to_f(bias[long(e) * NOUT + c + 1]));
      }
    }
  }
