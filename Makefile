# Two commands for a newcomer: `make demo` and `make test`. Both set up .venv when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test test-harness test-scale demo benchmarks clean

setup: $(STAMP)

# Re-installs only when pyproject.toml changes; a second `make setup` is a no-op.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade --quiet pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q

# The real lmms-eval with the `latent_vlm` model: installs the `lmms` extra (about 900 MB, README: Evaluation)
# into .venv once, then runs the tests marked `harness` (deselected by `make test`).
HARNESS_STAMP := $(VENV)/.installed-lmms
$(HARNESS_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,lmms]'
	@touch $@

test-harness: $(HARNESS_STAMP)
	$(BIN)/python -m pytest -q -m harness

# Every recipe under train/configs at its real shapes (one step per stage), FSDP2 on two processes against
# one, and the demo's several-seed command at a tiny size: too long for `make test`'s 15 minutes, so CI
# runs them as a third command.
test-scale: setup
	$(BIN)/python -m pytest -q -m "recipes or fsdp2 or demo_seeds"

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
