// The part of the Metal Shading Language that kernels_metal/ uses, as C++ for clang: enough to
// compile each kernel the way mx.fast.metal_kernel assembles it, with the address spaces kept
// (device / constant / threadgroup are clang address spaces, so passing a pointer to the wrong one is
// an error, as in Metal). Not Metal: no GPU semantics, nothing runs. It catches what a compiler
// catches before any Mac sees the sources: syntax, names, overloads, templates, address spaces.
#pragma once
#include <stdint.h>

#define device __attribute__((address_space(1)))
#define constant __attribute__((address_space(2)))
#define threadgroup __attribute__((address_space(3)))
#define thread

typedef unsigned int uint;
typedef unsigned short ushort;

// Scalars, as in Metal (MLX's bfloat16_t is Metal's `bfloat` or a 2-byte struct of its own).
typedef _Float16 half;
typedef _Float16 float16_t;
typedef __bf16 bfloat16_t;
// Metal's vector types copy from any address space; a C++ struct needs a constructor for each.
#define OSS_SHIM_FROM_SPACES(T)                                   \
  T() = default;                                                  \
  T(const T&) = default;                                          \
  T& operator=(const T&) = default;                               \
  T(const device T& o) { __builtin_memcpy((void*)this, (const void*)(uintptr_t)&o, sizeof(T)); } \
  T(const constant T& o) { __builtin_memcpy((void*)this, (const void*)(uintptr_t)&o, sizeof(T)); } \
  T(const threadgroup T& o) { __builtin_memcpy((void*)this, (const void*)(uintptr_t)&o, sizeof(T)); }

struct half2 {
  half x, y;
};
struct float2 {
  float x, y;
  float2() = default;
  float2(float a, float b) : x(a), y(b) {}
  explicit float2(half2 h) : x(h.x), y(h.y) {}
  float& operator[](int i) { return i == 0 ? x : y; }
};
struct float4 {
  float x, y, z, w;
  OSS_SHIM_FROM_SPACES(float4)
};
struct uint2 {
  uint x, y;
};
struct uint3 {
  uint x, y, z;
};
struct uint4 {
  uint x, y, z, w;
  OSS_SHIM_FROM_SPACES(uint4)
  uint& operator[](int i) { return i == 0 ? x : i == 1 ? y : i == 2 ? z : w; }
  uint operator[](int i) const { return i == 0 ? x : i == 1 ? y : i == 2 ? z : w; }
};

template <typename T, typename U>
T as_type(U u) {
  static_assert(sizeof(T) == sizeof(U), "as_type: sizes differ");
  T t;
  __builtin_memcpy(&t, &u, sizeof(T));
  return t;
}

namespace metal {
inline float fma(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
inline float min(float a, float b) { return a < b ? a : b; }
inline float max(float a, float b) { return a > b ? a : b; }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline float rsqrt(float x) { return 1.f / __builtin_sqrtf(x); }
inline float exp(float x) { return __builtin_expf(x); }
inline float exp2(float x) { return __builtin_exp2f(x); }
namespace precise {
inline float exp(float x) { return __builtin_expf(x); }
inline float cos(float x) { return __builtin_cosf(x); }
inline float sin(float x) { return __builtin_sinf(x); }
inline float rsqrt(float x) { return 1.f / __builtin_sqrtf(x); }
}  // namespace precise
enum class mem_flags { mem_none, mem_device, mem_threadgroup };
inline void threadgroup_barrier(mem_flags) {}
inline void simdgroup_barrier(mem_flags) {}
inline float simd_sum(float v) { return v; }
inline float simd_shuffle_xor(float v, ushort) { return v; }
inline int simd_shuffle_xor(int v, ushort) { return v; }
inline uint simd_shuffle_xor(uint v, ushort) { return v; }
// simdgroup matrices: the type, its per-thread elements, fill and multiply-accumulate.
template <typename T, int R, int C>
struct simdgroup_matrix {
  float2 e;
  float2& thread_elements() { return e; }
};
template <typename T, int R, int C>
simdgroup_matrix<T, R, C> make_filled_simdgroup_matrix(T v) {
  simdgroup_matrix<T, R, C> m;
  m.e = float2(v, v);
  return m;
}
template <typename T, int R, int C>
void simdgroup_multiply_accumulate(simdgroup_matrix<T, R, C>& d, const simdgroup_matrix<T, R, C>& a,
                                   const simdgroup_matrix<T, R, C>& b, const simdgroup_matrix<T, R, C>& c) {
  d.e.x = a.e.x * b.e.x + c.e.x;
}
struct ulong2 {
  unsigned long x, y;
  ulong2(unsigned long a, unsigned long b) : x(a), y(b) {}
};
template <typename T, int R, int C>
void simdgroup_load(simdgroup_matrix<T, R, C>& d, const threadgroup T* src, unsigned long elements_per_row = C,
                    ulong2 matrix_origin = ulong2(0, 0), bool transpose_matrix = false) {
  d.e.x = src[0];
}
// Atomics on threadgroup memory (the ones the kernels use).
enum memory_order { memory_order_relaxed };
enum class atomic_uint : uint {};  // a distinct, trivial type: a threadgroup array of it needs no constructor
inline void atomic_store_explicit(threadgroup atomic_uint* a, uint v, memory_order) { *a = atomic_uint(v); }
inline uint atomic_load_explicit(threadgroup atomic_uint* a, memory_order) { return uint(*a); }
inline uint atomic_fetch_add_explicit(threadgroup atomic_uint* a, uint v, memory_order) {
  const uint old = uint(*a);
  *a = atomic_uint(old + v);
  return old;
}
}  // namespace metal
using namespace metal;  // MLX's prelude does the same
