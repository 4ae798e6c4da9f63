// A small CPU emulation of the CUDA execution model, so that the fastlin kernels (csrc/cuda/*.cu,
// compiled as C++ with FASTLIN_CUDA_EMU) can run on a machine without a GPU, under AddressSanitizer
// and UBSan, against a plain reference (csrc/cuda/tests/emu_test.cpp).
//
// What it models: a launch runs its blocks one after another; a block runs blockDim threads as
// cooperative fibers (ucontext) on the calling thread; __syncthreads / __syncthreads_and are
// barriers over the block's fibers and __shfl_xor_sync an exchange over the warp's 32 fibers (a
// fiber runs until it waits at a barrier, so a missing or non-uniform barrier shows up as a
// deadlock, reported). __shared__ variables become function-local statics (one block at a time, so
// that is one copy per block); dynamic shared memory is a fresh buffer per block filled with 0xFF
// bytes (NaN for floats), so that a read of an unwritten slot shows. 16-byte and read-only loads
// check their alignment.
// What it does not model: concurrency between blocks, the memory model, timing, registers; the
// result is a check of indexing, tails, barriers, shuffles and numerics, not of speed.
#pragma once

#ifndef FASTLIN_CUDA_EMU
#error "cuda_emu.h is for the CPU emulation build only"
#endif

// Must precede the CUDA headers: host_defines.h keeps a qualifier that is already defined.
#define __global__
#define __device__
#define __host__
#define __shared__ static
#define __grid_constant__

#include <cuda_runtime.h>

#undef __launch_bounds__
#define __launch_bounds__(...)

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define FASTLIN_EMU_ASAN 1
#endif

namespace fastlin {
namespace emu {

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "cuda_emu: %s\n", what);
  std::abort();
}

struct Barrier {
  int participants = 0;
  int arrived = 0;
  unsigned generation = 0;
};

struct Fiber {
  ucontext_t ctx;
  unsigned char* stack = nullptr;
  bool done = false;
  void* fake = nullptr;  // AddressSanitizer's fake-stack slot of this fiber
};

constexpr size_t kFiberStack = 128 * 1024;

// Fiber stacks, reused from block to block (not zeroed: a kernel never reads its stack unwritten).
inline unsigned char* fiber_stack(int i) {
  static std::vector<std::unique_ptr<unsigned char[]>> pool;
  while (static_cast<int>(pool.size()) <= i) pool.emplace_back(new unsigned char[kFiberStack]);
  return pool[static_cast<size_t>(i)].get();
}

inline unsigned long long g_events = 0;  // arrivals, releases, finished fibers: progress

struct BlockCtx {
  int nthreads = 0;
  Barrier bar;
  std::vector<Barrier> warp_bar;
  std::vector<std::vector<unsigned char>> warp_slots;  // [warp][32 * 16]
  std::vector<unsigned char> smem;
  int and_acc = 1;
  std::vector<Fiber> fibers;
  ucontext_t sched;
  int current = -1;
  std::function<void()> body;
  uint3 bidx;
  dim3 bdim, gdim;
  size_t stack_bytes = 0;
};

inline BlockCtx* g_block = nullptr;
inline uint3 g_threadIdx;
inline uint3 g_blockIdx;
inline dim3 g_blockDim;
inline dim3 g_gridDim;

#ifdef FASTLIN_EMU_ASAN
inline const void* g_main_bottom = nullptr;  // the scheduler's stack, learnt when a fiber starts
inline size_t g_main_size = 0;
#endif

// Switch from the running fiber back to the scheduler.
inline void yield() {
  BlockCtx& b = *g_block;
  Fiber& f = b.fibers[static_cast<size_t>(b.current)];
#ifdef FASTLIN_EMU_ASAN
  __sanitizer_start_switch_fiber(&f.fake, g_main_bottom, g_main_size);
#endif
  swapcontext(&f.ctx, &b.sched);
#ifdef FASTLIN_EMU_ASAN
  __sanitizer_finish_switch_fiber(f.fake, nullptr, nullptr);
#endif
}

inline void fiber_main() {
#ifdef FASTLIN_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &g_main_bottom, &g_main_size);
#endif
  BlockCtx& b = *g_block;
  b.body();
  b.fibers[static_cast<size_t>(b.current)].done = true;
#ifdef FASTLIN_EMU_ASAN
  __sanitizer_start_switch_fiber(nullptr, g_main_bottom, g_main_size);  // this fiber ends
#endif
  setcontext(&b.sched);
}

inline void arrive_and_wait(Barrier& bar) {
  ++g_events;
  const unsigned gen = bar.generation;
  if (++bar.arrived == bar.participants) {
    bar.arrived = 0;
    ++bar.generation;
    return;
  }
  while (bar.generation == gen) yield();
}

inline unsigned char* dynamic_smem() {
  auto& v = g_block->smem;
  uintptr_t p = reinterpret_cast<uintptr_t>(v.data());
  return v.data() + ((16 - (p & 15)) & 15);
}

// getcontext returns twice as far as the compiler knows: keep it out of loops with live variables.
__attribute__((noinline)) inline void init_fiber(Fiber& f, int t) {
  f.stack = fiber_stack(t);
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = f.stack;
  f.ctx.uc_stack.ss_size = kFiberStack;
  f.ctx.uc_link = nullptr;
  makecontext(&f.ctx, &fiber_main, 0);
}

// Runs fiber t until it waits at a barrier or ends (a function of its own: swapcontext returns
// twice as far as the compiler knows, which must not touch the scheduler's loop variables).
__attribute__((noinline)) inline void run_fiber(BlockCtx& b, int t) {
  Fiber& f = b.fibers[static_cast<size_t>(t)];
  b.current = t;
  const dim3 block = b.bdim;
  g_threadIdx = make_uint3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
  g_blockIdx = b.bidx;
  g_blockDim = block;
  g_gridDim = b.gdim;
#ifdef FASTLIN_EMU_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, f.stack, kFiberStack);
#endif
  swapcontext(&b.sched, &f.ctx);
#ifdef FASTLIN_EMU_ASAN
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
}

template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t /*stream*/, Args&&... args) {
  const int nthreads = static_cast<int>(block.x * block.y * block.z);
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || nthreads == 0) fail("launch with an empty grid or block");
  if (nthreads % 32 != 0) fail("blockDim must be a multiple of 32 in the emulator");
  if (nthreads > 1024) fail("more than 1024 threads per block");
  if (smem > 227 * 1024) fail("more dynamic shared memory than an H100 block can have");
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        auto b = std::make_unique<BlockCtx>();
        b->nthreads = nthreads;
        b->bar.participants = nthreads;
        b->warp_bar.resize(static_cast<size_t>(nthreads / 32));
        for (auto& wb : b->warp_bar) wb.participants = 32;
        b->warp_slots.assign(static_cast<size_t>(nthreads / 32), std::vector<unsigned char>(32 * 16));
        b->smem.assign(smem + 16, 0xFF);
        b->bidx = make_uint3(bx, by, bz);
        b->bdim = block;
        b->gdim = grid;
        b->body = [&]() { kernel(args...); };
        b->fibers.resize(static_cast<size_t>(nthreads));
        g_block = b.get();
        for (int t = 0; t < nthreads; ++t) init_fiber(b->fibers[static_cast<size_t>(t)], t);
        // Round-robin until every fiber is done. A round without any arrival, release or finished
        // fiber is a deadlock (a barrier some threads never reach).
        int live = nthreads;
        while (live > 0) {
          const unsigned long long events_before = g_events;
          for (int t = 0; t < nthreads; ++t) {
            Fiber& f = b->fibers[static_cast<size_t>(t)];
            if (f.done) continue;
            run_fiber(*b, t);
            if (f.done) {
              --live;
              ++g_events;
            }
          }
          if (live > 0 && g_events == events_before) fail("deadlock: some threads wait at a barrier others never reach");
        }
        g_block = nullptr;
      }
}

inline void syncthreads() { arrive_and_wait(g_block->bar); }

inline int syncthreads_and(int pred) {
  BlockCtx& b = *g_block;
  arrive_and_wait(b.bar);  // every thread is done with the previous value
  if (b.current == 0) b.and_acc = 1;
  arrive_and_wait(b.bar);
  if (!pred) b.and_acc = 0;
  arrive_and_wait(b.bar);
  const int r = b.and_acc;
  arrive_and_wait(b.bar);  // every thread has read it before the next reset
  return r;
}

template <typename T>
T shfl_xor(unsigned mask, T v, int lane_mask) {
  static_assert(sizeof(T) <= 16, "shuffle of at most 16 bytes");
  if (mask != 0xffffffffu) fail("only full-warp shuffles are emulated");
  BlockCtx& b = *g_block;
  const int warp = b.current / 32;
  const int lane = b.current & 31;
  unsigned char* slots = b.warp_slots[static_cast<size_t>(warp)].data();
  std::memcpy(slots + 16 * lane, &v, sizeof(T));
  arrive_and_wait(b.warp_bar[static_cast<size_t>(warp)]);
  const int src = lane ^ lane_mask;
  T r = v;
  if (src >= 0 && src < 32) std::memcpy(&r, slots + 16 * src, sizeof(T));
  arrive_and_wait(b.warp_bar[static_cast<size_t>(warp)]);
  return r;
}

template <typename T>
T checked_load(const T* p) {
  if (reinterpret_cast<uintptr_t>(p) % alignof(T) != 0) fail("misaligned load");
  return *p;
}

}  // namespace emu
}  // namespace fastlin

#define threadIdx (::fastlin::emu::g_threadIdx)
#define blockIdx (::fastlin::emu::g_blockIdx)
#define blockDim (::fastlin::emu::g_blockDim)
#define gridDim (::fastlin::emu::g_gridDim)

inline void __syncthreads() { ::fastlin::emu::syncthreads(); }
inline int __syncthreads_and(int pred) { return ::fastlin::emu::syncthreads_and(pred); }
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
  return ::fastlin::emu::shfl_xor(mask, v, lane_mask);
}
template <typename T>
inline T __ldg(const T* p) {
  return ::fastlin::emu::checked_load(p);
}
template <typename T>
inline T __ldcs(const T* p) {
  return ::fastlin::emu::checked_load(p);
}
using std::fma;
using std::isfinite;
