# Two commands matter: `make demo` and `make test`. Each sets up .venv when it is missing
# or older than pyproject.toml, so a fresh clone needs nothing installed by hand.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TOY ?= toy
RUN ?= output/toy
# Threads per process on the small CPU machines we test on.
export OMP_NUM_THREADS ?= 2
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1

.PHONY: setup demo repae study chromium test test-fast lint toy clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: pip takes these two from the machine's local wheel store
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

toy: $(STAMP)
	$(PY) dataset_download.py --toy $(TOY)

demo: $(STAMP)
	$(PY) -m fusedit.demo --toy $(TOY) --run $(RUN)

# The REPA-E stage on the toy world: tunes the toy VAE, exports toy/e2e-vae, compares before/after.
repae: $(STAMP)
	$(PY) -m repae.demo --toy $(TOY) --run output/repae/toy

# The paired study on the toy world: original VAE vs its REPA-E twin (runs `make repae` first when
# toy/e2e-vae is missing); report in output/study/report/index.html. Resumes; ~15 min on 2 cores.
study: $(STAMP)
	$(PY) -m evaluation.study --toy $(TOY) --out output/study

# Headless Chromium for tests/test_report.py (Debian's package). Never fatal: without apt or root
# the browser test skips and names the missing binary.
chromium:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq chromium) >/dev/null 2>&1 || \
		echo "chromium not installed: tests/test_report.py will skip its browser check"

test: $(STAMP) chromium
	$(PY) -m pytest -q tests

test-fast: $(STAMP)
	$(PY) -m pytest -q tests -m "not multiprocess and not e2e"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(TOY) output .pytest_cache
