// cp.async: 16- and 4-byte global -> shared copies that land while the thread goes on (sm_80+), shared by
// the flash softmax kernels and the tensor-core linear-attention reduction. Only __host__ __device__
// code: with SOLA_HOST_EMULATION the emulator (scripts/cuda_emulator/emu.h) lands a copy at the
// issuing thread's wait, as the GPU may; other host builds copy at once.
#pragma once

#include <cstring>

#include "common.h"

namespace sola {

SOLA_HD void cp_async_16(void* smem, const void* gmem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem));
#elif defined(SOLA_HOST_EMULATION)
  ::emu::cp_async_16(smem, gmem);  // lands at this thread's wait, as on the GPU
#else
  std::memcpy(smem, gmem, 16);
#endif
}

// 4 bytes (both addresses 4-byte aligned), through L1 (.ca: the only mode for copies under 16 bytes).
SOLA_HD void cp_async_4(void* smem, const void* gmem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(s), "l"(gmem));
#elif defined(SOLA_HOST_EMULATION)
  ::emu::cp_async_4(smem, gmem);
#else
  std::memcpy(smem, gmem, 4);
#endif
}

SOLA_HD void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#elif defined(SOLA_HOST_EMULATION)
  ::emu::cp_async_commit();
#endif
}

// The first row a thread copies where 4 threads copy a 16-bit row (4 16-byte pieces) padded to 5 bank
// groups (32 + 8 elements): a quarter warp (8 lanes; 16-byte accesses go a quarter warp at a time) takes
// rows q and q + 4 of its warp's 8, which start 4 groups apart, so its 8 pieces fill the 8 bank groups
// (rows 2q and 2q + 1 would share a group: 2-way conflicts, scripts/cuda_emulator MEMSTAT=1). Then
// every 32 rows (a block's threads cover 8 rows a warp).
SOLA_HD int quarter_warp_row(int tid) { return 8 * (tid / 32) + (tid % 32) / 8 + 4 * ((tid / 4) % 2); }

// Waits for this thread's copies; a __syncthreads() after it makes everyone's visible.
SOLA_HD void cp_async_wait_all() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#elif defined(SOLA_HOST_EMULATION)
  ::emu::cp_async_wait_all();
#endif
}

// Waits for all but this thread's kPending most recently committed copy groups.
template <int kPending>
SOLA_HD void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
#elif defined(SOLA_HOST_EMULATION)
  ::emu::cp_async_wait_group(kPending);
#endif
}

}  // namespace sola
