#pragma once
#include <cstdlib>
#include <map>
#include <mutex>
// One SM, so the small grids of the driver's cases still take the two-group flash kernels.
// An H100 / H200's shared memory (the driver's "shallow" cases set an A100's 164 KB per SM).
struct cudaDeviceProp {
  int major = 9, minor = 0;
  int multiProcessorCount = 1;
  size_t sharedMemPerBlockOptin = 232448, sharedMemPerMultiprocessor = 233472;
};
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
