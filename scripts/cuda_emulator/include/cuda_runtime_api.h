#pragma once
struct cudaDeviceProp { int major = 9, minor = 0; size_t sharedMemPerBlockOptin = 232448; };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
using cudaError_t = int;
template <class F> cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int) { return 0; }
