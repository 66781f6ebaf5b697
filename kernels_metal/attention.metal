// Attention with sinks for decode (one query per sequence), reading the KV cache in place
// (Metal; CUDA twin: kernels_cuda/attention.cu).
//
// sdpa_decode: one block (4 simdgroups) per (sequence b, KV head, split of the keys). The G = Hq / Hkv
//   query heads of a KV head share every key and value load. Each simdgroup walks tiles of 32 keys. For
//   the scores a lane takes one key whole (D / 8 16-byte loads) and dots it with the G queries, which
//   sit in shared memory and are read by all lanes alike (broadcast, no shuffles). The tile's maximum
//   (simdgroup-uniform, so the running max m is too) rescales the lane's running sum l and the output;
//   the probabilities go through shared memory to P.V, where lane (kg, sub) takes 8 dims (8 sub ..)
//   of the keys kg, kg + KG, ... (KG = 32 / (D / 8)), one 16-byte load each, issued with the keys'
//   loads so a tile costs one memory round trip; key groups are summed once at the end. Why this
//   shape: the first version gave D / 8 lanes to a key and merged dots by shuffles per key; its 190
//   registers let 8 simdgroups per SM hold 8 KB of loads in flight (~0.6 TB/s at 32k keys on an H200);
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
// sdpa_decode_mma: sdpa_decode on the matrix units (simdgroup_matrix), for 16-bit T, D = 64, G <= 8
//   (gpt-oss: G = 8). Same inputs, outputs, grid and key ranges as sdpa_decode; the algorithm of the
//   CUDA twin (kernels_cuda/attention.cu, whose comment says why), in Metal's 8 x 8 float tiles:
//   per simdgroup and 32 keys, S^T = K Q^T as 4 key tiles x 8 dim steps (rows: keys; columns: the
//   G query heads, columns G..7 zero), online softmax per column, P rounded to T as the CUDA twin's
//   16-bit mma operand is, O^T += V^T P^T as 4 key tiles x 8 dim tiles. Metal's tiles share one
//   layout for A, B and the result, so the scores are transposed (keys as rows) to reuse P^T as the
//   B operand in place, where CUDA's m16n8k16 reuses P as A. Lane (fm, fn) loads dims 16 (fn / 2)
//   .. + 15 of key fm of each key tile (dim step s takes 16 (fn / 2) + 2 s, + 1), and dims 8 fm ..
//   8 fm + 7 of keys fn, fn + 1 for V^T (row fm of dim tile v is dim 8 fm + v). A simdgroup's next
//   tile is loaded while the current one computes (mma_keys).
//   template T (bf16 or f16), D (= 64), G (<= 8), WINDOW; grid and threadgroup as sdpa_decode
//
// sdpa_combine: o[b, h] = sum_i 2^(m_i - M) o_i / (sum_i 2^(m_i - M) l_i + 2^(sink - M)).
//   inputs  part [B, Hq, nsplit <= 256, D + 2] float32, sinks [Hq] (any float)
//   outputs out [B, Hq, D] (T)
//   template T, D
//   grid (D * B * Hq, 1, 1), threadgroup (D, 1, 1)
// The keys [s0, s1) of one split: of the first min(len, pos + 1) positions (written so far: a buffer
// may be longer), the last WINDOW (all when WINDOW = 0), cut into nsplit equal runs.
template <int WINDOW>
OSS_DEV void split_keys(int len, int pos, int split, int nsplit, thread int& s0, thread int& s1) {
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
  long kb, vb, ks, kd;
};
template <int WINDOW, typename Shape, typename Strides>
OSS_DEV KVPart kv_part(Shape shape, Strides strides, int y, int pos, int split, int nsplit) {
  KVPart p;
  p.Hkv = shape[2];
  p.b = y / p.Hkv;
  p.kvh = y % p.Hkv;
  split_keys<WINDOW>(shape[3], pos, split, nsplit, p.s0, p.s1);
  p.kb = (long)p.b * strides[1] + (long)p.kvh * strides[2];
  p.vb = p.kb + strides[0];
  p.ks = strides[3];
  p.kd = strides[4];
  return p;
}
// The 4 simdgroups' (m, l, o) per query head merged, thread (g, d) for g < G, d < D; with one split
// the softmax is finished with the sink (it joins the denominator and has no value), with several
// the split's partial (o, m, l) goes to part. head0 / bh0: the threadgroup's first query head, alone
// and as b * Hq + head. SinkPtr: a device or a constant pointer (MLX passes arrays of fewer than 8
// elements in constant memory).
template <typename T, int G, int D, typename SinkPtr>
OSS_DEV void merge_warps(const threadgroup float (*sm_m)[G], const threadgroup float (*sm_l)[G],
                         const threadgroup float (*sm_o)[G][D], SinkPtr sinks, device T* out,
                         device float* part, int tid, int head0, long bh0, int split, int nsplit) {
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
    const long bh = bh0 + g;
    if (nsplit == 1) {
      const float sk = to_f(sinks[head0 + g]) * OSS_LOG2E;
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
}
// sdpa_decode_mma's key loop for one simdgroup: tiles of 32 keys from `first` in steps of 128 (4
// simdgroups), each tile's loads issued while the previous tile computes (two tiles in registers).
// UNIT: rows contiguous (element stride kd = 1): the stride is a constant, so load8_raw folds to a
// plain 16-byte load with no branch between the loads; else element gathers.
template <typename T, bool UNIT>
OSS_DEV void mma_tile_loads(const device T* k, const device T* v, long ks, long kd, int base,
                            int s1, int fm, int fn, thread uint4 (&kw)[4][2], thread uint4 (&vw)[4][2]) {
  // Keys past the end read the last key (finite, weight 0).
  for (int j = 0; j < 4; ++j) {
    const device T* kp = k + min(base + 8 * j + fm, s1 - 1) * ks + 16 * (fn / 2) * kd;
    kw[j][0] = load8_raw(kp, UNIT ? 1 : kd);
    kw[j][1] = load8_raw(kp + 8 * kd, UNIT ? 1 : kd);
    for (int c = 0; c < 2; ++c) {
      const device T* vp = v + min(base + 8 * j + fn + c, s1 - 1) * ks + 8 * fm * kd;
      vw[j][c] = load8_raw(vp, UNIT ? 1 : kd);
    }
  }
}
template <typename T, bool UNIT>
OSS_DEV void mma_keys(const device T* k, const device T* v, long ks, long kd, int first,
                      int s1, int fm, int fn, thread frag8 (&qt)[8], float qscale, thread float (&m)[2],
                      thread float (&l)[2], thread frag8 (&ot)[8]) {
  uint4 kn[4][2], vn[4][2];
  if (first < s1) mma_tile_loads<T, UNIT>(k, v, ks, kd, first, s1, fm, fn, kn, vn);
  for (int base = first; base < s1; base += 128) {
    uint4 kw[4][2], vw[4][2];
    for (int j = 0; j < 4; ++j) {
      for (int c = 0; c < 2; ++c) {
        kw[j][c] = kn[j][c];
        vw[j][c] = vn[j][c];
      }
    }
    if (base + 128 < s1) mma_tile_loads<T, UNIT>(k, v, ks, kd, base + 128, s1, fm, fn, kn, vn);
    frag8 st[4];
    for (int j = 0; j < 4; ++j) {
      st[j] = make_filled_simdgroup_matrix<float, 8, 8>(0.f);
      for (int s = 0; s < 8; ++s) {
        frag8 kt;
        elems(kt).x = elem8(T(), kw[j][s / 4], 2 * (s % 4));
        elems(kt).y = elem8(T(), kw[j][s / 4], 2 * (s % 4) + 1);
        simdgroup_multiply_accumulate(st[j], kt, qt[s], st[j]);
      }
    }
    // Online softmax in base 2 per head (column): rows are keys, spread over lane bits 1, 2, 4.
    float corr[2];
    for (int c = 0; c < 2; ++c) {
      float mt = m[c];
      for (int j = 0; j < 4; ++j) {
        const float sv = base + 8 * j + fm < s1 ? elems(st[j])[c] * qscale : OSS_NEG;
        elems(st[j])[c] = sv;
        mt = max(mt, sv);
      }
      mt = max(mt, lane_xor(mt, 2));
      mt = max(mt, lane_xor(mt, 4));
      mt = max(mt, lane_xor(mt, 16));
      corr[c] = fast_exp2(m[c] - mt);
      m[c] = mt;
      l[c] *= corr[c];
      for (int j = 0; j < 4; ++j) {
        const float p = base + 8 * j + fm < s1 ? round_to<T>(fast_exp2(elems(st[j])[c] - mt)) : 0.f;
        elems(st[j])[c] = p;
        l[c] += p;
      }
    }
    for (int n = 0; n < 8; ++n) {
      elems(ot[n]).x *= corr[0];
      elems(ot[n]).y *= corr[1];
    }
    for (int j = 0; j < 4; ++j) {
      for (int n = 0; n < 8; ++n) {
        frag8 vt;
        elems(vt).x = elem8(T(), vw[j][0], n);
        elems(vt).y = elem8(T(), vw[j][1], n);
        simdgroup_multiply_accumulate(ot[n], vt, st[j], ot[n]);
      }
    }
  }
}
// @@kernel sdpa_decode
  constexpr int LPV = D / 8;      // lanes per value row in P.V (8 dims each, a 16-byte load)
  constexpr int KG = 32 / LPV;    // key groups in P.V: lane (kg, sub) takes keys kg, kg + KG, ...
  threadgroup float sq[G][D];
  threadgroup float sp[4][G][32];
  threadgroup float sm_m[4][G];
  threadgroup float sm_l[4][G];
  threadgroup float sm_o[4][G][D];
  const int tid = thread_position_in_threadgroup.x;
  const int lane = thread_index_in_simdgroup, warp = simdgroup_index_in_threadgroup;
  const int sub = lane % LPV, kg = lane / LPV;
  const int split = threadgroup_position_in_grid.x, nsplit = threadgroups_per_grid.x;
  const KVPart p = kv_part<WINDOW>(kv_shape, kv_strides, threadgroup_position_in_grid.y, pos[0], split, nsplit);
  const int Hkv = p.Hkv, b = p.b, kvh = p.kvh, s0 = p.s0, s1 = p.s1;
  const long kb = p.kb, vb = p.vb, ks = p.ks, kd = p.kd;

  const float qscale = scale_log2[0];
  const long q0 = (long)(b * Hkv + kvh) * G * D;
  for (int i = tid; i < G * D; i += 128) sq[i / D][i % D] = to_f(q[q0 + i]) * qscale;
  OSS_BARRIER();

  // m is the same on every lane; l sums this lane's keys; o holds dims 8 sub .. 8 sub + 7 over
  // this lane's P.V keys (the key groups are summed once, after the last tile).
  float m[G], l[G], o[G][8];
  for (int g = 0; g < G; ++g) {
    m[g] = OSS_NEG;
    l[g] = 0.f;
    for (int t = 0; t < 8; ++t) o[g][t] = 0.f;
  }
  // Tiles are simdgroup-uniform (the shuffles need the whole simdgroup); lanes past the end load nothing.
  for (int base = s0 + 32 * warp; base < s1; base += 128) {
    // The tile's values first: their loads are then in flight with the keys' (one round trip).
    float vf[LPV][8];
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
        for (int t = 0; t < 8; ++t) vf[i][t] = 0.f;
      }
    }
    const int s = base + lane;
    const bool valid = s < s1;
    float dot[G];
    for (int g = 0; g < G; ++g) dot[g] = 0.f;
    if (valid) {
      auto kr = kv + kb + s * ks;
      for (int c = 0; c < D / 8; ++c) {
        float kf[8];
        if (kd == 1) {
          load8(kr + 8 * c, kf);
        } else {
          load8_strided(kr + 8 * c * kd, kd, kf);
        }
        for (int g = 0; g < G; ++g) {
          for (int t = 0; t < 8; ++t) dot[g] = fma(sq[g][8 * c + t], kf[t], dot[g]);
        }
      }
    }
    for (int g = 0; g < G; ++g) {
      float mt = valid ? dot[g] : OSS_NEG;
      for (int off = 16; off > 0; off >>= 1) mt = max(mt, lane_xor(mt, off));
      const float mn = max(m[g], mt);
      const float c = fast_exp2(m[g] - mn);
      const float p = valid ? fast_exp2(dot[g] - mn) : 0.f;
      l[g] = fma(l[g], c, p);
      for (int t = 0; t < 8; ++t) o[g][t] *= c;
      m[g] = mn;
      sp[warp][g][lane] = p;
    }
    OSS_WARP_BARRIER();
    for (int i = 0; i < LPV; ++i) {
      for (int g = 0; g < G; ++g) {
        const float p = sp[warp][g][kg + KG * i];  // 0 past the end
        for (int t = 0; t < 8; ++t) o[g][t] = fma(p, vf[i][t], o[g][t]);
      }
    }
    OSS_WARP_BARRIER();  // sp is rewritten by the next tile
  }
  // Sum the key groups (lanes with the same sub), then the simdgroup's totals go to shared memory.
  for (int off = LPV; off < 32; off <<= 1) {
    for (int g = 0; g < G; ++g) {
      for (int t = 0; t < 8; ++t) o[g][t] += lane_xor(o[g][t], off);
    }
  }
  for (int g = 0; g < G; ++g) {
    const float lw = warp_sum(l[g]);
    if (lane == 0) {
      sm_m[warp][g] = m[g];
      sm_l[warp][g] = lw;
    }
    if (kg == 0) {
      for (int t = 0; t < 8; ++t) sm_o[warp][g][8 * sub + t] = o[g][t];
    }
  }
  OSS_BARRIER();
  // Merge the 4 simdgroups; finish with the sink (one split) or write the split's partial.
  merge_warps<T, G, D>(sm_m, sm_l, sm_o, sinks, out, part, tid, kvh * G, (long)b * (Hkv * G) + kvh * G, split,
                       nsplit);
// @@kernel sdpa_decode_mma
  static_assert(D == 64 && G <= 8, "sdpa_decode_mma: D = 64, G <= 8");
  threadgroup float sm_m[4][G];
  threadgroup float sm_l[4][G];
  threadgroup float sm_o[4][G][D];
  const int tid = thread_position_in_threadgroup.x;
  const int lane = thread_index_in_simdgroup, warp = simdgroup_index_in_threadgroup;
  const int fm = frag_row(lane), fn = frag_col(lane);
  const int split = threadgroup_position_in_grid.x, nsplit = threadgroups_per_grid.x;
  const KVPart p = kv_part<WINDOW>(kv_shape, kv_strides, threadgroup_position_in_grid.y, pos[0], split, nsplit);
  const int Hkv = p.Hkv, b = p.b, kvh = p.kvh, s0 = p.s0, s1 = p.s1;
  const long kb = p.kb, vb = p.vb, ks = p.ks, kd = p.kd;
  const float qscale = scale_log2[0];

  // Q^T as the B operand of the 8 dim steps: row fm of step s is dim 16 (fm / 2) + 2 s + fm % 2,
  // columns fn, fn + 1 are query heads (0 past G).
  frag8 qt[8];
  const long q0 = (long)(b * Hkv + kvh) * G * D;
  for (int s = 0; s < 8; ++s) {
    const int dim = 16 * (fm / 2) + 2 * s + fm % 2;
    elems(qt[s]).x = fn < G ? to_f(q[q0 + fn * D + dim]) : 0.f;
    elems(qt[s]).y = fn + 1 < G ? to_f(q[q0 + (fn + 1) * D + dim]) : 0.f;
  }

  float m[2] = {OSS_NEG, OSS_NEG}, l[2] = {0.f, 0.f};  // heads fn, fn + 1
  frag8 ot[8];
  for (int n = 0; n < 8; ++n) ot[n] = make_filled_simdgroup_matrix<float, 8, 8>(0.f);
  // Contiguous rows (every cache) take 16-byte loads with no branch between them; others gather.
  if (kd == 1) {
    mma_keys<T, true>(kv + kb, kv + vb, ks, 1, s0 + 32 * warp, s1, fm, fn, qt, qscale, m, l, ot);
  } else {
    mma_keys<T, false>(kv + kb, kv + vb, ks, kd, s0 + 32 * warp, s1, fm, fn, qt, qscale, m, l, ot);
  }
  for (int c = 0; c < 2; ++c) {
    l[c] += lane_xor(l[c], 2);
    l[c] += lane_xor(l[c], 4);
    l[c] += lane_xor(l[c], 16);
    const int h = fn + c;
    if (h < G) {
      if (fm == 0) {
        sm_m[warp][h] = m[c];
        sm_l[warp][h] = l[c];
      }
      for (int n = 0; n < 8; ++n) sm_o[warp][h][8 * fm + n] = elems(ot[n])[c];
    }
  }
  OSS_BARRIER();
  // Merge the 4 simdgroups; finish with the sink (one split) or write the split's partial.
  merge_warps<T, G, D>(sm_m, sm_l, sm_o, sinks, out, part, tid, kvh * G, (long)b * (Hkv * G) + kvh * G, split,
                       nsplit);
// @@kernel sdpa_combine
  // The splits' (m, l) first, all loaded at once (a loop carrying the running maximum through its
  // loads waited one round trip per split), then maxima and sums by tree over the threadgroup.
  threadgroup float cm[256];
  threadgroup float cl[256];
  threadgroup float red[D];
  const int bh = threadgroup_position_in_grid.x, d = thread_position_in_threadgroup.x;
  const int nsplit = part_shape[2];
  const int Hq = part_shape[1];
  const device float* pp = part + (long)bh * nsplit * (D + 2);
  const float sk = to_f(sinks[bh % Hq]) * OSS_LOG2E;
  float mx_ = sk;
  for (int i = d; i < nsplit; i += D) {
    cm[i] = pp[i * (D + 2) + D];
    cl[i] = pp[i * (D + 2) + D + 1];
    mx_ = max(mx_, cm[i]);
  }
  red[d] = mx_;
  OSS_BARRIER();
  for (int s = D / 2; s > 0; s >>= 1) {
    if (d < s) red[d] = max(red[d], red[d + s]);
    OSS_BARRIER();
  }
  const float M = red[0];
  OSS_BARRIER();
  float lsum = 0.f;
  for (int i = d; i < nsplit; i += D) {
    cm[i] = fast_exp2(cm[i] - M);  // now the split's weight
    lsum = fma(cl[i], cm[i], lsum);
  }
  red[d] = lsum;
  OSS_BARRIER();
  for (int s = D / 2; s > 0; s >>= 1) {
    if (d < s) red[d] += red[d + s];
    OSS_BARRIER();
  }
  const float L = red[0] + fast_exp2(sk - M);
  float O = 0.f;
  for (int i = 0; i < nsplit; ++i) O = fma(pp[i * (D + 2) + d], cm[i], O);
  out[(long)bh * D + d] = from_f<T>(O / L);
