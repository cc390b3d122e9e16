// Which archs this build compiled for: nvcc defines __CUDA_ARCH_LIST__ (e.g. 900) in every pass.
#include <cstdint>
#include <vector>

namespace sola {
std::vector<int64_t> cuda_arch_list() { return {__CUDA_ARCH_LIST__}; }
}  // namespace sola
