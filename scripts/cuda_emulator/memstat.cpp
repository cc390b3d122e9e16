// Memory-access statistics of the emulated kernels (MEMSTAT=1 build.sh; README.md). The kernels are
// compiled with GCC's -fsanitize=thread, whose instrumentation calls __tsan_read4(addr) and the like
// before every load and store; this file defines those hooks instead of linking the TSan runtime.
// While a sampled block runs, each CUDA thread logs its accesses (call site, address, size); at the
// block's end the k-th access of each lane at one site forms that site's k-th warp request, and
// each request is priced as a GPU would:
//   global: distinct 32-byte sectors touched (ideal: the requested bytes / 32);
//   shared: wavefronts, the most distinct 4-byte words any bank serves (ideal: bytes / 128), per
//           phase of 32 lanes (accesses up to 4 bytes), 16 (8 bytes) or 8 (16 bytes).
// At exit the report (stderr, or the file EMU_MEMSTAT_OUT) lists per kernel the sites by cost.
// EMU_MEMSTAT_BLOCKS (default 2): how many blocks of each launch are sampled.
#include <cxxabi.h>
#include <dlfcn.h>
#include <pthread.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "emu.h"

// emu.h makes a kernel's static __shared__ arrays static variables: they lie in the executable's
// data and bss, where nothing else a kernel reads does (tensors are on the heap).
extern "C" char __data_start[], _end[];

namespace emu::memstat {
namespace {
struct Event {
  uintptr_t pc, addr;
  int bytes;
  bool write;
};
struct Stat {
  long requests = 0, lanes = 0, bytes = 0;
  double cost = 0, ideal = 0;  // sectors or wavefronts, and the fewest the bytes allow
};
// (kernel, site, shared, write) -> Stat
using Key = std::tuple<uintptr_t, uintptr_t, bool, bool>;

struct Range {
  uintptr_t lo = 0, hi = 0;
  bool has(uintptr_t a) const { return a >= lo && a < hi; }
};
Range stack_of_this_thread() {
  pthread_attr_t attr;
  void* base = nullptr;
  size_t size = 0;
  if (pthread_getattr_np(pthread_self(), &attr) == 0) {
    pthread_attr_getstack(&attr, &base, &size);
    pthread_attr_destroy(&attr);
  }
  return {reinterpret_cast<uintptr_t>(base), reinterpret_cast<uintptr_t>(base) + size};
}

thread_local bool tl_recording = false;
thread_local bool tl_in_kernel = false;  // every block's threads, sampled or not
thread_local unsigned tl_tx = 0;
thread_local Range tl_stack;
thread_local std::vector<Event> tl_events;

std::mutex g_mutex;
Range g_main_stack, g_dynamic;
uintptr_t g_kernel = 0;
bool g_sampled = false;
unsigned g_threads = 0;
std::vector<std::vector<Event>> g_lanes;  // the sampled block's events, by thread
std::map<Key, Stat> g_stats;
std::map<uintptr_t, std::pair<long, long>> g_kernels;  // kernel -> (launches, sampled blocks)
std::vector<uintptr_t> g_kernel_order;
long g_max_blocks = -1;

// The kernel's own variables live on its thread's stack (registers on a GPU); the launch lambda's
// captures on the launching thread's; threadIdx and friends in thread-local storage.
bool is_device_memory(uintptr_t a) {
  if (tl_stack.has(a) || g_main_stack.has(a)) return false;
  for (const void* v : {static_cast<const void*>(&threadIdx), static_cast<const void*>(&blockIdx),
                        static_cast<const void*>(&blockDim), static_cast<const void*>(&gridDim)}) {
    const uintptr_t p = reinterpret_cast<uintptr_t>(v);
    if (a >= p && a < p + sizeof(dim3)) return false;
  }
  return true;
}

inline void hook(const void* pc, const void* addr, long bytes, bool write) {
  if (!tl_recording || quiet) return;
  const uintptr_t a = reinterpret_cast<uintptr_t>(addr);
  if (!is_device_memory(a)) return;
  for (long off = 0; off < bytes; off += 16)  // a wider copy is issued as 16-byte accesses
    tl_events.push_back({reinterpret_cast<uintptr_t>(pc), a + off, static_cast<int>(std::min(16L, bytes - off)), write});
}

bool is_shared(uintptr_t a) {
  const Range stat{reinterpret_cast<uintptr_t>(__data_start), reinterpret_cast<uintptr_t>(_end)};
  return g_dynamic.has(a) || stat.has(a);
}

// Bytes covered by the accesses (overlaps once).
long unique_bytes(std::vector<std::pair<uintptr_t, uintptr_t>> iv) {
  std::sort(iv.begin(), iv.end());
  long total = 0;
  uintptr_t end = 0;
  for (auto [lo, hi] : iv) {
    if (lo < end) lo = end;
    if (hi > lo) total += hi - lo, end = hi;
  }
  return total;
}

// One warp request: the accesses of its active lanes (lane, event).
void price(const std::vector<std::pair<int, const Event*>>& req, bool shared, Stat& s) {
  s.requests += 1;
  s.lanes += req.size();
  if (!shared) {
    std::set<uintptr_t> sectors;
    std::vector<std::pair<uintptr_t, uintptr_t>> iv;
    for (auto [lane, e] : req) {
      s.bytes += e->bytes;
      for (uintptr_t sec = e->addr >> 5; sec <= (e->addr + e->bytes - 1) >> 5; ++sec) sectors.insert(sec);
      iv.push_back({e->addr, e->addr + e->bytes});
    }
    s.cost += sectors.size();
    s.ideal += (unique_bytes(iv) + 31) / 32;
    return;
  }
  int widest = 1;
  for (auto [lane, e] : req) widest = std::max(widest, e->bytes);
  const int phase_lanes = widest <= 4 ? 32 : widest <= 8 ? 16 : 8;
  for (int phase = 0; phase < 32 / phase_lanes; ++phase) {
    std::map<int, std::set<uintptr_t>> banks;  // bank -> distinct words
    std::vector<std::pair<uintptr_t, uintptr_t>> iv;
    for (auto [lane, e] : req) {
      if (lane / phase_lanes != phase) continue;
      s.bytes += e->bytes;
      for (uintptr_t w = e->addr >> 2; w <= (e->addr + e->bytes - 1) >> 2; ++w) banks[w % 32].insert(w);
      iv.push_back({e->addr, e->addr + e->bytes});
    }
    if (iv.empty()) continue;
    size_t most = 0;
    for (auto& [bank, words] : banks) most = std::max(most, words.size());
    s.cost += most;
    s.ideal += (unique_bytes(iv) + 127) / 128;
  }
}

void report();
std::map<uintptr_t, std::pair<std::string, std::vector<std::string>>> resolve(const std::vector<uintptr_t>& pcs);

// An access the compiler emitted as aligned to its size (a 16-byte Vec, an 8-byte one) at an address that
// is not: a GPU faults ("misaligned address"), x86 does not, so it aborts here, naming the site.
void check_aligned(const void* pc, const void* addr, int bytes) {
  if (!tl_in_kernel || quiet || reinterpret_cast<uintptr_t>(addr) % bytes == 0) return;
  static std::mutex first;  // one report: the other lanes wait here until the abort
  first.lock();
  const uintptr_t site = reinterpret_cast<uintptr_t>(pc);
  const auto where = resolve({site});
  std::string frames;
  if (where.count(site))
    for (const std::string& f : where.at(site).second) frames += (frames.empty() ? "" : " < ") + f;
  std::fprintf(stderr, "misaligned %d-byte access at %p (a GPU faults): %s\n", bytes, addr, frames.c_str());
  std::abort();
}
}  // namespace

void record(const void* pc, const void* addr, int bytes, bool write) {
  if (!tl_recording) return;
  const int saved = quiet;  // the emulated instruction runs under a Quiet: its access is the kernel's
  quiet = 0;
  hook(pc, addr, bytes, write);
  quiet = saved;
}

void launch_begin(const void* kernel) {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (g_max_blocks < 0) {
    const char* env = std::getenv("EMU_MEMSTAT_BLOCKS");
    g_max_blocks = env ? std::atol(env) : 2;
    g_main_stack = stack_of_this_thread();
    std::atexit(report);
  }
  g_kernel = reinterpret_cast<uintptr_t>(kernel);
  if (!g_kernels.count(g_kernel)) g_kernel_order.push_back(g_kernel);
  g_kernels[g_kernel].first += 1;
}

void block_begin(unsigned block_index, unsigned threads, const void* dynamic_smem, int dynamic_bytes) {
  g_sampled = g_kernel != 0 && block_index < g_max_blocks;
  g_threads = threads;
  g_dynamic = {reinterpret_cast<uintptr_t>(dynamic_smem), reinterpret_cast<uintptr_t>(dynamic_smem) + dynamic_bytes};
  g_lanes.assign(g_sampled ? threads : 0, {});
}

void thread_begin(unsigned tx) {
  tl_tx = tx;
  tl_events.clear();
  tl_recording = g_sampled;
  if (tl_recording) tl_stack = stack_of_this_thread();  // only the recorded accesses are filtered by it
  tl_in_kernel = true;
}

void thread_end() {
  if (tl_recording) g_lanes[tl_tx] = std::move(tl_events);  // each thread its own slot
  tl_recording = false;
  tl_in_kernel = false;
  tl_events = {};
}

void block_end() {
  if (!g_sampled) return;
  g_kernels[g_kernel].second += 1;
  for (unsigned w = 0; w < g_threads / 32; ++w) {
    // site -> per lane, its events there in order
    std::unordered_map<uintptr_t, std::vector<std::vector<const Event*>>> sites;
    for (int lane = 0; lane < 32; ++lane)
      for (const Event& e : g_lanes[32 * w + lane]) {
        auto& per_lane = sites[e.pc];
        per_lane.resize(32);
        per_lane[lane].push_back(&e);
      }
    for (auto& [pc, per_lane] : sites) {
      size_t most = 0;
      for (auto& v : per_lane) most = std::max(most, v.size());
      for (size_t k = 0; k < most; ++k) {
        std::vector<std::pair<int, const Event*>> req[2][2];  // [shared][write]
        for (int lane = 0; lane < 32; ++lane)
          if (k < per_lane[lane].size()) {
            const Event* e = per_lane[lane][k];
            req[is_shared(e->addr)][e->write].push_back({lane, e});
          }
        for (int sh = 0; sh < 2; ++sh)
          for (int wr = 0; wr < 2; ++wr)
            if (!req[sh][wr].empty()) price(req[sh][wr], sh, g_stats[{g_kernel, pc, sh == 1, wr == 1}]);
      }
    }
  }
  g_lanes.clear();
}

namespace {
// file:line frames (innermost first) and function name of each address, from addr2line.
std::map<uintptr_t, std::pair<std::string, std::vector<std::string>>> resolve(const std::vector<uintptr_t>& pcs) {
  std::map<uintptr_t, std::pair<std::string, std::vector<std::string>>> out;
  if (pcs.empty()) return out;
  Dl_info info{};
  if (!dladdr(reinterpret_cast<void*>(pcs[0]), &info) || !info.dli_fname) return out;
  const uintptr_t base = reinterpret_cast<uintptr_t>(info.dli_fbase);
  const std::string list = std::string(std::getenv("TMPDIR") ? std::getenv("TMPDIR") : "/tmp") + "/emu_memstat_pcs." +
                           std::to_string(getpid());
  FILE* f = std::fopen(list.c_str(), "w");
  if (!f) return out;
  for (uintptr_t pc : pcs) std::fprintf(f, "0x%lx\n", static_cast<unsigned long>(pc - base));
  std::fclose(f);
  const std::string cmd = std::string("addr2line -C -f -i -a -e /proc/") + std::to_string(getpid()) + "/exe < " + list;
  FILE* p = popen(cmd.c_str(), "r");
  if (!p) return out;
  char line[4096];
  uintptr_t cur = 0;
  bool want_function = false;
  while (std::fgets(line, sizeof line, p)) {
    std::string s(line);
    if (!s.empty() && s.back() == '\n') s.pop_back();
    if (s.rfind("0x", 0) == 0) {
      cur = std::stoul(s, nullptr, 16) + base;
      want_function = true;
    } else if (want_function) {
      out[cur].first = s, want_function = false;
    } else {
      // the innermost frame, then the kernels' own (csrc) frames: the library headers' say little
      const size_t slash = s.rfind('/');
      std::string where = slash == std::string::npos ? s : s.substr(slash + 1);
      const size_t paren = where.find(" (");
      if (paren != std::string::npos) where.resize(paren);
      if (out[cur].second.empty() || s.find("/csrc/") != std::string::npos) out[cur].second.push_back(where);
      want_function = true;  // with -i, each inlined frame is a function line then a file line
    }
  }
  pclose(p);
  std::remove(list.c_str());
  return out;
}

void report() {
  if (g_stats.empty()) return;
  const char* path = std::getenv("EMU_MEMSTAT_OUT");
  FILE* out = path ? std::fopen(path, "w") : stderr;
  if (!out) out = stderr;
  std::vector<uintptr_t> pcs;
  for (auto& [key, s] : g_stats) pcs.push_back(std::get<1>(key));
  for (uintptr_t k : g_kernel_order) pcs.push_back(k);
  const auto where = resolve(pcs);
  std::fprintf(out, "memory requests of the sampled blocks (EMU_MEMSTAT_BLOCKS=%ld per launch); cost = 32-byte sectors "
               "(global) or wavefronts (shared) per request, ideal = what its bytes need; '<<' marks cost > 1.25x ideal\n",
               g_max_blocks);
  for (uintptr_t k : g_kernel_order) {
    const auto kw = where.find(k);
    std::string name = kw != where.end() ? kw->second.first : "?";
    if (name.size() > 110) name = name.substr(0, 107) + "...";
    std::vector<std::pair<Key, Stat>> rows;
    Stat tot[2];
    for (auto& [key, s] : g_stats)
      if (std::get<0>(key) == k) {
        rows.push_back({key, s});
        Stat& t = tot[std::get<2>(key)];
        t.requests += s.requests, t.cost += s.cost, t.ideal += s.ideal;
      }
    if (rows.empty()) continue;
    std::sort(rows.begin(), rows.end(), [](auto& a, auto& b) { return a.second.cost > b.second.cost; });
    std::fprintf(out, "\n== %s: %ld launches, %ld blocks sampled\n", name.c_str(), g_kernels[k].first, g_kernels[k].second);
    std::fprintf(out, "   global %ld requests, %.2fx ideal sectors; shared %ld requests, %.2fx ideal wavefronts\n",
                 tot[0].requests, tot[0].ideal ? tot[0].cost / tot[0].ideal : 0.0, tot[1].requests,
                 tot[1].ideal ? tot[1].cost / tot[1].ideal : 0.0);
    std::fprintf(out, "   %-5s %9s %6s %7s %7s %7s   site (innermost frame first)\n", "kind", "requests", "lanes",
                 "B/lane", "cost", "ideal");
    for (auto& [key, s] : rows) {
      const auto w = where.find(std::get<1>(key));
      std::string site;
      if (w != where.end())
        for (size_t i = 0; i < w->second.second.size() && i < 3; ++i) site += (i ? " < " : "") + w->second.second[i];
      const double cost = s.cost / s.requests, ideal = s.ideal / s.requests;
      std::fprintf(out, "   %s %s %9ld %6.1f %7.1f %7.2f %7.2f %s %s\n", std::get<2>(key) ? "S" : "G",
                   std::get<3>(key) ? "st" : "ld", s.requests, double(s.lanes) / s.requests, double(s.bytes) / s.lanes,
                   cost, ideal, cost > 1.25 * ideal ? "<<" : "  ", site.c_str());
    }
  }
  if (out != stderr) std::fclose(out);
}
}  // namespace
}  // namespace emu::memstat

// The TSan instrumentation's entry points (GCC 12), as memstat's hooks.
using emu::memstat::hook;
using emu::memstat::check_aligned;
#define EMU_ACCESS(n)                                                                                                  \
  extern "C" void __tsan_read##n(void* a) {                                                                            \
    if (n >= 8) check_aligned(__builtin_return_address(0), a, n);                                                      \
    hook(__builtin_return_address(0), a, n, false);                                                                    \
  }                                                                                                                    \
  extern "C" void __tsan_write##n(void* a) {                                                                           \
    if (n >= 8) check_aligned(__builtin_return_address(0), a, n);                                                      \
    hook(__builtin_return_address(0), a, n, true);                                                                     \
  }                                                                                                                    \
  extern "C" void __tsan_unaligned_read##n(void* a) { hook(__builtin_return_address(0), a, n, false); }                \
  extern "C" void __tsan_unaligned_write##n(void* a) { hook(__builtin_return_address(0), a, n, true); }
EMU_ACCESS(1)
EMU_ACCESS(2)
EMU_ACCESS(4)
EMU_ACCESS(8)
EMU_ACCESS(16)
extern "C" void __tsan_read_range(void* a, unsigned long n) { hook(__builtin_return_address(0), a, n, false); }
extern "C" void __tsan_write_range(void* a, unsigned long n) { hook(__builtin_return_address(0), a, n, true); }
extern "C" void __tsan_init() {}
extern "C" void __tsan_func_entry(void*) {}
extern "C" void __tsan_func_exit() {}
extern "C" void __tsan_vptr_update(void**, void*) {}
extern "C" void __tsan_vptr_read(void**) {}

// Atomics (std::barrier, std::atomic in emu.h): performed, not logged, all sequentially consistent.
#define EMU_FETCH(bits, T, op)                                                                   \
  extern "C" T __tsan_atomic##bits##_fetch_##op(volatile T* a, T v, int) {                       \
    return __atomic_fetch_##op(a, v, __ATOMIC_SEQ_CST);                                          \
  }
#define EMU_CAS(bits, T, kind, weak)                                                             \
  extern "C" int __tsan_atomic##bits##_compare_exchange_##kind(volatile T* a, T* c, T v, int, int) { \
    return __atomic_compare_exchange_n(a, c, v, weak, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);       \
  }
#define EMU_ATOMIC(bits, T)                                                                      \
  extern "C" T __tsan_atomic##bits##_load(const volatile T* a, int) { return __atomic_load_n(a, __ATOMIC_SEQ_CST); } \
  extern "C" void __tsan_atomic##bits##_store(volatile T* a, T v, int) { __atomic_store_n(a, v, __ATOMIC_SEQ_CST); } \
  extern "C" T __tsan_atomic##bits##_exchange(volatile T* a, T v, int) { return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST); } \
  EMU_FETCH(bits, T, add) EMU_FETCH(bits, T, sub) EMU_FETCH(bits, T, and)                        \
  EMU_FETCH(bits, T, or) EMU_FETCH(bits, T, xor)                                                 \
  EMU_CAS(bits, T, strong, false) EMU_CAS(bits, T, weak, true)                                   \
  extern "C" T __tsan_atomic##bits##_compare_exchange_val(volatile T* a, T c, T v, int, int) {   \
    __atomic_compare_exchange_n(a, &c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);            \
    return c;                                                                                    \
  }
EMU_ATOMIC(8, unsigned char)
EMU_ATOMIC(16, unsigned short)
EMU_ATOMIC(32, unsigned int)
EMU_ATOMIC(64, unsigned long)
extern "C" void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
extern "C" void __tsan_atomic_signal_fence(int) { __atomic_signal_fence(__ATOMIC_SEQ_CST); }
