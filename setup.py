"""Builds sola_ops._C: C++ CPU kernels always, CUDA kernels when nvcc is found.

Environment:
  SOLA_CPU_ONLY=1        build the CPU kernels alone
  CUDA_HOME              toolkit root (else /usr/local/cuda, else nvcc on PATH)
  TORCH_CUDA_ARCH_LIST   CUDA archs (else the visible GPU's, else 9.0); 9.0 builds as 9.0a
  MAX_JOBS               parallel compile jobs (honoured by torch's ninja build)
Nothing is downloaded here.
"""
import glob
import os
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def find_cuda_home():
    if os.environ.get("SOLA_CPU_ONLY", "0") not in ("", "0"):
        return None
    candidates = [os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for home in candidates:
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return home
    return None


CUDA_HOME = find_cuda_home()
if CUDA_HOME:
    # torch.utils.cpp_extension reads CUDA_HOME at import; without a GPU it cannot guess it.
    os.environ["CUDA_HOME"] = CUDA_HOME

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def cuda_arch_list():
    """TORCH_CUDA_ARCH_LIST if set, else the visible GPU's arch, else 9.0 (no GPU needed); 9.0 is
    built as 9.0a (the same GPUs; Hopper's wgmma needs the `a` target, nvcc 12.0 or newer)."""
    archs = [arch for arch in _requested_cuda_archs().replace(" ", ";").split(";") if arch]
    if nvcc_version() >= (12, 0):
        archs = ["9.0a" if arch == "9.0" else arch for arch in archs]
    return ";".join(archs)


def nvcc_version():
    """(major, minor) of CUDA_HOME's nvcc; (0, 0) when it cannot tell."""
    try:
        out = subprocess.run([os.path.join(CUDA_HOME, "bin", "nvcc"), "--version"], capture_output=True, text=True,
                             timeout=60).stdout
        major, minor = out.split("release ")[1].split(",")[0].split(".")[:2]
        return int(major), int(minor)
    except (OSError, subprocess.SubprocessError, IndexError, ValueError):
        return (0, 0)


def _requested_cuda_archs():
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        caps = sorted({line.strip() for line in out.stdout.splitlines() if line.strip()})
        if out.returncode == 0 and caps:
            return ";".join(caps)
    except (OSError, subprocess.SubprocessError):
        pass
    return "9.0"


def pip_nvidia_includes():
    """Headers such as cusparse.h that a bare toolkit may lack ship in the pip nvidia packages."""
    site = os.path.dirname(os.path.dirname(torch.__file__))
    return sorted(glob.glob(os.path.join(site, "nvidia", "*", "include")))


def sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", pattern), recursive=True))


def make_extension():
    # C++20 named, not left to torch: torch 2.11 (the GPU box's) would pick C++17, where
    # std::bit_cast (cpu_math.h) does not compile. No FP traps are ever enabled, and without
    # them GCC may if-convert the CPU kernels' selects (cpu_exp, feature maps) and vectorise those loops.
    # OpenMP: at::parallel_for is an inline template that runs everything on one thread unless the
    # caller is compiled with OpenMP (torch's ParallelOpenMP.h); the threads are then torch's own
    # libgomp.so.1 (same soname, loaded once).
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    cxx_flags = ["-std=c++20", "-O3", "-fno-trapping-math"] + openmp
    cpu_sources = sources("**/*.cpp")
    include_dirs = [os.path.join(ROOT, "csrc")]
    if CUDA_HOME is None:
        print("sola_ops: building CPU kernels only", file=sys.stderr)
        return CppExtension("sola_ops._C", cpu_sources, include_dirs=include_dirs,
                            extra_compile_args={"cxx": cxx_flags}, extra_link_args=openmp)
    archs = cuda_arch_list()
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    print(f"sola_ops: building CPU + CUDA kernels (CUDA_HOME={CUDA_HOME}, archs {archs})", file=sys.stderr)
    defines = ["-DSOLA_WITH_CUDA"]
    if "9.0a" in archs.split(";"):
        defines.append("-DSOLA_SM90A")  # the wgmma kernels have code (softmax_attention_flash.h)
    # No --use_fast_math: fp32 inputs are computed in true fp32 (exact exp, division, denormals).
    nvcc_flags = ["-std=c++20", "-O3", "-lineinfo", "--expt-relaxed-constexpr",
                  "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                  "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"]
    return CUDAExtension("sola_ops._C", cpu_sources + sources("**/*.cu"),
                         include_dirs=include_dirs + pip_nvidia_includes(),
                         extra_compile_args={"cxx": cxx_flags + defines, "nvcc": nvcc_flags + defines},
                         extra_link_args=openmp)


setup(
    ext_modules=[make_extension()],
    cmdclass={"build_ext": BuildExtension},
    package_dir={"sola_ops": "sola_ops", "sola_vision": "models"},
    packages=["sola_ops", "sola_vision"],
)
