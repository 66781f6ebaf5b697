// The decode batch's experts on the matrix units, Metal (its CUDA counterpart:
// kernels_cuda/decode_moe.cu, which says why they exist; interfaces: SPECS in
// oss_mlx/kernels/sources.py; launcher: oss_mlx/kernels/decode_moe.py). Written per dialect because
// the matrix units differ: simdgroup_matrix 8 x 8 (fp32) here, mma.sync m16n8k16 on CUDA.
//
// The same algorithm as the CUDA kernels: the slots grouped by expert (moe_group; SORTED 0: one token's
// slots, a threadgroup row each), one threadgroup of
// 4 simdgroups per (expert, tile of RT x 16 weight rows), the simdgroups splitting the k range (simdgroup
// w: the 32-element groups w, w + 4, ...) and summed in simdgroup order; each weight dequantized once
// for up to 8 slots, the slots the matrices' columns. A tile is two 8 x 8 weight matrices (rows 0..7
// and 8..15; gate_up: the gate and the up rows of 8 columns) against one 8 x 8 matrix of 8 slots'
// inputs, 8 k at a time.
//
// Fragments (matrix.h: lane (fm, fn) holds row fm, columns fn and fn + 1 of every matrix): within a
// group lane (fm, 2f) takes word f of its weight row (8 codes, one scale) for the group's four k steps,
// codes (2c, 2c + 1) at step c; so the k position q of step c means the input element 8 (q / 2) + 2c +
// q % 2 of the group, and the B matrix (k position = its row) holds those elements of the slots fn
// and fn + 1.
//
// gate_up_mma and down_mma: the CUDA kernels' results (gate_up_swiglu's rounding; down_grouped's
// float32 d, which moe_combine adds to the residual). down_mma_combine: one token's down_mma and
// moe_combine in one threadgroup of K x 4 simdgroups per 16 rows, as on CUDA (the same bits).

// One simdgroup's part of a tile: acc[rt] (rows 0..7, rows 8..15) += W rows (r0, r1) . inputs, the
// inputs of the slot columns fn and fn + 1 at xa and xb (rows of KD elements), for the groups warp,
// warp + 4, ...; wr0 / wr1 / sr0 / sr1 address tile rt's rows by an offset of rt * the tile stride.
template <typename T, int KD, int RT>
OSS_DEV void mma_rows(const device uint32_t* w, const device uint8_t* scales, const thread long* r0,
                      const thread long* r1, const device T* xa, const device T* xb, int warp, int fm, int f,
                      thread frag8 (*acc)[2]) {
  constexpr int G = KD / 32;
  for (int gi = warp; gi < G; gi += 4) {
    float v0[RT][8], v1[RT][8];
    for (int rt = 0; rt < RT; ++rt) {
      fp4x8_scaled(w[r0[rt] * (KD / 8) + 4 * gi + f], e8m0_scale(scales[r0[rt] * G + gi]), v0[rt]);
      fp4x8_scaled(w[r1[rt] * (KD / 8) + 4 * gi + f], e8m0_scale(scales[r1[rt] * G + gi]), v1[rt]);
    }
    const int k = 32 * gi + 8 * (fm / 2) + fm % 2;  // this lane's B row at step c: k + 2c
    for (int c = 0; c < 4; ++c) {
      frag8 b;
      elems(b) = float2(to_f(xa[k + 2 * c]), to_f(xb[k + 2 * c]));
      for (int rt = 0; rt < RT; ++rt) {
        frag8 a0, a1;
        elems(a0) = float2(round_to<T>(v0[rt][2 * c]), round_to<T>(v0[rt][2 * c + 1]));
        elems(a1) = float2(round_to<T>(v1[rt][2 * c]), round_to<T>(v1[rt][2 * c + 1]));
        simdgroup_multiply_accumulate(acc[rt][0], a0, b, acc[rt][0]);
        simdgroup_multiply_accumulate(acc[rt][1], a1, b, acc[rt][1]);
      }
    }
  }
}
// The 4 simdgroups' partial tiles summed in simdgroup order into simdgroup 0's (every one calls it).
template <int RT> OSS_DEV void split_k_sum(thread frag8 (*acc)[2], threadgroup float* red, int warp, int lane) {
  if (warp > 0) {
    for (int rt = 0; rt < RT; ++rt) {
      for (int i = 0; i < 2; ++i) {
        const float2 v = elems(acc[rt][i]);
        red[((warp - 1) * RT * 4 + rt * 4 + 2 * i) * 32 + lane] = v.x;
        red[((warp - 1) * RT * 4 + rt * 4 + 2 * i + 1) * 32 + lane] = v.y;
      }
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (warp == 0) {
    for (int w = 0; w < 3; ++w) {
      for (int rt = 0; rt < RT; ++rt) {
        for (int i = 0; i < 2; ++i) {
          float2 v = elems(acc[rt][i]);
          v.x += red[(w * RT * 4 + rt * 4 + 2 * i) * 32 + lane];
          v.y += red[(w * RT * 4 + rt * 4 + 2 * i + 1) * 32 + lane];
          elems(acc[rt][i]) = v;
        }
      }
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);  // red is reused by the next pass
}
// @@kernel gate_up_mma
  threadgroup float red[3 * RT * 4 * 32];
  const int lane = thread_index_in_simdgroup, warp = simdgroup_index_in_threadgroup;
  const int fm = frag_row(lane), fn = frag_col(lane);
  int e, first, last;
  if (!expert_slots(perm, offsets, threadgroup_position_in_grid.y, SORTED, e, first, last)) return;
  const int col0 = threadgroup_position_in_grid.x * 8 * RT;
  long r0[RT], r1[RT];  // tile rt: the gate row of column col0 + 8 rt + fm, and its up row
  for (int rt = 0; rt < RT; ++rt) {
    r0[rt] = long(e) * (2 * I) + 2 * min(col0 + 8 * rt + fm, I - 1);  // past I: not stored
    r1[rt] = r0[rt] + 1;
  }
  const float alpha = consts[0], limit = consts[1];
  for (int p = first; p < last; p += 8) {  // the expert's slots, 8 at a time
    frag8 acc[RT][2];
    for (int rt = 0; rt < RT; ++rt) {
      acc[rt][0] = make_filled_simdgroup_matrix<float, 8, 8>(0.f);
      acc[rt][1] = make_filled_simdgroup_matrix<float, 8, 8>(0.f);
    }
    const int sa = slot_at(perm, min(p + fn, last - 1), SORTED), sb = slot_at(perm, min(p + fn + 1, last - 1), SORTED);
    mma_rows<T, H, RT>(w, scales, r0, r1, x + long(sa / K) * H, x + long(sb / K) * H, warp, fm, fn / 2, acc);
    split_k_sum<RT>(acc, red, warp, lane);
    if (warp != 0) continue;
    for (int rt = 0; rt < RT; ++rt) {
      const int col = col0 + 8 * rt + fm;
      const float bg = to_f(bias[r0[rt]]), bu = to_f(bias[r1[rt]]);
      const float2 vg = elems(acc[rt][0]), vu = elems(acc[rt][1]);
      for (int j = 0; j < 2; ++j) {  // slot columns fn, fn + 1
        if (col >= I || p + fn + j >= last) continue;
        // The reference rounds the matmul and the bias add to T; so do we, then SwiGLU in float.
        float gt = round_to<T>(round_to<T>(j ? vg.y : vg.x) + bg);
        float up = round_to<T>(round_to<T>(j ? vu.y : vu.x) + bu);
        gt = min(gt, limit);
        up = min(max(up, -limit), limit);
        h[long(slot_at(perm, p + fn + j, SORTED)) * I + col] = from_f<T>(gt / (1.f + fast_exp(-alpha * gt)) * (up + 1.f));
      }
    }
  }
// @@kernel down_mma
  threadgroup float red[3 * RT * 4 * 32];
  const int lane = thread_index_in_simdgroup, warp = simdgroup_index_in_threadgroup;
  const int fm = frag_row(lane), fn = frag_col(lane);
  int e, first, last;
  if (!expert_slots(perm, offsets, threadgroup_position_in_grid.y, SORTED, e, first, last)) return;
  const int row0 = threadgroup_position_in_grid.x * 16 * RT;
  long r0[RT], r1[RT];  // tile rt: rows row0 + 16 rt + fm and + 8 (past H: not stored)
  for (int rt = 0; rt < RT; ++rt) {
    r0[rt] = long(e) * HP + min(row0 + 16 * rt + fm, H - 1);
    r1[rt] = long(e) * HP + min(row0 + 16 * rt + fm + 8, H - 1);
  }
  for (int p = first; p < last; p += 8) {
    frag8 acc[RT][2];
    for (int rt = 0; rt < RT; ++rt) {
      acc[rt][0] = make_filled_simdgroup_matrix<float, 8, 8>(0.f);
      acc[rt][1] = make_filled_simdgroup_matrix<float, 8, 8>(0.f);
    }
    const int sa = slot_at(perm, min(p + fn, last - 1), SORTED), sb = slot_at(perm, min(p + fn + 1, last - 1), SORTED);
    mma_rows<T, I, RT>(w, scales, r0, r1, h + long(sa) * I, h + long(sb) * I, warp, fm, fn / 2, acc);
    split_k_sum<RT>(acc, red, warp, lane);
    if (warp != 0) continue;
    for (int rt = 0; rt < RT; ++rt) {
      for (int hh = 0; hh < 2; ++hh) {  // rows fm, fm + 8
        const int row = row0 + 16 * rt + fm + 8 * hh;
        if (row >= H) continue;
        const float bb = to_f(bias[long(e) * H + row]);
        const float2 v = elems(acc[rt][hh]);
        for (int j = 0; j < 2; ++j) {
          if (p + fn + j >= last) continue;
          const int s = slot_at(perm, p + fn + j, SORTED);
          d[long(s) * H + row] = wts[s] * ((j ? v.y : v.x) + bb);
        }
      }
    }
  }
// @@kernel down_mma_combine
  threadgroup float red[K][3 * 4 * 32];
  threadgroup float part[K][16];
  const int lane = thread_index_in_simdgroup, sg = simdgroup_index_in_threadgroup;
  const int slot = sg / 4, warp = sg % 4;
  const int fm = frag_row(lane), fn = frag_col(lane);
  const int row0 = threadgroup_position_in_grid.x * 16;
  const long e = ids[slot];  // one token: slot j's expert is the router's j-th
  long r0[1], r1[1];  // rows row0 + fm and + 8 (past H: not stored)
  r0[0] = e * HP + min(row0 + fm, H - 1);
  r1[0] = e * HP + min(row0 + fm + 8, H - 1);
  frag8 acc[1][2];
  acc[0][0] = make_filled_simdgroup_matrix<float, 8, 8>(0.f);
  acc[0][1] = make_filled_simdgroup_matrix<float, 8, 8>(0.f);
  const device T* hs = h + long(slot) * I;
  mma_rows<T, I, 1>(w, scales, r0, r1, hs, hs, warp, fm, fn / 2, acc);
  split_k_sum<1>(acc, red[slot], warp, lane);
  if (warp == 0 && fn == 0) {  // slot column 0 (every column holds this slot's input)
    for (int hh = 0; hh < 2; ++hh) {  // rows fm, fm + 8
      const int row = min(row0 + fm + 8 * hh, H - 1);
      part[slot][fm + 8 * hh] = wts[slot] * (elems(acc[0][hh]).x + to_f(bias[e * H + row]));
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const int tid = thread_position_in_threadgroup.x;
  if (tid < 16 && row0 + tid < H) {
    const int row = row0 + tid;
    float a = to_f(res[row]);
    for (int j = 0; j < K; ++j) a += part[j][tid];
    y[row] = from_f<T>(a);
  }
