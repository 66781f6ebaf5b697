// The interface between the Metal emulator's runtime (runtime.cpp), the Metal shim (shim.h) and the
// Python launcher (launch.py, which mirrors OssLaunch and OssResult with ctypes). C only, no macros
// of the shim, so the runtime can include it next to the system headers.
#pragma once
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Bytes each lane hands to a simdgroup exchange (the largest: a matrix op's three 2-element parts,
// or a matrix load's address and layout).
#define OSS_SLOT_BYTES 64

typedef struct { uint32_t x, y, z; } OssU3;

// Every thread-position attribute MLX's metal_kernel may add to a kernel's signature.
typedef struct {
  OssU3 thread_position_in_grid, thread_position_in_threadgroup, threadgroup_position_in_grid;
  OssU3 threadgroups_per_grid, threads_per_threadgroup, dispatch_threads_per_threadgroup;
  OssU3 threads_per_grid, grid_size, grid_origin;
  uint32_t thread_index_in_threadgroup, simdgroup_index_in_threadgroup, thread_index_in_simdgroup;
  uint32_t simdgroups_per_threadgroup, dispatch_simdgroups_per_threadgroup, threads_per_simdgroup;
  uint32_t thread_execution_width, quadgroup_index_in_threadgroup, thread_index_in_quadgroup;
  uint32_t quadgroups_per_threadgroup, dispatch_quadgroups_per_threadgroup;
} OssThreadIds;

typedef void (*OssKernelFn)(void** buffers, const OssThreadIds* ids);

enum { OSS_SCHEDULE_FORWARD = 0, OSS_SCHEDULE_REVERSE = 1, OSS_SCHEDULE_SHUFFLE = 2 };

typedef struct {
  int64_t grid[3], threadgroup[3];
  int64_t schedule;            // OSS_SCHEDULE_*
  uint64_t seed;               // for OSS_SCHEDULE_SHUFFLE
  double cpu_seconds;          // budget of the whole launch (an endless loop becomes an error)
  int64_t max_threads;         // per threadgroup (MLX checks maxTotalThreadsPerThreadgroup)
  int64_t threadgroup_memory;  // bytes a threadgroup may declare
  uint32_t garbage;            // the 32-bit pattern uninitialised threadgroup memory holds
  void* stacks;                // the fibers' stacks (oss_make_stacks: one set for the process)
} OssLaunch;

enum { OSS_OK = 0, OSS_ERROR = 1, OSS_FAULT = 2, OSS_TIMEOUT = 3 };

typedef struct {
  int32_t code;                  // OSS_*
  int32_t signal;                // OSS_FAULT: the signal
  uint64_t fault_address;        // OSS_FAULT: the address
  int32_t where[6];              // threadgroup position, thread position in it (-1: none)
  int64_t threadgroup_memory;    // bytes of threadgroup memory the kernel declares
  char message[2048];
} OssResult;

// Simdgroup operations (shim.h names them in messages through this order).
enum {
  OSS_OP_THREADGROUP_BARRIER = 1,
  OSS_OP_SIMDGROUP_BARRIER,
  OSS_OP_SHUFFLE,
  OSS_OP_REDUCE,
  OSS_OP_PREFIX,
  OSS_OP_VOTE,
  OSS_OP_BROADCAST,
  OSS_OP_MATRIX_LOAD,
  OSS_OP_MATRIX_STORE,
  OSS_OP_MATRIX_MULTIPLY,
};

// The runtime's side, called by the shim from inside a kernel thread.
unsigned char* oss_simd_exchange(int op, const char* file, unsigned line, unsigned column, const void* value,
                                 int nbytes, uint32_t* active);
void oss_threadgroup_barrier(void);
void oss_atomic_point(void);
uint32_t oss_lane(void);
void oss_fail(const char* what) __attribute__((noreturn));

#ifdef __cplusplus
}
#endif
