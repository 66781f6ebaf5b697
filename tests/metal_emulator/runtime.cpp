// The Metal emulator's runtime: runs one kernel (its generated oss_thread entry, see source.py) over
// a grid with Metal's dispatchThreads semantics, every threadgroup's threads as cooperative fibers
// on one OS thread.
//
// A fiber runs until it reaches a synchronisation point, then the scheduler picks the next one:
//   threadgroup_barrier   waits until every thread of the threadgroup is there (a thread that has
//                         returned while others wait, or a barrier after one returned, is an error:
//                         Metal requires every thread to reach every barrier);
//   simdgroup operation   (shuffles, reductions, simdgroup_barrier, matrix ops) waits until every
//                         live lane of the simdgroup is at the same operation (same kind, same call
//                         site: lanes at different ones are a divergence error), then each lane
//                         reads the others' values; lanes that returned are inactive;
//   atomic operation      yields first, so other threads run between two atomics of one thread
//                         (a read-modify-write built from a separate load and store loses updates).
// Between those points lanes run one after another, not in lock-step: a lane reading threadgroup
// memory another lane writes without a barrier in between sees the old contents (as Metal's memory
// model allows; real simdgroups in lock-step would usually hide it). Threads start, and released
// groups resume, in shuffled order (seeded, per threadgroup); released groups run first (LIFO), so
// one simdgroup runs as far ahead of the others as it can. Threadgroup memory (the kernel's
// `threadgroup` arrays, in the section oss_tg) is filled with a garbage pattern before each
// threadgroup. Invalid memory accesses (buffers have guard pages), integer division traps and a
// CPU-time budget end the launch with an error instead of the process.
#include "abi.h"

#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#if !defined(__x86_64__) || !defined(__linux__)
#error "the Metal emulator's fibers are written for x86-64 Linux"
#endif

#define OSS_API extern "C" __attribute__((visibility("default")))

extern "C" void oss_thread(void** buffers, const OssThreadIds* ids);  // the kernel (source.py)
extern "C" char __start_oss_tg[] __attribute__((weak));
extern "C" char __stop_oss_tg[] __attribute__((weak));

// Saves the callee-saved registers on the current stack, stores its pointer in *save and continues
// on stack `to` (SysV x86-64: rbx, rbp, r12-r15; the FP control words are never changed here).
extern "C" void oss_switch(void** save, void* to);
asm(R"(
  .text
  .p2align 4
  .hidden oss_switch
  .type oss_switch,@function
oss_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size oss_switch, .-oss_switch
)");

namespace {

constexpr int kMaxThreads = 1024, kLanes = 32, kMaxSimd = kMaxThreads / kLanes;
constexpr size_t kPage = 4096, kStack = 256 * 1024, kQueue = 2048;  // kQueue: a power of two
enum { kReady, kBlocked, kDone };

// Where in the source a simdgroup operation is called.
struct Site {
  const char* file;
  unsigned line, column;
  bool operator==(const Site& o) const {
    return line == o.line && column == o.column && (file == o.file || strcmp(file, o.file) == 0);
  }
};
const char* base_name(const char* path) {
  const char* slash = path ? strrchr(path, '/') : nullptr;
  return slash ? slash + 1 : path ? path : "?";
}

struct Fiber {
  void* sp;
  int state, lane, sg, op;
  unsigned seq;  // simdgroup operations done: their parity picks the exchange slots
  Site site;
  OssThreadIds ids;
};

struct Simd {
  int live, arrived, op, parity;
  Site site;
  uint32_t mask, active[2];
  alignas(16) unsigned char slot[2][kLanes][OSS_SLOT_BYTES];
};

struct Runtime {
  Fiber fiber[kMaxThreads];
  Simd simd[kMaxSimd];
  int queue[kQueue];
  unsigned head, count;
  int n, live, done, exited, at_barrier;
  Fiber* current;
  void* main_sp;
  char* stacks;
  sigjmp_buf env;
  char message[2048];
  volatile sig_atomic_t signal;
  void* volatile fault_address;
  uint64_t rng;
  int schedule;
} rt;

const char* op_name(int op) {
  static const char* names[] = {"?", "threadgroup_barrier", "simdgroup_barrier", "simd_shuffle*",
                                "simd reduction", "simd prefix", "simd vote", "simd_broadcast",
                                "simdgroup_load", "simdgroup_store", "simdgroup_multiply(_accumulate)"};
  return op > 0 && op <= OSS_OP_MATRIX_MULTIPLY ? names[op] : names[0];
}

[[noreturn]] void fail(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(rt.message, sizeof rt.message, fmt, ap);
  va_end(ap);
  siglongjmp(rt.env, OSS_ERROR);
}

uint64_t next_random() {  // splitmix64
  uint64_t z = (rt.rng += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// `order` (n fiber indices) permuted as the schedule says.
void arrange(int* order, int n) {
  if (rt.schedule == OSS_SCHEDULE_REVERSE) {
    for (int i = 0; i < n / 2; ++i) {
      int t = order[i];
      order[i] = order[n - 1 - i];
      order[n - 1 - i] = t;
    }
  } else if (rt.schedule == OSS_SCHEDULE_SHUFFLE) {
    for (int i = n - 1; i > 0; --i) {
      int j = int(next_random() % unsigned(i + 1)), t = order[i];
      order[i] = order[j];
      order[j] = t;
    }
  }
}

void push_back(int i) { rt.queue[(rt.head + rt.count++) & (kQueue - 1)] = i; }
void push_front(int i) {
  rt.head = (rt.head - 1) & (kQueue - 1);
  rt.queue[rt.head] = i;
  ++rt.count;
}

// Fibers become ready: in shuffle mode at the front of the queue (they run next), else at the back.
void release(int* order, int n) {
  arrange(order, n);
  for (int k = 0; k < n; ++k) rt.fiber[order[k]].state = kReady;
  if (rt.schedule == OSS_SCHEDULE_SHUFFLE) {
    for (int k = n - 1; k >= 0; --k) push_front(order[k]);
  } else {
    for (int k = 0; k < n; ++k) push_back(order[k]);
  }
}

void block() {
  Fiber* f = rt.current;
  oss_switch(&f->sp, rt.main_sp);
}

void complete_simd(int sg) {
  Simd& g = rt.simd[sg];
  g.active[g.parity] = g.mask;
  g.arrived = 0;
  int order[kLanes], n = 0;
  for (int l = 0; l < kLanes; ++l) {
    if (g.mask >> l & 1u) order[n++] = sg * kLanes + l;
  }
  release(order, n);
}

[[noreturn]] void thread_exit(Fiber* f) {
  f->state = kDone;
  ++rt.done;
  --rt.live;
  ++rt.exited;
  Simd& g = rt.simd[f->sg];
  --g.live;
  if (rt.at_barrier > 0) {
    fail("thread %u of the threadgroup returned while %d thread(s) wait at a threadgroup_barrier "
         "(Metal requires every thread of a threadgroup to reach each barrier)",
         f->ids.thread_index_in_threadgroup, rt.at_barrier);
  }
  if (g.arrived > 0 && g.arrived == g.live) complete_simd(f->sg);
  oss_switch(&f->sp, rt.main_sp);
  __builtin_unreachable();
}

void* kernel_buffers;

void fiber_start() {
  Fiber* f = rt.current;
  oss_thread(static_cast<void**>(kernel_buffers), &f->ids);
  thread_exit(rt.current);
}

// A new fiber's stack: oss_switch pops six registers and returns into fiber_start, with the stack
// aligned as at a call.
void* new_stack(int i) {
  char* top = rt.stacks + (i + 1) * (kStack + kPage);
  void** sp = reinterpret_cast<void**>((reinterpret_cast<uintptr_t>(top) & ~uintptr_t(15)) - 64);
  for (int k = 0; k < 6; ++k) sp[k] = nullptr;
  sp[6] = reinterpret_cast<void*>(&fiber_start);
  sp[7] = nullptr;
  return sp;
}

void describe_deadlock() {
  char* p = rt.message;
  size_t left = sizeof rt.message;
  int w = snprintf(p, left, "deadlock: no thread can continue (divergent simdgroup or barrier):");
  p += w, left -= w;
  for (int sg = 0; sg * kLanes < rt.n && left > 80; ++sg) {
    uint32_t at_barrier = 0, at_simd = 0;
    Site site = {};
    int op = 0;
    for (int l = 0; l < kLanes && sg * kLanes + l < rt.n; ++l) {
      const Fiber& f = rt.fiber[sg * kLanes + l];
      if (f.state != kBlocked) continue;
      if (f.op == OSS_OP_THREADGROUP_BARRIER) {
        at_barrier |= 1u << l;
      } else {
        at_simd |= 1u << l;
        op = f.op, site = f.site;
      }
    }
    if (at_barrier | at_simd) {
      w = snprintf(p, left, " simdgroup %d: lanes %08x at threadgroup_barrier, lanes %08x at %s (%s:%u:%u);", sg,
                   at_barrier, at_simd, op_name(op), base_name(site.file), site.line, site.column);
      p += w, left -= w;
    }
  }
  siglongjmp(rt.env, OSS_ERROR);
}

void run_threadgroup() {
  while (rt.count > 0) {
    int i = rt.queue[rt.head];
    rt.head = (rt.head + 1) & (kQueue - 1);
    --rt.count;
    rt.current = &rt.fiber[i];
    oss_switch(&rt.main_sp, rt.fiber[i].sp);
    rt.current = nullptr;
  }
  rt.current = nullptr;
  if (rt.done != rt.n) describe_deadlock();
}

void on_signal(int sig, siginfo_t* info, void*) {
  rt.signal = sig;
  rt.fault_address = info->si_addr;
  siglongjmp(rt.env, sig == SIGVTALRM ? OSS_TIMEOUT : OSS_FAULT);
}

const int kSignals[] = {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGVTALRM};
constexpr int kNumSignals = sizeof kSignals / sizeof kSignals[0];

}  // namespace

extern "C" {

__attribute__((visibility("hidden"))) unsigned char* oss_simd_exchange(int op, const char* file, unsigned line,
                                                                        unsigned column, const void* value, int nbytes,
                                                                        uint32_t* active) {
  const Site site = {file, line, column};
  Fiber* f = rt.current;
  if (f == nullptr) fail("a simdgroup operation outside a kernel thread");
  Simd& g = rt.simd[f->sg];
  const int parity = f->seq & 1;
  if (nbytes > OSS_SLOT_BYTES) fail("a simdgroup operation on %d bytes (the emulator takes %d)", nbytes, OSS_SLOT_BYTES);
  if (nbytes > 0) memcpy(g.slot[parity][f->lane], value, nbytes);
  if (g.arrived == 0) {
    g.op = op, g.site = site, g.mask = 0, g.parity = parity;
  } else if (g.op != op || !(g.site == site)) {
    fail("divergent simdgroup operation: lane %d of simdgroup %d is at %s (%s:%u:%u) while other lanes wait at %s "
         "(%s:%u:%u) (every live lane of a simdgroup must take part in each simdgroup operation)",
         f->lane, f->sg, op_name(op), base_name(file), line, column, op_name(g.op), base_name(g.site.file),
         g.site.line, g.site.column);
  }
  ++g.arrived;
  g.mask |= 1u << f->lane;
  f->state = kBlocked, f->op = op, f->site = site;
  if (g.arrived == g.live) complete_simd(f->sg);
  block();
  ++f->seq;
  *active = g.active[parity];
  return &g.slot[parity][0][0];
}

__attribute__((visibility("hidden"))) void oss_threadgroup_barrier(void) {
  Fiber* f = rt.current;
  if (f == nullptr) fail("threadgroup_barrier outside a kernel thread");
  if (rt.exited > 0) {
    fail("threadgroup_barrier reached after %d thread(s) of the threadgroup returned (Metal requires every "
         "thread of a threadgroup to reach each barrier)",
         rt.exited);
  }
  f->state = kBlocked, f->op = OSS_OP_THREADGROUP_BARRIER, f->site = Site{};
  if (++rt.at_barrier == rt.live) {
    int order[kMaxThreads], n = 0;
    for (int i = 0; i < rt.n; ++i) {
      if (rt.fiber[i].state == kBlocked && rt.fiber[i].op == OSS_OP_THREADGROUP_BARRIER) order[n++] = i;
    }
    rt.at_barrier = 0;
    release(order, n);
  }
  block();
}

__attribute__((visibility("hidden"))) void oss_atomic_point(void) {
  Fiber* f = rt.current;
  if (f == nullptr) return;
  push_back(int(f - rt.fiber));
  block();
}

__attribute__((visibility("hidden"))) uint32_t oss_lane(void) {
  return rt.current ? uint32_t(rt.current->lane) : 0u;
}

__attribute__((visibility("hidden"))) void oss_fail(const char* what) { fail("%s", what); }

// float -> bfloat conversion (compiler-rt's, which zig's runtime library lacks): round to nearest
// even, NaN stays a quiet NaN, subnormals are kept (x86's AVX-512 BF16 instruction would flush them:
// build.py compiles for a baseline CPU).
__attribute__((visibility("hidden"))) __bf16 __truncsfbf2(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  const uint16_t r = (u & 0x7FFFFFFFu) > 0x7F800000u ? uint16_t((u >> 16) | 0x40u)
                                                     : uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  __bf16 b;
  memcpy(&b, &r, sizeof b);
  return b;
}

// A buffer of n bytes whose end touches an inaccessible page (and whose start follows one): reads
// and writes past either end fault. The data starts 16-byte aligned, so up to 15 bytes after the
// end stay accessible. *base and *size are what oss_free needs.
OSS_API void* oss_alloc(uint64_t n, void** base, uint64_t* size) {
  const uint64_t data = ((n + kPage - 1) / kPage) * kPage;
  const uint64_t total = data + 2 * kPage;
  void* m = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (m == MAP_FAILED) return nullptr;
  char* c = static_cast<char*>(m);
  mprotect(c, kPage, PROT_NONE);
  mprotect(c + kPage + data, kPage, PROT_NONE);
  *base = m;
  *size = total;
  return c + kPage + data - ((n + 15) & ~uint64_t(15));
}

OSS_API void oss_free(void* base, uint64_t size) { munmap(base, size); }

// Stacks for a threadgroup's fibers, each above an inaccessible page (an overflow faults). Made once
// by one library and handed to every launch: each mapping split by a guard page counts against the
// process's limit of mappings, which a library of its own per kernel would exhaust.
OSS_API void* oss_make_stacks(void) {
  const size_t bytes = size_t(kMaxThreads) * (kStack + kPage);
  void* m = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (m == MAP_FAILED) return nullptr;
  char* c = static_cast<char*>(m);
  for (int i = 0; i < kMaxThreads; ++i) mprotect(c + i * (kStack + kPage), kPage, PROT_NONE);
  return m;
}

OSS_API int64_t oss_threadgroup_bytes(void) {
  return (__start_oss_tg && __stop_oss_tg) ? int64_t(__stop_oss_tg - __start_oss_tg) : 0;
}

OSS_API void oss_launch(const OssLaunch* L, void** buffers, OssResult* R) {
  memset(R, 0, sizeof *R);
  for (int k = 0; k < 6; ++k) R->where[k] = -1;
  R->threadgroup_memory = oss_threadgroup_bytes();
  int64_t tg[3], groups[3];
  for (int d = 0; d < 3; ++d) {
    if (L->grid[d] < 1 || L->threadgroup[d] < 1) {
      R->code = OSS_ERROR;
      snprintf(R->message, sizeof R->message, "grid and threadgroup sizes must be positive");
      return;
    }
    tg[d] = L->grid[d] < L->threadgroup[d] ? L->grid[d] : L->threadgroup[d];  // as MLX dispatches
    groups[d] = (L->grid[d] + tg[d] - 1) / tg[d];
  }
  const int64_t tg_size = L->threadgroup[0] * L->threadgroup[1] * L->threadgroup[2];
  if (tg_size > L->max_threads || tg_size > kMaxThreads) {
    R->code = OSS_ERROR;
    snprintf(R->message, sizeof R->message,
             "Thread group size (%lld) is greater than the maximum allowed threads per threadgroup (%lld).",
             (long long)tg_size, (long long)L->max_threads);
    return;
  }
  if (R->threadgroup_memory > L->threadgroup_memory) {
    R->code = OSS_ERROR;
    snprintf(R->message, sizeof R->message,
             "the kernel declares %lld bytes of threadgroup memory; the device gives a threadgroup %lld",
             (long long)R->threadgroup_memory, (long long)L->threadgroup_memory);
    return;
  }
  if (L->stacks == nullptr) {
    R->code = OSS_ERROR;
    snprintf(R->message, sizeof R->message, "no stacks for the fibers (oss_make_stacks)");
    return;
  }
  rt.stacks = static_cast<char*>(L->stacks);
  kernel_buffers = buffers;
  rt.schedule = int(L->schedule);

  // Faults and the CPU-time budget come back here (handlers on their own stack: a fiber's may be
  // the one that overflowed); the previous handlers are restored after.
  static char alt[64 * 1024];
  stack_t ss = {}, old_ss;
  ss.ss_sp = alt, ss.ss_size = sizeof alt;
  sigaltstack(&ss, &old_ss);
  struct sigaction sa = {}, old_sa[kNumSignals];
  sa.sa_sigaction = on_signal;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
  sigemptyset(&sa.sa_mask);
  for (int k = 0; k < kNumSignals; ++k) sigaction(kSignals[k], &sa, &old_sa[k]);
  timer_t timer;
  struct sigevent sev = {};
  sev.sigev_notify = SIGEV_THREAD_ID;
  sev.sigev_signo = SIGVTALRM;
  sev._sigev_un._tid = int(syscall(SYS_gettid));
  const bool timed = timer_create(CLOCK_THREAD_CPUTIME_ID, &sev, &timer) == 0;
  if (timed) {
    struct itimerspec its = {};
    its.it_value.tv_sec = time_t(L->cpu_seconds);
    its.it_value.tv_nsec = long((L->cpu_seconds - double(its.it_value.tv_sec)) * 1e9);
    timer_settime(timer, 0, &its, nullptr);
  }

  int64_t tgpos[3] = {0, 0, 0};
  const int code = sigsetjmp(rt.env, 1);
  if (code == 0) {
    for (tgpos[2] = 0; tgpos[2] < groups[2]; ++tgpos[2]) {
      for (tgpos[1] = 0; tgpos[1] < groups[1]; ++tgpos[1]) {
        for (tgpos[0] = 0; tgpos[0] < groups[0]; ++tgpos[0]) {
          // The threads of this threadgroup: fewer at the grid's far edges (non-uniform threadgroups).
          uint32_t dims[3];
          for (int d = 0; d < 3; ++d) {
            const int64_t left = L->grid[d] - tgpos[d] * tg[d];
            dims[d] = uint32_t(left < tg[d] ? left : tg[d]);
          }
          const int n = int(dims[0] * dims[1] * dims[2]);
          rt.n = rt.live = n;
          rt.done = rt.exited = rt.at_barrier = 0;
          rt.head = rt.count = 0;
          rt.rng = L->seed ^ (uint64_t(tgpos[0] + groups[0] * (tgpos[1] + groups[1] * tgpos[2])) * 0xD1B54A32D192ED03ull);
          const int nsimd = (n + kLanes - 1) / kLanes;
          for (int s = 0; s < nsimd; ++s) {
            Simd& g = rt.simd[s];
            g.live = (s + 1) * kLanes <= n ? kLanes : n - s * kLanes;
            g.arrived = 0;
            g.active[0] = g.active[1] = 0;
          }
          int order[kMaxThreads];
          for (int i = 0; i < n; ++i) {
            Fiber& f = rt.fiber[i];
            f.state = kReady, f.lane = i % kLanes, f.sg = i / kLanes, f.seq = 0, f.op = 0, f.site = Site{};
            const uint32_t p[3] = {uint32_t(i) % dims[0], (uint32_t(i) / dims[0]) % dims[1],
                                   uint32_t(i) / (dims[0] * dims[1])};
            OssThreadIds& t = f.ids;
            t.thread_position_in_threadgroup = {p[0], p[1], p[2]};
            t.threadgroup_position_in_grid = {uint32_t(tgpos[0]), uint32_t(tgpos[1]), uint32_t(tgpos[2])};
            t.thread_position_in_grid = {uint32_t(tgpos[0] * tg[0] + p[0]), uint32_t(tgpos[1] * tg[1] + p[1]),
                                         uint32_t(tgpos[2] * tg[2] + p[2])};
            t.threadgroups_per_grid = {uint32_t(groups[0]), uint32_t(groups[1]), uint32_t(groups[2])};
            t.threads_per_threadgroup = {dims[0], dims[1], dims[2]};
            t.dispatch_threads_per_threadgroup = {uint32_t(tg[0]), uint32_t(tg[1]), uint32_t(tg[2])};
            t.threads_per_grid = t.grid_size = {uint32_t(L->grid[0]), uint32_t(L->grid[1]), uint32_t(L->grid[2])};
            t.grid_origin = {0, 0, 0};
            t.thread_index_in_threadgroup = uint32_t(i);
            t.simdgroup_index_in_threadgroup = uint32_t(i / kLanes);
            t.thread_index_in_simdgroup = uint32_t(i % kLanes);
            t.simdgroups_per_threadgroup = uint32_t(nsimd);
            t.dispatch_simdgroups_per_threadgroup = uint32_t((tg[0] * tg[1] * tg[2] + kLanes - 1) / kLanes);
            t.threads_per_simdgroup = t.thread_execution_width = kLanes;
            t.quadgroup_index_in_threadgroup = uint32_t(i / 4);
            t.thread_index_in_quadgroup = uint32_t(i % 4);
            t.quadgroups_per_threadgroup = uint32_t((n + 3) / 4);
            t.dispatch_quadgroups_per_threadgroup = uint32_t((tg[0] * tg[1] * tg[2] + 3) / 4);
            f.sp = new_stack(i);
            order[i] = i;
          }
          for (uint32_t* w = reinterpret_cast<uint32_t*>(__start_oss_tg);
               __start_oss_tg && w < reinterpret_cast<uint32_t*>(__stop_oss_tg); ++w) {
            *w = L->garbage;
          }
          arrange(order, n);
          for (int i = 0; i < n; ++i) push_back(order[i]);
          run_threadgroup();
        }
      }
    }
  }
  if (timed) timer_delete(timer);
  for (int k = 0; k < kNumSignals; ++k) sigaction(kSignals[k], &old_sa[k], nullptr);
  sigaltstack(&old_ss, nullptr);
  R->code = code;
  if (code != OSS_OK) {
    if (rt.current) {
      const OssThreadIds& t = rt.current->ids;
      const uint32_t w[6] = {t.threadgroup_position_in_grid.x, t.threadgroup_position_in_grid.y,
                             t.threadgroup_position_in_grid.z, t.thread_position_in_threadgroup.x,
                             t.thread_position_in_threadgroup.y, t.thread_position_in_threadgroup.z};
      for (int k = 0; k < 6; ++k) R->where[k] = int32_t(w[k]);
    }
    if (code == OSS_FAULT) {
      R->signal = rt.signal;
      R->fault_address = reinterpret_cast<uintptr_t>(rt.fault_address);
    }
    memcpy(R->message, rt.message, sizeof R->message);
    rt.message[0] = 0;
  }
  rt.current = nullptr;
}

}  // extern "C"
