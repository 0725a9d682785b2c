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
	$(VENV)/bin/ruff check src tests benchmarks scripts
	$(VENV)/bin/ruff format --check src tests benchmarks scripts

test: lint
	$(PY) -m pytest -q

data/shapes/train.csv: | $(STAMP)
	$(PY) -m cliptune.data.synthetic data/shapes

tiny: data/shapes/train.csv
	$(VENV)/bin/cliptune train configs/tiny.yaml

# The Open Clip Art Library from Debian's packages, as captioned images split by title (about 40 s).
data/openclipart/manifest.json: | $(STAMP)
	bash scripts/install_data_packages.sh
	$(PY) -m cliptune.data.sources openclipart --out data/openclipart --image-size 128

# Noto emoji rendered to images, captioned from emojibase (npm): a second visual domain for the benchmarks.
data/emoji/manifest.json: | $(STAMP)
	bash scripts/install_data_packages.sh data/.npm
	$(PY) -m cliptune.data.sources emoji --out data/emoji --emojibase data/.npm/node_modules/emojibase-data/en/data.json

# The embedded default: real pretrained towers (installed from PyPI) aligned on real clip art, offline.
# Each demo is a new run; a second one reuses the locked towers' outputs kept in runs/.feature_cache.
demo: data/openclipart/manifest.json
	rm -rf runs/quickstart
	$(VENV)/bin/cliptune train configs/quickstart.yaml

docs: $(STAMP)
	$(PY) scripts/update_readme_config.py

clean:
	rm -rf runs data/shapes data/openclipart data/emoji
