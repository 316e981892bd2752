# The two commands of the README: `make demo` and `make test`. Both set up .venv first on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch must be installed before the package: where pip finds the local CPU wheel (pip's find-links)
# 2.13.0 is taken from there; on a GPU machine with torch already in the venv nothing changes.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) jobs/demo.py

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: install lint
	$(PY) -m pytest -q

bench: install
	$(PY) benchmarks/quantize.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
