// Host emulation of the few CUDA features the sola kernels use: a block's CUDA threads run as fibers on
// one OS thread (fiber.h), switched at __syncthreads, shuffles and the other warp collectives, and blocks
// run on EMU_WORKERS OS threads (default: every core). Under ThreadSanitizer (TSAN=1, MEMSTAT=1, whose
// instrumentation needs them) or with -DEMU_THREADS, each CUDA thread is an OS thread, blocks one after
// another.
#pragma once
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <limits>
#include <type_traits>
#include <utility>
#include <c10/util/Half.h>
#include <c10/util/BFloat16.h>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include <cuda_runtime_api.h>  // the stubs, with the shared memory opt-ins launch checks

#if defined(__SANITIZE_THREAD__) || defined(EMU_MEMSTAT) || !defined(__x86_64__)
#ifndef EMU_THREADS
#define EMU_THREADS 1
#endif
#endif
#ifndef EMU_THREADS
#include "fiber.h"
#endif

#define __global__
#define __device__
#define __host__
#ifdef EMU_MEMSTAT  // inlined as nvcc does, so each access site is its caller's line
#define __forceinline__ inline __attribute__((always_inline))
#else
#define __forceinline__ inline
#endif
#define __launch_bounds__(...)
#ifdef EMU_THREADS
#define __shared__ static
#else
#define __shared__ static thread_local  // blocks run side by side on the workers
#endif
#ifdef EMU_MEMSTAT  // MEMSTAT=1 build.sh: access statistics (memstat.h)
#include "memstat.h"
#define EMU_SITE __attribute__((noinline))  // an emulated instruction's caller is its access site
#else
#define EMU_QUIET
#define EMU_SITE
#endif
#define __align__(n) __attribute__((aligned(n)))  // may follow `static` (alignas may not)

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;
using cudaStream_t = int;

namespace emu {
// transform.py's check at the top of a kernel with __launch_bounds__(max_threads, ...): a GPU refuses a
// launch of more threads per block than that.
inline void check_block_bound(long long max_threads) {
  EMU_QUIET;
  if (blockDim.x > max_threads) {
    std::fprintf(stderr, "a launch of %u threads per block, past its kernel's __launch_bounds__ of %lld\n", blockDim.x,
                 max_threads);
    std::abort();
  }
}

#ifdef EMU_THREADS
using Barrier = std::barrier<>;
#else
// A barrier of the fibers of one OS thread: the last to arrive opens it; the others wait in
// fiber::run's loop until its phase moves on.
class Barrier {
 public:
  explicit Barrier(int n) : expected_(n) {}
  void arrive_and_wait() {
    const unsigned phase = phase_;
    if (++arrived_ == expected_) return open();
    fiber::wait_while_equal(&phase_, phase);
  }
  // As std::barrier: arrives, and the phases after this one expect one thread fewer.
  void arrive_and_drop() {
    if (--expected_ > 0 && arrived_ == expected_) open();
  }

 private:
  void open() {
    arrived_ = 0;
    ++phase_;
  }
  int expected_, arrived_ = 0;
  unsigned phase_ = 0;
};
#endif

struct Warp {
  Barrier bar{32};
  double buf[32];
  uint32_t a[32][4], b[32][2];
  const void* rows[32];
  std::atomic<int> exited{0};
};
// A block: its barrier and dynamic shared memory, filled with 0xff bytes (0xffff is NaN in fp16 / bf16:
// unwritten tiles show). Proxies: a cp.async that landed wrote shared memory through the generic proxy;
// until its thread runs fence.proxy.async those 16 bytes are marked in unfenced (a flag per byte), and
// a wgmma (async proxy) reading a marked byte aborts.
struct Block {
  Barrier bar;
  std::vector<unsigned char> storage;
  unsigned char* smem;  // 16-byte aligned in storage
  int smem_bytes;
  std::vector<unsigned char> unfenced;
  Block(int threads, int bytes)
      : bar(threads), storage(bytes + 16, 0xff),
        smem(storage.data() + (16 - reinterpret_cast<uintptr_t>(storage.data()) % 16) % 16), smem_bytes(bytes),
        unfenced(bytes, 0) {}
};
// cp.async as the hardware is allowed to do it: from the issue until this thread's wait lets the
// copy land, its 16 destination bytes are undefined (0xff: NaN), so a read before the wait (or,
// from another thread, before the barrier after it) sees NaN, and under ThreadSanitizer a read
// or write by another thread without a barrier in between is a reported race.
struct AsyncCopy {
  void* dst;
  const void* src;
  int bytes;  // 16 (cp.async.cg) or 4 (cp.async.ca)
};
// wgmma.mma_async in flight: this thread's accumulators read NaN from the issue until a
// wgmma.wait_group covers the op; the shared memory it read is read again at the wait, and a
// change in between (a tile refilled under an in-flight wgmma) aborts.
struct WgmmaOp {
  float* d;
  int n;                      // d's values (N / 2)
  std::vector<float> result;  // what the wait writes to d
  uint64_t checksum;          // of the shared-memory operands read at the issue
  std::vector<std::pair<uint64_t, bool>> operands;  // (descriptor, MN-major) to re-read
  int rows0;                  // first A row of this thread's warp (SS A operand), -1: A from registers
};
// What a CUDA thread keeps to itself; tl_thread points to the running one's.
struct CudaThread {
  Warp* warp = nullptr;
  Block* block = nullptr;
  int lane = 0;
  std::vector<AsyncCopy> uncommitted;
  std::deque<std::vector<AsyncCopy>> groups;
  std::vector<void*> landed;  // landed cp.async copies not yet fenced (below)
  std::vector<WgmmaOp> wg_uncommitted;
  std::deque<std::vector<WgmmaOp>> wg_groups;
};
inline thread_local CudaThread* tl_thread = nullptr;
inline CudaThread& self() { return *tl_thread; }
inline std::atomic<long> launches{0}, threads_run{0}, mmas{0};
inline unsigned char* dynamic_smem() {
  EMU_QUIET;
  return self().block->smem;
}

inline void mark_unfenced(void* dst, unsigned char flag) {
  Block& b = *self().block;
  const ptrdiff_t off = static_cast<unsigned char*>(dst) - b.smem;
  if (off >= 0 && off + 16 <= static_cast<ptrdiff_t>(b.unfenced.size())) std::memset(&b.unfenced[off], flag, 16);
}
inline void cp_async_bytes(void* dst, const void* src, int bytes, const void* site = nullptr) {
  EMU_QUIET;
#ifdef EMU_MEMSTAT
  memstat::record(site, src, bytes, false);  // the global read and the shared write, at the issue
  memstat::record(site, dst, bytes, true);
#endif
  // cp.async faults on the device unless both addresses are aligned to the copy's size
  if (reinterpret_cast<uintptr_t>(dst) % bytes != 0 || reinterpret_cast<uintptr_t>(src) % bytes != 0) {
    std::fprintf(stderr, "cp.async: %d-byte copy from %p to %p is not %d-byte aligned\n", bytes, src, dst, bytes);
    std::abort();
  }
  std::memset(dst, 0xff, bytes);
  self().uncommitted.push_back({dst, src, bytes});
}
EMU_SITE inline void cp_async_16(void* dst, const void* src) { cp_async_bytes(dst, src, 16, __builtin_return_address(0)); }
EMU_SITE inline void cp_async_4(void* dst, const void* src) { cp_async_bytes(dst, src, 4, __builtin_return_address(0)); }
inline void cp_async_commit() {
  EMU_QUIET;
  self().groups.push_back(std::move(self().uncommitted));
  self().uncommitted.clear();
}
// cp.async.wait_group: all but the `pending` most recently committed groups land.
inline void cp_async_wait_group(int pending) {
  EMU_QUIET;
  for (; static_cast<int>(self().groups.size()) > pending; self().groups.pop_front())
    for (const AsyncCopy& c : self().groups.front()) {
      std::memcpy(c.dst, c.src, c.bytes);
      if (c.bytes == 16) mark_unfenced(c.dst, 1);
      self().landed.push_back(c.dst);
    }
}
// fence.proxy.async: this thread's landed copies become visible to the async proxy (wgmma).
inline void async_proxy_fence() {
  EMU_QUIET;
  for (void* dst : self().landed) mark_unfenced(dst, 0);
  self().landed.clear();
}
inline void cp_async_wait_all() {
  EMU_QUIET;  // cp.async.wait_all = commit_group + wait_group 0
  cp_async_commit();
  cp_async_wait_group(0);
}

// What a CUDA thread does after the kernel's body: the checks at its exit, then it leaves the barriers.
inline void thread_exit() {
  CudaThread& t = self();
  if (!t.uncommitted.empty() || !t.groups.empty()) {
    std::fprintf(stderr, "a thread exited with cp.async copies it never waited for\n");
    std::abort();
  }
  if (!t.wg_uncommitted.empty() || !t.wg_groups.empty()) {
    std::fprintf(stderr, "a thread exited with wgmma results it never waited for\n");
    std::abort();
  }
  ++threads_run;
  t.warp->exited++;
  t.warp->bar.arrive_and_drop();
  t.block->bar.arrive_and_drop();
}

// One block of kernel f on this OS thread: its CUDA threads as fibers, or (EMU_THREADS) as OS threads.
template <class F>
void run_block(dim3 block_idx, dim3 grid, dim3 block, int smem, F& f) {
  Block blk(block.x, smem);
  std::vector<std::unique_ptr<Warp>> warps;
  for (unsigned w = 0; w < block.x / 32; ++w) warps.emplace_back(new Warp);
  std::vector<CudaThread> threads(block.x);
  for (unsigned tx = 0; tx < block.x; ++tx)
    threads[tx].warp = warps[tx / 32].get(), threads[tx].block = &blk, threads[tx].lane = tx % 32;
#ifdef EMU_THREADS
#ifdef EMU_MEMSTAT
  memstat::block_begin(block_idx.y * grid.x + block_idx.x, block.x, blk.smem, smem);
#endif
  std::vector<std::thread> ts;
  for (unsigned tx = 0; tx < block.x; ++tx)
    ts.emplace_back([&, tx] {
      threadIdx = dim3(tx), blockIdx = block_idx, blockDim = block, gridDim = grid;
      tl_thread = &threads[tx];
#ifdef EMU_MEMSTAT
      F* kernel_call = &f;  // read before the recording starts: the closure is emu's, not the kernel's
      memstat::thread_begin(tx);
      (*kernel_call)();
      memstat::thread_end();
#else
      f();
#endif
      thread_exit();
    });
  for (auto& t : ts) t.join();
#ifdef EMU_MEMSTAT
  memstat::block_end();
#endif
#else
  blockIdx = block_idx, blockDim = block, gridDim = grid;
  auto body = [](void* kernel, unsigned) {
    (*static_cast<F*>(kernel))();
    thread_exit();
  };
  fiber::run(block.x, body, &f, [&](unsigned tx) {
    threadIdx = dim3(tx);
    tl_thread = &threads[tx];
  });
#endif
}

// How many OS threads run a launch's blocks: EMU_WORKERS, else every core (1 with EMU_THREADS, whose
// __shared__ arrays are plain statics).
inline unsigned workers() {
#ifdef EMU_THREADS
  return 1;
#else
  static const unsigned n = [] {
    const char* env = std::getenv("EMU_WORKERS");
    const int asked = env ? std::atoi(env) : static_cast<int>(std::thread::hardware_concurrency());
    return static_cast<unsigned>(asked > 0 ? asked : 1);
  }();
  return n;
#endif
}

template <class F>
void launch(dim3 grid, dim3 block, int smem, cudaStream_t, F f) {
  if (grid.x == 0 || grid.y == 0 || grid.z != 1 || block.x == 0 || block.x % 32 || block.y != 1 || smem < 0 || smem > 227 * 1024 ||
      grid.x > 2147483647u || grid.y > 65535u) {
    std::fprintf(stderr, "bad launch grid (%u,%u,%u) block %u\n", grid.x, grid.y, grid.z, block.x);
    std::abort();
  }
  ++launches;
  const uint64_t blocks = static_cast<uint64_t>(grid.x) * grid.y;
  std::atomic<uint64_t> next{0};
  auto work = [&] {  // each worker takes the next block not yet taken
    for (uint64_t b; (b = next++) < blocks;)
      run_block(dim3(static_cast<unsigned>(b % grid.x), static_cast<unsigned>(b / grid.x)), grid, block, smem, f);
  };
  const unsigned n = static_cast<unsigned>(std::min<uint64_t>(workers(), blocks));
  std::vector<std::thread> helpers;
  for (unsigned w = 1; w < n; ++w) helpers.emplace_back(work);
  work();
  for (auto& h : helpers) h.join();
}

// A launch as transform.py writes it: the kernel first, so a request past the 48 KB of dynamic shared
// memory every kernel may take is checked against what cudaFuncSetAttribute allowed that kernel.
template <class K, class F>
void launch(K* kernel, dim3 grid, dim3 block, int smem, cudaStream_t stream, F f) {
#ifdef EMU_MEMSTAT
  memstat::launch_begin(reinterpret_cast<const void*>(kernel));
#endif
  // EMU_LAUNCH_LOG=1: each launch's launcher (the lambda's enclosing function, template arguments and all).
  static const bool log = std::getenv("EMU_LAUNCH_LOG") && std::strcmp(std::getenv("EMU_LAUNCH_LOG"), "1") == 0;
  if (log) std::fprintf(stderr, "launch (%d bytes of shared memory): %s\n", smem, __PRETTY_FUNCTION__);
  if (smem > 48 * 1024) {
    std::lock_guard<std::mutex> lock(smem_optin_mutex);
    const auto it = smem_optin.find(reinterpret_cast<const void*>(kernel));
    const int allowed = it == smem_optin.end() ? 48 * 1024 : it->second;
    if (smem > allowed) {
      std::fprintf(stderr, "launch with %d bytes of dynamic shared memory, past the %d its kernel was allowed "
                   "(cudaFuncSetAttribute MaxDynamicSharedMemorySize)\n", smem, allowed);
      std::abort();
    }
  }
  launch(grid, block, smem, stream, f);
}

template <class T>
T shfl(T v, int src) {
  EMU_QUIET;
  Warp* w = self().warp;
  w->buf[self().lane] = static_cast<double>(v);
  w->bar.arrive_and_wait();
  if (w->exited.load()) {
    std::fprintf(stderr, "shuffle while a lane of the warp has exited\n");
    std::abort();
  }
  T r = static_cast<T>(w->buf[src & 31]);
  w->bar.arrive_and_wait();
  return r;
}
}  // namespace emu

template <class T>
T __shfl_sync(unsigned mask, T v, int src) {
  if (mask != 0xffffffffu) std::abort();
  return emu::shfl(v, src);
}
inline int __any_sync(unsigned mask, int pred) {
  EMU_QUIET;
  if (mask != 0xffffffffu) std::abort();
  emu::Warp* w = emu::self().warp;
  w->buf[emu::self().lane] = pred ? 1.0 : 0.0;
  w->bar.arrive_and_wait();
  int any = 0;
  for (int i = 0; i < 32; ++i) any |= w->buf[i] != 0.0;
  w->bar.arrive_and_wait();
  return any;
}
template <class T>
T __shfl_xor_sync(unsigned mask, T v, int off) {
  EMU_QUIET;  // reading this lane's number is the emulator's access, not the kernel's
  if (mask != 0xffffffffu) std::abort();
  return emu::shfl(v, emu::self().lane ^ off);
}
inline void __syncthreads() {
  EMU_QUIET;
  emu::self().block->bar.arrive_and_wait();
}
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  EMU_QUIET;
  if (mask != 0xffffffffu) std::abort();
  emu::self().warp->bar.arrive_and_wait();
}

namespace emu {
template <class T>
float half_bits_to_float(uint32_t bits) {
  T x;
  x.x = static_cast<uint16_t>(bits & 0xffffu);
  return static_cast<float>(x);
}
// d += A B for a warp-collective mma of depth K: every lane hands in its fragments, then computes
// its four C elements (c0, c1 = C[g][2t, 2t+1], c2, c3 = C[g+8][...]) from A(w, r, k) and B(w, k, n),
// which read the gathered fragments.
template <int K, class FA, class FB>
void mma_collective(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], FA A, FB B) {
  EMU_QUIET;
  Warp* w = self().warp;
  const int lane = self().lane;
  std::memcpy(w->a[lane], a, sizeof a);
  std::memcpy(w->b[lane], b, sizeof b);
  w->bar.arrive_and_wait();
  if (w->exited.load()) {
    std::fprintf(stderr, "mma while a lane of the warp has exited\n");
    std::abort();
  }
  float out[4];
  for (int i = 0; i < 4; ++i) {
    const int r = lane / 4 + 8 * (i / 2), c = 2 * (lane % 4) + i % 2;
    double sum = 0;
    for (int k = 0; k < K; ++k) sum += static_cast<double>(A(w, r, k)) * B(w, k, c);
    out[i] = static_cast<float>(d[i] + sum);
  }
  ++mmas;
  w->bar.arrive_and_wait();
  for (int i = 0; i < 4; ++i) d[i] = out[i];
}

// mma.sync.m16n8k16.row.col f32 += T * T, with the PTX fragment layouts, as a warp collective.
template <class T>
void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  auto A = [](Warp* w, int r, int c) {  // a_i: row g (+8 for regs 1, 3), cols 2t, 2t+1 (+8 for regs 2, 3)
    const int owner = (r % 8) * 4 + (c % 8) / 2, reg = r / 8 + 2 * (c / 8);
    return half_bits_to_float<T>(w->a[owner][reg] >> (16 * (c % 2)));
  };
  auto B = [](Warp* w, int k, int n) {  // b_i: rows 2t, 2t+1 (+8 for reg 1), col g
    const int owner = n * 4 + (k % 8) / 2, reg = k / 8;
    return half_bits_to_float<T>(w->b[owner][reg] >> (16 * (k % 2)));
  };
  mma_collective<16>(d, a, b, A, B);
}

// mma.sync.m16n8k8.row.col f32 += tf32 * tf32 (the operands' low 13 bits ignored, as the hardware).
inline float tf32_operand(uint32_t bits) {
  bits &= 0xffffe000u;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline void mma_1688_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  auto A = [](Warp* w, int r, int c) { return tf32_operand(w->a[(r % 8) * 4 + c % 4][r / 8 + 2 * (c / 4)]); };  // a0 = A[g][t]
  auto B = [](Warp* w, int k, int n) { return tf32_operand(w->b[n * 4 + k % 4][k / 4]); };                     // b0 = B[t][g]
  mma_collective<8>(d, a, b, A, B);
}

// ldmatrix.sync.m8n8.x4(.trans).b16 as a warp collective.
EMU_SITE inline void ldmatrix_x4(uint32_t (&r)[4], const void* row, bool trans) {
  EMU_QUIET;
#ifdef EMU_MEMSTAT
  memstat::record(__builtin_return_address(0), row, 16, false);  // each lane's 16-byte row
#endif
  Warp* w = self().warp;
  const int L = self().lane;
  if (reinterpret_cast<uintptr_t>(row) % 16) {
    std::fprintf(stderr, "ldmatrix: row address not 16-byte aligned\n");
    std::abort();
  }
  w->rows[L] = row;
  w->bar.arrive_and_wait();
  if (w->exited.load()) {
    std::fprintf(stderr, "ldmatrix while a lane of the warp has exited\n");
    std::abort();
  }
  auto elem = [&](int m, int row_i, int col) {  // matrix m, its row row_i, column col
    return static_cast<const uint16_t*>(w->rows[8 * m + row_i])[col];
  };
  uint32_t out[4];
  for (int m = 0; m < 4; ++m) {
    uint16_t lo, hi;
    if (!trans) lo = elem(m, L / 4, 2 * (L % 4)), hi = elem(m, L / 4, 2 * (L % 4) + 1);
    else lo = elem(m, 2 * (L % 4), L / 4), hi = elem(m, 2 * (L % 4) + 1, L / 4);
    out[m] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
  }
  w->bar.arrive_and_wait();
  for (int m = 0; m < 4; ++m) r[m] = out[m];
}
}  // namespace emu

namespace emu {
// 16-bit element (mn, k) of a shared-memory wgmma operand (no-swizzle canonical layouts, PTX ISA):
// K-major ((8,m),(T,2k)):((1T,SBO),(1,LBO)), MN-major ((T,1,m),(8,k)):((1,T,SBO),(1T,LBO)), T = 8.
inline const uint16_t* wgmma_element(uint64_t desc, bool mn_major, int mn, int k) {
  const uint32_t start = static_cast<uint32_t>(desc & 0x3FFF) << 4;
  const uint32_t lbo = static_cast<uint32_t>((desc >> 16) & 0x3FFF) << 4;
  const uint32_t sbo = static_cast<uint32_t>((desc >> 32) & 0x3FFF) << 4;
  if ((desc >> 62) != 0 || ((desc >> 49) & 7) != 0) {
    std::fprintf(stderr, "wgmma: only no-swizzle descriptors are emulated\n");
    std::abort();
  }
  const uint32_t off = mn_major ? start + (mn / 8) * sbo + (mn % 8) * 2 + (k / 8) * lbo + (k % 8) * 16
                                : start + (mn / 8) * sbo + (mn % 8) * 16 + (k / 8) * lbo + (k % 8) * 2;
  const Block& b = *self().block;
  if (off + 2 > static_cast<uint32_t>(b.smem_bytes)) {
    std::fprintf(stderr, "wgmma: operand element at byte %u past the %d bytes of shared memory\n", off, b.smem_bytes);
    std::abort();
  }
  if (b.unfenced[off]) {
    std::fprintf(stderr, "wgmma: reads shared memory a cp.async wrote, with no fence.proxy.async by its thread since\n");
    std::abort();
  }
  return reinterpret_cast<const uint16_t*>(b.smem + off);
}

// Checksum of what this thread's part of a wgmma reads from shared memory: A rows rows0 + lane/4
// (+8) when A is in shared memory, all of B (16 x n).
inline uint64_t wgmma_checksum(const WgmmaOp& op, int n) {
  uint64_t h = 1469598103934665603ull;
  auto mix = [&](uint16_t v) { h = (h ^ v) * 1099511628211ull; };
  for (size_t i = 0; i < op.operands.size(); ++i) {
    const auto [desc, mn_major] = op.operands[i];
    const bool is_a = op.rows0 >= 0 && i == 0;
    for (int k = 0; k < 16; ++k)
      if (is_a) {
        mix(*wgmma_element(desc, false, op.rows0 + self().lane / 4, k));
        mix(*wgmma_element(desc, false, op.rows0 + self().lane / 4 + 8, k));
      } else {
        for (int c = 0; c < n; ++c) mix(*wgmma_element(desc, mn_major, c, k));
      }
  }
  return h;
}

// wgmma.mma_async.m64nNk16.f32.T.T for this thread: a_regs (A from registers, gathered over the
// warp as in mma.sync) or desc_a (K-major), desc_b K-major or, with b_mn_major (tnspB), MN-major.
template <class T, int N>
void wgmma(float* d, const uint32_t* a_regs, uint64_t desc_a, uint64_t desc_b, int scale_d, bool b_mn_major) {
  EMU_QUIET;
  Warp* w = self().warp;
  const int lane = self().lane, warp_in_group = (threadIdx.x / 32) % 4;
  float a_val[2][16];  // this lane's rows lane/4 and lane/4 + 8 of its warp's 16 A rows
  if (a_regs) {
    std::memcpy(w->a[lane], a_regs, 4 * sizeof(uint32_t));
    w->bar.arrive_and_wait();
    for (int h = 0; h < 2; ++h)
      for (int k = 0; k < 16; ++k) {
        const int r = lane / 4 + 8 * h, owner = (r % 8) * 4 + (k % 8) / 2, reg = r / 8 + 2 * (k / 8);
        a_val[h][k] = half_bits_to_float<T>(w->a[owner][reg] >> (16 * (k % 2)));
      }
    w->bar.arrive_and_wait();
  } else {
    for (int h = 0; h < 2; ++h)
      for (int k = 0; k < 16; ++k)
        a_val[h][k] = half_bits_to_float<T>(*wgmma_element(desc_a, false, 16 * warp_in_group + lane / 4 + 8 * h, k));
  }
  WgmmaOp op{d, N / 2, std::vector<float>(N / 2), 0, {}, a_regs ? -1 : 16 * warp_in_group};
  if (!a_regs) op.operands.push_back({desc_a, false});
  op.operands.push_back({desc_b, b_mn_major});
  // The input accumulators: those of an op on the same registers still in flight, else d.
  const float* in = d;
  for (auto& g : self().wg_groups)
    for (auto& o : g)
      if (o.d == d) in = o.result.data();
  for (auto& o : self().wg_uncommitted)
    if (o.d == d) in = o.result.data();
  for (int i = 0; i < N / 2; ++i) {
    const int n = i / 4, e = i % 4, col = 8 * n + 2 * (lane % 4) + e % 2;
    double sum = 0;
    for (int k = 0; k < 16; ++k)
      sum += static_cast<double>(a_val[e / 2][k]) * half_bits_to_float<T>(*wgmma_element(desc_b, b_mn_major, col, k));
    op.result[i] = static_cast<float>((scale_d ? in[i] : 0.f) + sum);
  }
  op.checksum = wgmma_checksum(op, N);
  ++mmas;
  for (int i = 0; i < N / 2; ++i) d[i] = std::numeric_limits<float>::quiet_NaN();
  self().wg_uncommitted.push_back(std::move(op));
}

inline void wgmma_commit() {
  EMU_QUIET;
  self().wg_groups.push_back(std::move(self().wg_uncommitted));
  self().wg_uncommitted.clear();
}

inline void wgmma_wait(int pending) {
  EMU_QUIET;
  for (; static_cast<int>(self().wg_groups.size()) > pending; self().wg_groups.pop_front())
    for (WgmmaOp& op : self().wg_groups.front()) {
      if (wgmma_checksum(op, 2 * op.n) != op.checksum) {
        std::fprintf(stderr, "wgmma: shared memory it reads changed before its wait_group\n");
        std::abort();
      }
      std::memcpy(op.d, op.result.data(), op.n * sizeof(float));
    }
}
}  // namespace emu
