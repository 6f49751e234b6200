# dlog: the README's two commands (`make run`, `make test`) work on a fresh clone
# with only python3 and make: each creates .venv when it is missing.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip --disable-pip-version-check --quiet
# Installs are stamped so repeated runs skip pip; editing pyproject.toml redoes them.
RUN_STAMP  := $(VENV)/.installed-run
TEST_STAMP := $(VENV)/.installed-test

# The optional compiled build (setup.py): a venv of its own with dlog installed
# (not editable) and its hot modules compiled by mypyc. Rebuilt when a source changes.
CVENV        ?= .venv-compiled
CBIN         := $(CVENV)/bin
CPIP         := $(CBIN)/python -m pip --disable-pip-version-check --quiet
COMPILED_STAMP := $(CVENV)/.installed-compiled

.PHONY: run test test-fast test-compiled compiled lint bench bench-pure venv clean

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

$(CBIN)/python:
	$(PYTHON) -m venv $(CVENV)

# The compiler is pinned: what mypyc generates changes between mypy releases, and the
# compiled build is tested with this one.
MYPYC = 'mypy>=2.4.1,<2.5'

# pip builds in build/: what an earlier build left there (a module since removed from
# setup.py, another interpreter's objects) would be installed too, so it goes first, and
# so does the installed package.
$(COMPILED_STAMP): Makefile pyproject.toml setup.py $(shell find dlog cli -name '*.py') | $(CBIN)/python
	$(CPIP) install 'setuptools>=77' wheel $(MYPYC) '.[test]'
	rm -rf build/lib.* build/temp.* build/bdist.* build/__native* build/dlog build/ops.txt
	$(CPIP) uninstall --yes dlog
	rm -rf $(CVENV)/lib/python3*/site-packages/dlog
	DLOG_COMPILE=1 $(CPIP) install --no-build-isolation --force-reinstall --no-deps .
	touch $@

compiled: $(COMPILED_STAMP)

# The compiled build's own tests: the suites of the compiled layers and of the layers
# over them. Run by pytest's script, not `python -m`, so that the source tree is not on
# sys.path (only `tests`, through a link); the conftest checks that the compiled modules
# are the ones in use.
test-compiled: $(COMPILED_STAMP)
	mkdir -p build/testroot && ln -sfn $(CURDIR)/tests build/testroot/tests
	DLOG_EXPECT_COMPILED=1 PYTHONPATH=build/testroot $(CBIN)/pytest -q -p no:cacheprovider \
		tests/unit/storage tests/unit/net tests/unit/broker tests/unit/client \
		tests/unit/raft tests/unit/gossip tests/cluster/test_control_plane.py

# Benchmarks run on the compiled build; bench-pure on the pure-Python one.
run_benchmarks = @for script in bench/[!_]*.py; do echo "== $$script"; $(1) $$script || exit 1; done

bench: $(COMPILED_STAMP)
	$(call run_benchmarks,$(CBIN)/python)

bench-pure: $(RUN_STAMP)
	$(call run_benchmarks,$(BIN)/python)

clean:
	rm -rf $(VENV) $(CVENV) build .dlog .pytest_cache .mypy_cache .ruff_cache .hypothesis
