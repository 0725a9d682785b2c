# `make demo` and `make test` each set up .venv in the repo root when it is missing or stale.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test lint demo tiny docs clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

test: lint
	$(PY) -m pytest -q

data/shapes/train.csv: | $(STAMP)
	$(PY) -m cliptune.data.synthetic data/shapes

tiny: data/shapes/train.csv
	$(VENV)/bin/cliptune train configs/tiny.yaml

demo: tiny

docs: $(STAMP)
	$(PY) scripts/update_readme_config.py

clean:
	rm -rf runs data/shapes
