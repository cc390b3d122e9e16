#!/usr/bin/env bash
# The one command a GPU box runs (no internet needed):
#   1. build sola_ops in place against the box's torch: pip install --no-build-isolation -e .
#      (TORCH_CUDA_ARCH_LIST from the GPU, MAX_JOBS = cores)
#   2. a probe of the C++ checks' error path (scripts/cxx_error_probe.py; a backtrace of a crash),
#      the CUDA tests (pytest -m cuda tests), then the API tests' CPU cases against the box's torch
#      (the whole CPU suite takes minutes; CI runs it)
#   3. compute-sanitizer memcheck and racecheck over scripts/sanitizer_driver.py
#   4. bench/kernels.py and bench/models.py -> bench/results/<gpu-slug>.json, bench/plot.py -> PNGs;
#      bench/dwconv.py (the blocks' and downsamples' depthwise convs, ours vs cuDNN) -> bench/results/<gpu-slug>_dwconv.json;
#      the Triton peers at the very end, alone: bench/kernels.py --ops linear -> bench/results/<gpu-slug>_peers.json
#   5. the placement explorer (python -m sola_vision.explore --quick) -> bench/results/placements_*.csv/.png
#   6. scripts/perf_table.py: the README table
# Everything printed also goes to bench/results/<gpu-slug>.log. When $OUT is set, the JSON, the
# log, the PNGs and <gpu-slug>_more.tar (the explorer's CSV and PNG, the peers' JSON) are copied
# there. A failing step does not stop the run; the exit status is 1 when any step failed, timed out
# or could not run.
#
#   bash scripts/gpu_check.sh            (or: make gpu-check)
#
# Environment:
#   PYTHON                python with torch (default python3)
#   GPU_CHECK_BUDGET_S    seconds all steps may take together (default 560, under a 10-minute limit)
#   GPU_CHECK_BENCH       quick (default) or full: the kernel benchmark's shape set
#   TORCH_CUDA_ARCH_LIST  default: the visible GPUs' compute capability
#   MAX_JOBS              default: nproc
#   GPU_CHECK_SKIP_BUILD  1: use the sola_ops already built (re-running the checks and benchmarks)
#   GPU_CHECK_PROFILE     1: per-kernel ncu numbers after the kernel benchmark (scripts/profile_kernels.py,
#                         ~170 s, wgmma cases included; e.g. with GPU_CHECK_SKIP=explorer) into bench/results/<gpu>_profile.txt
#   GPU_CHECK_BREAKDOWN   1: a model step's kernel time by kind, sola vs torch, the training step then the
#                         forward (bench/model_breakdown.py --top 15 --ops 25: also each op's GB/s, ~80 s each)
#                         into bench/results/<gpu>_breakdown.txt,
#                         after the model bench
#   GPU_CHECK_PEER_S      seconds for the peer step (default 60; on 2026-12-04 fla / flash_bla compiled
#                         for over 40 s before their first case, so 60 measured none: give it more
#                         with GPU_CHECK_SKIP=explorer, or run the step alone)
#   GPU_CHECK_SKIP        comma list of step names not to run, e.g. "memcheck,racecheck,explorer"
#                         (a second call on a warm box re-running only what the first ran out of time for)
# third_party/site (scripts/fetch_peers.sh), when present, goes on PYTHONPATH: the fla / flash_bla
# peers of the linear-attention benchmark.
set -u -o pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
ROOT=$(pwd)
SELF="$ROOT/scripts/gpu_check.sh"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

# ---- internal sub-commands (each runs as one step under `timeout`) ------------------------------
case "${1:-}" in
__build)
    # pip's editable install; if pip is missing or refuses, an in-place build_ext.
    if "$PY" -m pip --version >/dev/null 2>&1 \
        && "$PY" -m pip install --no-index --no-build-isolation --no-deps -e .; then
        :
    else
        echo "gpu_check: pip install -e . failed or pip is missing; trying setup.py build_ext --inplace"
        "$PY" setup.py build_ext --inplace || exit 1
    fi
    exit 0
    ;;
__pytest)
    shift
    # failures named as they happen (tests/conftest.py): a step cut off by its timeout still says what failed
    SOLA_TESTS_REPORT_NOW=1 "$PY" -m pytest "$@"
    rc=$?
    if [ "$rc" = 5 ]; then echo "gpu_check: no tests collected"; exit 0; fi
    exit "$rc"
    ;;
esac

BUDGET=${GPU_CHECK_BUDGET_S:-560}
BENCH_MODE=${GPU_CHECK_BENCH:-quick}
START=$(date +%s)
DEADLINE=$((START + BUDGET))

GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
if [ -z "$GPU" ]; then
    GPU=$("$PY" -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no-gpu')" 2>/dev/null || echo unknown)
fi
# the same slug as bench/common.py: lower case, runs of other characters -> '-'
SLUG=$(printf '%s' "$GPU" | tr '[:upper:]' '[:lower:]' | sed -E 's/[^a-z0-9]+/-/g; s/^-+//; s/-+$//')
[ -n "$SLUG" ] || SLUG=unknown
RESULTS=bench/results
JSON=$RESULTS/$SLUG.json
PEERS_JSON=$RESULTS/${SLUG}_peers.json
LOG=$RESULTS/$SLUG.log
# bench/kernels.py's impls but the Triton peers, which get a step of their own
OUR_IMPLS=sola_ops,sola_ops_wgmma,sola_ops_1group,sola_ops_unstaged,sola_ops_presplit,sola_ops_tf32,reference,einsum_fp32,sdpa_flash,sdpa_cudnn,sdpa_efficient,sdpa_math,naive
mkdir -p "$RESULTS"
STARTED=$(mktemp)  # files newer than this were written by this run

if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
    TORCH_CUDA_ARCH_LIST=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | sort -u | paste -sd ';' -)
fi
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
# the kernel benchmark's peers (fla, flash_bla), when scripts/fetch_peers.sh ran and third_party
# was carried here
PEERS=$ROOT/third_party/site
[ -d "$PEERS" ] && export PYTHONPATH="$PEERS${PYTHONPATH:+:$PYTHONPATH}"

now() { date +%s; }

main() {
    local names=() results=() secs=() failed=0

    # step NAME CAP RESERVE CMD...: CMD under a timeout of min(CAP, seconds left - RESERVE), where
    # RESERVE keeps time for the steps after it.
    step() {
        local name=$1 cap=$2 reserve=$3
        shift 3
        local left=$((DEADLINE - $(now) - reserve))
        local t=$((cap < left ? cap : left))
        local s rc status
        s=$(now)
        if [[ ",${GPU_CHECK_SKIP:-}," == *",$name,"* ]]; then
            status="skipped (GPU_CHECK_SKIP)"
        elif ((t < 5)); then
            status="NOT RUN (time budget used up)"
            failed=$((failed + 1))
        else
            echo
            echo "=== [$name] $* (timeout ${t}s; $(($(now) - START))s elapsed)"
            timeout --kill-after=15 "$t" "$@"
            rc=$?
            if [ "$rc" = 0 ]; then
                status="ok"
            elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
                status="TIMEOUT (${t}s)"
                failed=$((failed + 1))
            else
                status="FAILED (exit $rc)"
                failed=$((failed + 1))
            fi
        fi
        echo "=== [$name] $status in $(($(now) - s))s"
        # what was measured so far reaches $OUT even if the whole command is killed later
        [ -n "${OUT:-}" ] && [ -f "$JSON" ] && cp -f "$JSON" "$OUT"/ 2>/dev/null
        names+=("$name")
        results+=("$status")
        secs+=("$(($(now) - s))")
    }
    note() { # a step that was not run on purpose: NAME RESULT COUNTS_AS_FAILURE
        names+=("$1")
        results+=("$2")
        secs+=("0")
        [ "$3" = 1 ] && failed=$((failed + 1))
        echo "=== [$1] $2"
    }

    echo "gpu_check: $GPU ($SLUG), arch list $TORCH_CUDA_ARCH_LIST, MAX_JOBS $MAX_JOBS, budget ${BUDGET}s, bench $BENCH_MODE"
    echo "gpu_check: started $(date -u +%Y-%m-%dT%H:%M:%SZ) in $ROOT"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>/dev/null
    (nvcc --version 2>/dev/null | tail -n 2) || echo "nvcc not on PATH"
    "$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available())"
    if [ -d "$PEERS" ]; then
        echo "gpu_check: benchmark peers from $PEERS: $(cd "$PEERS" && ls -d *.dist-info flash_bla 2>/dev/null | tr '\n' ' ')"
    else
        echo "gpu_check: no benchmark peers (bash scripts/fetch_peers.sh, then carry third_party)"
    fi

    if [ "${GPU_CHECK_SKIP_BUILD:-0}" = 1 ]; then
        note "build" "skipped (GPU_CHECK_SKIP_BUILD=1)" 0
    else
        step "build" 330 200 bash "$SELF" __build
    fi
    # without the editable install the package is imported from the checkout (models/ as sola_vision)
    if ! (cd / && "$PY" -c "import sola_ops" >/dev/null 2>&1); then
        local shim="${TMPDIR:-/tmp}/sola_gpu_check_path"
        mkdir -p "$shim" && ln -sfn "$ROOT/models" "$shim/sola_vision"
        export PYTHONPATH="$ROOT:$shim${PYTHONPATH:+:$PYTHONPATH}"
        echo "gpu_check: sola_ops is not installed; using PYTHONPATH=$PYTHONPATH"
    fi
    step "build_info" 60 190 "$PY" -c "import sola_ops; bi = sola_ops.build_info(); print('sola_ops build:', bi); assert bi['cuda'], 'no CUDA kernels were compiled'"
    # the C++ checks' error path: on 2026-12-04 a message holding a number crashed there (SIGSEGV);
    # each case in a process of its own, and a backtrace of the first crash
    step "C++ errors" 120 180 "$PY" scripts/cxx_error_probe.py

    # pytest-xdist, when there, spreads the CUDA tests over 6 processes on the one GPU: the tests'
    # references and torch.compile are CPU-bound. 429 of them took 28 s on 2026-12-04; there are ~1700
    # now (dwconv, layer_norm, silu_mul, bias_gelu), hence the longer cap.
    local xdist=()
    "$PY" -c "import xdist" >/dev/null 2>&1 && xdist=(-n 6)
    step "tests: cuda" 210 170 bash "$SELF" __pytest -m cuda tests -q -p no:cacheprovider --maxfail=25 "${xdist[@]}"
    step "tests: API on CPU" 45 160 bash "$SELF" __pytest -m "not cuda and not slow" tests/test_ops_api.py \
        -k "not cpu_gemm_builds" -q -p no:cacheprovider --maxfail=25 "${xdist[@]}"

    if command -v compute-sanitizer >/dev/null 2>&1; then
        step "memcheck" 120 140 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck \
            --error-exitcode 99 --print-limit 30 "$PY" scripts/sanitizer_driver.py
        step "racecheck" 120 130 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool racecheck \
            --error-exitcode 99 --print-limit 30 "$PY" scripts/sanitizer_driver.py --quick --dtypes bfloat16,float32
    else
        note "memcheck" "NOT RUN (compute-sanitizer not on PATH)" 1
        note "racecheck" "NOT RUN (compute-sanitizer not on PATH)" 1
    fi

    local quick=--quick
    [ "$BENCH_MODE" = full ] && quick=
    # Ours and PyTorch's first; the Triton peers (fla, flash_bla) in a step of their own, last: on
    # 2026-12-04 one of them compiled or tuned for over 200 s without finishing a case, and took the
    # whole benchmark's time with it. --budget-s stops starting new measurements; the timeout is the
    # backstop (the JSON is rewritten after every case, so a killed run keeps what it measured).
    local kb=$((DEADLINE - $(now) - 230))
    ((kb > 150)) && kb=150
    step "kernel bench" 180 200 "$PY" bench/kernels.py $quick --strict --max-impl-s 30 --out "$JSON" \
        --impls "$OUR_IMPLS" --budget-s "$((kb > 10 ? kb : 10))"
    if [ "${GPU_CHECK_PROFILE:-0}" = 1 ]; then
        step "profile" 200 150 bash -c '"$1" scripts/profile_kernels.py | tee "$2"; exit "${PIPESTATUS[0]}"' _ "$PY" \
            "$RESULTS/${SLUG}_profile.txt"
    fi
    local mb=$((DEADLINE - $(now) - 150))
    ((mb > 100)) && mb=100
    step "model bench" 130 120 "$PY" bench/models.py --strict --out "$JSON" --append --budget-s "$((mb > 10 ? mb : 10))"
    # the blocks' and downsamples' depthwise convs, ours vs cuDNN (the model's other lever besides attention)
    step "dwconv bench" 60 105 "$PY" bench/dwconv.py --out "$RESULTS/${SLUG}_dwconv.json"
    if [ "${GPU_CHECK_BREAKDOWN:-0}" = 1 ]; then
        # the training step, then the forward (inference) step, each impl's ops by time
        step "model breakdown" 180 100 bash -c '"$1" bench/model_breakdown.py --top 15 --ops 25 > "$2" &&
            "$1" bench/model_breakdown.py --step fwd --top 15 --ops 25 >> "$2"' _ "$PY" "$RESULTS/${SLUG}_breakdown.txt"
    fi
    # issue 9's placement explorer on this GPU: tiny at 224, one softmax layer in stages 3-4
    step "explorer" 60 70 "$PY" -m sola_vision.explore --model sola_vision_tiny --img-size 224 --quick \
        --device cuda --out "$RESULTS"

    if "$PY" -c "import matplotlib" >/dev/null 2>&1; then
        step "plots" 30 40 "$PY" bench/plot.py "$JSON"
    else
        note "plots" "not run: no matplotlib here (python bench/plot.py $JSON elsewhere)" 0
    fi
    if [ -f "$JSON" ]; then
        step "perf table" 20 30 "$PY" scripts/perf_table.py "$JSON"
    fi
    # last, with what time is left: a stalled Triton compile can cost nothing else
    if [ -d "$PEERS" ]; then
        local peer_s=${GPU_CHECK_PEER_S:-60}
        step "peer bench" "$peer_s" 0 "$PY" bench/kernels.py $quick --ops linear --impls sola_ops,reference,flash_bla,fla \
            --max-impl-s "$((peer_s / 3))" -v --out "$PEERS_JSON" --budget-s "$((peer_s * 3 / 4))"
    else
        note "peer bench" "not run: no third_party/site (scripts/fetch_peers.sh)" 0
    fi

    echo
    echo "=== gpu_check summary: $GPU, $(($(now) - START))s in all, results in $JSON"
    printf '%-26s %-44s %6s\n' "step" "result" "time"
    local i
    for i in "${!names[@]}"; do
        printf '%-26s %-44s %5ss\n' "${names[$i]}" "${results[$i]}" "${secs[$i]}"
    done
    if ((failed > 0)); then
        echo "gpu_check: $failed step(s) failed"
        return 1
    fi
    echo "gpu_check: all steps passed"
    return 0
}

# the log is written to $OUT as it grows too, so a run killed from outside still brings it back
OUT_LOG=/dev/null
[ -n "${OUT:-}" ] && [ -d "${OUT}" ] && OUT_LOG="$OUT/$SLUG.log"
main 2>&1 | tee "$LOG" "$OUT_LOG"
rc=${PIPESTATUS[0]}
if [ -n "${OUT:-}" ] && [ -d "${OUT}" ]; then
    # at most 8 files come back from $OUT: the JSON and the log (written there as the run went), up
    # to 5 PNGs, and one tar of the rest: the explorer's CSV + PNG, the peers' JSON, the profile, the model breakdown, the dwconv JSON
    for f in "$RESULTS/$SLUG"_*.png; do [ -f "$f" ] && cp -f "$f" "$OUT"/; done
    # the explorer names its files from torch's device name: take what it wrote during this run
    more=$(cd "$RESULTS" && find . -maxdepth 1 \( -name 'placements_*' -o -name "${SLUG}_peers.json" -o -name "${SLUG}_breakdown.txt" \
        -o -name "${SLUG}_profile.txt" -o -name "${SLUG}_dwconv.json" \) \
        -newer "$STARTED" -printf '%f\n')
    [ -n "$more" ] && tar -cf "$OUT/${SLUG}_more.tar" -C "$RESULTS" $more
    echo "gpu_check: copied $(ls "$OUT" | wc -l) file(s) to \$OUT"
fi
rm -f "$STARTED"
exit "$rc"
