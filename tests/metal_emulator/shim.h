// The Metal Shading Language, as much of it as MLX kernels use, in C++ for clang: it stands where
// MLX's prelude (metal::utils(): metal_stdlib, bfloat16_t, float16_t) stands in the translation
// unit mx.fast.metal_kernel builds, and it runs (runtime.cpp executes the kernel).
//
// Kept from Metal, so the compile check stays strict:
//  - device / constant / threadgroup are clang address spaces: a pointer into one does not convert
//    to another or to a plain pointer, as in Metal;
//  - vector conversions are explicit (float2(h) converts a half2; as_type reinterprets bits);
//  - only 8 x 8 simdgroup matrices; matrix loads from device or threadgroup memory only;
//  - atomics are a type of their own: only the atomic_* functions touch them.
// Semantics modelled: bfloat (__bf16) and half (_Float16) round to nearest even on conversion and,
// with the emulator's flags, after every arithmetic operation, as Metal's 16-bit types do; simd_*
// functions exchange values among the simdgroup's active lanes; simdgroup matrices use the lane
// layout of Apple GPUs (MLX's steel BaseMMAFrag::get_coord). metal::precise::, metal:: and
// metal::fast:: math are all the host's single-precision libm (MLX compiles with fast math off, so
// metal:: is the precise variant there; metal::fast:: would be less accurate on a Mac).
// Not modelled: swizzles (.xy, .rgba), whole-vector stores into device/threadgroup memory (C++
// cannot qualify `this` with an address space: store the elements), textures, quadgroup functions,
// matrices other than 8 x 8, `half` literals (1.0h).
#pragma once
#include <stdint.h>

#include "abi.h"

#define device __attribute__((address_space(1)))
#define constant __attribute__((address_space(2)))
#define threadgroup __attribute__((address_space(3)))
#define thread
#define METAL_FUNC inline __attribute__((always_inline))
// Threadgroup arrays are declared at kernel scope; C++ takes an address space on a static only.
// source.py declares them `static OSS_THREADGROUP_STORAGE threadgroup ...`: the runtime fills the
// section with garbage before each threadgroup and reports its size as the threadgroup memory.
#define OSS_THREADGROUP_STORAGE __attribute__((section("oss_tg"), aligned(16)))
// A simdgroup operation's call site (where in the source it is called: the same for every lane of a
// simdgroup, or the lanes diverged; runtime.cpp checks), as defaulted trailing arguments.
#define OSS_AT const char *oss_file = __builtin_FILE(), unsigned oss_line = __builtin_LINE(), unsigned oss_col = __builtin_COLUMN()
#define OSS_SITE oss_file, oss_line, oss_col

typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned char uchar;
typedef unsigned long ulong;
typedef __SIZE_TYPE__ size_t;
typedef _Float16 half;
typedef __bf16 bfloat;
typedef half float16_t;      // MLX's utils.h
typedef bfloat bfloat16_t;   // MLX's bf16.h (Metal 3.1+: the native bfloat)

namespace metal {

// ---- vectors ------------------------------------------------------------------------------------
template <typename T, int N>
struct vec_storage;
template <typename T>
struct alignas(2 * sizeof(T)) vec_storage<T, 2> {
  union {
    struct {
      T x, y;
    };
    T e_[2];
  };
};
template <typename T>
struct alignas(4 * sizeof(T)) vec_storage<T, 3> {
  union {
    struct {
      T x, y, z;
    };
    T e_[3];
  };
};
template <typename T>
struct alignas(4 * sizeof(T)) vec_storage<T, 4> {
  union {
    struct {
      T x, y, z, w;
    };
    T e_[4];
  };
};

template <typename T, int N>
struct vec;
template <typename A>
struct vec_count {
  static constexpr int value = 1;
};
template <typename U, int M>
struct vec_count<vec<U, M>> {
  static constexpr int value = M;
};
template <typename T, typename S>
inline void vec_fill(T* e, int& k, S s) {
  e[k++] = static_cast<T>(s);
}
template <typename T, typename U, int M>
inline void vec_fill(T* e, int& k, const vec<U, M>& v) {
  for (int i = 0; i < M; ++i) e[k++] = static_cast<T>(v.e_[i]);
}

#define OSS_FROM_SPACES(V)                                                                            \
  V(const device V& o) { __builtin_memcpy((void*)this, (const void*)(uintptr_t)&o, sizeof(V)); }       \
  V(const constant V& o) { __builtin_memcpy((void*)this, (const void*)(uintptr_t)&o, sizeof(V)); }     \
  V(const threadgroup V& o) { __builtin_memcpy((void*)this, (const void*)(uintptr_t)&o, sizeof(V)); }

template <typename T, int N>
struct vec : vec_storage<T, N> {
  typedef T elem;
  vec() = default;
  vec(const vec&) = default;
  vec& operator=(const vec&) = default;
  vec(T s) {  // a scalar widens to every element
    for (int i = 0; i < N; ++i) this->e_[i] = s;
  }
  template <typename A0, typename A1, typename... As>
  vec(A0 a0, A1 a1, As... as) {
    static_assert(vec_count<A0>::value + vec_count<A1>::value + (0 + ... + vec_count<As>::value) == N,
                  "vector constructor: the arguments' elements must add up to the vector's");
    int k = 0;
    vec_fill(this->e_, k, a0);
    vec_fill(this->e_, k, a1);
    (vec_fill(this->e_, k, as), ...);
  }
  template <typename U>
  explicit vec(const vec<U, N>& o) {  // element-wise conversion, as Metal's float2(half2)
    for (int i = 0; i < N; ++i) this->e_[i] = static_cast<T>(o.e_[i]);
  }
  OSS_FROM_SPACES(vec)
  T& operator[](int i) { return this->e_[i]; }
  const T& operator[](int i) const { return this->e_[i]; }
};

// packed_* types: no alignment beyond the element's, convert to and from the aligned vector.
template <typename T, int N>
struct packed_storage;
template <typename T>
struct packed_storage<T, 2> {
  union {
    struct {
      T x, y;
    };
    T e_[2];
  };
};
template <typename T>
struct packed_storage<T, 3> {
  union {
    struct {
      T x, y, z;
    };
    T e_[3];
  };
};
template <typename T>
struct packed_storage<T, 4> {
  union {
    struct {
      T x, y, z, w;
    };
    T e_[4];
  };
};
template <typename T, int N>
struct packed_vec : packed_storage<T, N> {
  packed_vec() = default;
  packed_vec(const packed_vec&) = default;
  packed_vec& operator=(const packed_vec&) = default;
  packed_vec(const vec<T, N>& v) {
    for (int i = 0; i < N; ++i) this->e_[i] = v.e_[i];
  }
  OSS_FROM_SPACES(packed_vec)
  operator vec<T, N>() const {
    vec<T, N> v;
    for (int i = 0; i < N; ++i) v.e_[i] = this->e_[i];
    return v;
  }
  T& operator[](int i) { return this->e_[i]; }
  const T& operator[](int i) const { return this->e_[i]; }
};

// Element-wise operators: vector op vector, vector op scalar, scalar op vector; R is the result's
// element type (T, or bool for comparisons).
#define OSS_VEC_OP(op, R)                                                                        \
  template <typename T, int N>                                                                   \
  inline vec<R, N> operator op(const vec<T, N>& a, const vec<T, N>& b) {                         \
    vec<R, N> r;                                                                                 \
    for (int i = 0; i < N; ++i) r.e_[i] = a.e_[i] op b.e_[i];                                    \
    return r;                                                                                    \
  }                                                                                              \
  template <typename T, int N>                                                                   \
  inline vec<R, N> operator op(const vec<T, N>& a, typename vec<T, N>::elem b) {                 \
    return a op vec<T, N>(b);                                                                    \
  }                                                                                              \
  template <typename T, int N>                                                                   \
  inline vec<R, N> operator op(typename vec<T, N>::elem a, const vec<T, N>& b) {                 \
    return vec<T, N>(a) op b;                                                                    \
  }
#define OSS_VEC_ARITHMETIC(op)                                                                   \
  OSS_VEC_OP(op, T)                                                                              \
  template <typename T, int N>                                                                   \
  inline vec<T, N>& operator op##=(vec<T, N>& a, const vec<T, N>& b) {                           \
    return a = a op b;                                                                           \
  }                                                                                              \
  template <typename T, int N>                                                                   \
  inline vec<T, N>& operator op##=(vec<T, N>& a, typename vec<T, N>::elem b) {                   \
    return a = a op vec<T, N>(b);                                                                \
  }
OSS_VEC_ARITHMETIC(+)
OSS_VEC_ARITHMETIC(-)
OSS_VEC_ARITHMETIC(*)
OSS_VEC_ARITHMETIC(/)
OSS_VEC_ARITHMETIC(%)
OSS_VEC_ARITHMETIC(&)
OSS_VEC_ARITHMETIC(|)
OSS_VEC_ARITHMETIC(^)
OSS_VEC_ARITHMETIC(<<)
OSS_VEC_ARITHMETIC(>>)
OSS_VEC_OP(==, bool)
OSS_VEC_OP(!=, bool)
OSS_VEC_OP(<, bool)
OSS_VEC_OP(<=, bool)
OSS_VEC_OP(>, bool)
OSS_VEC_OP(>=, bool)
#undef OSS_VEC_ARITHMETIC
#undef OSS_VEC_OP

template <typename T, int N>
inline vec<T, N> operator-(const vec<T, N>& a) {
  vec<T, N> r;
  for (int i = 0; i < N; ++i) r.e_[i] = -a.e_[i];
  return r;
}
template <typename T, int N>
inline vec<T, N> operator~(const vec<T, N>& a) {
  vec<T, N> r;
  for (int i = 0; i < N; ++i) r.e_[i] = ~a.e_[i];
  return r;
}
template <int N>
inline vec<bool, N> operator!(const vec<bool, N>& a) {
  vec<bool, N> r;
  for (int i = 0; i < N; ++i) r.e_[i] = !a.e_[i];
  return r;
}
template <int N>
inline bool all(const vec<bool, N>& a) {
  for (int i = 0; i < N; ++i)
    if (!a.e_[i]) return false;
  return true;
}
template <int N>
inline bool any(const vec<bool, N>& a) {
  for (int i = 0; i < N; ++i)
    if (a.e_[i]) return true;
  return false;
}
inline bool all(bool b) { return b; }
inline bool any(bool b) { return b; }

#define OSS_VEC_TYPES(T, name)              \
  typedef vec<T, 2> name##2;                \
  typedef vec<T, 3> name##3;                \
  typedef vec<T, 4> name##4;                \
  typedef packed_vec<T, 2> packed_##name##2; \
  typedef packed_vec<T, 3> packed_##name##3; \
  typedef packed_vec<T, 4> packed_##name##4;
OSS_VEC_TYPES(float, float)
OSS_VEC_TYPES(half, half)
OSS_VEC_TYPES(bfloat, bfloat)
OSS_VEC_TYPES(int, int)
OSS_VEC_TYPES(uint, uint)
OSS_VEC_TYPES(short, short)
OSS_VEC_TYPES(ushort, ushort)
OSS_VEC_TYPES(char, char)
OSS_VEC_TYPES(uchar, uchar)
OSS_VEC_TYPES(long, long)
OSS_VEC_TYPES(ulong, ulong)
OSS_VEC_TYPES(bool, bool)
#undef OSS_VEC_TYPES

// ---- reinterpretation ------------------------------------------------------------------------------
template <typename T, typename U>
inline T as_type(U u) {
  static_assert(sizeof(T) == sizeof(U), "as_type: the two types must have the same size");
  T t;
  __builtin_memcpy((void*)&t, (const void*)&u, sizeof(T));
  return t;
}

// ---- math ----------------------------------------------------------------------------------------
#define OSS_ELEMENTWISE1(name)                        \
  template <typename T, int N>                        \
  inline vec<T, N> name(const vec<T, N>& v) {         \
    vec<T, N> r;                                      \
    for (int i = 0; i < N; ++i) r.e_[i] = name(v.e_[i]); \
    return r;                                         \
  }
#define OSS_ELEMENTWISE2(name)                                        \
  template <typename T, int N>                                        \
  inline vec<T, N> name(const vec<T, N>& a, const vec<T, N>& b) {     \
    vec<T, N> r;                                                      \
    for (int i = 0; i < N; ++i) r.e_[i] = name(a.e_[i], b.e_[i]);     \
    return r;                                                         \
  }
#define OSS_ELEMENTWISE3(name)                                                          \
  template <typename T, int N>                                                          \
  inline vec<T, N> name(const vec<T, N>& a, const vec<T, N>& b, const vec<T, N>& c) {   \
    vec<T, N> r;                                                                        \
    for (int i = 0; i < N; ++i) r.e_[i] = name(a.e_[i], b.e_[i], c.e_[i]);              \
    return r;                                                                           \
  }
// float computes in float; half in float, rounded back (Metal's half functions are accurate to a
// few half ulps at best).
#define OSS_UNARY(name, expr)                                  \
  inline float name(float x) { return expr; }                  \
  inline half name(half h) { return half(name(float(h))); }    \
  OSS_ELEMENTWISE1(name)
OSS_UNARY(exp, __builtin_expf(x))
OSS_UNARY(exp2, __builtin_exp2f(x))
OSS_UNARY(exp10, __builtin_powf(10.f, x))
OSS_UNARY(log, __builtin_logf(x))
OSS_UNARY(log2, __builtin_log2f(x))
OSS_UNARY(log10, __builtin_log10f(x))
OSS_UNARY(sqrt, __builtin_sqrtf(x))
OSS_UNARY(rsqrt, 1.f / __builtin_sqrtf(x))
OSS_UNARY(sin, __builtin_sinf(x))
OSS_UNARY(cos, __builtin_cosf(x))
OSS_UNARY(tan, __builtin_tanf(x))
OSS_UNARY(asin, __builtin_asinf(x))
OSS_UNARY(acos, __builtin_acosf(x))
OSS_UNARY(atan, __builtin_atanf(x))
OSS_UNARY(sinh, __builtin_sinhf(x))
OSS_UNARY(cosh, __builtin_coshf(x))
OSS_UNARY(tanh, __builtin_tanhf(x))
OSS_UNARY(floor, __builtin_floorf(x))
OSS_UNARY(ceil, __builtin_ceilf(x))
OSS_UNARY(trunc, __builtin_truncf(x))
OSS_UNARY(round, __builtin_roundf(x))
OSS_UNARY(rint, __builtin_rintf(x))
OSS_UNARY(fabs, __builtin_fabsf(x))
OSS_UNARY(fract, x - __builtin_floorf(x))
OSS_UNARY(saturate, __builtin_fminf(__builtin_fmaxf(x, 0.f), 1.f))
OSS_UNARY(sign, x > 0.f ? 1.f : x < 0.f ? -1.f : x)
#undef OSS_UNARY
inline float sincos(float x, thread float& c) {
  c = __builtin_cosf(x);
  return __builtin_sinf(x);
}
#define OSS_BINARY(name, expr)                                          \
  inline float name(float x, float y) { return expr; }                  \
  inline half name(half a, half b) { return half(name(float(a), float(b))); } \
  OSS_ELEMENTWISE2(name)
OSS_BINARY(pow, __builtin_powf(x, y))
OSS_BINARY(powr, __builtin_powf(x, y))
OSS_BINARY(atan2, __builtin_atan2f(x, y))
OSS_BINARY(fmod, __builtin_fmodf(x, y))
OSS_BINARY(copysign, __builtin_copysignf(x, y))
// IEEE maxNum / minNum, as Metal defines fmax / fmin (and max / min of floats): a NaN argument
// gives the other argument.
OSS_BINARY(fmax, __builtin_fmaxf(x, y))
OSS_BINARY(fmin, __builtin_fminf(x, y))
OSS_BINARY(step, y < x ? 0.f : 1.f)
#undef OSS_BINARY
inline float max(float x, float y) { return __builtin_fmaxf(x, y); }
inline float min(float x, float y) { return __builtin_fminf(x, y); }
inline half max(half a, half b) { return half(__builtin_fmaxf(float(a), float(b))); }
inline half min(half a, half b) { return half(__builtin_fminf(float(a), float(b))); }
#define OSS_INT_MINMAX(T)                                 \
  inline T max(T a, T b) { return a < b ? b : a; }        \
  inline T min(T a, T b) { return b < a ? b : a; }        \
  inline T abs(T a) { return a < 0 ? T(-a) : a; }
OSS_INT_MINMAX(int)
OSS_INT_MINMAX(long)
OSS_INT_MINMAX(short)
OSS_INT_MINMAX(char)
#undef OSS_INT_MINMAX
#define OSS_UINT_MINMAX(T)                                \
  inline T max(T a, T b) { return a < b ? b : a; }        \
  inline T min(T a, T b) { return b < a ? b : a; }        \
  inline T abs(T a) { return a; }
OSS_UINT_MINMAX(uint)
OSS_UINT_MINMAX(ulong)
OSS_UINT_MINMAX(ushort)
OSS_UINT_MINMAX(uchar)
#undef OSS_UINT_MINMAX
inline float abs(float x) { return __builtin_fabsf(x); }
inline half abs(half x) { return half(__builtin_fabsf(float(x))); }
OSS_ELEMENTWISE2(max)
OSS_ELEMENTWISE2(min)
OSS_ELEMENTWISE1(abs)
inline float fma(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
inline half fma(half a, half b, half c) { return half(__builtin_fmaf(float(a), float(b), float(c))); }
OSS_ELEMENTWISE3(fma)
template <typename T>
inline T clamp(T x, T lo, T hi) {
  return min(max(x, lo), hi);
}
inline float mix(float x, float y, float a) { return x + (y - x) * a; }
inline half mix(half x, half y, half a) { return x + (y - x) * a; }
OSS_ELEMENTWISE3(mix)
template <typename T>
inline T select(T a, T b, bool c) {
  return c ? b : a;
}
template <typename T, int N>
inline vec<T, N> select(const vec<T, N>& a, const vec<T, N>& b, const vec<bool, N>& c) {
  vec<T, N> r;
  for (int i = 0; i < N; ++i) r.e_[i] = c.e_[i] ? b.e_[i] : a.e_[i];
  return r;
}
inline bool isnan(float x) { return __builtin_isnan(x); }
inline bool isinf(float x) { return __builtin_isinf(x); }
inline bool isfinite(float x) { return __builtin_isfinite(x); }
inline bool signbit(float x) { return __builtin_signbit(x); }
inline bool isnan(half x) { return __builtin_isnan(float(x)); }
inline bool isinf(half x) { return __builtin_isinf(float(x)); }
inline bool isfinite(half x) { return __builtin_isfinite(float(x)); }
template <typename T, int N>
inline T dot(const vec<T, N>& a, const vec<T, N>& b) {
  T s = a.e_[0] * b.e_[0];
  for (int i = 1; i < N; ++i) s = s + a.e_[i] * b.e_[i];
  return s;
}
template <int N>
inline float length(const vec<float, N>& a) {
  return sqrt(dot(a, a));
}
inline uint popcount(uint x) { return uint(__builtin_popcount(x)); }
inline int popcount(int x) { return __builtin_popcount(uint(x)); }
inline uint clz(uint x) { return x ? uint(__builtin_clz(x)) : 32u; }
inline uint ctz(uint x) { return x ? uint(__builtin_ctz(x)) : 32u; }
#undef OSS_ELEMENTWISE1
#undef OSS_ELEMENTWISE2
#undef OSS_ELEMENTWISE3

namespace precise {
using metal::cos;
using metal::exp;
using metal::exp2;
using metal::log;
using metal::log2;
using metal::pow;
using metal::rsqrt;
using metal::sin;
using metal::sincos;
using metal::sqrt;
using metal::tanh;
inline float divide(float x, float y) { return x / y; }
}  // namespace precise
namespace fast {
using metal::cos;
using metal::exp;
using metal::exp2;
using metal::log;
using metal::log2;
using metal::pow;
using metal::rsqrt;
using metal::sin;
using metal::sincos;
using metal::sqrt;
using metal::tanh;
inline float divide(float x, float y) { return x / y; }
}  // namespace fast

template <typename T>
struct numeric_limits;
template <>
struct numeric_limits<float> {
  static constexpr float max() { return 3.40282347e38f; }
  static constexpr float min() { return 1.17549435e-38f; }
  static constexpr float lowest() { return -3.40282347e38f; }
  static constexpr float epsilon() { return 1.1920929e-7f; }
  static constexpr float infinity() { return __builtin_inff(); }
  static constexpr float quiet_NaN() { return __builtin_nanf(""); }
};
template <>
struct numeric_limits<half> {
  static constexpr half max() { return half(65504.f); }
  static constexpr half min() { return half(6.10351562e-5f); }
  static constexpr half lowest() { return half(-65504.f); }
  static constexpr half epsilon() { return half(9.765625e-4f); }
  static constexpr half infinity() { return half(__builtin_inff()); }
  static constexpr half quiet_NaN() { return half(__builtin_nanf("")); }
};
template <>
struct numeric_limits<int> {
  static constexpr int max() { return 2147483647; }
  static constexpr int min() { return -2147483647 - 1; }
  static constexpr int lowest() { return -2147483647 - 1; }
};
template <>
struct numeric_limits<uint> {
  static constexpr uint max() { return 4294967295u; }
  static constexpr uint min() { return 0u; }
  static constexpr uint lowest() { return 0u; }
};

// ---- barriers ------------------------------------------------------------------------------------
enum class mem_flags : uint { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };
inline mem_flags operator|(mem_flags a, mem_flags b) { return mem_flags(uint(a) | uint(b)); }
inline void threadgroup_barrier(mem_flags) { oss_threadgroup_barrier(); }
inline void simdgroup_barrier(mem_flags, OSS_AT) {
  uint32_t active;
  oss_simd_exchange(OSS_OP_SIMDGROUP_BARRIER, OSS_SITE, nullptr, 0, &active);
}

// ---- simdgroup functions ---------------------------------------------------------------------------
// Each lane hands its value to the exchange; after it every lane reads the active lanes' values.
// A value from an inactive lane (returned, or past a partial simdgroup) or an out-of-range lane is
// undefined on Metal: here a garbage pattern (NaN as a float, huge as an integer).
template <typename T>
inline T oss_garbage() {
  unsigned char b[sizeof(T)];
  for (unsigned i = 0; i < sizeof(T); ++i) b[i] = (i % 4 == 3) ? 0x7F : 0xFF;
  T t;
  __builtin_memcpy((void*)&t, b, sizeof(T));
  return t;
}
template <typename T>
inline T oss_lane_value(const unsigned char* slots, uint32_t active, int lane) {
  if (lane < 0 || lane >= 32 || !(active >> lane & 1u)) return oss_garbage<T>();
  T t;
  __builtin_memcpy((void*)&t, slots + lane * OSS_SLOT_BYTES, sizeof(T));
  return t;
}
template <typename T>
inline const unsigned char* oss_exchange(int op, const char* file, unsigned line, unsigned col, const T& v,
                                         uint32_t* active) {
  return oss_simd_exchange(op, file, line, col, (const void*)&v, sizeof(T), active);
}

template <typename T>
T simd_shuffle(T v, ushort lane, OSS_AT) {
  uint32_t a;
  const unsigned char* s = oss_exchange(OSS_OP_SHUFFLE, OSS_SITE, v, &a);
  return oss_lane_value<T>(s, a, lane);
}
template <typename T>
T simd_shuffle_xor(T v, ushort mask, OSS_AT) {
  uint32_t a;
  const unsigned char* s = oss_exchange(OSS_OP_SHUFFLE, OSS_SITE, v, &a);
  return oss_lane_value<T>(s, a, int(oss_lane() ^ mask));
}
template <typename T>
T simd_shuffle_down(T v, ushort delta, OSS_AT) {  // the upper `delta` lanes keep their own value
  uint32_t a;
  const unsigned char* s = oss_exchange(OSS_OP_SHUFFLE, OSS_SITE, v, &a);
  const int src = int(oss_lane()) + delta;
  return src < 32 ? oss_lane_value<T>(s, a, src) : v;
}
template <typename T>
T simd_shuffle_up(T v, ushort delta, OSS_AT) {  // the lower `delta` lanes keep their own value
  uint32_t a;
  const unsigned char* s = oss_exchange(OSS_OP_SHUFFLE, OSS_SITE, v, &a);
  const int src = int(oss_lane()) - delta;
  return src >= 0 ? oss_lane_value<T>(s, a, src) : v;
}
template <typename T>
T simd_shuffle_rotate_down(T v, ushort delta, OSS_AT) {
  uint32_t a;
  const unsigned char* s = oss_exchange(OSS_OP_SHUFFLE, OSS_SITE, v, &a);
  return oss_lane_value<T>(s, a, int((oss_lane() + delta) % 32u));
}
template <typename T>
T simd_shuffle_rotate_up(T v, ushort delta, OSS_AT) {
  uint32_t a;
  const unsigned char* s = oss_exchange(OSS_OP_SHUFFLE, OSS_SITE, v, &a);
  return oss_lane_value<T>(s, a, int((oss_lane() + 32u - delta % 32u) % 32u));
}
// simd_broadcast: the lane must be the same on every lane (Metal requires a uniform index).
template <typename T>
T simd_broadcast(T v, ushort lane, OSS_AT) {
  struct {
    T v;
    ushort lane;
  } mine = {v, lane};
  uint32_t a;
  const unsigned char* s = oss_exchange(OSS_OP_BROADCAST, OSS_SITE, mine, &a);
  for (int l = 0; l < 32; ++l) {
    if ((a >> l & 1u) && oss_lane_value<decltype(mine)>(s, a, l).lane != lane)
      oss_fail("simd_broadcast: the lane index differs between lanes (it must be uniform)");
  }
  return oss_lane_value<decltype(mine)>(s, a, lane).v;
}
template <typename T>
T simd_broadcast_first(T v, OSS_AT) {
  uint32_t a;
  const unsigned char* s = oss_exchange(OSS_OP_BROADCAST, OSS_SITE, v, &a);
  return oss_lane_value<T>(s, a, a ? __builtin_ctz(a) : 0);
}

// Reductions over the active lanes, as a tree over lane pairs 16 apart, then 8, ... (the order a
// butterfly of shuffles gives); every lane gets the result.
template <typename T, typename Op>
inline T oss_reduce(const unsigned char* s, uint32_t active, Op op) {
  T v[32];
  bool has[32];
  for (int l = 0; l < 32; ++l) {
    has[l] = active >> l & 1u;
    if (has[l]) __builtin_memcpy((void*)&v[l], s + l * OSS_SLOT_BYTES, sizeof(T));
  }
  for (int off = 16; off > 0; off >>= 1) {
    for (int l = 0; l < off; ++l) {
      if (has[l] && has[l + off]) {
        v[l] = op(v[l], v[l + off]);
      } else if (has[l + off]) {
        v[l] = v[l + off];
        has[l] = true;
      }
    }
  }
  return v[0];
}
#define OSS_SIMD_REDUCE(name, expr)                                              \
  template <typename T>                                                          \
  T name(T v, OSS_AT) {                                                          \
    uint32_t a;                                                                  \
    const unsigned char* s = oss_exchange(OSS_OP_REDUCE, OSS_SITE, v, &a);       \
    return oss_reduce<T>(s, a, [](T x, T y) { return T(expr); });                \
  }
OSS_SIMD_REDUCE(simd_sum, x + y)
OSS_SIMD_REDUCE(simd_product, x * y)
OSS_SIMD_REDUCE(simd_max, max(x, y))
OSS_SIMD_REDUCE(simd_min, min(x, y))
OSS_SIMD_REDUCE(simd_and, x & y)
OSS_SIMD_REDUCE(simd_or, x | y)
OSS_SIMD_REDUCE(simd_xor, x ^ y)
#undef OSS_SIMD_REDUCE
// Prefix scans over the active lanes below this one (in lane order).
#define OSS_SIMD_PREFIX(name, op, inclusive, identity)                              \
  template <typename T>                                                             \
  T name(T v, OSS_AT) {                                                             \
    uint32_t a;                                                                     \
    const unsigned char* s = oss_exchange(OSS_OP_PREFIX, OSS_SITE, v, &a);          \
    const int me = int(oss_lane());                                                 \
    T acc = T(identity);                                                            \
    for (int l = 0; l < me + (inclusive); ++l) {                                    \
      if (a >> l & 1u) acc = acc op oss_lane_value<T>(s, a, l);                     \
    }                                                                               \
    return acc;                                                                     \
  }
OSS_SIMD_PREFIX(simd_prefix_inclusive_sum, +, 1, 0)
OSS_SIMD_PREFIX(simd_prefix_exclusive_sum, +, 0, 0)
OSS_SIMD_PREFIX(simd_prefix_inclusive_product, *, 1, 1)
OSS_SIMD_PREFIX(simd_prefix_exclusive_product, *, 0, 1)
#undef OSS_SIMD_PREFIX

struct simd_vote {
  typedef ulong vote_t;
  vote_t v;
  explicit simd_vote(vote_t x = 0) : v(x) {}
  explicit operator vote_t() const { return v; }
  bool all() const { return v == 0xFFFFFFFFul; }
  bool any() const { return v != 0; }
};
inline simd_vote simd_ballot(bool b, OSS_AT) {
  uint32_t a;
  const unsigned char* s = oss_exchange(OSS_OP_VOTE, OSS_SITE, b, &a);
  ulong m = 0;
  for (int l = 0; l < 32; ++l) {
    if ((a >> l & 1u) && oss_lane_value<bool>(s, a, l)) m |= 1ul << l;
  }
  return simd_vote(m);
}
inline bool simd_all(bool b, OSS_AT) {
  uint32_t a;
  const unsigned char* s = oss_exchange(OSS_OP_VOTE, OSS_SITE, b, &a);
  for (int l = 0; l < 32; ++l) {
    if ((a >> l & 1u) && !oss_lane_value<bool>(s, a, l)) return false;
  }
  return true;
}
inline bool simd_any(bool b, OSS_AT) {
  uint32_t a;
  const unsigned char* s = oss_exchange(OSS_OP_VOTE, OSS_SITE, b, &a);
  for (int l = 0; l < 32; ++l) {
    if ((a >> l & 1u) && oss_lane_value<bool>(s, a, l)) return true;
  }
  return false;
}
inline simd_vote simd_active_threads_mask(OSS_AT) {
  uint32_t a;
  oss_simd_exchange(OSS_OP_VOTE, OSS_SITE, nullptr, 0, &a);
  return simd_vote(a);
}
inline bool simd_is_first(OSS_AT) {
  uint32_t a;
  oss_simd_exchange(OSS_OP_VOTE, OSS_SITE, nullptr, 0, &a);
  return a && int(oss_lane()) == __builtin_ctz(a);
}

// ---- simdgroup matrices (8 x 8) ----------------------------------------------------------------------
// Lane l holds the elements (m, n) and (m, n + 1) of every 8 x 8 matrix, for the same (m, n) in A,
// B and the result, with q = l / 4: m = (q & 4) + (l / 2) % 4, n = (q & 2) * 2 + (l % 2) * 2 (Apple
// GPUs; MLX's steel kernels, BaseMMAFrag::get_coord, rely on it).
inline void oss_frag_coord(int lane, int& m, int& n) {
  const int q = lane / 4;
  m = (q & 4) + (lane / 2) % 4;
  n = (q & 2) * 2 + (lane % 2) * 2;
}
template <typename T, int Cols, int Rows = Cols>
struct simdgroup_matrix {
  static_assert(Cols == 8 && Rows == 8, "the emulator's simdgroup matrices are 8 x 8 (as Metal's)");
  vec<T, 2> e_;
  simdgroup_matrix() = default;
  explicit simdgroup_matrix(T diagonal) {  // diagonal * identity
    int m, n;
    oss_frag_coord(int(oss_lane()), m, n);
    e_.e_[0] = m == n ? diagonal : T(0);
    e_.e_[1] = m == n + 1 ? diagonal : T(0);
  }
  thread vec<T, 2>& thread_elements() { return e_; }
  const thread vec<T, 2>& thread_elements() const { return e_; }
};
typedef simdgroup_matrix<float, 8, 8> simdgroup_float8x8;
typedef simdgroup_matrix<half, 8, 8> simdgroup_half8x8;
typedef simdgroup_matrix<bfloat, 8, 8> simdgroup_bfloat8x8;

template <typename T, int Cols, int Rows = Cols>
inline simdgroup_matrix<T, Cols, Rows> make_filled_simdgroup_matrix(const T value) {
  simdgroup_matrix<T, Cols, Rows> m;
  m.e_ = vec<T, 2>(value);
  return m;
}

inline void oss_require_full_simdgroup(uint32_t active, const char* what) {
  if (active != 0xFFFFFFFFu) oss_fail(what);
}
// The arguments of a matrix load or store (the same on every lane, which is checked).
struct oss_matrix_access {
  uintptr_t address;
  ulong elements_per_row, origin_x, origin_y;
  bool transpose;
};
inline void oss_require_uniform(const unsigned char* s, const oss_matrix_access& mine, const char* what) {
  for (int l = 0; l < 32; ++l) {
    oss_matrix_access o;
    __builtin_memcpy((void*)&o, s + l * OSS_SLOT_BYTES, sizeof o);
    if (o.address != mine.address || o.elements_per_row != mine.elements_per_row ||
        o.origin_x != mine.origin_x || o.origin_y != mine.origin_y || o.transpose != mine.transpose)
      oss_fail(what);
  }
}
// Element (m, n) of the matrix at src: row m at src + (origin.y + m) * elements_per_row + origin.x
// (origin = (column, row)); transposed, the source holds the matrix's columns as rows.
inline ulong oss_matrix_offset(const oss_matrix_access& a, int m, int n) {
  const ulong r = a.transpose ? ulong(n) : ulong(m), c = a.transpose ? ulong(m) : ulong(n);
  return (a.origin_y + r) * a.elements_per_row + a.origin_x + c;
}
#define OSS_MATRIX_MEMORY(SPACE)                                                                          \
  template <typename T, int C, int R>                                                                     \
  void simdgroup_load(thread simdgroup_matrix<T, C, R>& d, const SPACE T* src,                    \
                               ulong elements_per_row = C, vec<ulong, 2> matrix_origin = vec<ulong, 2>(0ul), \
                               bool transpose_matrix = false, OSS_AT) {                                  \
    const oss_matrix_access mine = {(uintptr_t)src, elements_per_row, matrix_origin.x, matrix_origin.y,   \
                                    transpose_matrix};                                                   \
    uint32_t a;                                                                                           \
    const unsigned char* s = oss_exchange(OSS_OP_MATRIX_LOAD, OSS_SITE, mine, &a);                        \
    oss_require_full_simdgroup(a, "simdgroup_load needs all 32 lanes of the simdgroup");                 \
    oss_require_uniform(s, mine, "simdgroup_load: the arguments differ between lanes (they must be uniform)"); \
    int m, n;                                                                                             \
    oss_frag_coord(int(oss_lane()), m, n);                                                                \
    for (int i = 0; i < 2; ++i) d.e_.e_[i] = src[oss_matrix_offset(mine, m, n + i)];                     \
  }                                                                                                       \
  template <typename T, int C, int R>                                                                     \
  void simdgroup_store(const thread simdgroup_matrix<T, C, R>& v, SPACE T* dst,                  \
                                ulong elements_per_row = C, vec<ulong, 2> matrix_origin = vec<ulong, 2>(0ul), \
                                bool transpose_matrix = false, OSS_AT) {                                 \
    const oss_matrix_access mine = {(uintptr_t)dst, elements_per_row, matrix_origin.x, matrix_origin.y,   \
                                    transpose_matrix};                                                   \
    uint32_t a;                                                                                           \
    const unsigned char* s = oss_exchange(OSS_OP_MATRIX_STORE, OSS_SITE, mine, &a);                       \
    oss_require_full_simdgroup(a, "simdgroup_store needs all 32 lanes of the simdgroup");                \
    oss_require_uniform(s, mine, "simdgroup_store: the arguments differ between lanes (they must be uniform)"); \
    int m, n;                                                                                             \
    oss_frag_coord(int(oss_lane()), m, n);                                                                \
    for (int i = 0; i < 2; ++i) dst[oss_matrix_offset(mine, m, n + i)] = v.e_.e_[i];                      \
  }
OSS_MATRIX_MEMORY(device)
OSS_MATRIX_MEMORY(threadgroup)
#undef OSS_MATRIX_MEMORY

// D = A B + C, each lane computing its two elements of D in float (a fused multiply-add per k, in k
// order, from C), rounded to D's type. D may be any of A, B, C: every lane's parts are exchanged first.
template <typename TD, typename TA, typename TB, typename TC, int C, int R>
void simdgroup_multiply_accumulate(thread simdgroup_matrix<TD, C, R>& d,
                                            const thread simdgroup_matrix<TA, C, R>& a,
                                            const thread simdgroup_matrix<TB, C, R>& b,
                                            const thread simdgroup_matrix<TC, C, R>& c, OSS_AT) {
  struct parts {
    vec<TA, 2> a;
    vec<TB, 2> b;
    vec<TC, 2> c;
  };
  const parts mine = {a.e_, b.e_, c.e_};
  uint32_t active;
  const unsigned char* s = oss_exchange(OSS_OP_MATRIX_MULTIPLY, OSS_SITE, mine, &active);
  oss_require_full_simdgroup(active, "simdgroup_multiply_accumulate needs all 32 lanes of the simdgroup");
  float A[8][8], B[8][8], Cm[8][8];
  for (int l = 0; l < 32; ++l) {
    parts p;
    __builtin_memcpy((void*)&p, s + l * OSS_SLOT_BYTES, sizeof p);
    int m, n;
    oss_frag_coord(l, m, n);
    for (int i = 0; i < 2; ++i) {
      A[m][n + i] = float(p.a.e_[i]);
      B[m][n + i] = float(p.b.e_[i]);
      Cm[m][n + i] = float(p.c.e_[i]);
    }
  }
  int m, n;
  oss_frag_coord(int(oss_lane()), m, n);
  for (int i = 0; i < 2; ++i) {
    float acc = Cm[m][n + i];
    for (int k = 0; k < 8; ++k) acc = __builtin_fmaf(A[m][k], B[k][n + i], acc);
    d.e_.e_[i] = TD(acc);
  }
}
template <typename TD, typename TA, typename TB, int C, int R>
inline void simdgroup_multiply(thread simdgroup_matrix<TD, C, R>& d, const thread simdgroup_matrix<TA, C, R>& a,
                               const thread simdgroup_matrix<TB, C, R>& b, OSS_AT) {
  simdgroup_multiply_accumulate(d, a, b, make_filled_simdgroup_matrix<TD, C, R>(TD(0)), OSS_SITE);
}

// ---- atomics ---------------------------------------------------------------------------------------
// An atomic object is a type of its own (an enum of its value's bits: a threadgroup array of it needs
// no constructor), so only these functions read or write it. Each is a scheduling point
// (runtime.cpp): another thread may run between two atomic operations of one thread.
enum memory_order { memory_order_relaxed = 0, memory_order_seq_cst = 5 };
enum class atomic_int : int {};
enum class atomic_uint : uint {};
enum class atomic_bool : uchar {};
enum class atomic_float : uint {};
enum class atomic_ulong : ulong {};
template <typename T>
struct oss_atomic_for;
template <>
struct oss_atomic_for<int> {
  typedef atomic_int type;
};
template <>
struct oss_atomic_for<uint> {
  typedef atomic_uint type;
};
template <>
struct oss_atomic_for<bool> {
  typedef atomic_bool type;
};
template <>
struct oss_atomic_for<float> {
  typedef atomic_float type;
};
template <>
struct oss_atomic_for<ulong> {
  typedef atomic_ulong type;
};
template <typename T>
using atomic = typename oss_atomic_for<T>::type;  // MLX's atomic_outputs: device atomic<float>*
template <typename T, typename U>
inline T oss_from_bits(U u) {
  if constexpr (sizeof(T) == sizeof(U) && T(0.5f) != T(0)) {
    return as_type<T>(u);
  } else {
    return T(u);
  }
}
template <typename U, typename T>
inline U oss_to_bits(T t) {
  if constexpr (sizeof(T) == sizeof(U) && T(0.5f) != T(0)) {
    return as_type<U>(t);
  } else {
    return U(t);
  }
}
#define OSS_ATOMIC_ACCESS(Q, A, T, U)                                                                      \
  inline void atomic_store_explicit(Q A* o, T v, memory_order) {                                           \
    oss_atomic_point();                                                                                    \
    *o = A(oss_to_bits<U>(v));                                                                             \
  }                                                                                                        \
  inline T atomic_load_explicit(Q A* o, memory_order) {                                                    \
    oss_atomic_point();                                                                                    \
    return oss_from_bits<T>(U(*o));                                                                        \
  }                                                                                                        \
  inline T atomic_exchange_explicit(Q A* o, T v, memory_order) {                                           \
    oss_atomic_point();                                                                                    \
    const T old = oss_from_bits<T>(U(*o));                                                                 \
    *o = A(oss_to_bits<U>(v));                                                                             \
    return old;                                                                                            \
  }                                                                                                        \
  inline bool atomic_compare_exchange_weak_explicit(Q A* o, thread T* expected, T desired, memory_order,   \
                                                    memory_order) {                                        \
    oss_atomic_point();                                                                                    \
    const T now = oss_from_bits<T>(U(*o));                                                                 \
    if (now == *expected) {                                                                                \
      *o = A(oss_to_bits<U>(desired));                                                                     \
      return true;                                                                                         \
    }                                                                                                      \
    *expected = now;                                                                                       \
    return false;                                                                                          \
  }
#define OSS_ATOMIC_RMW(Q, A, T, U, name, expr)                                                             \
  inline T atomic_fetch_##name##_explicit(Q A* o, T v, memory_order) {                                     \
    oss_atomic_point();                                                                                    \
    const T old = oss_from_bits<T>(U(*o));                                                                 \
    *o = A(oss_to_bits<U>(T(expr)));                                                                       \
    return old;                                                                                            \
  }
#define OSS_ATOMIC_INTEGER(Q, A, T)            \
  OSS_ATOMIC_ACCESS(Q, A, T, T)                \
  OSS_ATOMIC_RMW(Q, A, T, T, add, old + v)     \
  OSS_ATOMIC_RMW(Q, A, T, T, sub, old - v)     \
  OSS_ATOMIC_RMW(Q, A, T, T, and, old & v)     \
  OSS_ATOMIC_RMW(Q, A, T, T, or, old | v)      \
  OSS_ATOMIC_RMW(Q, A, T, T, xor, old ^ v)     \
  OSS_ATOMIC_RMW(Q, A, T, T, min, old < v ? old : v) \
  OSS_ATOMIC_RMW(Q, A, T, T, max, old < v ? v : old)
#define OSS_ATOMICS(Q)                                     \
  OSS_ATOMIC_INTEGER(Q, atomic_int, int)                   \
  OSS_ATOMIC_INTEGER(Q, atomic_uint, uint)                 \
  OSS_ATOMIC_INTEGER(Q, atomic_ulong, ulong)               \
  OSS_ATOMIC_ACCESS(Q, atomic_bool, bool, uchar)           \
  OSS_ATOMIC_ACCESS(Q, atomic_float, float, uint)          \
  OSS_ATOMIC_RMW(Q, atomic_float, float, uint, add, old + v) \
  OSS_ATOMIC_RMW(Q, atomic_float, float, uint, sub, old - v)
OSS_ATOMICS(device)
OSS_ATOMICS(threadgroup)
OSS_ATOMICS(volatile device)
OSS_ATOMICS(volatile threadgroup)
#undef OSS_ATOMICS
#undef OSS_ATOMIC_INTEGER
#undef OSS_ATOMIC_RMW
#undef OSS_ATOMIC_ACCESS

}  // namespace metal
using namespace metal;  // MLX's prelude does the same

#define MAXFLOAT 3.40282347e38f
#define INFINITY __builtin_inff()
#define NAN __builtin_nanf("")
#define HUGE_VALF __builtin_inff()
#define FLT_MAX 3.40282347e38f
#define FLT_MIN 1.17549435e-38f
#define M_PI_F 3.14159265358979323846f
#define M_LN2_F 0.69314718055994530942f
#define M_LOG2E_F 1.44269504088896340736f
#define HALF_MAX half(65504.f)
