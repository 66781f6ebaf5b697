// oss-mlx Metal matrix-unit helpers (kernels_metal/*.metal's sdpa_decode_mma and moe_gemm use them):
// placed after common.h and kernels_shared/helpers.gpu in every kernel's header.
//
// simdgroup_matrix<float, 8, 8>: each lane holds the elements (fm, fn) and (fm, fn + 1) with
// fm = (q & 4) + (lane / 2) % 4, fn = (q & 2) * 2 + (lane % 2) * 2, q = lane / 4 (the layout MLX's
// steel kernels rely on), one layout for A, B and the result alike.
typedef simdgroup_matrix<float, 8, 8> frag8;
OSS_DEV thread float2& elems(thread frag8& m) { return reinterpret_cast<thread float2&>(m.thread_elements()); }
OSS_DEV int frag_row(int lane) { return ((lane / 4) & 4) + (lane / 2) % 4; }
OSS_DEV int frag_col(int lane) { return ((lane / 4) & 2) * 2 + (lane % 2) * 2; }
// 8 consecutive 16-bit elements (element stride `stride`) as a uint4, 16-byte load when contiguous.
template <typename T> OSS_DEV uint4 load8_raw(const device T* p, long stride) {
  if (stride == 1) return *reinterpret_cast<const device uint4*>(p);
  uint4 u;
  for (int i = 0; i < 4; ++i) {
    u[i] = uint(as_type<ushort>(p[2 * i * stride])) | (uint(as_type<ushort>(p[(2 * i + 1) * stride])) << 16);
  }
  return u;
}
// Element i (0..7) of the 8 16-bit T values in a uint4, as float.
OSS_DEV float elem8(bfloat16_t, uint4 u, int i) {
  const uint w = u[i / 2];
  return as_type<float>((i & 1) ? (w & 0xFFFF0000u) : (w << 16));
}
OSS_DEV float elem8(half, uint4 u, int i) {
  const half2 h = as_type<half2>(u[i / 2]);
  return float((i & 1) ? h.y : h.x);
}
