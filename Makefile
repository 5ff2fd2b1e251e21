# btmnist: balanced ternary networks with Triton popcount kernels. `make` lists the targets.
PYTHON ?= python3
VENV ?= .venv
# set PY=python3 DEPS= to use an environment you already have (a GPU machine without network)
PY ?= $(VENV)/bin/python
DEPS ?= $(VENV)/.installed
EPOCHS ?= 30
BATCH ?= 128
SEED ?= 0
DATASET ?= mnist
DEVICE ?= cuda
EXPORT ?= bt_mnist_export.pt
NPROC ?= 2
TRAIN_ARGS ?=
BENCH_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help venv test train train-triton train-ddp infer bench clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-13s %s\n", $$1, $$2}'
	@echo "knobs: PYTHON=$(PYTHON) EPOCHS=$(EPOCHS) BATCH=$(BATCH) SEED=$(SEED) DATASET=$(DATASET) DEVICE=$(DEVICE) EXPORT=$(EXPORT) NPROC=$(NPROC)"

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

venv: $(VENV)/.installed ## create .venv from requirements.txt

test: $(DEPS) ## run the tests (no GPU needed: Triton's interpreter)
	$(PY) -m pytest -q test_bt.py

train: $(DEPS) ## train the ternary LeNet (PyTorch path) and export it packed
	$(PY) bt_train.py --dataset $(DATASET) --epochs $(EPOCHS) --batch $(BATCH) --seed $(SEED) --device $(DEVICE) --export $(EXPORT) $(TRAIN_ARGS)

train-triton: $(DEPS) ## the same with the fc layers on the popcount kernels (GPU)
	$(PY) bt_train.py --dataset $(DATASET) --epochs $(EPOCHS) --batch $(BATCH) --seed $(SEED) --device $(DEVICE) --export $(EXPORT) --use-triton-linear $(TRAIN_ARGS)

train-ddp: $(DEPS) ## data-parallel training with TernGrad on NPROC processes (torchrun)
	$(PY) -m torch.distributed.run --standalone --nproc_per_node=$(NPROC) bt_train.py --dataset $(DATASET) --epochs $(EPOCHS) --batch $(BATCH) --seed $(SEED) --device $(DEVICE) --export $(EXPORT) --terngrad $(TRAIN_ARGS)

infer: $(DEPS) ## Triton-only inference of the export (numpy on the CPU with DEVICE=cpu)
	$(PY) bt_infer.py --export $(EXPORT) --device $(DEVICE)

bench: $(DEPS) ## kernel tables, training s/epoch and inference images/s against torch (GPU)
	$(PY) bt_bench.py $(BENCH_ARGS)
	@echo "== training seconds per epoch: PyTorch path, then --use-triton-linear (3 epochs each)"
	$(PY) bt_train.py --epochs 3 --export /tmp/bt_bench_export.pt --checkpoint /tmp/bt_bench_ckpt.pt
	$(PY) bt_train.py --epochs 3 --use-triton-linear --export /tmp/bt_bench_export.pt --checkpoint /tmp/bt_bench_ckpt.pt
	@echo "== Triton-only inference against the float model on cuDNN"
	$(PY) bt_bench.py --infer /tmp/bt_bench_export.pt

clean: ## remove the venv, caches, exports and checkpoints
	rm -rf $(VENV) __pycache__ .pytest_cache .hypothesis bt_mnist_export.pt bt_mnist_ckpt.pt
