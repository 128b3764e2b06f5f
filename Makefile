# Two commands for a newcomer: `make demo` and `make test`. Both set up .venv when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test demo benchmarks clean

setup: $(STAMP)

# Re-installs only when pyproject.toml changes; a second `make setup` is a no-op.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade --quiet pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q

demo: setup
	$(BIN)/python -m mmlatent.demo --out runs/demo

# Each benchmark compares two ways of doing the same work and prints one JSON line last.
benchmarks: setup
	$(BIN)/python benchmarks/dataloader.py
	$(BIN)/python benchmarks/latent_loop.py
	$(BIN)/python benchmarks/train_step.py
	$(BIN)/python benchmarks/eval_batching.py
	$(BIN)/python benchmarks/convert.py
	$(BIN)/python benchmarks/gpu_throughput.py

clean:
	rm -rf runs lightning_logs .pytest_cache
