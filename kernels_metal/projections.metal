// The attention block's projections for decode (Metal; CUDA twin: kernels_cuda/projections.cu).
//
// At batch 1 a decode step is a few hundred small ops, and on MLX each op costs a few microseconds
// of dispatch whatever its size, so the attention block's ~40 ops (norm casts, matmul, slices,
// reshapes, transposes, concentration, two RoPEs, copies) are folded into two kernels around the
// cache update and the attention itself. Both are GEMVs reading each weight row once with 16-byte
// loads; a simdgroup owns whole rows, lane l holds the 8-element chunks l, l + 32, ... of the input
// in registers (NC = ceil(in / 256) chunks per lane). Rounding follows the reference path op by op
// (norm output, matmul + bias, concentration, RoPE, residual add each rounded to T).
//
// norm_qkv_rope: q, k, v for N tokens at one position from the residual stream x.
//   h = RMSNorm(x) (float32, times the weight, rounded to T); a = W h + b, rows head-major
//   (HQ query heads, then HKV key heads, then HKV value heads, D rows each); q and k times the
//   YaRN concentration, then rotated (half-split pairs i, i + D/2, angle pos / wavelength[i]).
//   inputs  x [N, H], nw [H], w [(HQ + 2 HKV) D, H], b [(HQ + 2 HKV) D], wl [D / 2] float32
//           (wavelengths, as mx.fast.rope takes them), pos [1] int32, consts [2] float32 (eps,
//           concentration)
//   outputs q [N, HQ, D], kv [2, N, HKV, 1, D] (T; the new key, then the new value: the layout of
//           the caches' joint buffer, written with one scatter)
//   template T, H, D, HQ, HKV, NC, PW (pairs of rows per simdgroup, <= 32); 4 simdgroups per threadgroup
//   grid (128 * ceil((HQ + 2 HKV) D / 2 / (4 PW)), N, 1), threadgroup (128, 1, 1)
//
// out_residual: y[n, r] = res[n, r] + (W[r] . o[n] + b[r]).
//   inputs  o [N, IN], w [H, IN], b [H], res [N, H]
//   outputs y [N, H] (T)
//   template T, H, IN, NC, RW (rows per simdgroup, even, <= 32); 4 simdgroups per threadgroup
//   grid (128 * ceil(H / (4 RW)), N, 1), threadgroup (128, 1, 1)
// @@kernel norm_qkv_rope
  constexpr int HALF = D / 2;
  constexpr int NCH = H / 8;
  const int lane = thread_index_in_simdgroup, warp = simdgroup_index_in_threadgroup;
  const int n = threadgroup_position_in_grid.y;
  // Every simdgroup normalises x itself: H values from cache cost less than a barrier.
  float xr[NC][8];
  rms_norm_chunks<T, NC, NCH>(x + (long)n * H, nw, consts[0], lane, xr);

  const float conc = round_to<T>(consts[1]);
  const float p = (float)pos[0];
  // Biases and rotations first and every store last: a load after the reduction, or a store or a
  // branch (sincosf's slow path for large angles is one) between pairs, would put a memory round
  // trip between one pair's weights and the next (measured: 33 µs a call on an H200 with the
  // rotation inside the loop).
  constexpr int PAIRS = (HQ + 2 * HKV) * HALF;
  const int pair0 = (int(threadgroup_position_in_grid.x) * 4 + warp) * PW;
  float b0[PW], b1[PW], cs[PW], sn[PW], y0[PW], y1[PW];
  for (int j = 0; j < PW; ++j) {
    const int pair = min(pair0 + j, PAIRS - 1);  // past the end: recomputed, not stored
    const int head = pair / HALF, i = pair % HALF;
    b0[j] = to_f(b[head * D + i]);
    b1[j] = to_f(b[head * D + i + HALF]);
    const float theta = p * (1.f / wl[i]);
    cs[j] = metal::precise::cos(theta);
    sn[j] = metal::precise::sin(theta);
  }
  for (int j = 0; j < PW; ++j) {
    const int pair = min(pair0 + j, PAIRS - 1);
    const int head = pair / HALF, i = pair % HALF;
    const long r0 = (long)head * D + i, r1 = r0 + HALF;
    float a0 = 0.f, a1 = 0.f;
    dot2_rows<NC, NCH>(w + r0 * H, w + r1 * H, xr, lane, a0, a1);
    y0[j] = round_to<T>(a0 + b0[j]);
    y1[j] = round_to<T>(a1 + b1[j]);
    if (head < HQ + HKV) {
      const float c0 = round_to<T>(y0[j] * conc), c1 = round_to<T>(y1[j] * conc);
      y0[j] = c0 * cs[j] - c1 * sn[j];
      y1[j] = c0 * sn[j] + c1 * cs[j];
    }
  }
  for (int j = 0; j < PW; ++j) {
    const int pair = pair0 + j;
    if (lane == j && pair < PAIRS) {
      const int head = pair / HALF, i = pair % HALF;
      long base;
      device T* dst;
      if (head < HQ) {
        dst = q;
        base = ((long)n * HQ + head) * D;
      } else {  // kv [2, N, HKV, 1, D]: the keys, then the values
        const int h = head - HQ, which = h / HKV;
        dst = kv;
        base = (((long)which * threadgroups_per_grid.y + n) * HKV + h % HKV) * D;
      }
      dst[base + i] = from_f<T>(y0[j]);
      dst[base + i + HALF] = from_f<T>(y1[j]);
    }
  }
// @@kernel out_residual
  constexpr int NCH = IN / 8;
  const int lane = thread_index_in_simdgroup, warp = simdgroup_index_in_threadgroup;
  const int n = threadgroup_position_in_grid.y;
  const int row0 = (int(threadgroup_position_in_grid.x) * 4 + warp) * RW;
  if (row0 >= H) return;
  float xr[NC][8];
  load_chunks<NC, NCH>(o + (long)n * IN, lane, xr);
  // Bias and residual first, every store last (as in norm_qkv_rope).
  float add[RW], acc[RW];
  for (int r = 0; r < RW; ++r) {
    const int row = min(row0 + r, H - 1);  // past the end: recomputed, not stored
    add[r] = to_f(b[row]);
    acc[r] = to_f(res[(long)n * H + row]);
  }
  for (int r = 0; r < RW; r += 2) {
    const int ra = min(row0 + r, H - 1), rb = min(row0 + r + 1, H - 1);
    float a0 = 0.f, a1 = 0.f;
    dot2_rows<NC, NCH>(w + (long)ra * IN, w + (long)rb * IN, xr, lane, a0, a1);
    acc[r] += round_to<T>(a0 + add[r]);
    acc[r + 1] += round_to<T>(a1 + add[r + 1]);
  }
  for (int r = 0; r < RW; ++r) {
    if (lane == r && row0 + r < H) y[(long)n * H + row0 + r] = from_f<T>(acc[r]);
  }
