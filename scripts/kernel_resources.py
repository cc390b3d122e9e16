"""Registers, stack (spills) and shared memory of every CUDA kernel in the built extension, from the SASS.

    python scripts/kernel_resources.py                 # kernels with a stack frame (spills), then a summary
    python scripts/kernel_resources.py --all           # every kernel
    python scripts/kernel_resources.py --grep rows_tc  # kernels whose name contains a string

Needs no GPU: it reads sola_ops/_C*.so with cuobjdump. A toolkit without cuobjdump (this repo's CI image has only
nvcc and ptxas) gets NVIDIA's PyPI wheel (nvidia-cuda-cuobjdump) downloaded once into ~/.cache/sola_ops.
A kernel edit that adds a stack frame to a hot kernel shows here before any GPU run does.
"""
import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(os.path.expanduser("~"), ".cache", "sola_ops", "cuobjdump")


def _cached():
    return next(iter(glob.glob(os.path.join(CACHE, "**", "bin", "cuobjdump"), recursive=True)), None)


def cuobjdump() -> str:
    found = shutil.which("cuobjdump") or _cached()
    if found:
        return found
    os.makedirs(CACHE, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", CACHE,
                    "nvidia-cuda-cuobjdump"], check=True)
    for wheel in glob.glob(os.path.join(CACHE, "*.whl")):
        with zipfile.ZipFile(wheel) as z:
            z.extractall(CACHE)
    found = _cached()
    os.chmod(found, 0o755)
    return found


def kernels(library: str):
    """(name, registers, stack bytes, shared bytes) of each kernel, names demangled."""
    text = subprocess.run([cuobjdump(), "--dump-resource-usage", library], capture_output=True, text=True,
                          check=True).stdout
    rows = re.findall(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+)", text)
    names = subprocess.run(["c++filt"], input="\n".join(r[0] for r in rows), capture_output=True,
                           text=True).stdout.split("\n")
    return [(name, int(reg), int(stack), int(shared)) for name, (_, reg, stack, shared) in zip(names, rows)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--all", action="store_true", help="every kernel, not only those with a stack frame")
    parser.add_argument("--grep", default="", help="only kernels whose demangled name contains this")
    parser.add_argument("--library", default=None, help="default: sola_ops/_C*.so of this checkout")
    args = parser.parse_args()
    library = args.library or next(iter(glob.glob(os.path.join(ROOT, "sola_ops", "_C*.so"))), None)
    if library is None:
        sys.exit("no sola_ops/_C*.so here: build the extension first (make build)")
    rows = [r for r in kernels(library) if args.grep in r[0]]
    shown = rows if args.all else [r for r in rows if r[2] > 0]
    for name, reg, stack, shared in sorted(shown, key=lambda r: (-r[2], r[0])):
        print(f"{reg:4d} regs {stack:4d} B stack {shared:6d} B smem  {name[:160]}")
    print(f"{len(rows)} kernels, {sum(r[2] > 0 for r in rows)} with a stack frame (spills or local arrays)")


if __name__ == "__main__":
    main()
