# GPU backends.
# * Triton: requirements/triton.txt goes into the main venv before the tests (tests/test_triton.py
#   runs the kernels on CPU tensors through TRITON_INTERPRET=1).
# * CUDA: `make cuda-check` proves that csrc/cuda compiles for sm_80 and sm_90 on a machine
#   without a GPU.  It installs the CUDA build of torch into its own venv, builds a copy of the
#   sources there (never in place: the main venv's extension stays as it is), then checks that
#   the installed package imports and that `python -m tiedkernels info` reports the CUDA kernels
#   compiled (and, on a machine without a GPU, that none is present).  It fails on a register
#   spill and writes every kernel's registers / stack / shared memory per architecture to
#   $(CUDA_TABLE), the table `python -m tiedkernels gpu-report` reads.  `make test` runs it.
VENV_CUDA ?= .venv-cuda
CUDA_BIN := $(abspath $(VENV_CUDA))/bin
CUDA_TORCH_VERSION ?= 2.14.1
CUDA_ARCHS ?= 8.0;9.0
CUDA_BUILD_DIR ?= build/cuda-check
CUDA_TABLE := tiedkernels/data/cuda_resources.json
CUDA_TORCH_STAMP := $(VENV_CUDA)/.tiedkernels-torch-installed
TRITON_STAMP := $(VENV)/.tiedkernels-triton-installed

.PHONY: triton-deps cuda-check test-triton

$(TRITON_STAMP): $(STAMP) requirements/triton.txt
	$(BIN)/python -m pip install -r requirements/triton.txt
	touch $@

triton-deps: $(TRITON_STAMP)

# test-core must see Triton in the main venv.
test-core: triton-deps

# tests/test_triton.py in a process of its own, with the interpreter on from the start: in the
# full run another test module may import Triton first (transformers/peft do), after which the
# interpreter cannot be switched on and the file skips itself there.  tests/test_grad_filter_triton.py
# runs only here (it skips itself unless TRITON_INTERPRET=1 was set before the process started).
test-triton: triton-deps
	TRITON_INTERPRET=1 $(BIN)/python -m pytest tests/test_triton.py tests/test_grad_filter_triton.py -q $(PYTEST_TESTS)

$(CUDA_TORCH_STAMP):
	test -x $(CUDA_BIN)/python || $(PYTHON) -m venv $(VENV_CUDA)
	$(CUDA_BIN)/python -m pip install --upgrade "pip>=23" setuptools wheel ninja numpy
	$(CUDA_BIN)/python -m pip install "torch==$(CUDA_TORCH_VERSION)"
	$(CUDA_BIN)/python -c "import torch; assert torch.version.cuda, 'not a CUDA build of torch'; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"
	touch $@

# $(call cuda_compile_check,VENV_BIN,ARCHS,BUILD_DIR,TABLE): build a copy of the sources with the CUDA
# kernels for ARCHS (e.g. 8.0;9.0) with that venv's torch, installed into BUILD_DIR/site (not into the
# venv, which other targets may use with the checkout); fail on a missing architecture or a spill, write
# the resource table to TABLE (none if empty), then check what the built package reports.
define cuda_compile_check
	rm -rf $(3)
	mkdir -p $(3)
	cp -r setup.py csrc tiedkernels $(3)/
	find $(3) \( -name '*.so' -o -name '__pycache__' \) -prune -exec rm -rf {} +
	@echo "cuda-check: compiling csrc/cuda for $(2) with $$($(1)/python -c 'import torch; print("torch", torch.__version__)') (about 90 s per architecture on two cores)"
	cd $(3) && start=$$(date +%s) && \
	  if TIEDKERNELS_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$(2)" MAX_JOBS=$${MAX_JOBS:-2} \
	     NVCC_APPEND_FLAGS="$$NVCC_APPEND_FLAGS -Xptxas -v" \
	     $(1)/python -m pip install -v --no-build-isolation --no-deps --target site . > build.log 2>&1; \
	  then echo "cuda-check: compiled in $$(( $$(date +%s) - start )) s"; \
	  else tail -n 80 build.log; echo "cuda-check: the CUDA sources do not compile"; exit 1; fi
	for a in $(subst ;, ,$(2)); do c=$$(echo $$a | tr -d .); \
	  grep -q "arch=compute_$${c},code=sm_$${c}" $(3)/build.log || { echo "cuda-check: no sm_$${c} code built"; exit 1; }; done
	@# Resources of every kernel (ptxas -v in the log; cuobjdump on the built .so): fail on a spill,
	@# and regenerate the table that `python -m tiedkernels gpu-report` reads (git diff shows a change).
	if grep -E "[1-9][0-9]* bytes spill (stores|loads)" $(3)/build.log; then \
	  echo "cuda-check: ptxas reports register spills (above)"; exit 1; fi
	$(if $(4),cd / && PYTHONPATH=$(abspath $(3))/site $(1)/python -m tiedkernels.gpu_report cuda-table --root $(abspath $(3)) \
	  --ptxas-log $(abspath $(3))/build.log --out $(CURDIR)/$(4))
	cd / && PYTHONPATH=$(abspath $(3))/site $(1)/python -W error::RuntimeWarning -c "import tiedkernels, torch; from tiedkernels import _ext; \
	  info = _ext.build_info(); assert info is not None and info['cuda'], info; print('imported', tiedkernels.__file__); \
	  assert tiedkernels.__file__.startswith('$(abspath $(3))/site/'), tiedkernels.__file__"
	cd / && PYTHONPATH=$(abspath $(3))/site $(1)/python -m tiedkernels info | tee $(abspath $(3))/info.txt
	grep -q "CUDA kernels yes" $(3)/info.txt || { echo "cuda-check: info does not report the CUDA kernels"; exit 1; }
	if [ -e /dev/nvidia0 ]; then echo "cuda-check: a GPU is present; not checking the no-GPU report"; \
	  else grep -q "GPU: none present" $(3)/info.txt && \
	       grep -q "cuda    off: no CUDA device is available" $(3)/info.txt || \
	       { echo "cuda-check: info should say that no GPU is present"; exit 1; }; fi
	@echo "cuda-check: OK ($(2))"
endef

cuda-check: $(CUDA_TORCH_STAMP)
	$(call cuda_compile_check,$(CUDA_BIN),$(CUDA_ARCHS),$(CUDA_BUILD_DIR),$(CUDA_TABLE))

EXTRA_TESTS += test-triton cuda-check
