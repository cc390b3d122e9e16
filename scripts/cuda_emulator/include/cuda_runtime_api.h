#pragma once
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <map>
#include <mutex>
// One SM, so the small grids of the driver's cases still take the two-group flash kernels.
// An H100 / H200's shared memory (the driver's "shallow" cases set an A100's 164 KB per SM).
struct cudaDeviceProp {
  int major = 9, minor = 0;
  int multiProcessorCount = 1;
  size_t sharedMemPerBlockOptin = 232448, sharedMemPerMultiprocessor = 233472;
};
namespace emu {
// The emulated GPU: an H100 / H200 (cudaDeviceProp's defaults), or EMU_DEVICE's: sm80 (A100: 163 KB of
// shared memory a block), sm86 (RTX 30xx, A10, A40; sm89's RTX 40xx, L4, L40S have the same 99 KB) or
// sm75 (T4: no tensor-core kernels). The launchers must pick kernels that fit, or fall back.
inline cudaDeviceProp device_from_env() {
  cudaDeviceProp prop;
  const char* name = std::getenv("EMU_DEVICE");
  if (name == nullptr || std::strcmp(name, "sm90") == 0) return prop;
  if (std::strcmp(name, "sm80") == 0) {
    prop.major = 8, prop.minor = 0, prop.sharedMemPerBlockOptin = 166912, prop.sharedMemPerMultiprocessor = 167936;
  } else if (std::strcmp(name, "sm86") == 0) {
    prop.major = 8, prop.minor = 6, prop.sharedMemPerBlockOptin = 101376, prop.sharedMemPerMultiprocessor = 102400;
  } else if (std::strcmp(name, "sm75") == 0) {
    prop.major = 7, prop.minor = 5, prop.sharedMemPerBlockOptin = 65536, prop.sharedMemPerMultiprocessor = 65536;
  } else {
    throw std::invalid_argument("EMU_DEVICE: sm90, sm80, sm86 or sm75");
  }
  return prop;
}
inline cudaDeviceProp g_prop = device_from_env();
// Whether the emulated GPU is the H100 / H200 the kernels were tuned on, where every kernel variant fits.
inline bool tuned_device() {
  return g_prop.major == 9 && g_prop.sharedMemPerBlockOptin == cudaDeviceProp{}.sharedMemPerBlockOptin;
}
}  // namespace emu
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
using cudaError_t = int;
// The dynamic shared memory each kernel was allowed past the 48 KB default (cudaFuncSetAttribute), which
// emu::launch checks as a GPU's launch does ("invalid argument" there).
namespace emu {
inline std::mutex smem_optin_mutex;
inline std::map<const void*, int> smem_optin;
}  // namespace emu
template <class F> cudaError_t cudaFuncSetAttribute(F kernel, cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value > static_cast<int>(emu::g_prop.sharedMemPerBlockOptin)) {  // a GPU answers "invalid argument"
      std::fprintf(stderr, "cudaFuncSetAttribute: %d bytes of dynamic shared memory, past the device's %zu\n", value,
                   emu::g_prop.sharedMemPerBlockOptin);
      std::abort();
    }
    std::lock_guard<std::mutex> lock(emu::smem_optin_mutex);
    emu::smem_optin[reinterpret_cast<const void*>(kernel)] = value;
  }
  return 0;
}
// As many resident blocks as the row kernels aimed for before they asked (1024 on the one SM), so
// the driver's cases keep blocks that walk several row tiles; EMU_BLOCKS_PER_SM=n answers n (1: the
// row kernels' blocks each walk all of their head's tiles, as a big batch on a GPU does).
template <class F> cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, F, int, size_t) {
  const char* s = std::getenv("EMU_BLOCKS_PER_SM");
  *n = s ? std::atoi(s) : 1024;
  return 0;
}
