# The README's commands. Each target creates .venv and installs what it needs itself.
#   make demo   build, train sola_vision_nano on the embedded digits (CPU: ~1.5 min to ~98% val top-1),
#               evaluate it, check both ops against the references, print a speed comparison
#   make test   build and run the whole test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The torch every build and test here runs against (a CUDA 13.0 build; no GPU needed to compile).
TORCH_VERSION := 2.14.1
# setuptools >= 77 reads pyproject's SPDX license string; pip keeps an older one a venv came with (3.11: 65.5).
DEPS := torch==$(TORCH_VERSION) numpy pytest pybind11 ninja "setuptools>=77" wheel timm matplotlib tqdm safetensors scikit-learn
SOURCES := $(shell find csrc -type f) setup.py

.PHONY: all build demo test bench gpu-check clean

all: test

$(VENV)/.deps: Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(DEPS)
	touch $@

# Rebuilds the extension in place when a kernel source or setup.py changes.
$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	MAX_JOBS=$${MAX_JOBS:-$$(nproc)} $(PY) -m pip install --no-build-isolation --no-deps -e .
	$(PY) -c "import sola_ops; print('sola_ops build:', sola_ops.build_info())"
	touch $@

build: $(VENV)/.built

demo: build
	$(PY) scripts/demo.py

test: build
	$(PY) -m pytest tests

bench: build
	$(PY) bench/kernels.py

gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf build *.egg-info sola_ops/*.so $(VENV)/.built
