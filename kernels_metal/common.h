// oss-mlx Metal dialect primitives: the first part of every kernel's header (mx.fast.metal_kernel's
// `header`, only the items a kernel reaches). The twin of kernels_cuda/common.cuh: the same names with
// the same meaning, so one source (kernels_shared/*.gpu) serves both dialects. MLX prepends its own
// utilities (metal_stdlib, bfloat16_t);
// large inputs arrive as `const device T* name`, inputs of fewer than 8 elements as
// `const constant T* name`, outputs as `device T* name`.

#define OSS_DEV inline
#define OSS_LOG2E 1.4426950408889634f
// A finite "minus infinity": safe under any math mode, and exp2(OSS_NEG - m) is exactly 0.
#define OSS_NEG (-1.0e30f)
#define OSS_BARRIER() threadgroup_barrier(mem_flags::mem_threadgroup)
#define OSS_WARP_BARRIER() simdgroup_barrier(mem_flags::mem_threadgroup)
#define OSS_SHARED threadgroup
#define OSS_ALIGN16  // threadgroup floats are read one by one here: no alignment needed

OSS_DEV float to_f(float x) { return x; }
OSS_DEV float to_f(bfloat16_t x) { return static_cast<float>(x); }
OSS_DEV float to_f(half x) { return static_cast<float>(x); }

template <typename T> OSS_DEV T from_f(float x) { return static_cast<T>(x); }

// Round x to T and back: the value the reference would hold after an op that outputs T.
template <typename T> OSS_DEV float round_to(float x) { return static_cast<float>(static_cast<T>(x)); }

OSS_DEV float warp_sum(float v) { return simd_sum(v); }
OSS_DEV float lane_xor(float v, int mask) { return simd_shuffle_xor(v, ushort(mask)); }
OSS_DEV int lane_xor_i(int v, int mask) { return simd_shuffle_xor(v, ushort(mask)); }
OSS_DEV float fast_exp2(float x) { return metal::exp2(x); }
OSS_DEV float fast_exp(float x) { return metal::exp(x); }

// Load 8 consecutive elements (16-byte aligned for 16-bit types) as floats.
OSS_DEV void load8(const device bfloat16_t* p, thread float* out) {
  uint4 u = *reinterpret_cast<const device uint4*>(p);
  for (int i = 0; i < 4; ++i) {
    out[2 * i] = as_type<float>(u[i] << 16);
    out[2 * i + 1] = as_type<float>(u[i] & 0xFFFF0000u);
  }
}
OSS_DEV void load8(const device half* p, thread float* out) {
  uint4 u = *reinterpret_cast<const device uint4*>(p);
  for (int i = 0; i < 4; ++i) {
    float2 f = float2(as_type<half2>(u[i]));
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}
OSS_DEV void load8(const device float* p, thread float* out) {
  float4 a = *reinterpret_cast<const device float4*>(p);
  float4 b = *reinterpret_cast<const device float4*>(p + 4);
  out[0] = a.x; out[1] = a.y; out[2] = a.z; out[3] = a.w;
  out[4] = b.x; out[5] = b.y; out[6] = b.z; out[7] = b.w;
}
// 8 consecutive elements of threadgroup memory as floats (read one by one: no alignment asked).
template <typename T> OSS_DEV void load8_shared(const threadgroup T* p, thread float* out) {
  for (int i = 0; i < 8; ++i) out[i] = to_f(p[i]);
}
// Strided fallback (any element stride).
template <typename T> OSS_DEV void load8_strided(const device T* p, long stride, thread float* out) {
  for (int i = 0; i < 8; ++i) out[i] = to_f(p[i * stride]);
}

// ---- MXFP4 -------------------------------------------------------------------------------
// One uint32 holds 8 e2m1 codes, element 2j in the low nibble of byte j, 2j+1 in the high one.
// Each code is moved into an fp16 bit pattern (sign -> bit 15, exponent/mantissa bits -> 11..9):
// that fp16 equals the e2m1 value times 2^-14 exactly (e = 0 lands on the fp16 subnormal 0.5*2^-14).
// The 2^14 goes back into the group scale (see e8m0_scale). Pairs come out as (elem i, elem i+4).
OSS_DEV float dot8_fp4(uint w, thread const float* x) {
  uint h0 = ((w & 0x00070007u) << 9) | ((w & 0x00080008u) << 12);  // elements 0, 4
  uint h1 = ((w & 0x00700070u) << 5) | ((w & 0x00800080u) << 8);   // elements 1, 5
  uint h2 = ((w & 0x07000700u) << 1) | ((w & 0x08000800u) << 4);   // elements 2, 6
  uint h3 = ((w & 0x70007000u) >> 3) | (w & 0x80008000u);          // elements 3, 7
  float2 f0 = float2(as_type<half2>(h0));
  float2 f1 = float2(as_type<half2>(h1));
  float2 f2 = float2(as_type<half2>(h2));
  float2 f3 = float2(as_type<half2>(h3));
  float acc = f0.x * x[0];
  acc = fma(f1.x, x[1], acc);
  acc = fma(f2.x, x[2], acc);
  acc = fma(f3.x, x[3], acc);
  acc = fma(f0.y, x[4], acc);
  acc = fma(f1.y, x[5], acc);
  acc = fma(f2.y, x[6], acc);
  acc = fma(f3.y, x[7], acc);
  return acc;
}
// A 32-element MXFP4 group (16 bytes) against 32 floats.
OSS_DEV float dot32_fp4(uint4 w, thread const float* x) {
  return dot8_fp4(w.x, x) + dot8_fp4(w.y, x + 8) + dot8_fp4(w.z, x + 16) + dot8_fp4(w.w, x + 24);
}
// The 8 values of one uint32 in element order, times `scale` (an e8m0_scale: the 2^14 included).
OSS_DEV void fp4x8_scaled(uint w, float scale, thread float* out) {
  const uint h[4] = {((w & 0x00070007u) << 9) | ((w & 0x00080008u) << 12), ((w & 0x00700070u) << 5) | ((w & 0x00800080u) << 8),
                     ((w & 0x07000700u) << 1) | ((w & 0x08000800u) << 4), ((w & 0x70007000u) >> 3) | (w & 0x80008000u)};
  for (int i = 0; i < 4; ++i) {
    const float2 f = float2(as_type<half2>(h[i]));
    out[i] = f.x * scale;  // elements i and i + 4 (see dot8_fp4)
    out[i + 4] = f.y * scale;
  }
}
// e8m0 scale 2^(s - 127), times the 2^14 taken out by dot8_fp4: 2^(s - 113), built from its bits.
OSS_DEV float e8m0_scale(uint s) { return as_type<float>((s + 14u) << 23); }
OSS_DEV uint4 load_u4(const device uint32_t* p) { return *reinterpret_cast<const device uint4*>(p); }
