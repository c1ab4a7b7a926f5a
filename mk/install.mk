# Installing like a library (README, install section): tests/test_install.py's install checks, in
# throwaway venvs under build/install-tests on a copy of this checkout's files: `pip install .` with
# torch installed (the first import compiles the kernels, two imports at once build once) and without it,
# a wheel and an sdist from `python -m build` checked by `twine check`, each installed in a fresh venv,
# `--no-build-isolation` and `-e`, and the torch-backend fallback when the kernels cannot be built.
# torch comes from pip's cache (or the local wheel pip is configured with) at $(TORCH_VERSION).
.PHONY: test-install test-install-ci dist

test-install: install
	TIEDKERNELS_INSTALL_TESTS=1 TORCH_VERSION=$(TORCH_VERSION) $(BIN)/python -m pytest tests/test_install.py -q -p no:cacheprovider

# What `make test` runs: every install check but the Makefile's own install recipe in a copy, which the
# run itself has just executed on this clone (the venv, torch, the editable build with its test extra).
test-install-ci: install
	TIEDKERNELS_INSTALL_TESTS=1 TORCH_VERSION=$(TORCH_VERSION) $(BIN)/python -m pytest tests/test_install.py -q \
	  -p no:cacheprovider -k "not make_install_is_an_editable_build"

EXTRA_TESTS += test-install-ci

# The wheel and the sdist, into dist/ (pure Python; the kernels compile on first import).
dist:
	rm -rf build/dist-tools dist
	$(PYTHON) -m venv build/dist-tools
	build/dist-tools/bin/python -m pip install -r requirements/dist.txt
	build/dist-tools/bin/python -m build --outdir dist .
	build/dist-tools/bin/python -m twine check --strict dist/*

