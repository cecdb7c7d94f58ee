# Two commands matter: `make demo` and `make test`. Each sets up .venv when it is missing
# or older than pyproject.toml or the lock, so a fresh clone needs nothing installed by hand.
# Every package version comes from requirements.lock (`make lock` regenerates it;
# `make test-latest` runs the suite against the newest releases in a separate venv).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LOCK := requirements.lock
LATEST := .venv-latest
TOY ?= toy
RUN ?= output/toy
# Threads per process on the small CPU machines we test on.
export OMP_NUM_THREADS ?= 2
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1

.PHONY: setup demo repae study study-families chromium slurm test test-fast test-latest lock lint toy clean

setup: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first: pip takes these two from the machine's local wheel store
	$(PY) -m pip install -q -c $(LOCK) pip setuptools torch torchvision
	$(PY) -m pip install -q -c $(LOCK) -e '.[dev]'
	$(PY) scripts/check_lock.py $(LOCK)
	# DeepSpeed compiles its CPU communication op on first use (~30 s, once per machine, cached in
	# ~/.cache/torch_extensions): part of installing DeepSpeed, so it happens here, not in the demo.
	$(PY) -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" >/dev/null 2>&1 || \
		echo "note: DeepSpeed's CPU communication op did not build now; the first training run builds it"
	touch $(STAMP)

# Regenerate requirements.lock from the newest releases that pyproject.toml allows, in a scratch
# venv (the working .venv is left alone); review the diff, then `make test` installs it.
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q --upgrade pip
	.venv-lock/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	.venv-lock/bin/python -m pip install -q -e '.[dev]'
	.venv-lock/bin/python scripts/check_lock.py --write $(LOCK)
	rm -rf .venv-lock

# The suite against the newest releases (no lock), for whoever wants to move the lock.
test-latest: chromium
	test -x $(LATEST)/bin/python || $(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q --upgrade pip torch==2.14.1 torchvision==0.29.1
	$(LATEST)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e '.[dev]'
	$(LATEST)/bin/python scripts/check_lock.py --diff $(LOCK)
	TEST_LATEST=1 $(LATEST)/bin/python -m pytest -q tests

toy: $(STAMP)
	$(PY) dataset_download.py --toy $(TOY)

demo: $(STAMP)
	$(PY) -m fusedit.tools.demo --toy $(TOY) --run $(RUN)

# The REPA-E stage on the toy world: tunes the toy VAE, exports toy/e2e-vae, compares before/after.
repae: $(STAMP)
	$(PY) -m repae.demo --toy $(TOY) --run output/repae/toy

# The paired studies on the toy world, 3 training seeds per arm, 450 steps: the text-to-image DiT and the
# class-conditional SiT (train_ldm) on the original VAE vs its REPA-E twin (runs `make repae` first
# when toy/e2e-vae is missing). Results with intervals in output/study/{t2i,ldm}/results.json,
# reports in output/study/index.html. Resumes after a kill.
study: $(STAMP)
	$(PY) -m evaluation.study --toy $(TOY) --out output/study --seeds 3

# The text-to-image study across tokenizer families on the toy world (docs/tokenizers.md): the toy VAE, its
# REPA-E twin, a toy FLUX.2 VAE and a toy RAE (built into the world first when missing), 3 seeds each, every
# arm against the toy VAE with intervals. Results in output/study-families/results.json and index.html.
study-families: $(STAMP)
	$(PY) -m evaluation.study --toy $(TOY) --families --out output/study-families --seeds 3

# Headless Chromium for tests/test_report.py (Debian's package). Never fatal: without apt or root
# the browser test skips and names the missing binary.
chromium:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq chromium) >/dev/null 2>&1 || \
		echo "chromium not installed: tests/test_report.py will skip its browser check"

# Debian's SLURM and munge for tests/test_slurm.py, which starts a real two-node cluster on this machine
# (scripts/slurm/local_cluster.py). Never fatal: without apt or root those tests skip and say why.
slurm:
	@command -v slurmctld >/dev/null 2>&1 && command -v munged >/dev/null 2>&1 || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge) \
		>/dev/null 2>&1 || echo "slurm-wlm not installed: tests/test_slurm.py will skip"

test: $(STAMP) chromium slurm
	$(PY) -m pytest -q tests

test-fast: $(STAMP)
	$(PY) -m pytest -q tests -m "not multiprocess and not e2e"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) scripts/check_layers.py

clean:
	rm -rf $(TOY) output .pytest_cache
