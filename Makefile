# Two entry points, both of which create (or reuse) ./.venv and install tl-ray into it:
#   make demo   - sample data, then the offline transfer-learning story on it
#   make test   - the full test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_DIR ?= demo

.PHONY: install demo test test-unit test-fast test-extended lint clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/.installed

# The offline transfer story: a source model learns shapes from scratch, then a sweep compares
# freeze depths for transferring it to other shapes with 20 labels each, against the same
# task learnt from scratch (the yardstick). Every depth runs its full budget (FIFO): with 4
# optimizer steps an epoch, ASHA's early rungs judge on noise. About 5 minutes on 2 CPU cores.
demo: install
	$(BIN)/tl-ray sample-data $(DEMO_DIR)/data
	$(BIN)/tl-ray train --data $(DEMO_DIR)/data/source --arch resnet18 --weights none --image-size 48 \
		--epochs 10 --num-workers 2 --storage $(DEMO_DIR)/runs --name source
	$(BIN)/tl-ray tune --data $(DEMO_DIR)/data/target --arch resnet18 --image-size 48 --batch-size 16 \
		--weights "$$($(BIN)/python -c 'import json,sys; print(json.load(open(sys.argv[1]))["best_checkpoint"])' \
			$(DEMO_DIR)/runs/source/result.json)" \
		--freeze-depths 0,3,5 --max-epochs 15 --scheduler fifo --scratch-baseline --storage $(DEMO_DIR)/runs --name sweep

# The unit tests alone (no Ray, no servers): the edit-test loop's first command, under 2 minutes.
test-unit: install
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow" tests/unit

# What CI runs: everything but the tests marked extended (benchmark smoke runs, the 4-node cluster, the new
# backbones through Ray). The 30 slowest are listed at the end: CI's 30-minute budget is spent there.
test: install
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not extended" --durations=30 tests

# Everything but the tests marked slow (worker kills, the memory bound): for the edit-test loop.
test-fast: install
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow and not extended" tests

# The benchmark scripts on tiny settings, a real 4-node Ray cluster losing and gaining nodes, and the new
# backbones through Ray: before a benchmark run, a release, or a change to bench/, fault tolerance, cluster
# resources or backbones.
test-extended: install
	$(BIN)/python -m pytest -q -p no:cacheprovider -m extended tests

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(DEMO_DIR) runs .pytest_cache
