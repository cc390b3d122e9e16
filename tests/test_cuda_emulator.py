"""The CUDA kernels run on the CPU: scripts/cuda_emulator builds csrc/'s .cu sources as host C++ (its
README.md) and its drivers compare every CUDA launcher's results with the CPU kernels, so a kernel change
is checked here and in CI, where no GPU is. The build (~6 min on 2 cores) is kept in
build/cuda_emulator_tests and reused while csrc/ and the emulator's sources are unchanged."""
import hashlib
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMULATOR = os.path.join(ROOT, "scripts", "cuda_emulator")
OUT = os.path.join(ROOT, "build", "cuda_emulator_tests")
DRIVERS = {"softmax": "driver", "linear": "driver_linear", "rope": "driver_rope", "dwconv": "driver_dwconv",
           "layer_norm": "driver_layer_norm", "silu_mul": "driver_silu_mul", "bias_gelu": "driver_bias_gelu"}

# (op, driver arguments): every driver's `all`, the softmax wgmma kernels, fused RoPE, grids capped so
# blocks walk several items, and 24 random cases per driver with a fuzz mode (scripts/cuda_emulator/README.md).
RUNS = [(op, "all") for op in DRIVERS] + [("softmax", "wgmma"), ("linear", "rope")] + [
    (op, "fuzz 1 24") for op in DRIVERS if op != "rope"]
CAPPED_GRID_RUNS = [("softmax", "flash"), ("linear", "quick"), ("dwconv", "quick")]
# GPUs other than the H100 / H200 the kernels were tuned on (EMU_DEVICE, scripts/cuda_emulator/README.md): an
# A100's 163 KB of shared memory a block, an sm_86 / sm_89 GPU's 99 KB (RTX 30xx / 40xx, A10, L4), a T4 without
# the tensor-core kernels. The launchers must take kernels that fit there, or fall back, never fail a launch.
# (The fused-RoPE cases run where those kernels fit: all on an A100, head dim 32 on sm_86, none on a T4.)
DEVICE_RUNS = [(device, op, args) for device in ("sm80", "sm86", "sm75")
               for op, args in (("softmax", "flash"), ("linear", "quick"), ("linear", "rope"))
               if (device, args) != ("sm75", "rope")]
# The fp16 / bf16 products on tf32 as well (by default the forward's token reduction and bf16's row
# kernels multiply 16-bit operands).
TF32_RUNS = [("linear", "quick"), ("linear", "rope")]

pytestmark = pytest.mark.slow


def _sources_hash():
    digest = hashlib.sha256()
    for folder in ("csrc", os.path.join("scripts", "cuda_emulator")):
        for parent, dirs, names in sorted(os.walk(os.path.join(ROOT, folder))):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            for name in sorted(names):
                path = os.path.join(parent, name)
                digest.update(os.path.relpath(path, ROOT).encode())
                with open(path, "rb") as f:
                    digest.update(f.read())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def emulator():
    if shutil.which("g++") is None:
        pytest.skip("no g++ to build the CUDA emulator")
    stamp = os.path.join(OUT, "sources.sha256")
    wanted = _sources_hash()
    built = os.path.exists(stamp) and open(stamp).read() == wanted
    if not built or not all(os.path.exists(os.path.join(OUT, exe)) for exe in DRIVERS.values()):
        env = dict(os.environ, PYTHON=sys.executable, OUT_DIR=OUT, JOBS=str(os.cpu_count() or 2))
        run = subprocess.run(["bash", os.path.join(EMULATOR, "build.sh")], env=env, capture_output=True, text=True,
                             timeout=3600)
        assert run.returncode == 0, (run.stdout + run.stderr)[-6000:]
        with open(stamp, "w") as f:
            f.write(wanted)
    return OUT


def _run_driver(emulator, op, args, **env):
    run = subprocess.run([os.path.join(emulator, DRIVERS[op])] + args.split(), env=dict(os.environ, **env),
                         capture_output=True, text=True, timeout=1800)
    output = run.stdout + run.stderr
    failures = [line for line in output.splitlines() if line.startswith(("FAIL", "emu:"))]
    assert run.returncode == 0 and "PASSED" in output, "\n".join(failures[:40]) or output[-4000:]
    return output


@pytest.mark.parametrize("op,args", RUNS, ids=[f"{op}-{args.replace(' ', '_')}" for op, args in RUNS])
def test_cuda_kernels_match_cpu_kernels(emulator, op, args):
    _run_driver(emulator, op, args)


@pytest.mark.parametrize("op,args", CAPPED_GRID_RUNS, ids=[op for op, _ in CAPPED_GRID_RUNS])
def test_capped_grids_walk_every_item(emulator, op, args):
    """SOLA_MAX_GRID=2: each block walks several work items, as past 65535 blocks on a GPU."""
    _run_driver(emulator, op, args, SOLA_MAX_GRID="2")


@pytest.mark.parametrize("op,args", TF32_RUNS, ids=[args for _, args in TF32_RUNS])
def test_tf32_products(emulator, op, args):
    """SOLA_LINEAR_MMA=tf32: the other products (bench/kernels.py's sola_ops_tf32)."""
    _run_driver(emulator, op, args, SOLA_LINEAR_MMA="tf32")


@pytest.mark.parametrize("device,op,args", DEVICE_RUNS, ids=[f"{d}-{op}-{args}" for d, op, args in DEVICE_RUNS])
def test_other_gpus(emulator, device, op, args):
    output = _run_driver(emulator, op, args, EMU_DEVICE=device, EMU_LAUNCH_LOG="1")
    if (device, op) == ("sm86", "softmax"):
        # The backward's twins (launch_bwd: kDeep false for a kernel past 99 KB) ran, not the row kernels, which
        # would give the same results: dq at 16-bit head dim 128, both kernels at 16-bit 256 and at fp32 64, dkdv
        # at fp32 128 (its lse / delta in the padding of the query rows).
        for launcher in ("launch_bwd_tiles<c10::Half, 128, 1, 1, false, true, false>",
                         "launch_bwd_tiles<c10::BFloat16, 128, 1, 1, false, true, false>",
                         "launch_bwd_tiles<c10::Half, 256, 1, 1, false, false, false>",
                         "launch_bwd_tiles<c10::BFloat16, 256, 1, 1, false, false, false>",
                         "launch_bwd_tiles<float, 64, 1, 1, false, false, false>",
                         "launch_bwd_tiles<float, 128, 1, 1, false, false, true>"):
            assert launcher in output, launcher
