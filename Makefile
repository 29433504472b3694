# Fresh-machine set-up: `make run` (main job) and `make test` (test suite) each create .venv, install what
# is missing and build the extension. The venv sees system site-packages, so a machine that already has
# torch/triton (a GPU box) keeps them; elsewhere torch is installed from TORCH_SPEC.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
# timm, torchvision, open_clip and segment-anything (SAM's reference code) for the integration tests, kept out of the
# venv in $(VENV)/optional-libs (the tests put it on sys.path): the only torchvision wheel for torch 2.13 links CUDA,
# and installed into the venv it would break `import transformers` on a CPU machine. --no-deps so that pip never
# replaces the installed torch.
OPTIONAL_LIBS_SPEC ?= torchvision==0.28.0 timm open_clip_torch ftfy wcwidth segment-anything

.PHONY: setup run test test-cpu-capabilities bench check-cuda check-triton clean

setup: $(VENV)/.built $(VENV)/.optional

$(VENV)/.deps:
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install $$($(PY) scripts/missing_packages.py)
	touch $@

$(VENV)/.optional: $(VENV)/.deps
	$(PY) -c "import torchvision, timm, open_clip, segment_anything" 2>/dev/null || \
	  $(PY) -m pip install --no-deps --target $(VENV)/optional-libs $(OPTIONAL_LIBS_SPEC) || \
	  echo "timm/torchvision/open_clip/segment_anything not installed: their tests will skip"
	touch $@

$(VENV)/.built: $(VENV)/.deps setup.py $(wildcard csrc/*.cpp csrc/*.h kernels/*.cu kernels/*.cuh)
	$(PY) -m pip install --no-build-isolation --no-deps -e .
	touch $@

run: setup
	$(PY) -m vitfast

# The suite runs on every core where pytest-xdist is installed (a machine without registry access may lack it): most
# of it is single-threaded (the Triton interpreter, numpy). Expanded when the recipe runs, after setup.
XDIST = $(shell $(PY) -c "import xdist" 2>/dev/null && echo "-n auto")

test: setup
	VITFAST_OPTIONAL_LIBS=$(abspath $(VENV))/optional-libs $(PY) -m pytest tests -q $(XDIST) $(PYTEST_ARGS)

# The cpp-backend tests again under each ATen CPU capability below this CPU's own (default, and avx2 on an AVX-512
# CPU): ATen's kernels, and so plain PyTorch's rounding, change with it, and `default` also turns off the C++ kernels'
# vector paths, so a kernel or a tolerance that holds only on one instruction set fails on every machine. The torch.compile
# tests are left out: Inductor's C++ code does not build under ATEN_CPU_CAPABILITY=default (torch 2.13).
test-cpu-capabilities: setup
	for cap in $$($(PY) scripts/cpu_capabilities.py); do \
	  echo "ATEN_CPU_CAPABILITY=$$cap"; \
	  ATEN_CPU_CAPABILITY=$$cap VITFAST_OPTIONAL_LIBS=$(abspath $(VENV))/optional-libs \
	    $(PY) -m pytest tests -q -k "cpp and not compile" $(PYTEST_ARGS) || exit 1; \
	done

bench: setup
	$(PY) -m pytest bench --benchmark-only -q $(PYTEST_ARGS)

# Compiles every CUDA kernel and the CUDA glue without a GPU (CI runs this where nvcc is present).
check-cuda: setup
	bash scripts/check_cuda.sh $(PY)

# Compiles every Triton kernel for an H100 (sm_90) without a GPU: Triton's compiler and ptxas run on the CPU.
# CI runs the bf16 subset; TRITON_ARGS= compiles every dtype and head dim.
TRITON_ARGS ?= --quick
check-triton: setup
	$(PY) scripts/compile_triton.py $(TRITON_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info vitfast/_C*.so
