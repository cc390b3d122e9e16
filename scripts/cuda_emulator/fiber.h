// Fibers for emu.h: a block's CUDA threads as coroutines on one OS thread, switched only where a thread
// waits at a barrier (__syncthreads, __syncwarp, a shuffle, an mma). An OS thread per CUDA thread spends
// most of its time in the kernel's futex calls at those barriers; a fiber switch is a few instructions.
// x86-64 System V only (emu.h falls back to OS threads elsewhere, and under ThreadSanitizer).
#pragma once
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

// emu_fiber_switch(save, load): pushes the callee-saved registers and the SSE / x87 control words, stores
// the stack pointer to *save and pops the same from the stack at load. Weak: every object file that
// includes this header carries a copy, the linker keeps one.
asm(R"(
  .pushsection .text
  .weak emu_fiber_switch
  .type emu_fiber_switch, @function
emu_fiber_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $16, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $16, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size emu_fiber_switch, .-emu_fiber_switch
  .popsection
)");
extern "C" void emu_fiber_switch(void** save, void* load);

namespace emu::fiber {

struct Fiber {
  void* sp = nullptr;                 // saved stack pointer while switched out
  const unsigned* wait_on = nullptr;  // waiting until *wait_on != wait_value (a barrier's phase)
  unsigned wait_value = 0;
  bool done = false;
  void (*body)(void*, unsigned) = nullptr;
  void* arg = nullptr;
  unsigned index = 0;  // threadIdx.x
};

inline thread_local void* tl_scheduler_sp = nullptr;
inline thread_local Fiber* tl_running = nullptr;

// The running fiber waits until *word changes from value (another fiber opens the barrier).
inline void wait_while_equal(const unsigned* word, unsigned value) {
  Fiber* self = tl_running;
  self->wait_on = word;
  self->wait_value = value;
  emu_fiber_switch(&self->sp, tl_scheduler_sp);
}

[[noreturn]] inline void entry() {
  Fiber* self = tl_running;
  self->body(self->arg, self->index);
  self->done = true;
  emu_fiber_switch(&self->sp, tl_scheduler_sp);
  std::abort();  // a finished fiber is never resumed
}

// Stacks of this OS thread, reused by its blocks; each has a guard page below it (an overflow faults).
class Stacks {
 public:
  static constexpr size_t kBytes = 1 << 20;  // reserved, touched as used (kernels' frames are a few KB)
  ~Stacks() {
    for (char* s : stacks_) munmap(s - page(), kBytes + page());
  }
  char* top(size_t i) {
    while (stacks_.size() <= i) {
      void* m = mmap(nullptr, kBytes + page(), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (m == MAP_FAILED || mprotect(m, page(), PROT_NONE) != 0) {
        std::fprintf(stderr, "emu: no memory for fiber stack %zu\n", i);
        std::abort();
      }
      stacks_.push_back(static_cast<char*>(m) + page());
    }
    return stacks_[i] + kBytes;
  }

 private:
  static size_t page() { return static_cast<size_t>(sysconf(_SC_PAGESIZE)); }
  std::vector<char*> stacks_;
};
inline thread_local Stacks tl_stacks;

// A new fiber's stack as emu_fiber_switch leaves one: control words, six registers, then entry as the
// return address, placed so entry starts with the stack aligned as after a call.
inline void prepare(Fiber& f, char* top) {
  auto* sp = reinterpret_cast<uint64_t*>(top) - 10;  // top is page aligned: sp is 16-byte aligned
  uint32_t mxcsr;
  uint16_t fpucw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  sp[0] = mxcsr | (static_cast<uint64_t>(fpucw) << 32);
  sp[1] = 0;
  for (int r = 2; r < 8; ++r) sp[r] = 0;  // r15 r14 r13 r12 rbx rbp
  sp[8] = reinterpret_cast<uint64_t>(&entry);
  sp[9] = 0;  // entry's return address: it never returns
  f.sp = sp;
}

// Runs body(arg, i) for i < n as fibers on this OS thread until all return; on_switch(i) runs before each
// switch into fiber i (emu.h sets the CUDA thread's state there). Aborts when no fiber can go on: each
// waits at a barrier the others never reach (a __syncthreads some threads skip).
template <class OnSwitch>
void run(unsigned n, void (*body)(void*, unsigned), void* arg, OnSwitch on_switch) {
  std::vector<Fiber> fibers(n);
  for (unsigned i = 0; i < n; ++i) {
    fibers[i].body = body, fibers[i].arg = arg, fibers[i].index = i;
    prepare(fibers[i], tl_stacks.top(i));
  }
  unsigned live = n, skipped = 0;
  for (unsigned i = 0; live > 0; i = i + 1 == n ? 0 : i + 1) {
    Fiber& f = fibers[i];
    if (f.done || (f.wait_on && *f.wait_on == f.wait_value)) {
      if (++skipped > n) {
        std::fprintf(stderr, "emu: deadlock: every live thread of the block waits at a barrier the others do not reach\n");
        std::abort();
      }
      continue;
    }
    skipped = 0;
    f.wait_on = nullptr;
    on_switch(i);
    tl_running = &f;
    emu_fiber_switch(&tl_scheduler_sp, f.sp);
    tl_running = nullptr;
    if (f.done) --live;
  }
}

}  // namespace emu::fiber
