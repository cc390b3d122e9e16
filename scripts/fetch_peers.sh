#!/usr/bin/env bash
# Puts the linear-attention peers that bench/kernels.py compares against into third_party/site
# (git-ignored, never committed), so a GPU box without internet can import them: carry
# third_party to the box and scripts/gpu_check.sh puts third_party/site on PYTHONPATH.
#
#   bash scripts/fetch_peers.sh                      fla (fla-core from PyPI) and its one dependency
#   FLASH_BLA_SRC=/path/to/checkout bash scripts/fetch_peers.sh
#                                                    also flash_bla (not on PyPI: a checkout of
#                                                    github.com/fla-org/flash-bidirectional-linear-attention)
#
# Both are Triton kernels: they run on the GPU box's torch and triton, nothing is built here.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
SITE=third_party/site
FLA_VERSION=${FLA_VERSION:-0.6.0}

rm -rf "$SITE"
mkdir -p "$SITE"
# fla-core holds fla.ops (layers and models, which need transformers, are a separate package).
"$PY" -m pip install --quiet --no-deps --target "$SITE" "fla-core==$FLA_VERSION" einops
if [ -n "${FLASH_BLA_SRC:-}" ]; then
    [ -d "$FLASH_BLA_SRC/flash_bla" ] || { echo "fetch_peers: no flash_bla/ in $FLASH_BLA_SRC" >&2; exit 1; }
    cp -r "$FLASH_BLA_SRC/flash_bla" "$SITE/"
fi
echo "fetch_peers: $(du -sh "$SITE" | cut -f1) in $SITE:"
ls "$SITE"
