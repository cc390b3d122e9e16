"""The source distribution a user pip-installs from carries everything the build needs: every file
under csrc/ (headers included, and the CUDA sources even when the sdist was made without nvcc),
CMakeLists.txt and both Python packages."""
import os
import shutil
import subprocess
import sys
import tarfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What setup.py reads; the sdist is made in a copy, since setuptools builds its release tree in the cwd.
SOURCES = ("setup.py", "pyproject.toml", "README.md", "MANIFEST.in", "CMakeLists.txt", "csrc", "sola_ops", "models")


def _files_under(root, folder):
    found = set()
    for parent, _, names in os.walk(os.path.join(root, folder)):
        found.update(os.path.relpath(os.path.join(parent, name), root) for name in names)
    return found


def test_sdist_carries_every_kernel_source(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        path = os.path.join(ROOT, name)
        if os.path.isdir(path):
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info"))
        else:
            shutil.copy2(path, src / name)
    env = dict(os.environ, SOLA_CPU_ONLY="1")  # the .cu files must be packed without nvcc too
    run = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "--dist-dir", str(tmp_path)], cwd=src, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    (archive,) = tmp_path.glob("sola_ops-*.tar.gz")
    with tarfile.open(archive) as tar:
        packed = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}

    kernel_sources = _files_under(src, "csrc")
    assert any(name.endswith(".cuh") for name in kernel_sources)
    assert kernel_sources - packed == set()
    for package in ("sola_ops", "models"):
        python_files = {name for name in _files_under(src, package) if name.endswith(".py")}
        assert python_files and python_files - packed == set()
    assert {"setup.py", "pyproject.toml", "README.md", "CMakeLists.txt"} <= packed
