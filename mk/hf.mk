# Hugging Face integration: requirements/hf.txt goes into the main venv (test-core runs
# tests/test_hf*.py there, on transformers v5); a second venv runs the same tests on the last
# transformers v4 release. `make test` runs both (hf-deps before test-core, test-hf4 after).
VENV_HF4 ?= .venv-hf4
HF4_BIN := $(VENV_HF4)/bin
HF_STAMP := $(VENV)/.tiedkernels-hf-installed
HF4_STAMP := $(VENV_HF4)/.tiedkernels-installed

.PHONY: hf-deps install-hf4 test-hf4 test-hf hf-demo hf-memory

$(HF_STAMP): $(STAMP) requirements/hf.txt
	$(BIN)/python -m pip install -r requirements/hf.txt
	touch $@

hf-deps: $(HF_STAMP)

# test-core must see transformers in the main venv.
test-core: hf-deps

# The v4 line: same python, same torch, the same requirements/test.txt, transformers 4.51.3.
# The package is this checkout, put on the venv's path by a .pth file (what an editable install
# does), with the extension the main install built in place: no second compile, and the shared
# in-place .so is never rewritten while other processes have it loaded.
$(HF4_STAMP): $(STAMP) requirements/hf-v4.txt requirements/test.txt
	test -x $(HF4_BIN)/python || $(PYTHON) -m venv $(VENV_HF4)
	$(HF4_BIN)/python -m pip install --upgrade "pip>=23" setuptools wheel
	$(HF4_BIN)/python -m pip install "torch==$(TORCH_VERSION)"
	$(HF4_BIN)/python -m pip install -r requirements/test.txt -r requirements/hf-v4.txt
	$(HF4_BIN)/python -c "import site, sys; open(site.getsitepackages()[0] + '/tiedkernels-checkout.pth', 'w').write(sys.argv[1] + '\\n')" "$(CURDIR)"
	cd / && $(CURDIR)/$(HF4_BIN)/python -c "import transformers, tiedkernels, tiedkernels.hf; from tiedkernels import _ext; \
	  assert _ext.build_info() is not None, _ext.error(); print('v4 line: transformers', transformers.__version__, 'tiedkernels from', tiedkernels.__file__)"
	touch $@

install-hf4: $(HF4_STAMP)

test-hf4: $(HF4_STAMP)
	$(HF4_BIN)/python -m pytest tests/test_hf*.py -q $(PYTEST_FILES)

test-hf: hf-deps
	$(BIN)/python -m pytest tests/test_hf*.py -q $(PYTEST_FILES)

hf-demo: hf-deps
	$(BIN)/python -m tiedkernels.hf.demo

hf-memory: hf-deps
	$(BIN)/python -m tiedkernels.hf.demo --memory

EXTRA_TESTS += test-hf4
