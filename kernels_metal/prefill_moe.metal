// The prefill experts' grouped GEMM, Metal (its CUDA counterpart: kernels_cuda/prefill_moe.cu;
// interface: SPECS in oss_mlx/kernels/sources.py; launcher: oss_mlx/kernels/prefill_moe.py). Written
// per dialect because the matrix units differ: simdgroup_matrix 8 x 8 here, mma.sync m16n8k16 on CUDA.
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
//   Row tiles past tiles[E] return at once.
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
