// sdpa_decode on Metal's matrix units (its CUDA counterpart: kernels_cuda/decode_attention.cu;
// interface: SPECS in oss_mlx/kernels/sources.py, the same as sdpa_decode's; launcher:
// oss_mlx/kernels/decode_attention.py). Its helpers split_keys, kv_part and merge_warps are
// kernels_shared/decode_attention.gpu's, placed before this file's in the kernel's header.
//
// sdpa_decode_mma: sdpa_decode on the matrix units (simdgroup_matrix), for 16-bit T, D = 64, G <= 8
//   (gpt-oss: G = 8). Same inputs, outputs, grid and key ranges as sdpa_decode; the algorithm of the
//   CUDA twin (kernels_cuda/decode_attention.cu, whose comment says why), in Metal's 8 x 8 float tiles:
//   per simdgroup and 32 keys, S^T = K Q^T as 4 key tiles x 8 dim steps (rows: keys; columns: the
//   G query heads, columns G..7 zero), online softmax per column, P rounded to T as the CUDA twin's
//   16-bit mma operand is, O^T += V^T P^T as 4 key tiles x 8 dim tiles. Metal's tiles share one
//   layout for A, B and the result, so the scores are transposed (keys as rows) to reuse P^T as the
//   B operand in place, where CUDA's m16n8k16 reuses P as A. Lane (fm, fn) loads dims 16 (fn / 2)
//   .. + 15 of key fm of each key tile (dim step s takes 16 (fn / 2) + 2 s, + 1), and dims 8 fm ..
//   8 fm + 7 of keys fn, fn + 1 for V^T (row fm of dim tile v is dim 8 fm + v). A simdgroup's next
//   tile is loaded while the current one computes (mma_keys).
//
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
