"""The source distribution a user pip-installs from carries everything the build needs: every file
under csrc/ (headers included, and the CUDA sources even when the sdist was made without nvcc) and
both Python packages."""
import os
import subprocess
import sys
import tarfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _files_under(folder):
    found = set()
    for parent, _, names in os.walk(os.path.join(ROOT, folder)):
        found.update(os.path.relpath(os.path.join(parent, name), ROOT) for name in names)
    return found


def test_sdist_carries_every_kernel_source(tmp_path):
    env = dict(os.environ, SOLA_CPU_ONLY="1")  # the .cu files must be packed without nvcc too
    subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path),
                    "sdist", "--dist-dir", str(tmp_path)], cwd=ROOT, env=env, check=True,
                   capture_output=True, timeout=300)
    (archive,) = tmp_path.glob("sola_ops-*.tar.gz")
    with tarfile.open(archive) as tar:
        packed = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}

    kernel_sources = _files_under("csrc")
    assert any(name.endswith(".cuh") for name in kernel_sources)
    assert kernel_sources - packed == set()
    for package in ("sola_ops", "models"):
        python_files = {name for name in _files_under(package) if name.endswith(".py")}
        assert python_files and python_files - packed == set()
    assert {"setup.py", "pyproject.toml", "README.md"} <= packed
