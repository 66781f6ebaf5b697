// sdpa_decode on CUDA's matrix units (its Metal counterpart: kernels_metal/decode_attention.metal;
// interface: SPECS in oss_mlx/kernels/sources.py, the same as sdpa_decode's; launcher:
// oss_mlx/kernels/decode_attention.py). Its helpers split_keys, kv_part and merge_warps are
// kernels_shared/decode_attention.gpu's, placed before this file's in the kernel's header.
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
//
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
