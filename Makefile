# Two commands set everything up: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_ROOT ?= demo_output

.PHONY: venv demo test lint bench clean-demo

# pip -qq: no progress, notices or warnings (e.g. about configured find-links folders that do
# not exist); errors still print and stop make.
PIP := $(PY) -m pip install -qq --disable-pip-version-check

$(VENV)/.installed: requirements.txt pyproject.toml
	@echo "setting up $(VENV): python packages from requirements.txt (quiet; a minute or more the first time)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PIP) --upgrade pip
	@$(PIP) -r requirements.txt
	@$(PIP) --no-deps -e .
	@touch $@

venv: $(VENV)/.installed

demo: venv
	@PY=$(PY) DEMO_ROOT=$(DEMO_ROOT) VERBOSE=$(VERBOSE) bash scripts/demo.sh

# lint and types first (seconds), then the suite
lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy pni

test: lint
	$(PY) -m pytest -q tests

bench: venv
	$(PY) bench/run_all.py

clean-demo:
	rm -rf $(DEMO_ROOT)
