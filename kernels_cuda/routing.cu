// MoE routing (CUDA twin of kernels_metal/routing.metal).
//
// route: logits = x @ W^T + b (rounded to LT, the dtype the reference's addmm returns), top-K,
// softmax over the K in float32. One block of 256 threads per token; warp w computes the logits
// of experts w, w + 8, ...; warp 0 then selects the K largest (ties: lower index) by K rounds of a
// warp arg-max and normalises them.
//   inputs  x [N, H], w [E, H], b [E]
//   outputs wts [N, K] float32 (descending logit order), ids [N, K] uint32
//   template LT (logits dtype), H, E (<= 256), K (<= E, <= 8)
//   grid (256 * N, 1, 1), threadgroup (256, 1, 1)
//
// norm_route: the MoE block's RMSNorm fused in front of route: h = round_T(x * rsqrt(mean(x^2) + eps)
// * nw) (float32 math, as the reference's float32 rms_norm), written out for the experts, then the
// logits of h as in route.
//   512 threads: the norm's loads are issued together (rms_norm_to_shared), then each warp takes
//   two router rows at once; with one block per token, the single block's round trips are the cost.
//   inputs  x [N, H], nw [H], w [E, H], b [E], eps [1] float32
//   outputs h [N, H] (T), wts [N, K] float32 (descending logit order), ids [N, K] uint32
//   template T, LT (logits dtype), H (<= 7680: the row is staged in 32 KB of threadgroup memory), E (<= 256), K (<= E, <= 8)
//   grid (512 * N, 1, 1), threadgroup (512, 1, 1)
//
// moe_group: the prefill chunk's (token, expert) rows grouped by expert for moe_gemm: counts by
// shared-memory atomics, their prefix sums, then each row's place in its expert's run. The order of
// rows within an expert is arbitrary (atomics); moe_gemm computes each row alone and writes it back
// to its own slot, so the result does not depend on it.
//   inputs  ids [NK] uint32 (route's ids, flattened: row s = n * K + j)
//   outputs perm [NK] uint32 (sorted row -> s), offsets [E + 1] uint32 (expert e's rows are
//           perm[offsets[e] .. offsets[e + 1])), tiles [E + 1] uint32 (expert e's BM-row tiles are
//           moe_gemm's row tiles tiles[e] .. tiles[e + 1])
//   template E (<= 1024), BM
//   grid (1024, 1, 1), threadgroup (1024, 1, 1): one block
// Warp 0 of both kernels: the K largest of logits[0, E) (ties: the lower index), by K rounds of a
// warp arg-max, then the softmax over them; token n's weights and ids written in descending order.
template <int E, int K>
OSS_DEV void top_k_softmax(const float* logits, int lane, int n, float* wts, uint* ids) {
  constexpr int PER = (E + 31) / 32;
  float v[PER];
#pragma unroll
  for (int c = 0; c < PER; ++c) {
    int e = lane + 32 * c;
    v[c] = e < E ? logits[e] : OSS_NEG;
  }
  float top[K];
  int arg[K];
#pragma unroll
  for (int k = 0; k < K; ++k) {
    float best = OSS_NEG;
    int bi = E;
#pragma unroll
    for (int c = 0; c < PER; ++c) {
      int e = lane + 32 * c;
      if (e < E && (v[c] > best || (v[c] == best && e < bi))) { best = v[c]; bi = e; }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      float ob = lane_xor(best, o);
      int oi = lane_xor_i(bi, o);
      if (ob > best || (ob == best && oi < bi)) { best = ob; bi = oi; }
    }
    top[k] = best;
    arg[k] = bi;
#pragma unroll
    for (int c = 0; c < PER; ++c) {
      if (lane + 32 * c == bi) v[c] = OSS_NEG;
    }
  }
  if (lane == 0) {
    float s = 0.f, p[K];
#pragma unroll
    for (int k = 0; k < K; ++k) { p[k] = expf(top[k] - top[0]); s += p[k]; }
#pragma unroll
    for (int k = 0; k < K; ++k) {
      wts[n * K + k] = p[k] / s;
      ids[n * K + k] = (uint)arg[k];
    }
  }
}
// @@kernel route
  OSS_SHARED float logits[E];
  const int n = blockIdx.x;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const auto* xr = x + (long long)n * H;
  for (int e = warp; e < E; e += 8) {
    const auto* wr = w + (long long)e * H;
    float acc = 0.f;
    for (int i = lane * 8; i < H; i += 256) {
      float xv[8], wv[8];
      load8(xr + i, xv);
      load8(wr + i, wv);
#pragma unroll
      for (int t = 0; t < 8; ++t) acc = fmaf(xv[t], wv[t], acc);
    }
    acc = warp_sum(acc);
    if (lane == 0) logits[e] = round_to<LT>(acc + to_f(b[e]));
  }
  OSS_BARRIER();
  if (warp == 0) top_k_softmax<E, K>(logits, lane, n, wts, ids);
// @@kernel norm_route
  constexpr int NT = 512, NWARP = NT / 32;
  OSS_SHARED float logits[E];
  OSS_SHARED float red[NWARP];
  OSS_SHARED OSS_ALIGN16 float hs[H];
  const int n = blockIdx.x, tid = threadIdx.x;
  const int lane = tid & 31, warp = tid >> 5;
  rms_norm_to_shared<T, H, NT>(x + (long long)n * H, nw, eps[0], hs, red, tid);
  // Two router rows a warp at a time (E = 32: every row in one round trip).
  for (int e = warp; e < E; e += 2 * NWARP) {
    const int e2 = min(e + NWARP, E - 1);
    const float a = dot_row_shared<H / 8>(w + (long long)e * H, hs, lane);
    const float a2 = dot_row_shared<H / 8>(w + (long long)e2 * H, hs, lane);
    if (lane == 0) {
      logits[e] = round_to<LT>(a + to_f(b[e]));
      if (e + NWARP < E) logits[e2] = round_to<LT>(a2 + to_f(b[e2]));
    }
  }
  for (int i = tid; i < H; i += NT) h[(long long)n * H + i] = from_f<T>(hs[i]);
  OSS_BARRIER();
  if (warp == 0) top_k_softmax<E, K>(logits, lane, n, wts, ids);
// @@kernel moe_group
  OSS_SHARED uint count[E];
  OSS_SHARED uint cursor[E];
  const int tid = threadIdx.x, nk = ids_shape[0];
  for (int e = tid; e < E; e += 1024) count[e] = 0;
  OSS_BARRIER();
  for (int s = tid; s < nk; s += 1024) atomicAdd(&count[ids[s]], 1u);
  OSS_BARRIER();
  if (tid == 0) {
    uint rows = 0, tile = 0;
    for (int e = 0; e < E; ++e) {
      offsets[e] = rows;
      tiles[e] = tile;
      cursor[e] = rows;
      rows += count[e];
      tile += (count[e] + BM - 1) / BM;
    }
    offsets[E] = rows;
    tiles[E] = tile;
  }
  OSS_BARRIER();
  for (int s = tid; s < nk; s += 1024) perm[atomicAdd(&cursor[ids[s]], 1u)] = (uint)s;
