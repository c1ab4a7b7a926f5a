# Two commands a user needs: `make demo` and `make test`. Each sets up what it needs:
# a virtual environment, torch, the test requirements and the compiled extension.
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.tiedkernels-installed
SOURCES := setup.py pyproject.toml tiedkernels/_ext.py $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp requirements/*.txt)

# The test runs spread their tests over TEST_WORKERS processes (pytest-xdist, in requirements/test.txt):
# whole files per process (PYTEST_FILES: module fixtures such as the distributed ranks run once), or
# single tests where one file holds them all (PYTEST_TESTS). TEST_WORKERS=1 runs each in one process.
TEST_WORKERS ?= 2
PYTEST_FILES := $(if $(filter-out 0 1,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile)
PYTEST_TESTS := $(if $(filter-out 0 1,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist load)

# Fragments under mk/ add their own targets; they append to EXTRA_TESTS what `make test`
# must also run (a second transformers line, the CUDA compile check, ...).
EXTRA_TESTS :=

.PHONY: all install demo test test-core bench clean
all: test

# The package is installed as a user who builds from source would (README, install section): torch first,
# then an editable install without build isolation, so the extension compiles against that torch; the
# `test` extra (requirements/test.txt) comes with it.
$(STAMP): $(SOURCES)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade "pip>=23" "setuptools>=77" wheel ninja
	$(BIN)/python -m pip install "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip install --no-build-isolation -e ".[test]"
	$(BIN)/python -m tiedkernels info
	touch $@

install: $(STAMP)

# The main job: a byte-level BPE tokenizer and a GPT-2 (transformers) trained stock and patched
# (mk/hf.mk installs transformers). `python -m tiedkernels demo` is the same without transformers.
demo: install hf-deps
	$(BIN)/python -m tiedkernels.hf.demo

# The benchmark cases run once each (no timing) so they never rot; `make bench` times them.
test-core: install
	$(BIN)/python -m pytest tests benchmarks -q --benchmark-disable $(PYTEST_FILES)

-include mk/*.mk

test: test-core $(EXTRA_TESTS)

bench: install
	$(BIN)/python -m pytest benchmarks -q --benchmark-only

clean:
	rm -rf build dist *.egg-info tiedkernels/*.so
