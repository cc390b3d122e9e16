// MEMSTAT=1 builds (README.md): every load and store of the emulated kernels goes through
// memstat.cpp (GCC's -fsanitize=thread instrumentation, with memstat.cpp's hooks in place of the
// TSan runtime), which groups a warp's lanes at each access site and counts what a GPU would pay:
// 32-byte sectors per global request, shared-memory wavefronts (bank conflicts) per request.
#pragma once

namespace emu::memstat {
// Inside emu.h's own machinery (barriers, shuffles, mma, the copies it models) accesses are not the
// kernel's: a Quiet in scope mutes the hooks.
inline thread_local int quiet = 0;
struct Quiet {  // the compiler barriers keep the muted accesses from moving out of the scope
  Quiet() {
    ++quiet;
    asm volatile("" ::: "memory");
  }
  ~Quiet() {
    asm volatile("" ::: "memory");
    --quiet;
  }
};
// An access made on the kernel's behalf by an emulated instruction (ldmatrix, cp.async) at `pc`.
void record(const void* pc, const void* addr, int bytes, bool write);
// A kernel's launch (its address names it in the report), its blocks and their threads.
void launch_begin(const void* kernel);
void block_begin(unsigned block_index, unsigned threads, const void* dynamic_smem, int dynamic_bytes);
void thread_begin(unsigned tx);
void thread_end();
void block_end();
}  // namespace emu::memstat

#define EMU_QUIET ::emu::memstat::Quiet emu_quiet_
