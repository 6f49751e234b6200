# dlog: the README's two commands (`make run`, `make test`) work on a fresh clone
# with only python3 and make: each creates .venv when it is missing.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip --disable-pip-version-check --quiet
# Installs are stamped so repeated runs skip pip; editing pyproject.toml redoes them.
RUN_STAMP  := $(VENV)/.installed-run
TEST_STAMP := $(VENV)/.installed-test

.PHONY: run test test-fast lint bench venv clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(RUN_STAMP): pyproject.toml | $(BIN)/python
	$(PIP) install -e .
	touch $@

$(TEST_STAMP): pyproject.toml | $(BIN)/python
	$(PIP) install -e '.[test,dev]'
	touch $@ $(RUN_STAMP)

venv: $(TEST_STAMP)

run: $(RUN_STAMP)
	$(BIN)/dlogctl demo

test: $(TEST_STAMP)
	$(BIN)/python -m pytest -q

# Everything but the long soak tests.
test-fast: $(TEST_STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(TEST_STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: $(RUN_STAMP)
	@for script in bench/[!_]*.py; do \
		echo "== $$script"; \
		$(BIN)/python $$script || exit 1; \
	done

clean:
	rm -rf $(VENV) .dlog .pytest_cache .mypy_cache .ruff_cache .hypothesis
