// oss-mlx CUDA dialect header: prepended to every kernel body (mx.fast.cuda_kernel's `header`).
// The twin of kernels_metal/common.h: the same helper names with the same meaning, so the kernel
// bodies of the two dialects read alike. MLX's generated signature already includes cuda_bf16.h and
// cuda_fp16.h; inputs arrive as `const T* name`, outputs as `T* name`.

#define OSS_DEV __device__ __forceinline__
#define OSS_LOG2E 1.4426950408889634f
// A finite "minus infinity": safe under fast math, and exp2(OSS_NEG - m) is exactly 0.
#define OSS_NEG (-1.0e30f)

typedef unsigned int uint;

OSS_DEV float to_f(float x) { return x; }
OSS_DEV float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
OSS_DEV float to_f(__half x) { return __half2float(x); }

template <typename T> OSS_DEV T from_f(float x);
template <> OSS_DEV float from_f<float>(float x) { return x; }
template <> OSS_DEV __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <> OSS_DEV __half from_f<__half>(float x) { return __float2half(x); }

// Round x to T and back: the value the reference would hold after an op that outputs T.
template <typename T> OSS_DEV float round_to(float x) { return to_f(from_f<T>(x)); }

OSS_DEV float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
OSS_DEV float lane_xor(float v, int mask) { return __shfl_xor_sync(0xffffffffu, v, mask); }
OSS_DEV int lane_xor_i(int v, int mask) { return __shfl_xor_sync(0xffffffffu, v, mask); }
OSS_DEV float fast_exp2(float x) { return exp2f(x); }
OSS_DEV float fast_exp(float x) { return __expf(x); }
#define OSS_BARRIER() __syncthreads()
#define OSS_WARP_BARRIER() __syncwarp()
#define OSS_SHARED __shared__
#define OSS_ALIGN16 __align__(16)

// Load 8 consecutive elements (16-byte aligned for 16-bit types) as floats.
OSS_DEV void load8(const __nv_bfloat16* p, float* out) {
  uint4 u = *reinterpret_cast<const uint4*>(p);
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float2 f = __bfloat1622float2(h[i]);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}
OSS_DEV void load8(const __half* p, float* out) {
  uint4 u = *reinterpret_cast<const uint4*>(p);
  const __half2* h = reinterpret_cast<const __half2*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float2 f = __half22float2(h[i]);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}
OSS_DEV void load8(const float* p, float* out) {
  float4 a = *reinterpret_cast<const float4*>(p);
  float4 b = *reinterpret_cast<const float4*>(p + 4);
  out[0] = a.x; out[1] = a.y; out[2] = a.z; out[3] = a.w;
  out[4] = b.x; out[5] = b.y; out[6] = b.z; out[7] = b.w;
}
// Strided fallback (any element stride).
template <typename T> OSS_DEV void load8_strided(const T* p, long long stride, float* out) {
#pragma unroll
  for (int i = 0; i < 8; ++i) out[i] = to_f(p[i * stride]);
}

// ---- MXFP4 -------------------------------------------------------------------------------
// One uint32 holds 8 e2m1 codes, element 2j in the low nibble of byte j, 2j+1 in the high one.
// Each code is moved into an fp16 bit pattern (sign -> bit 15, exponent/mantissa bits -> 11..9):
// that fp16 equals the e2m1 value times 2^-14 exactly (e = 0 lands on the fp16 subnormal 0.5*2^-14).
// The 2^14 goes back into the group scale (see e8m0_scale). Pairs come out as (elem i, elem i+4).
OSS_DEV float dot8_fp4(uint w, const float* x) {
  uint h0 = ((w & 0x00070007u) << 9) | ((w & 0x00080008u) << 12);  // elements 0, 4
  uint h1 = ((w & 0x00700070u) << 5) | ((w & 0x00800080u) << 8);   // elements 1, 5
  uint h2 = ((w & 0x07000700u) << 1) | ((w & 0x08000800u) << 4);   // elements 2, 6
  uint h3 = ((w & 0x70007000u) >> 3) | (w & 0x80008000u);          // elements 3, 7
  float2 f0 = __half22float2(*reinterpret_cast<__half2*>(&h0));
  float2 f1 = __half22float2(*reinterpret_cast<__half2*>(&h1));
  float2 f2 = __half22float2(*reinterpret_cast<__half2*>(&h2));
  float2 f3 = __half22float2(*reinterpret_cast<__half2*>(&h3));
  float acc = f0.x * x[0];
  acc = fmaf(f1.x, x[1], acc);
  acc = fmaf(f2.x, x[2], acc);
  acc = fmaf(f3.x, x[3], acc);
  acc = fmaf(f0.y, x[4], acc);
  acc = fmaf(f1.y, x[5], acc);
  acc = fmaf(f2.y, x[6], acc);
  acc = fmaf(f3.y, x[7], acc);
  return acc;
}
// The 8 values of one uint32 in element order, times `scale` (an e8m0_scale: the 2^14 included).
OSS_DEV void fp4x8_scaled(uint w, float scale, float* out) {
  uint h[4] = {((w & 0x00070007u) << 9) | ((w & 0x00080008u) << 12), ((w & 0x00700070u) << 5) | ((w & 0x00800080u) << 8),
               ((w & 0x07000700u) << 1) | ((w & 0x08000800u) << 4), ((w & 0x70007000u) >> 3) | (w & 0x80008000u)};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __half22float2(*reinterpret_cast<__half2*>(&h[i]));
    out[i] = f.x * scale;  // elements i and i + 4 (see dot8_fp4)
    out[i + 4] = f.y * scale;
  }
}
// A 32-element MXFP4 group (16 bytes) against 32 floats.
OSS_DEV float dot32_fp4(uint4 w, const float* x) {
  return dot8_fp4(w.x, x) + dot8_fp4(w.y, x + 8) + dot8_fp4(w.z, x + 16) + dot8_fp4(w.w, x + 24);
}
// e8m0 scale 2^(s - 127), times the 2^14 taken out by dot8_fp4: 2^(s - 113), built from its bits.
OSS_DEV float e8m0_scale(uint s) { return __uint_as_float((s + 14u) << 23); }
OSS_DEV uint4 load_u4(const uint* p) { return *reinterpret_cast<const uint4*>(p); }

// ---- GEMV rows ---------------------------------------------------------------------------
// No branch around a load: where a row's chunks do not divide by 32 lanes (gpt-oss's 2880 = 11.25 x
// 256), lanes past the end load the last chunk again (in bounds, finite) and their input is zero.
// A load inside `if (ch < NCH)` cannot be issued before the branch, so each such tail cost its warp
// a memory round trip of its own, between one row's loads and the next.
//
// Lane `lane` takes the 8-element chunks lane, lane + 32, ... of a vector of NCH chunks into
// registers (zeros past the end).
template <int NC, int NCH, typename P> OSS_DEV void load_chunks(const P* v, int lane, float (*xr)[8]) {
#pragma unroll
  for (int c = 0; c < NC; ++c) {
    const int ch = lane + 32 * c;
    float tmp[8];
    load8(v + 8 * min(ch, NCH - 1), tmp);
#pragma unroll
    for (int t = 0; t < 8; ++t) xr[c][t] = ch < NCH ? tmp[t] : 0.f;
  }
}
// The 32-element groups lane, lane + 32, ... of a vector of NG groups (MXFP4 rows' group size) into
// registers, zeros past the end (loads clamped, no branch).
template <int NC, int NG, typename P> OSS_DEV void load_groups(const P* v, int lane, float (*xr)[32]) {
#pragma unroll
  for (int c = 0; c < NC; ++c) {
    const int g = lane + 32 * c;
    float tmp[32];
#pragma unroll
    for (int q = 0; q < 4; ++q) load8(v + 32 * min(g, NG - 1) + 8 * q, &tmp[8 * q]);
#pragma unroll
    for (int t = 0; t < 32; ++t) xr[c][t] = g < NG ? tmp[t] : 0.f;
  }
}
// Two rows against the registers of load_chunks, summed over the warp (every lane gets the sums).
template <int NC, int NCH, typename W>
OSS_DEV void dot2_rows(const W* r0, const W* r1, float (*xr)[8], int lane, float& a0, float& a1) {
#pragma unroll
  for (int c = 0; c < NC; ++c) {
    const int ch = min(lane + 32 * c, NCH - 1);  // past the end: xr is zero
    float w0[8], w1[8];
    load8(r0 + 8 * ch, w0);
    load8(r1 + 8 * ch, w1);
#pragma unroll
    for (int t = 0; t < 8; ++t) {
      a0 = fmaf(w0[t], xr[c][t], a0);
      a1 = fmaf(w1[t], xr[c][t], a1);
    }
  }
  a0 = warp_sum(a0);
  a1 = warp_sum(a1);
}
// RMSNorm of one row straight into the registers of load_chunks, by one warp alone:
// xr = round_T(x * rsqrt(mean(x^2) + eps) * nw). No shared memory and no block barrier: every warp
// of a GEMV starts on its weights without waiting for the others.
template <typename T, int NC, int NCH, typename X, typename W>
OSS_DEV void rms_norm_chunks(const X* x, const W* nw, float eps, int lane, float (*xr)[8]) {
  load_chunks<NC, NCH>(x, lane, xr);
  float ss = 0.f;
#pragma unroll
  for (int c = 0; c < NC; ++c) {
#pragma unroll
    for (int t = 0; t < 8; ++t) ss = fmaf(xr[c][t], xr[c][t], ss);  // zeros past the end
  }
  const float r = rsqrtf(warp_sum(ss) / (8 * NCH) + eps);
#pragma unroll
  for (int c = 0; c < NC; ++c) {
    float wv[8];
    load8(nw + 8 * min(lane + 32 * c, NCH - 1), wv);  // past the end: xr stays zero
#pragma unroll
    for (int t = 0; t < 8; ++t) xr[c][t] = round_to<T>(xr[c][t] * r * wv[t]);
  }
}

// ---- RMSNorm of one row into shared memory ------------------------------------------------
// hs[i] = round_T(x[i] * rsqrt(mean(x^2) + eps) * nw[i]) in float32, by the NT threads of a block.
// Each thread takes the 8-element chunks tid, tid + NT, ... of x and nw with 16-byte loads, all
// issued before the reduction: a loop that stores between its loads (the first versions wrote each
// element out as it went) waits one memory round trip per iteration. Ends with a barrier.
template <typename T, int H, int NT, typename X, typename W>
OSS_DEV void rms_norm_to_shared(const X* x, const W* nw, float eps, float* hs, float* red, int tid) {
  constexpr int NCH = H / 8, CPT = (NCH + NT - 1) / NT;
  float xv[CPT][8], wv[CPT][8];
#pragma unroll
  for (int c = 0; c < CPT; ++c) {
    const int ch = tid + NT * c;
    if (ch < NCH) {
      load8(x + 8 * ch, xv[c]);
      load8(nw + 8 * ch, wv[c]);
    }
  }
  float ss = 0.f;
#pragma unroll
  for (int c = 0; c < CPT; ++c) {
    if (tid + NT * c < NCH) {
#pragma unroll
      for (int t = 0; t < 8; ++t) ss = fmaf(xv[c][t], xv[c][t], ss);
    }
  }
  ss = warp_sum(ss);
  if ((tid & 31) == 0) red[tid >> 5] = ss;
  OSS_BARRIER();
  float total = 0.f;
#pragma unroll
  for (int i = 0; i < NT / 32; ++i) total += red[i];
  const float r = rsqrtf(total / H + eps);
#pragma unroll
  for (int c = 0; c < CPT; ++c) {
    const int ch = tid + NT * c;
    if (ch < NCH) {
#pragma unroll
      for (int t = 0; t < 8; ++t) hs[8 * ch + t] = round_to<T>(xv[c][t] * r * wv[c][t]);
    }
  }
  OSS_BARRIER();
}
// One row of W (NCH 8-element chunks) against a vector in shared memory: lane l takes the chunks
// l, l + 32, ... (all loads issued together), summed over the warp (every lane gets the sum).
template <int NCH, typename W> OSS_DEV float dot_row_shared(const W* row, const float* v, int lane) {
  constexpr int NC = (NCH + 31) / 32;
  float acc = 0.f;
#pragma unroll
  for (int c = 0; c < NC; ++c) {
    const int ch = lane + 32 * c, cl = min(ch, NCH - 1);  // no branch around the load
    float wv[8];
    load8(row + 8 * cl, wv);
#pragma unroll
    for (int t = 0; t < 8; ++t) acc = fmaf(ch < NCH ? v[8 * cl + t] : 0.f, wv[t], acc);
  }
  return warp_sum(acc);
}

// ---- Matrix units ------------------------------------------------------------------------
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
