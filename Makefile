# Two commands set everything up: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_ROOT ?= demo_output

.PHONY: venv demo test bench clean-demo

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

venv: $(VENV)/.installed

demo: venv
	PY=$(PY) DEMO_ROOT=$(DEMO_ROOT) bash scripts/demo.sh

test: venv
	$(PY) -m pytest -q tests

bench: venv
	$(PY) bench/run_all.py

clean-demo:
	rm -rf $(DEMO_ROOT)
