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

.PHONY: install run test bench browser
install: $(VENV)/.installed

# Headless Chromium renders the HTML report in its test (the test skips without it).
# Best effort: needs root or sudo and Debian/Ubuntu's apt.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  ($$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium >/dev/null) \
	  || echo "chromium not installed: the report rendering test will skip"; }

run: install
	$(VENV)/bin/booruset run

test: install browser
	$(VENV)/bin/ruff check .
	RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1 $(PY) -m pytest -q

bench: install
	$(PY) bench/ingest.py
