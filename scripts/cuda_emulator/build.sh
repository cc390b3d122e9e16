#!/usr/bin/env bash
# Builds the CPU emulation of the CUDA kernels and their drivers (README.md).
#   bash scripts/cuda_emulator/build.sh && build/cuda_emulator/driver all && build/cuda_emulator/driver_linear all
# SRC=<csrc dir> emulates another tree (default: this checkout's csrc); OPS="linear" (or softmax, rope, dwconv,
# layer_norm, silu_mul, bias_gelu)
# builds one driver;
# TSAN=1 builds with ThreadSanitizer into build/cuda_emulator_tsan (shared-memory races: README.md);
# UBSAN=1 with UndefinedBehaviorSanitizer into build/cuda_emulator_ubsan (misaligned vector accesses).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
SRC=${SRC:-$ROOT/csrc}
SAN=""
SUFFIX=""
# one sanitizer per build: TSan and UBSan runtimes cannot be linked together
[ "${TSAN:-0}" = 1 ] && [ "${UBSAN:-0}" = 1 ] && { echo "build.sh: TSAN=1 and UBSAN=1 cannot be combined" >&2; exit 2; }
[ "${TSAN:-0}" = 1 ] && SAN="-fsanitize=thread -DSOLA_CPU_NO_CLONES" SUFFIX=_tsan  # no ifunc clones: see cpu_math.h
# UBSAN=1: misaligned typed (vector) accesses, which fault on the device, and signed overflow in
# index arithmetic, which the device wraps silently; the first report aborts.
[ "${UBSAN:-0}" = 1 ] && SAN="-fsanitize=undefined -fno-sanitize=vptr -fno-sanitize-recover=all" SUFFIX=_ubsan
# MEMSTAT=1: memory-access statistics (memstat.cpp): TSan's instrumentation calling memstat's hooks,
# no TSan runtime; __forceinline__ forced, as nvcc inlines, so sites are the kernels' lines.
[ "${MEMSTAT:-0}" = 1 ] && [ -n "$SAN" ] && { echo "build.sh: MEMSTAT=1 takes no sanitizer" >&2; exit 2; }
[ "${MEMSTAT:-0}" = 1 ] && SAN="-fsanitize=thread -DEMU_MEMSTAT" SUFFIX=_memstat
OUT=${OUT_DIR:-$ROOT/build/cuda_emulator$SUFFIX}
PY=${PYTHON:-$ROOT/.venv/bin/python}
TORCH=$("$PY" -c 'import os, torch; print(os.path.dirname(torch.__file__))')
ABI=$("$PY" -c 'import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))')
FLAGS="-std=c++20 -O1 -g -DSOLA_WITH_CUDA -DSOLA_HOST_EMULATION -I$HERE/include -I$OUT/csrc -I$TORCH/include
       -I$TORCH/include/torch/csrc/api/include -D_GLIBCXX_USE_CXX11_ABI=$ABI -fPIC -w $SAN"
rm -rf "$OUT" && mkdir -p "$OUT/obj"
cp -r "$SRC" "$OUT/csrc"
for f in $(find "$OUT/csrc" -name '*.cu' -o -name '*.cuh'); do "$PY" "$HERE/transform.py" "$f" "$f" > /dev/null; done
# Objects of one op's CUDA (.cu) and CPU kernels (with the CPU tile gemm) plus its driver; emulated
# sources get emu.h.
compile() {
  local f=$1 extra=""
  case $f in *.cu | *driver_*.cpp) extra="-x c++ -include $HERE/emu.h" ;; esac
  g++ $FLAGS $extra -c "$f" -o "$OUT/obj/$2/$(basename "$f").o"
}
objs=()
for op in ${OPS:-softmax linear rope dwconv layer_norm silu_mul bias_gelu}; do
  mkdir -p "$OUT/obj/$op"
  dir=$OUT/csrc/${op}_attention
  [ -d "$dir" ] || dir=$OUT/csrc/$op  # csrc/rope, csrc/dwconv, csrc/layer_norm, csrc/silu_mul, csrc/bias_gelu
  extra_cpu=""
  [ "$op" = linear ] && extra_cpu=$OUT/csrc/rope/rope_cpu.cpp  # the CPU side of the fused-RoPE cases
  for f in "$dir"/*.cu "$dir"/*_cpu.cpp $extra_cpu "$OUT"/csrc/common.cpp "$OUT"/csrc/cpu_gemm.cpp \
           "$HERE/driver_$op.cpp"; do
    while (($(jobs -rp | wc -l) >= ${JOBS:-$(nproc)})); do sleep 0.5; done  # ~0.7 GB per compile
    compile "$f" "$op" &
    objs+=("$OUT/obj/$op/$(basename "$f").o")
  done
done
# `wait PID` fails for a job that `jobs` already reaped, so wait for all and check the objects.
wait
for o in "${objs[@]}"; do [ -f "$o" ] || { echo "compile failed: $o" >&2; exit 1; }; done
LINK_SAN=$SAN
if [ "${MEMSTAT:-0}" = 1 ]; then  # the hooks, uninstrumented, in place of the TSan runtime
  g++ ${FLAGS/-fsanitize=thread/} -I"$HERE" -c "$HERE/memstat.cpp" -o "$OUT/obj/memstat.o"
  LINK_SAN="$OUT/obj/memstat.o"
fi
LIBS="-L$TORCH/lib -Wl,-rpath,$TORCH/lib -ltorch_cpu -lc10 -ltorch -lpthread"
for op in ${OPS:-softmax linear rope dwconv layer_norm silu_mul bias_gelu}; do
  exe=$OUT/driver_$op
  [ "$op" = softmax ] && exe=$OUT/driver  # the name the softmax notes use
  g++ $LINK_SAN "$OUT"/obj/$op/*.o -o "$exe" $LIBS
  echo "built $exe"
done
