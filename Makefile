# The two commands of the README. PYTHON is the interpreter that runs cookiecutter and the tests.
PYTHON ?= python3
BUILD ?= build

.PHONY: demo test lint clean

demo:  ## bake a project with the defaults into $(BUILD)/llm-lab, set it up and run its offline demo
	$(PYTHON) -m pip install "cookiecutter>=2.6"
	$(PYTHON) -m cookiecutter --no-input --overwrite-if-exists --output-dir $(BUILD) .
	$(MAKE) -C $(BUILD)/llm-lab demo

test:  ## install the test requirements once, then bake every option and run what users would run
	$(PYTHON) -m pip install -r requirements-test.txt
	$(PYTHON) -m pytest

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

clean:
	rm -rf $(BUILD) .pytest_cache .ruff_cache
