# The two commands of the README. Both run in the template's own virtual environment, .venv, made from PYTHON (any
# Python 3.10+ with venv, externally managed or not), so the system's site-packages are never touched. Inside an
# activated virtual environment (VIRTUAL_ENV is set) that one is used instead.
PYTHON ?= python3
BUILD ?= build
ifdef VIRTUAL_ENV
PY := python
else
PY := .venv/bin/python
endif
# The template's tests run on the CPU: PyTorch's CPU wheels (~200 MB) instead of PyPI's CUDA build (~3 GB).
# The generated project chooses its own build (`make demo` passes TORCH and TORCH_INDEX_URL on when you give them).
TORCH_INDEX_URL ?= https://download.pytorch.org/whl/cpu
# The demo project is baked for the Python that runs it, so its own .venv is made from the same interpreter.
PY_VERSION = $(shell $(PY) -c 'import sys; print("%d.%d" % sys.version_info[:2])')

.PHONY: demo test venv lint clean
# A venv whose creation failed half-way is made again on the next run instead of being taken for a finished one.
.DELETE_ON_ERROR:

demo: venv  ## bake a project with the defaults (and this Python's version) into $(BUILD)/llm-lab, run its `make demo`
	$(PY) -m pip install "cookiecutter>=2.6"
	$(PY) -m cookiecutter --no-input --overwrite-if-exists --output-dir $(BUILD) . python_version=$(PY_VERSION)
	$(MAKE) -C $(BUILD)/llm-lab demo

test: venv  ## the CPU build of torch and the test requirements, then bake every option and run what users would run
	$(PY) -m pip install torch --index-url $(TORCH_INDEX_URL)
	$(PY) -m pip install -r requirements-test.txt
	$(PY) -m pytest

venv: $(if $(VIRTUAL_ENV),,.venv/bin/python)

.venv/bin/python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null || { echo "error: $(PYTHON) is missing or older than Python 3.10: install Python 3.10+ or pass PYTHON=/path/to/python3" >&2; exit 1; }
	@v=$$($(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])'); $(PYTHON) -c 'import ensurepip, venv' 2>/dev/null \
	|| { echo "error: $(PYTHON) cannot create virtual environments (no ensurepip): install the python$$v-venv package (Debian/Ubuntu: sudo apt install python$$v-venv)" >&2; exit 1; }
	$(PYTHON) -m venv .venv

lint:  ## ruff comes with the test requirements (`make test`)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean:
	rm -rf $(BUILD) .pytest_cache .ruff_cache
