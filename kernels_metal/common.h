// oss-mlx Metal dialect header: prepended to every kernel body (mx.fast.metal_kernel's `header`).
// The twin of kernels_cuda/common.cuh: the same helper names with the same meaning, so the kernel
// bodies of the two dialects read alike. MLX prepends its own utilities (metal_stdlib, bfloat16_t);
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

// ---- GEMV rows ---------------------------------------------------------------------------
// No branch around a load: where a row's chunks do not divide by 32 lanes (gpt-oss's 2880 = 11.25 x
// 256), lanes past the end load the last chunk again (in bounds, finite) and their input is zero.
// A load inside `if (ch < NCH)` cannot be issued before the branch, so each such tail cost its warp
// a memory round trip of its own, between one row's loads and the next (seen on the CUDA twin).
//
// Lane `lane` takes the 8-element chunks lane, lane + 32, ... of a vector of NCH chunks into
// registers (zeros past the end).
template <int NC, int NCH, typename P>
OSS_DEV void load_chunks(const device P* v, int lane, thread float (*xr)[8]) {
  for (int c = 0; c < NC; ++c) {
    const int ch = lane + 32 * c;
    float tmp[8];
    load8(v + 8 * min(ch, NCH - 1), tmp);
    for (int t = 0; t < 8; ++t) xr[c][t] = ch < NCH ? tmp[t] : 0.f;
  }
}
// The 32-element groups lane, lane + 32, ... of a vector of NG groups (MXFP4 rows' group size) into
// registers, zeros past the end (loads clamped, no branch).
template <int NC, int NG, typename P>
OSS_DEV void load_groups(const device P* v, int lane, thread float (*xr)[32]) {
  for (int c = 0; c < NC; ++c) {
    const int g = lane + 32 * c;
    float tmp[32];
    for (int q = 0; q < 4; ++q) load8(v + 32 * min(g, NG - 1) + 8 * q, &tmp[8 * q]);
    for (int t = 0; t < 32; ++t) xr[c][t] = g < NG ? tmp[t] : 0.f;
  }
}
// Two rows against the registers of load_chunks, summed over the simdgroup (every lane gets the sums).
template <int NC, int NCH, typename W>
OSS_DEV void dot2_rows(
    const device W* r0, const device W* r1, thread float (*xr)[8], int lane, thread float& a0, thread float& a1) {
  for (int c = 0; c < NC; ++c) {
    const int ch = min(lane + 32 * c, NCH - 1);  // past the end: xr is zero
    float w0[8], w1[8];
    load8(r0 + 8 * ch, w0);
    load8(r1 + 8 * ch, w1);
    for (int t = 0; t < 8; ++t) {
      a0 = fma(w0[t], xr[c][t], a0);
      a1 = fma(w1[t], xr[c][t], a1);
    }
  }
  a0 = warp_sum(a0);
  a1 = warp_sum(a1);
}

// RMSNorm of one row straight into the registers of load_chunks, by one simdgroup alone:
// xr = round_T(x * rsqrt(mean(x^2) + eps) * nw). No threadgroup memory and no barrier: every
// simdgroup of a GEMV starts on its weights without waiting for the others.
template <typename T, int NC, int NCH, typename X, typename W>
OSS_DEV void rms_norm_chunks(const device X* x, const device W* nw, float eps, int lane, thread float (*xr)[8]) {
  load_chunks<NC, NCH>(x, lane, xr);
  float ss = 0.f;
  for (int c = 0; c < NC; ++c) {
    for (int t = 0; t < 8; ++t) ss = fma(xr[c][t], xr[c][t], ss);  // zeros past the end
  }
  const float r = metal::precise::rsqrt(warp_sum(ss) / (8 * NCH) + eps);
  for (int c = 0; c < NC; ++c) {
    float wv[8];
    load8(nw + 8 * min(lane + 32 * c, NCH - 1), wv);  // past the end: xr stays zero
    for (int t = 0; t < 8; ++t) xr[c][t] = round_to<T>(xr[c][t] * r * wv[t]);
  }
}

// ---- RMSNorm of one row into threadgroup memory -------------------------------------------
// hs[i] = round_T(x[i] * rsqrt(mean(x^2) + eps) * nw[i]) in float32, by the NT threads of a threadgroup.
// Each thread takes the 8-element chunks tid, tid + NT, ... of x and nw with 16-byte loads, all
// issued before the reduction: a loop that stores between its loads (the first versions wrote each
// element out as it went) waits one memory round trip per iteration. Ends with a barrier.
template <typename T, int H, int NT, typename X, typename W>
OSS_DEV void rms_norm_to_shared(
    const device X* x, const device W* nw, float eps, threadgroup float* hs, threadgroup float* red, int tid) {
  constexpr int NCH = H / 8, CPT = (NCH + NT - 1) / NT;
  float xv[CPT][8], wv[CPT][8];
  for (int c = 0; c < CPT; ++c) {
    const int ch = tid + NT * c;
    if (ch < NCH) {
      load8(x + 8 * ch, xv[c]);
      load8(nw + 8 * ch, wv[c]);
    }
  }
  float ss = 0.f;
  for (int c = 0; c < CPT; ++c) {
    if (tid + NT * c < NCH) {
      for (int t = 0; t < 8; ++t) ss = fma(xv[c][t], xv[c][t], ss);
    }
  }
  ss = warp_sum(ss);
  if ((tid & 31) == 0) red[tid >> 5] = ss;
  OSS_BARRIER();
  float total = 0.f;
  for (int i = 0; i < NT / 32; ++i) total += red[i];
  const float r = metal::precise::rsqrt(total / H + eps);
  for (int c = 0; c < CPT; ++c) {
    const int ch = tid + NT * c;
    if (ch < NCH) {
      for (int t = 0; t < 8; ++t) hs[8 * ch + t] = round_to<T>(xv[c][t] * r * wv[c][t]);
    }
  }
  OSS_BARRIER();
}
// One row of W (NCH 8-element chunks) against a vector in threadgroup memory: lane l takes the
// chunks l, l + 32, ... (all loads issued together), summed over the simdgroup (every lane gets it).
template <int NCH, typename W>
OSS_DEV float dot_row_shared(const device W* row, const threadgroup float* v, int lane) {
  constexpr int NC = (NCH + 31) / 32;
  float acc = 0.f;
  for (int c = 0; c < NC; ++c) {
    const int ch = lane + 32 * c, cl = min(ch, NCH - 1);  // no branch around the load
    float wv[8];
    load8(row + 8 * cl, wv);
    for (int t = 0; t < 8; ++t) acc = fma(ch < NCH ? v[8 * cl + t] : 0.f, wv[t], acc);
  }
  return warp_sum(acc);
}

// ---- Matrix units ------------------------------------------------------------------------
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
