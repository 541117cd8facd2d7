# DINO suite. Every target builds .venv on first use (from pyproject.toml).
#   make demo     CPU demo: generate the suite, pretrain, all six evaluations random vs trained, the HTML report
#   make test     the test suite
#   make pretrain ARCH=vit_small PATCH=8 DATA=/data/imagenet/train [PRESET=paper] [GPUS=8] ...
#   make pretrain-slurm NODES=2 GPUS=8 PARTITION=learnlab DATA=/data/imagenet/train [PRESET=paper] [EXTRA="--save-every-steps 500"] [SLURM_EXTRA="--executor local"]
#   make knn      CKPT=runs/x/checkpoint.pth DATA=/data/imagenet
#   make eval-all CKPT=runs/x/checkpoint.pth [ARCH=.. PATCH=..] [DATA_ROOT=data/suite] [OUT=results/<run>] [FORCE=1]
#   make report   CKPT=runs/x/checkpoint.pth [DATA_ROOT=data/suite] [OUT=results/<run>] [IMAGES="a.jpg dir/"]
#   make data     write the embedded suite into data/suite/
#   make bench    training, data-pipeline and evaluation throughput on this machine
#   make gpu-check  the GPU path in one go (8 minutes; results/gpu/); DRY=1: its CPU dry run; PY=python3: a
#                 Python that already holds the dependencies (no .venv built)

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# pretraining knobs (empty = the preset's value)
PRESET ?= paper
ARCH ?=
PATCH ?=
DATA ?=
OUT ?= runs/$(PRESET)$(if $(ARCH),-$(ARCH))$(if $(PATCH),-p$(PATCH))
EPOCHS ?=
BATCH ?=
GPUS ?= 1
NNODES ?= 1
NODE_RANK ?= 0
MASTER_ADDR ?= 127.0.0.1
MASTER_PORT ?= 29500
SEED ?= 0
EXTRA ?=
CKPT ?=
DATA_ROOT ?= data/suite
FORCE ?=
IMAGES ?=

.PHONY: venv data demo test pretrain pretrain-slurm knn eval-all report bench gpu-check clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PYTHON) -c "import tomllib; p = tomllib.load(open('pyproject.toml','rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['test']))" > $(VENV)/requirements.txt
	$(PY) -m pip install --disable-pip-version-check -q -r $(VENV)/requirements.txt
	@touch $(STAMP)

data: $(STAMP)
	$(PY) -m data.suite --out data/suite

# the report is written even when an evaluation failed (it lists what is missing); the demo's status is kept
demo: $(STAMP)
	@$(PY) -m evaluate.demo; rc=$$?; \
	$(PY) -m analysis.report --ckpt runs/demo/checkpoint.pth --data-root data/suite || rc=$$?; exit $$rc

# the linter first (ruff, configured in pyproject.toml), then the tests
test: $(STAMP)
	@$(PY) -m ruff check --quiet . || { echo "ruff found the problems above: fix them (many: $(PY) -m ruff check --fix .)" >&2; exit 1; }
	@$(PY) -m pytest tests; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

PRETRAIN_ARGS = --preset $(PRESET) --data "$(DATA)" --output-dir "$(OUT)" --seed $(SEED) \
	$(if $(ARCH),--arch $(ARCH)) $(if $(PATCH),--patch-size $(PATCH)) \
	$(if $(EPOCHS),--epochs $(EPOCHS)) $(if $(BATCH),--batch-size-per-gpu $(BATCH)) $(EXTRA)

pretrain: $(STAMP)
	@test -n "$(DATA)" || { echo "error: DATA is not set: make pretrain DATA=<image folder> (try 'make data' and DATA=data/suite/classification/train PRESET=demo)" >&2; exit 2; }
ifeq ($(GPUS)$(NNODES),11)
	$(PY) -m pretrain.train $(PRETRAIN_ARGS)
else
	$(PY) -m torch.distributed.run --nproc_per_node=$(GPUS) --nnodes=$(NNODES) --node_rank=$(NODE_RANK) \
		--master_addr=$(MASTER_ADDR) --master_port=$(MASTER_PORT) -m pretrain.train $(PRETRAIN_ARGS)
endif

# pretraining on SLURM through submitit (pretrain/slurm.py): one task per GPU; a pre-empted or timed-out
# job is requeued and resumes from $(OUT)/checkpoint.pth (add EXTRA="--save-every-steps N" to lose at most N steps)
NODES ?= 1
PARTITION ?=
ACCOUNT ?=
CONSTRAINT ?=
TIMEOUT_MIN ?=
SLURM_EXTRA ?=

pretrain-slurm: $(STAMP)
	@test -n "$(DATA)" || { echo "error: DATA is not set: make pretrain-slurm NODES=2 GPUS=8 PARTITION=<partition> DATA=<image folder>" >&2; exit 2; }
	$(PY) -m pretrain.slurm --nodes $(NODES) --gpus-per-node $(GPUS) $(if $(PARTITION),--partition $(PARTITION)) \
		$(if $(ACCOUNT),--account $(ACCOUNT)) $(if $(CONSTRAINT),--constraint $(CONSTRAINT)) \
		$(if $(TIMEOUT_MIN),--timeout-min $(TIMEOUT_MIN)) $(SLURM_EXTRA) -- $(PRETRAIN_ARGS)

knn: $(STAMP)
	@test -n "$(CKPT)" -a -n "$(DATA)" || { echo "error: make knn needs CKPT=<checkpoint or random> and DATA=<folder with train/ and val/>" >&2; exit 2; }
	$(PY) -m evaluate.knn --ckpt "$(CKPT)" --data "$(DATA)" $(if $(ARCH),--arch $(ARCH)) $(if $(PATCH),--patch $(PATCH)) $(EXTRA)

# OUT is only passed when given on the command line (its default above is the pretraining run folder)
eval-all: $(STAMP)
	@test -n "$(CKPT)" || { echo "error: make eval-all needs CKPT=<checkpoint> (or CKPT=random ARCH=vit_small PATCH=16)" >&2; exit 2; }
	$(PY) -m evaluate.eval_all --ckpt "$(CKPT)" --data-root "$(DATA_ROOT)" $(if $(ARCH),--arch $(ARCH)) \
		$(if $(PATCH),--patch $(PATCH)) $(if $(filter command line environment,$(origin OUT)),--out "$(OUT)") \
		$(if $(filter 1 yes true,$(FORCE)),--force) $(EXTRA)

report: $(STAMP)
	@test -n "$(CKPT)" || { echo "error: make report needs CKPT=<checkpoint> (run make eval-all CKPT=... first for the tables)" >&2; exit 2; }
	$(PY) -m analysis.report --ckpt "$(CKPT)" --data-root "$(DATA_ROOT)" $(if $(ARCH),--arch $(ARCH)) \
		$(if $(PATCH),--patch $(PATCH)) $(if $(filter command line environment,$(origin OUT)),--out "$(OUT)") \
		$(if $(IMAGES),--images $(IMAGES)) $(EXTRA)

bench: $(STAMP)
	$(PY) -m bench.train_throughput
	$(PY) -m bench.augment_throughput
	$(PY) -m bench.end_to_end
	$(PY) -m bench.end_to_end --preset demo
	$(PY) -m bench.eval_throughput
	$(PY) -m bench.davis_propagation
	$(PY) -m bench.reliability_overhead

# the environment's build time (when it had to be built) goes into the report
GPU_CHECK_OUT ?= results/gpu
DRY ?=
gpu-check:
	@start=$$(date +%s); \
	if [ "$(PY)" = "$(VENV)/bin/python" ]; then $(MAKE) --no-print-directory $(STAMP) || exit $$?; fi; \
	$(PY) -m bench.gpu_check $(if $(DRY),--dry) --out "$(GPU_CHECK_OUT)" --env-seconds $$(( $$(date +%s) - start ))

clean:
	rm -rf runs data/suite
