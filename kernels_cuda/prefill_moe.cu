// The prefill experts' grouped GEMM, CUDA (its Metal counterpart: kernels_metal/prefill_moe.metal;
// interface: SPECS in oss_mlx/kernels/sources.py; launcher: oss_mlx/kernels/prefill_moe.py). Written
// per dialect because the matrix units differ: mma.sync m16n8k16 here, simdgroup_matrix 8 x 8 on Metal.
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
//   Row tiles past tiles[E] return at once.
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
