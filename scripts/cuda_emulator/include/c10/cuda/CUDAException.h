#pragma once
#define C10_CUDA_KERNEL_LAUNCH_CHECK() do {} while (0)
#define C10_CUDA_CHECK(x) (void)(x)
