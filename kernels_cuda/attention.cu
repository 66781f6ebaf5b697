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
//   memory (so one compiled decode step serves every position: kv may be a cache buffer whose
//   later slots are unwritten, or a window layer's ring, where order does not matter), of those the
//   last WINDOW (all when WINDOW = 0; the caches hand out only what a query may see, so WINDOW only
//   guards longer inputs).
//   inputs  q [B, Hq, D] (contiguous), kv [2, B, Hkv, S, D] (keys, then values; any strides: a
//           cache's joint buffer, read in place),
//           sinks [Hq] (any float), scale_log2 [1] float32 (scale * log2 e), pos [1] int32
//   outputs out [B, Hq, D] (T), part [B, Hq, nsplit, D + 2] float32 (only when nsplit > 1)
//   template T, D (D / 8 a power of two <= 32), G (<= 16, G * D <= 512), WINDOW
//   grid (128 * nsplit, B * Hkv, 1), threadgroup (128, 1, 1)
//
// sdpa_decode_mma: sdpa_decode on the matrix units, for 16-bit T, D = 64, G <= 8 (gpt-oss: G = 8).
//   Same inputs, outputs, grid and key ranges as sdpa_decode. Why: the SIMT kernel does 2 G D FMAs
//   per key and lane-serial reductions (~3,600 instructions a warp for 32 keys), so it was bound by
//   instruction latency at small S (13 µs for 128 keys) and by issue at large S (0.4-0.9 TB/s at 32k
//   keys); here a warp's 32 keys are 32 mma instructions. Per warp and 32 keys: S = Q K^T as 4 x 4
//   m16n8k16 tiles (rows: the G query heads, rows G..15 zero; columns: keys), online softmax on
//   the fp32 scores in registers, P rounded to T, O += P V as 2 x 8 tiles (columns: dims). The
//   dot products do not care in which order the dims are summed, nor P V in which order the keys,
//   so each lane loads whole 16-byte pieces: for Q K^T lane (g, t) holds dims 16t..16t+15 of query
//   head g and of key g of each 8-key tile (k-step s takes dims 16t+4s..16t+4s+3); for P V it holds
//   dims 8g..8g+7 of the keys 2t, 2t+1, 2t+8, 2t+9 of each 16-key step (output column n of
//   dim-tile v is dim 8n + v). Scores and output stay in the mma's own layout. A warp's next tile is
//   loaded while the current one computes (mma_keys). The 4 warps merge through shared memory as in
//   sdpa_decode, then finish with the sink or write partials.
//   template T (bf16 or f16), D (= 64), G (<= 8), WINDOW; grid and threadgroup as sdpa_decode
//
// sdpa_combine: o[b, h] = sum_i 2^(m_i - M) o_i / (sum_i 2^(m_i - M) l_i + 2^(sink - M)).
//   inputs  part [B, Hq, nsplit <= 256, D + 2] float32, sinks [Hq] (any float)
//   outputs out [B, Hq, D] (T)
//   template T, D
//   grid (D * B * Hq, 1, 1), threadgroup (D, 1, 1)
// The keys [s0, s1) of one split: of the first min(len, pos + 1) positions (written so far: a buffer
// may be longer), the last WINDOW (all when WINDOW = 0), cut into nsplit equal runs.
template <int WINDOW> OSS_DEV void split_keys(int len, int pos, int split, int nsplit, int& s0, int& s1) {
  const int S = min(len, pos + 1);
  const int lo = (WINDOW > 0 && S > WINDOW) ? S - WINDOW : 0;
  const int chunk = (S - lo + nsplit - 1) / nsplit;
  s0 = lo + split * chunk;
  s1 = min(S, s0 + chunk);
}
// One block's part of kv [2, B, Hkv, S, D] (blocks y = b * Hkv + kvh): its keys [s0, s1) (split_keys),
// kv + kb the first of them, kv + vb its first value (kv[1] has the same strides), ks the stride between
// keys and kd between dims.
struct KVPart {
  int Hkv, b, kvh, s0, s1;
  long long kb, vb, ks, kd;
};
template <int WINDOW, typename Shape, typename Strides>
OSS_DEV KVPart kv_part(const Shape& shape, const Strides& strides, int y, int pos, int split, int nsplit) {
  KVPart p;
  p.Hkv = shape[2];
  p.b = y / p.Hkv;
  p.kvh = y % p.Hkv;
  split_keys<WINDOW>(shape[3], pos, split, nsplit, p.s0, p.s1);
  p.kb = (long long)p.b * strides[1] + (long long)p.kvh * strides[2];
  p.vb = p.kb + strides[0];
  p.ks = strides[3];
  p.kd = strides[4];
  return p;
}
// The 4 warps' (m, l, o) per query head merged, thread (g, d) for g < G, d < D; with one split the
// softmax is finished with the sink (it joins the denominator and has no value), with several the
// split's partial (o, m, l) goes to part. head0 / bh0: the block's first query head, alone and as
// b * Hq + head.
template <typename T, int G, int D, typename SK>
OSS_DEV void merge_warps(const float (*sm_m)[G], const float (*sm_l)[G], const float (*sm_o)[G][D],
                         const SK* sinks, T* out, float* part, int tid, int head0, long long bh0, int split,
                         int nsplit) {
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
    const long long bh = bh0 + g;
    if (nsplit == 1) {
      const float sk = to_f(sinks[head0 + g]) * OSS_LOG2E;
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
}
// sdpa_decode_mma's key loop for one warp: tiles of 32 keys from `first` in steps of 128 (4 warps),
// each tile's loads issued while the previous tile computes (two tiles of registers in flight).
// UNIT: rows contiguous (element stride kd = 1): the stride is a constant, so load8_raw folds to a
// plain 16-byte load with no branch between the loads; else element gathers.
template <typename T, bool UNIT>
OSS_DEV void mma_tile_loads(const T* k, const T* v, long long ks, long long kd,
                            int base, int s1, int g, int t, uint4 (&kw)[4][2], uint4 (&vw)[2][4]) {
  // Keys past the end read the last key (finite, weight 0).
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const T* kp = k + min(base + 8 * j + g, s1 - 1) * ks + 16 * t * kd;
    kw[j][0] = load8_raw(kp, UNIT ? 1 : kd);
    kw[j][1] = load8_raw(kp + 8 * kd, UNIT ? 1 : kd);
  }
#pragma unroll
  for (int u = 0; u < 2; ++u) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int key = min(base + 16 * u + 2 * t + (i & 1) + 8 * (i >> 1), s1 - 1);
      const T* vp = v + key * ks + 8 * g * kd;
      vw[u][i] = load8_raw(vp, UNIT ? 1 : kd);
    }
  }
}
template <typename T, bool UNIT>
OSS_DEV void mma_keys(const T* k, const T* v, long long ks, long long kd, int first,
                      int s1, int g, int t, const uint4 (&qw)[2], float qscale, float& m, float& l, float (&o)[8][4]) {
  uint4 kn[4][2], vn[2][4];
  if (first < s1) mma_tile_loads<T, UNIT>(k, v, ks, kd, first, s1, g, t, kn, vn);
  for (int base = first; base < s1; base += 128) {
    uint4 kw[4][2], vw[2][4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      kw[j][0] = kn[j][0];
      kw[j][1] = kn[j][1];
    }
#pragma unroll
    for (int u = 0; u < 2; ++u) {
#pragma unroll
      for (int i = 0; i < 4; ++i) vw[u][i] = vn[u][i];
    }
    if (base + 128 < s1) mma_tile_loads<T, UNIT>(k, v, ks, kd, base + 128, s1, g, t, kn, vn);
    float sc[4][4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      sc[j][0] = sc[j][1] = sc[j][2] = sc[j][3] = 0.f;
#pragma unroll
      for (int s = 0; s < 4; ++s) {
        const uint4 kq = kw[j][s >> 1], qq = qw[s >> 1];
        const int w0 = 2 * (s & 1);
        Mma<T>::run(sc[j], u4_word(qq, w0), 0u, u4_word(qq, w0 + 1), 0u, u4_word(kq, w0), u4_word(kq, w0 + 1));
      }
    }
    // Online softmax in base 2 over this lane's 8 scores of head g (keys 8j + 2t + e).
    float mt = m;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const bool valid = base + 8 * j + 2 * t + e < s1;
        sc[j][e] = valid ? sc[j][e] * qscale : OSS_NEG;
        mt = fmaxf(mt, sc[j][e]);
      }
    }
    mt = fmaxf(mt, lane_xor(mt, 1));
    mt = fmaxf(mt, lane_xor(mt, 2));
    const float c = fast_exp2(m - mt);
    m = mt;
    l *= c;
#pragma unroll
    for (int n = 0; n < 8; ++n) {
      o[n][0] *= c;
      o[n][1] *= c;
    }
    uint pa[4];  // P as the A operand: key step u takes n-tiles 2u (a0) and 2u + 1 (a2)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const bool v0 = base + 8 * j + 2 * t < s1, v1 = base + 8 * j + 2 * t + 1 < s1;
      pa[j] = Mma<T>::pack(v0 ? fast_exp2(sc[j][0] - mt) : 0.f, v1 ? fast_exp2(sc[j][1] - mt) : 0.f);
      const float2 pr = Mma<T>::unpack(pa[j]);  // the sum takes the weights P V uses
      l += pr.x + pr.y;
    }
#pragma unroll
    for (int u = 0; u < 2; ++u) {
#pragma unroll
      for (int n = 0; n < 8; ++n) {
        const uint b0 = pair_halves(u4_word(vw[u][0], n >> 1), u4_word(vw[u][1], n >> 1), n & 1);
        const uint b1 = pair_halves(u4_word(vw[u][2], n >> 1), u4_word(vw[u][3], n >> 1), n & 1);
        Mma<T>::run(o[n], pa[2 * u], 0u, pa[2 * u + 1], 0u, b0, b1);
      }
    }
  }
}
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
  const KVPart p = kv_part<WINDOW>(kv_shape, kv_strides, blockIdx.y, pos[0], split, nsplit);
  const int Hkv = p.Hkv, b = p.b, kvh = p.kvh, s0 = p.s0, s1 = p.s1;
  const long long kb = p.kb, vb = p.vb, ks = p.ks, kd = p.kd;

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
  // Tiles are warp-uniform (the shuffles need the whole warp); lanes past the end load nothing.
  for (int base = s0 + 32 * warp; base < s1; base += 128) {
    // The tile's values first: their loads are then in flight with the keys' (one round trip).
    float vf[LPV][8];
#pragma unroll
    for (int i = 0; i < LPV; ++i) {
      const int sv = base + kg + KG * i;
      if (sv < s1) {
        auto vr = kv + vb + sv * ks + 8 * sub * kd;
        if (kd == 1) {
          load8(vr, vf[i]);
        } else {
          load8_strided(vr, kd, vf[i]);
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
      auto kr = kv + kb + s * ks;
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
  // Merge the 4 warps; finish with the sink (one split) or write the split's partial.
  merge_warps<T, G, D>(sm_m, sm_l, sm_o, sinks, out, part, tid, kvh * G, (long long)b * (Hkv * G) + kvh * G,
                       split, nsplit);
// @@kernel sdpa_decode_mma
  static_assert(D == 64 && G <= 8, "sdpa_decode_mma: D = 64, G <= 8");
  OSS_SHARED float sm_m[4][G];
  OSS_SHARED float sm_l[4][G];
  OSS_SHARED float sm_o[4][G][D];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int split = blockIdx.x, nsplit = gridDim.x;
  const KVPart p = kv_part<WINDOW>(kv_shape, kv_strides, blockIdx.y, pos[0], split, nsplit);
  const int Hkv = p.Hkv, b = p.b, kvh = p.kvh, s0 = p.s0, s1 = p.s1;
  const long long kb = p.kb, vb = p.vb, ks = p.ks, kd = p.kd;
  const float qscale = scale_log2[0];

  // Q as the A operand: head g's dims 16t..16t+15, k-step s takes words 2s, 2s + 1 (rows g + 8: 0).
  uint4 qw[2] = {make_uint4(0, 0, 0, 0), make_uint4(0, 0, 0, 0)};
  if (g < G) {
    const T* qp = q + ((long long)(b * Hkv + kvh) * G + g) * D + 16 * t;
    qw[0] = load8_raw(qp, 1);
    qw[1] = load8_raw(qp + 8, 1);
  }

  float m = OSS_NEG, l = 0.f;  // head g: running maximum (same on the 4 lanes of g), this lane's sum
  float o[8][4];
#pragma unroll
  for (int n = 0; n < 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  // Contiguous rows (every cache) take 16-byte loads with no branch between them; others gather.
  if (kd == 1) {
    mma_keys<T, true>(kv + kb, kv + vb, ks, 1, s0 + 32 * warp, s1, g, t, qw, qscale, m, l, o);
  } else {
    mma_keys<T, false>(kv + kb, kv + vb, ks, kd, s0 + 32 * warp, s1, g, t, qw, qscale, m, l, o);
  }
  l += lane_xor(l, 1);
  l += lane_xor(l, 2);
  if (g < G) {
    if (t == 0) {
      sm_m[warp][g] = m;
      sm_l[warp][g] = l;
    }
#pragma unroll
    for (int n = 0; n < 8; ++n) {
      sm_o[warp][g][16 * t + n] = o[n][0];
      sm_o[warp][g][16 * t + 8 + n] = o[n][1];
    }
  }
  OSS_BARRIER();
  // Merge the 4 warps; finish with the sink (one split) or write the split's partial.
  merge_warps<T, G, D>(sm_m, sm_l, sm_o, sinks, out, part, tid, kvh * G, (long long)b * (Hkv * G) + kvh * G,
                       split, nsplit);
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
