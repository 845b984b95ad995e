# Two entry points, both of which create (or reuse) ./.venv and install tl-ray into it:
#   make demo   - sample data, then the offline transfer-learning story on it
#   make test   - the full test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_DIR ?= demo

.PHONY: install demo test lint clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/tl-ray sample-data $(DEMO_DIR)/data
	$(BIN)/tl-ray train --data $(DEMO_DIR)/data/source --arch resnet18 --weights none --image-size 64 \
		--epochs 3 --num-workers 2 --storage $(DEMO_DIR)/runs --name source

test: install
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(DEMO_DIR) runs .pytest_cache
