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

.PHONY: demo test install install-all clean-demo

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
