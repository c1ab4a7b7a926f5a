# The low end of the supported versions (README, install section): torch 2.11 and Triton 3.6 on Python
# 3.12, the software of the GPU machine this project meets first. Its own venv runs the core suite (the
# cpu, torch and Triton-interpreter backends). The package is this checkout, put on the venv's path by a
# .pth file (what an editable install does); the checkout's in-place extension is built for the main
# venv's Python, so here the C++ kernels compile on first import against torch 2.11 (tiedkernels/_ext.py)
# into $(LOW_CACHE): the path of a user whose wheel was built without torch.
#
# torch 2.11 on PyPI is a CUDA 13.0 build (about 3.5 GB with its nvidia wheels, 4.7 GB installed); it
# runs on the CPU, and with no GPU present the first-use build compiles the CPU kernels only.
VENV_LOW ?= .venv-low
# The first Python 3.12 that runs: on PATH, else a pyenv install (pyenv's shim fails when 3.12 is not selected).
LOW_PYTHON ?= $(shell for p in python3.12 $$HOME/.pyenv/versions/3.12*/bin/python3.12; do \
  "$$p" -c "" >/dev/null 2>&1 && { echo "$$p"; break; }; done)
LOW_TORCH_VERSION ?= 2.11.0
LOW_TRITON_VERSION ?= 3.6.0
LOW_BIN := $(abspath $(VENV_LOW))/bin
LOW_STAMP := $(VENV_LOW)/.tiedkernels-installed
LOW_CACHE := $(abspath build/jit-low)
LOW_TESTS := tests/test_ops.py tests/test_errors.py tests/test_tie.py tests/test_backends.py

.PHONY: install-low test-low cuda-check-low

$(LOW_STAMP): requirements/test.txt
	@test -n "$(LOW_PYTHON)" || { echo "lowend: no Python 3.12 found (set LOW_PYTHON=...)"; exit 1; }
	test -x $(LOW_BIN)/python || $(LOW_PYTHON) -m venv $(VENV_LOW)
	$(LOW_BIN)/python -m pip install --upgrade "pip>=23" ninja
	@echo "lowend: torch $(LOW_TORCH_VERSION) and Triton $(LOW_TRITON_VERSION) (about 3.5 GB on a cold pip cache)"
	$(LOW_BIN)/python -m pip install "torch==$(LOW_TORCH_VERSION)" "triton==$(LOW_TRITON_VERSION)" -r requirements/test.txt \
	  "numpy<2.4"  # Triton 3.6's interpreter calls int() on 1-element arrays, an error from NumPy 2.4 on
	$(LOW_BIN)/python -c "import site, sys; open(site.getsitepackages()[0] + '/tiedkernels-checkout.pth', 'w').write(sys.argv[1] + '\\n')" "$(CURDIR)"
	touch $@

install-low: $(LOW_STAMP)

# The first import builds the kernels (or finds them cached) against this very torch; `info` must place
# every version inside the supported range. Then the core suite, and the Triton tests in a process of
# their own with the interpreter on from the start (as mk/cuda.mk's test-triton). The core suite runs with
# TIEDKERNELS_TEST_NAN_EMPTY=1 (tests/conftest.py): every empty allocation, the kernels' own included, is
# filled with NaN, so a result that reads memory nobody wrote fails. The CPU kernels take no other path in
# deterministic mode; the Triton run stays out of it (its fp32 embedding backward does). The core suite
# leaves out the `slow` cases (64-bit offsets: V·D and N·V beyond 2^31, the same kernel source as the main
# run's): the fill would write their 8.6 GB buffers whole, which they leave untouched. `make test` runs them.
# Last, the GEMMs with an fp32 output from bf16/fp16 operands that both GPU backends' dW runs: this torch
# (a CUDA build) must register their CUDA kernels and accept those dtypes (tests/test_lowend_gemm_dtypes.py;
# TIEDKERNELS_EXPECT_CUDA_TORCH=1 turns its skip on a CPU build of torch into a failure).
test-low: $(LOW_STAMP)
	cd / && TIEDKERNELS_CACHE=$(LOW_CACHE) $(LOW_BIN)/python -W error::RuntimeWarning -c "import torch, tiedkernels; \
	  from tiedkernels import _ext; info = _ext.build_info(); assert info is not None, _ext.error(); \
	  assert info['torch'] == torch.__version__, (info, torch.__version__); \
	  print('low end: tiedkernels from', tiedkernels.__file__, 'kernels', _ext.origin())"
	cd / && TIEDKERNELS_CACHE=$(LOW_CACHE) $(LOW_BIN)/python -m tiedkernels info | tee $(LOW_CACHE)/info$(notdir $(VENV_LOW)).txt
	grep -q "^python 3.*(supported" $(LOW_CACHE)/info$(notdir $(VENV_LOW)).txt
	grep -q "^torch $(LOW_TORCH_VERSION).*(supported" $(LOW_CACHE)/info$(notdir $(VENV_LOW)).txt
	grep -q "^triton $(LOW_TRITON_VERSION) (supported" $(LOW_CACHE)/info$(notdir $(VENV_LOW)).txt
	grep -q "compiled extension: CPU kernels yes" $(LOW_CACHE)/info$(notdir $(VENV_LOW)).txt
	TIEDKERNELS_CACHE=$(LOW_CACHE) TIEDKERNELS_TEST_NAN_EMPTY=1 $(LOW_BIN)/python -m pytest $(LOW_TESTS) -q $(PYTEST_FILES) \
	  -p no:cacheprovider -m "not slow"
	TIEDKERNELS_CACHE=$(LOW_CACHE) TRITON_INTERPRET=1 $(LOW_BIN)/python -m pytest tests/test_triton.py -q -p no:cacheprovider $(PYTEST_TESTS)
	TIEDKERNELS_CACHE=$(LOW_CACHE) TIEDKERNELS_EXPECT_CUDA_TORCH=1 $(LOW_BIN)/python -m pytest tests/test_lowend_gemm_dtypes.py -q \
	  -p no:cacheprovider

# The CUDA compile check (mk/cuda.mk) against the low end's torch, whose wheel is the CUDA 13.0 build:
# the kernels must compile against its headers too. One architecture, sm_90 (the GPU this project is
# lent first): the headers are what differs here, and each architecture costs about 90 s. The build is
# installed into build/cuda-check-low/site, so test-low's venv keeps testing the checkout.
cuda-check-low: $(LOW_STAMP)
	$(LOW_BIN)/python -m pip install -q "setuptools>=77" wheel
	$(call cuda_compile_check,$(LOW_BIN),9.0,build/cuda-check-low,)

EXTRA_TESTS += test-low cuda-check-low
