#pragma once
#include <ATen/ATen.h>
#include <cuda_runtime_api.h>
inline int min(int a, int b) { return a < b ? a : b; }
namespace at::cuda {
inline cudaStream_t getCurrentCUDAStream() { return 0; }
inline cudaDeviceProp* getCurrentDeviceProperties() { return &emu::g_prop; }
}
