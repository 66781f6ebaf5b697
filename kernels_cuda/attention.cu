// Attention with sinks for decode (one query per sequence), reading the KV cache in place
// (CUDA twin of kernels_metal/attention.metal).
//
// sdpa_decode: one block (4 warps) per (sequence b, KV head, split of the keys). The G = Hq / Hkv
//   query heads of a KV head share every key and value load. Each warp walks tiles of 32 keys. For
//   the scores a lane takes one key whole (D / 8 16-byte loads) and dots it with the G queries, which
//   sit in shared memory and are read by all lanes alike (broadcast, no shuffles). The tile's maximum
//   (warp-uniform, so the running max m is too) rescales the lane's running sum l and the output;
//   the probabilities go through shared memory to P.V, where lane (kg, sub) takes 8 dims (8 sub ..)
//   of the keys kg, kg + KG, ... (KG = 32 / (D / 8)), one 16-byte load each, issued with the keys'
//   loads so a tile costs one memory round trip; key groups are summed once at the end. Why this
//   shape: the first version gave D / 8 lanes to a key and merged dots by shuffles per key; its 190
//   registers let 8 warps per SM hold 8 KB of loads in flight (~0.6 TB/s at 32k keys on an H200);
//   a second read values 4 bytes a lane at a time, four round trips a tile.
//   Online softmax in base 2 (q is pre-scaled by scale * log2 e). Warps merge through shared
//   memory. With one split the block finishes the softmax itself, starting from the sink (the sink
//   joins the denominator and has no value); with several it writes (o, m, l) partials that
//   sdpa_combine merges.
//   Keys attended: the first min(S, pos + 1) of the S given, the query's position pos read from
//   memory (so one compiled decode step serves every position: k, v may be a cache buffer whose
//   later slots are unwritten, or a window layer's ring, where order does not matter), of those the
//   last WINDOW (all when WINDOW = 0; the caches hand out only what a query may see, so WINDOW only
//   guards longer inputs).
//   inputs  q [B, Hq, D] (contiguous), k, v [B, Hkv, S, D] (any strides: a cache buffer's view),
//           sinks [Hq] (any float), scale_log2 [1] float32 (scale * log2 e), pos [1] int32
//   outputs out [B, Hq, D] (T), part [B, Hq, nsplit, D + 2] float32 (only when nsplit > 1)
//   template T, D (D / 8 a power of two <= 32), G (<= 16, G * D <= 512), WINDOW
//   grid (128 * nsplit, B * Hkv, 1), threadgroup (128, 1, 1)
//
// sdpa_combine: o[b, h] = sum_i 2^(m_i - M) o_i / (sum_i 2^(m_i - M) l_i + 2^(sink - M)).
//   inputs  part [B, Hq, nsplit <= 256, D + 2] float32, sinks [Hq] (any float)
//   outputs out [B, Hq, D] (T)
//   template T, D
//   grid (D * B * Hq, 1, 1), threadgroup (D, 1, 1)
// @@kernel sdpa_decode
  constexpr int LPV = D / 8;      // lanes per value row in P.V (8 dims each, a 16-byte load)
  constexpr int KG = 32 / LPV;    // key groups in P.V: lane (kg, sub) takes keys kg, kg + KG, ...
  OSS_SHARED OSS_ALIGN16 float sq[G][D];
  OSS_SHARED float sp[4][G][32];
  OSS_SHARED float sm_m[4][G];
  OSS_SHARED float sm_l[4][G];
  OSS_SHARED float sm_o[4][G][D];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int sub = lane % LPV, kg = lane / LPV;
  const int split = blockIdx.x, nsplit = gridDim.x;
  const int Hkv = k_shape[1];
  const int b = blockIdx.y / Hkv, kvh = blockIdx.y % Hkv;
  const int S = min((int)k_shape[2], pos[0] + 1);  // keys written so far (a buffer may be longer)
  const int lo = (WINDOW > 0 && S > WINDOW) ? S - WINDOW : 0;
  const int chunk = (S - lo + nsplit - 1) / nsplit;
  const int s0 = lo + split * chunk;
  const int s1 = min(S, s0 + chunk);

  const float qscale = scale_log2[0];
  const long long q0 = (long long)(b * Hkv + kvh) * G * D;
  for (int i = tid; i < G * D; i += 128) sq[i / D][i % D] = to_f(q[q0 + i]) * qscale;
  OSS_BARRIER();

  // m is the same on every lane; l sums this lane's keys; o holds dims 8 sub .. 8 sub + 7 over
  // this lane's P.V keys (the key groups are summed once, after the last tile).
  float m[G], l[G], o[G][8];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    m[g] = OSS_NEG;
    l[g] = 0.f;
#pragma unroll
    for (int t = 0; t < 8; ++t) o[g][t] = 0.f;
  }
  const long long kb = (long long)b * k_strides[0] + (long long)kvh * k_strides[1];
  const long long vb = (long long)b * v_strides[0] + (long long)kvh * v_strides[1];
  const long long ks = k_strides[2], vs = v_strides[2], kd = k_strides[3], vd = v_strides[3];
  // Tiles are warp-uniform (the shuffles need the whole warp); lanes past the end load nothing.
  for (int base = s0 + 32 * warp; base < s1; base += 128) {
    // The tile's values first: their loads are then in flight with the keys' (one round trip).
    float vf[LPV][8];
#pragma unroll
    for (int i = 0; i < LPV; ++i) {
      const int sv = base + kg + KG * i;
      if (sv < s1) {
        auto vr = v + vb + sv * vs + 8 * sub * vd;
        if (vd == 1) {
          load8(vr, vf[i]);
        } else {
          load8_strided(vr, vd, vf[i]);
        }
      } else {
#pragma unroll
        for (int t = 0; t < 8; ++t) vf[i][t] = 0.f;
      }
    }
    const int s = base + lane;
    const bool valid = s < s1;
    float dot[G];
#pragma unroll
    for (int g = 0; g < G; ++g) dot[g] = 0.f;
    if (valid) {
      auto kr = k + kb + s * ks;
#pragma unroll
      for (int c = 0; c < D / 8; ++c) {
        float kf[8];
        if (kd == 1) {
          load8(kr + 8 * c, kf);
        } else {
          load8_strided(kr + 8 * c * kd, kd, kf);
        }
#pragma unroll
        for (int g = 0; g < G; ++g) {
#pragma unroll
          for (int t = 0; t < 8; ++t) dot[g] = fmaf(sq[g][8 * c + t], kf[t], dot[g]);
        }
      }
    }
#pragma unroll
    for (int g = 0; g < G; ++g) {
      float mt = valid ? dot[g] : OSS_NEG;
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) mt = fmaxf(mt, lane_xor(mt, off));
      const float mn = fmaxf(m[g], mt);
      const float c = fast_exp2(m[g] - mn);
      const float p = valid ? fast_exp2(dot[g] - mn) : 0.f;
      l[g] = fmaf(l[g], c, p);
#pragma unroll
      for (int t = 0; t < 8; ++t) o[g][t] *= c;
      m[g] = mn;
      sp[warp][g][lane] = p;
    }
    OSS_WARP_BARRIER();
#pragma unroll
    for (int i = 0; i < LPV; ++i) {
#pragma unroll
      for (int g = 0; g < G; ++g) {
        const float p = sp[warp][g][kg + KG * i];  // 0 past the end
#pragma unroll
        for (int t = 0; t < 8; ++t) o[g][t] = fmaf(p, vf[i][t], o[g][t]);
      }
    }
    OSS_WARP_BARRIER();  // sp is rewritten by the next tile
  }
  // Sum the key groups (lanes with the same sub), then the warp's totals go to shared memory.
#pragma unroll
  for (int off = LPV; off < 32; off <<= 1) {
#pragma unroll
    for (int g = 0; g < G; ++g) {
#pragma unroll
      for (int t = 0; t < 8; ++t) o[g][t] += lane_xor(o[g][t], off);
    }
  }
#pragma unroll
  for (int g = 0; g < G; ++g) {
    const float lw = warp_sum(l[g]);
    if (lane == 0) {
      sm_m[warp][g] = m[g];
      sm_l[warp][g] = lw;
    }
    if (kg == 0) {
#pragma unroll
      for (int t = 0; t < 8; ++t) sm_o[warp][g][8 * sub + t] = o[g][t];
    }
  }
  OSS_BARRIER();
  // Merge the 4 warps: thread (g, d) for g < G, d < D.
  for (int i = tid; i < G * D; i += 128) {
    const int g = i / D, d = i % D;
    float M = sm_m[0][g];
#pragma unroll
    for (int w4 = 1; w4 < 4; ++w4) M = fmaxf(M, sm_m[w4][g]);
    float L = 0.f, O = 0.f;
#pragma unroll
    for (int w4 = 0; w4 < 4; ++w4) {
      const float c = fast_exp2(sm_m[w4][g] - M);
      L = fmaf(sm_l[w4][g], c, L);
      O = fmaf(sm_o[w4][g][d], c, O);
    }
    const int h = kvh * G + g;
    const long long bh = (long long)b * (Hkv * G) + h;
    if (nsplit == 1) {
      const float sk = to_f(sinks[h]) * OSS_LOG2E;
      const float M2 = fmaxf(M, sk);
      const float c = fast_exp2(M - M2);
      const float den = L * c + fast_exp2(sk - M2);
      out[bh * D + d] = from_f<T>(O * c / den);
    } else {
      float* pp = part + (bh * nsplit + split) * (D + 2);
      pp[d] = O;
      if (d == 0) {
        pp[D] = M;
        pp[D + 1] = L;
      }
    }
  }
// @@kernel sdpa_combine
  // The splits' (m, l) first, all loaded at once (a loop carrying the running maximum through its
  // loads waited one round trip per split), then maxima and sums by tree over the block.
  OSS_SHARED float cm[256];
  OSS_SHARED float cl[256];
  OSS_SHARED float red[D];
  const int bh = blockIdx.x, d = threadIdx.x;
  const int nsplit = part_shape[2];
  const int Hq = part_shape[1];
  const float* pp = part + (long long)bh * nsplit * (D + 2);
  const float sk = to_f(sinks[bh % Hq]) * OSS_LOG2E;
  float mx_ = sk;
  for (int i = d; i < nsplit; i += D) {
    cm[i] = pp[i * (D + 2) + D];
    cl[i] = pp[i * (D + 2) + D + 1];
    mx_ = fmaxf(mx_, cm[i]);
  }
  red[d] = mx_;
  OSS_BARRIER();
  for (int s = D / 2; s > 0; s >>= 1) {
    if (d < s) red[d] = fmaxf(red[d], red[d + s]);
    OSS_BARRIER();
  }
  const float M = red[0];
  OSS_BARRIER();
  float lsum = 0.f;
  for (int i = d; i < nsplit; i += D) {
    cm[i] = fast_exp2(cm[i] - M);  // now the split's weight
    lsum = fmaf(cl[i], cm[i], lsum);
  }
  red[d] = lsum;
  OSS_BARRIER();
  for (int s = D / 2; s > 0; s >>= 1) {
    if (d < s) red[d] += red[d + s];
    OSS_BARRIER();
  }
  const float L = red[0] + fast_exp2(sk - M);
  float O = 0.f;
#pragma unroll 8
  for (int i = 0; i < nsplit; ++i) O = fmaf(pp[i * (D + 2) + d], cm[i], O);
  out[(long long)bh * D + d] = from_f<T>(O / L);
