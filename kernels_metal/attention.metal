// Attention with sinks for decode (one query per sequence), reading the KV cache in place
// (Metal; CUDA twin: kernels_cuda/attention.cu).
//
// sdpa_decode: one threadgroup (4 simdgroups) per (sequence b, KV head, split of the keys). The
//   G = Hq / Hkv query heads of a KV head share every key and value load. D / 8 lanes hold one key (8 dims
//   each, a 16-byte load), so a block walks 128 / (D / 8) keys at a time; each lane group keeps an
//   online softmax (running max m, sum l, output o) per query head, in base 2 (q is pre-scaled by
//   scale * log2 e). Groups are merged by shuffles, warps through shared memory. With one split the
//   block finishes the softmax itself, starting from the sink (the sink joins the denominator and
//   has no value); with several it writes (o, m, l) partials that sdpa_combine merges.
//   Keys attended: the last WINDOW of the S given (all when WINDOW = 0) - the caches hand out
//   exactly what a decode query may see, so WINDOW only guards longer inputs.
//   inputs  q [B, Hq, D] (contiguous), k, v [B, Hkv, S, D] (any strides: a cache buffer's view),
//           sinks [Hq] (any float), scale_log2 [1] float32 (scale * log2 e)
//   outputs out [B, Hq, D] (T), part [B, Hq, nsplit, D + 2] float32 (only when nsplit > 1)
//   template T, D (multiple of 8, D / 8 a power of two <= 32), G (<= 16), WINDOW
//   grid (128 * nsplit, B * Hkv, 1), threadgroup (128, 1, 1)
//
// sdpa_combine: o[b, h] = sum_i 2^(m_i - M) o_i / (sum_i 2^(m_i - M) l_i + 2^(sink - M)).
//   inputs  part [B, Hq, nsplit, D + 2] float32, sinks [Hq] (any float)
//   outputs out [B, Hq, D] (T)
//   template T, D
//   grid (D * B * Hq, 1, 1), threadgroup (D, 1, 1)
// @@kernel sdpa_decode
  constexpr int LPK = D / 8;             // lanes per key
  constexpr int NG = 128 / LPK;          // key groups per block
  threadgroup float sm_m[4][G];
  threadgroup float sm_l[4][G];
  threadgroup float sm_o[4][G][D];
  const int tid = thread_position_in_threadgroup.x;
  const int lane = thread_index_in_simdgroup, warp = simdgroup_index_in_threadgroup;
  const int sub = tid % LPK, grp = tid / LPK;
  const int split = threadgroup_position_in_grid.x, nsplit = threadgroups_per_grid.x;
  const int Hkv = k_shape[1];
  const int b = int(threadgroup_position_in_grid.y) / Hkv, kvh = int(threadgroup_position_in_grid.y) % Hkv;
  const int S = k_shape[2];
  const int lo = (WINDOW > 0 && S > WINDOW) ? S - WINDOW : 0;
  const int chunk = (S - lo + nsplit - 1) / nsplit;
  const int s0 = lo + split * chunk;
  const int s1 = min(S, s0 + chunk);

  const float qscale = scale_log2[0];
  float qr[G][8];
  for (int g = 0; g < G; ++g) {
    load8(q + ((long)(b * Hkv + kvh) * G + g) * D + 8 * sub, qr[g]);
    for (int t = 0; t < 8; ++t) qr[g][t] *= qscale;
  }
  float m[G], l[G], o[G][8];
  for (int g = 0; g < G; ++g) {
    m[g] = OSS_NEG;
    l[g] = 0.f;
    for (int t = 0; t < 8; ++t) o[g][t] = 0.f;
  }
  const long kb = (long)b * k_strides[0] + (long)kvh * k_strides[1] + 8 * sub * k_strides[3];
  const long vb = (long)b * v_strides[0] + (long)kvh * v_strides[1] + 8 * sub * v_strides[3];
  const long ks = k_strides[2], vs = v_strides[2];
  const bool unit = (k_strides[3] == 1) && (v_strides[3] == 1);
  // Every lane runs the same number of iterations (the shuffles below need the whole warp);
  // lanes past the end of the split load nothing and leave their state alone.
  for (int base = s0; base < s1; base += NG) {
    const int s = base + grp;
    const bool valid = s < s1;
    float kf[8], vf[8];
    if (valid) {
      if (unit) {
        load8(k + kb + s * ks, kf);
        load8(v + vb + s * vs, vf);
      } else {
        load8_strided(k + kb + s * ks, k_strides[3], kf);
        load8_strided(v + vb + s * vs, v_strides[3], vf);
      }
    } else {
      for (int t = 0; t < 8; ++t) kf[t] = vf[t] = 0.f;
    }
    for (int g = 0; g < G; ++g) {
      float d = 0.f;
      for (int t = 0; t < 8; ++t) d = fma(qr[g][t], kf[t], d);
      for (int off = LPK / 2; off > 0; off >>= 1) d += lane_xor(d, off);
      if (valid) {
        const float mn = max(m[g], d);
        const float c = fast_exp2(m[g] - mn), p = fast_exp2(d - mn);
        l[g] = fma(l[g], c, p);
        for (int t = 0; t < 8; ++t) o[g][t] = fma(o[g][t], c, p * vf[t]);
        m[g] = mn;
      }
    }
  }
  // Merge the key groups of this simdgroup (lanes with the same `sub`).
  for (int off = LPK; off < 32; off <<= 1) {
    for (int g = 0; g < G; ++g) {
      const float mo = lane_xor(m[g], off), lo_ = lane_xor(l[g], off);
      const float mn = max(m[g], mo);
      const float ca = fast_exp2(m[g] - mn), cb = fast_exp2(mo - mn);
      l[g] = l[g] * ca + lo_ * cb;
      for (int t = 0; t < 8; ++t) o[g][t] = o[g][t] * ca + lane_xor(o[g][t], off) * cb;
      m[g] = mn;
    }
  }
  if (lane < LPK) {
    for (int g = 0; g < G; ++g) {
      if (lane == 0) {
        sm_m[warp][g] = m[g];
        sm_l[warp][g] = l[g];
      }
      for (int t = 0; t < 8; ++t) sm_o[warp][g][8 * sub + t] = o[g][t];
    }
  }
  OSS_BARRIER();
  // Merge the 4 simdgroups: thread (g, d) for g < G, d < D.
  for (int i = tid; i < G * D; i += 128) {
    const int g = i / D, d = i % D;
    float M = sm_m[0][g];
    for (int w4 = 1; w4 < 4; ++w4) M = max(M, sm_m[w4][g]);
    float L = 0.f, O = 0.f;
    for (int w4 = 0; w4 < 4; ++w4) {
      const float c = fast_exp2(sm_m[w4][g] - M);
      L = fma(sm_l[w4][g], c, L);
      O = fma(sm_o[w4][g][d], c, O);
    }
    const int h = kvh * G + g;
    const long bh = (long)b * (Hkv * G) + h;
    if (nsplit == 1) {
      const float sk = to_f(sinks[h]) * OSS_LOG2E;
      const float M2 = max(M, sk);
      const float c = fast_exp2(M - M2);
      const float den = L * c + fast_exp2(sk - M2);
      out[bh * D + d] = from_f<T>(O * c / den);
    } else {
      device float* pp = part + (bh * nsplit + split) * (D + 2);
      pp[d] = O;
      if (d == 0) {
        pp[D] = M;
        pp[D + 1] = L;
      }
    }
  }
// @@kernel sdpa_combine
  const int bh = threadgroup_position_in_grid.x, d = thread_position_in_threadgroup.x;
  const int nsplit = part_shape[2];
  const int Hq = part_shape[1];
  const device float* pp = part + (long)bh * nsplit * (D + 2);
  const float sk = to_f(sinks[bh % Hq]) * OSS_LOG2E;
  float M = sk;
  for (int i = 0; i < nsplit; ++i) M = max(M, pp[i * (D + 2) + D]);
  float L = fast_exp2(sk - M), O = 0.f;
  for (int i = 0; i < nsplit; ++i) {
    const float c = fast_exp2(pp[i * (D + 2) + D] - M);
    L = fma(pp[i * (D + 2) + D + 1], c, L);
    O = fma(pp[i * (D + 2) + d], c, O);
  }
  out[(long)bh * D + d] = from_f<T>(O / L);
