// oss-mlx matrix-unit helpers, CUDA (kernels_cuda/*.cu's sdpa_decode_mma and moe_gemm use them): placed
// after common.cuh and kernels_shared/helpers.gpu in every kernel's header.
//
// D += A B on the tensor cores, one m16n8k16 tile per warp (fp32 accumulate; T = bf16 or f16).
// Fragments as PTX defines them, with g = lane / 4, t = lane % 4: A (16 x 16, row-major) a0 = (g,
// 2t..2t+1), a1 = (g + 8, 2t..), a2 = (g, 2t + 8..), a3 = (g + 8, 2t + 8..); B (16 x 8) b0 = (rows
// 2t..2t+1, column g), b1 = (rows 2t + 8.., g); D (16 x 8) d0, d1 = (g, 2t..2t+1), d2, d3 = (g + 8, ..).
// Each register holds two 16-bit values, the lower index in the low half.
template <typename T> struct Mma;
template <> struct Mma<__nv_bfloat16> {
  static OSS_DEV void run(float* d, uint a0, uint a1, uint a2, uint a3, uint b0, uint b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
  static OSS_DEV uint pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint*>(&h);
  }
  static OSS_DEV float2 unpack(uint u) { return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&u)); }
};
template <> struct Mma<__half> {
  static OSS_DEV void run(float* d, uint a0, uint a1, uint a2, uint a3, uint b0, uint b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
  static OSS_DEV uint pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint*>(&h);
  }
  static OSS_DEV float2 unpack(uint u) { return __half22float2(*reinterpret_cast<__half2*>(&u)); }
};
// 8 consecutive 16-bit elements (element stride `stride`) as a uint4, 16-byte load when contiguous.
template <typename T> OSS_DEV uint4 load8_raw(const T* p, long long stride) {
  if (stride == 1) return *reinterpret_cast<const uint4*>(p);
  uint w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const T lo = p[2 * i * stride], hi = p[(2 * i + 1) * stride];
    w[i] = (uint)(*reinterpret_cast<const unsigned short*>(&lo)) |
           ((uint)(*reinterpret_cast<const unsigned short*>(&hi)) << 16);
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}
OSS_DEV uint u4_word(uint4 u, int i) { return i == 0 ? u.x : i == 1 ? u.y : i == 2 ? u.z : u.w; }
// The 16-bit half `half` of words a and b side by side: (a.half, b.half) as one register.
OSS_DEV uint pair_halves(uint a, uint b, int half) { return __byte_perm(a, b, half ? 0x7632 : 0x5410); }
// ---- MXFP4 codes as bf16 (the decode experts' A operand, kernels_cuda/decode_moe.cu) --------------
// a * b on two bf16 pairs, exact for a power-of-two b (one fma with -0: subnormals kept, no ftz).
OSS_DEV uint bf16x2_mul(uint a, uint b) {
  uint d;
  asm("fma.rn.bf16x2 %0, %1, %2, %3;\n" : "=r"(d) : "r"(a), "r"(b), "r"(0x80008000u));
  return d;
}
// bf16 2^126, twice: fp4x8_bf16's placement times this is the e2m1 value itself.
#define OSS_BF16X2_2POW126 0x7E807E80u
// An e8m0 scale s as the bf16 pair 2^126 * 2^(s - 127) = 2^(s - 1): a normal bf16 for s <= 128 only.
OSS_DEV uint bf16x2_scale(uint s) { return s * 0x00800080u + 126u * 0x00800080u; }
// 2^(s - 127) as a bf16 pair, any s < 255 (s = 0: the subnormal 2^-127).
OSS_DEV uint bf16x2_pow2(uint s) { return s ? s * 0x00800080u : 0x00400040u; }
// The 8 e2m1 codes of w (element i in nibble i) as four bf16 pairs, register i holding elements
// (i, i + 4), times `mul`. Each code is placed as bf16 bits (sign -> bit 15, its exponent and
// mantissa bits -> 8..6): that bf16 is the e2m1 value times 2^-126 (e = 0 lands on a subnormal), so a
// multiply by 2^126 * scale gives value * scale exactly. One multiply spreads a nibble to both places
// (nibble << 6 and nibble << 12 do not overlap), the mask keeps sign and magnitude.
OSS_DEV void fp4x8_bf16(uint w, uint mul, uint* r) {
  const uint hi = w >> 8;
  r[0] = bf16x2_mul(((w & 0x000F000Fu) * 0x1040u) & 0x81C081C0u, mul);
  r[1] = bf16x2_mul(((w & 0x00F000F0u) * 0x0104u) & 0x81C081C0u, mul);
  r[2] = bf16x2_mul(((hi & 0x000F000Fu) * 0x1040u) & 0x81C081C0u, mul);
  r[3] = bf16x2_mul(((hi & 0x00F000F0u) * 0x0104u) & 0x81C081C0u, mul);
}
