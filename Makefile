# Two commands for a fresh machine: `make demo` (the main job) and `make test` (the test suite).
# Both create .venv in the repository root when it is missing and install fastdino into it.
# Another venv or torch build, e.g. the GPU image's stack (its own venv: the stamps below do not record TORCH_SPEC):
#   make test VENV=/path/to/venv211 TORCH_SPEC="torch==2.11.* torchvision==0.26.*"
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The torch build to install; on the maintainers' machines these two come from local files.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
DEMO_DIR ?= data/demo

.PHONY: demo test install install-all clean-demo mutate

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.installed-base: setup.py | $(PY)
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e .
	touch $@

# Every extra that installs on a CPU machine too: DALI (CPU pipelines run), xformers (GPU attention only), pytest.
$(VENV)/.installed-all: $(VENV)/.installed-base
	$(PY) -m pip install -q -e ".[test,dali,xformers]"
	touch $@

install: $(VENV)/.installed-base
install-all: $(VENV)/.installed-all

demo: install
	$(PY) -m fastdino.data.demo_dataset $(DEMO_DIR)
	$(PY) train.py --config configs/demo.yaml

test: install-all
	$(PY) -m pytest -q tests

clean-demo:
	rm -rf runs/demo $(DEMO_DIR)

# Mutation testing of one module, not in CI (minutes to hours): `make mutate MODULE=fastdino/guard.py`, optionally
# TESTS="tests/test_a.py tests/test_b.py" (default: the module's own test files, tools/mutate.py). Kernels run in the
# Triton interpreter. Results stay in mutants/ (git-ignored); `$(VENV)/bin/mutmut show NAME` prints one mutant.
mutate: install-all
	$(PY) -m pip install -q mutmut==3.8.1
	TRITON_INTERPRET=1 $(PY) tools/mutate.py $(MODULE) $(TESTS)

# The suite on the GPU machine's stack (torch 2.11, torchvision 0.26), in a venv of its own under the ignored build/:
# run it before resolving an issue that changes tests (docs/DESIGN.md).
GPU_STACK_VENV ?= build/venv-gpu-stack
GPU_STACK_TORCH ?= torch==2.11.0 torchvision==0.26.0
.PHONY: test-gpu-stack
test-gpu-stack:
	$(MAKE) test VENV=$(GPU_STACK_VENV) TORCH_SPEC="$(GPU_STACK_TORCH)"
