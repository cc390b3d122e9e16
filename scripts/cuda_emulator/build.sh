#!/usr/bin/env bash
# Builds the CPU emulation of the softmax-attention CUDA kernels and its driver (README.md).
#   bash scripts/cuda_emulator/build.sh && build/cuda_emulator/driver all
# SRC=<csrc dir> emulates another tree (default: this checkout's csrc).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
SRC=${SRC:-$ROOT/csrc}
OUT=${OUT_DIR:-$ROOT/build/cuda_emulator}
PY=${PYTHON:-$ROOT/.venv/bin/python}
TORCH=$("$PY" -c 'import os, torch; print(os.path.dirname(torch.__file__))')
ABI=$("$PY" -c 'import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))')
FLAGS="-std=c++20 -O1 -g -DSOLA_WITH_CUDA -DSOLA_HOST_EMULATION -I$HERE/include -I$OUT/csrc -I$TORCH/include
       -I$TORCH/include/torch/csrc/api/include -D_GLIBCXX_USE_CXX11_ABI=$ABI -fPIC -w"
rm -rf "$OUT" && mkdir -p "$OUT/obj"
cp -r "$SRC" "$OUT/csrc"
for f in $(find "$OUT/csrc" -name '*.cu' -o -name '*.cuh'); do "$PY" "$HERE/transform.py" "$f" "$f" > /dev/null; done
pids=()
for f in "$OUT"/csrc/softmax_attention/*.cu "$OUT"/csrc/softmax_attention/*_cpu.cpp "$OUT"/csrc/common.cpp "$HERE/driver_softmax.cpp"; do
  extra=""
  case $f in *.cu | *driver_softmax.cpp) extra="-x c++ -include $HERE/emu.h" ;; esac
  g++ $FLAGS $extra -c "$f" -o "$OUT/obj/$(basename "$f").o" &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
g++ "$OUT"/obj/*.o -o "$OUT/driver" -L"$TORCH/lib" -Wl,-rpath,"$TORCH/lib" -ltorch_cpu -lc10 -ltorch -lpthread
echo "built $OUT/driver"
