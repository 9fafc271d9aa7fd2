# Set-up and entry points. `make run` and `make test` are the README's two commands.
VENV ?= .venv
PY := $(VENV)/bin/python

# torch is installed first, alone, with the exact version whose CPU build our machines stage
# locally; any other specifier pulls several GB of CUDA packages.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

.PHONY: install run test lint bench
install: $(VENV)/.installed

run: install
	$(VENV)/bin/booruset run

test: install
	$(VENV)/bin/ruff check .
	RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1 $(PY) -m pytest -q

bench: install
	$(PY) bench/ingest.py
