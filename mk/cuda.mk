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
# interpreter cannot be switched on and the file skips itself there.
test-triton: triton-deps
	TRITON_INTERPRET=1 $(BIN)/python -m pytest tests/test_triton.py -q

$(CUDA_TORCH_STAMP):
	test -x $(CUDA_BIN)/python || $(PYTHON) -m venv $(VENV_CUDA)
	$(CUDA_BIN)/python -m pip install --upgrade "pip>=23" setuptools wheel ninja numpy
	$(CUDA_BIN)/python -m pip install "torch==$(CUDA_TORCH_VERSION)"
	$(CUDA_BIN)/python -c "import torch; assert torch.version.cuda, 'not a CUDA build of torch'; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"
	touch $@

cuda-check: $(CUDA_TORCH_STAMP)
	rm -rf $(CUDA_BUILD_DIR)
	mkdir -p $(CUDA_BUILD_DIR)
	cp -r setup.py csrc tiedkernels $(CUDA_BUILD_DIR)/
	find $(CUDA_BUILD_DIR) \( -name '*.so' -o -name '__pycache__' \) -prune -exec rm -rf {} +
	@echo "cuda-check: compiling csrc/cuda for $(CUDA_ARCHS) (about 90 s per architecture on two cores)"
	cd $(CUDA_BUILD_DIR) && start=$$(date +%s) && \
	  if TIEDKERNELS_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$(CUDA_ARCHS)" MAX_JOBS=$${MAX_JOBS:-2} \
	     NVCC_APPEND_FLAGS="$$NVCC_APPEND_FLAGS -Xptxas -v" \
	     $(CUDA_BIN)/python -m pip install -v --no-build-isolation --no-deps . > build.log 2>&1; \
	  then echo "cuda-check: compiled in $$(( $$(date +%s) - start )) s"; \
	  else tail -n 80 build.log; echo "cuda-check: the CUDA sources do not compile"; exit 1; fi
	grep -q "arch=compute_80,code=sm_80" $(CUDA_BUILD_DIR)/build.log || { echo "cuda-check: no sm_80 code built"; exit 1; }
	grep -q "arch=compute_90,code=sm_90" $(CUDA_BUILD_DIR)/build.log || { echo "cuda-check: no sm_90 code built"; exit 1; }
	@# Resources of every kernel (ptxas -v in the log; cuobjdump on the built .so): fail on a spill,
	@# and regenerate the table that `python -m tiedkernels gpu-report` reads (git diff shows a change).
	if grep -E "[1-9][0-9]* bytes spill (stores|loads)" $(CUDA_BUILD_DIR)/build.log; then \
	  echo "cuda-check: ptxas reports register spills (above)"; exit 1; fi
	cd / && $(CUDA_BIN)/python -m tiedkernels.gpu_report cuda-table --root $(abspath $(CUDA_BUILD_DIR)) \
	  --ptxas-log $(abspath $(CUDA_BUILD_DIR))/build.log --out $(CURDIR)/$(CUDA_TABLE)
	cd / && $(CUDA_BIN)/python -W error::RuntimeWarning -c "import tiedkernels, torch; from tiedkernels import _ext; \
	  info = _ext.build_info(); assert info is not None and info['cuda'], info; print('imported', tiedkernels.__file__)"
	cd / && $(CUDA_BIN)/python -m tiedkernels info | tee $(abspath $(CUDA_BUILD_DIR))/info.txt
	grep -q "CUDA kernels yes" $(CUDA_BUILD_DIR)/info.txt || { echo "cuda-check: info does not report the CUDA kernels"; exit 1; }
	if [ -e /dev/nvidia0 ]; then echo "cuda-check: a GPU is present; not checking the no-GPU report"; \
	  else grep -q "GPU: none present" $(CUDA_BUILD_DIR)/info.txt && \
	       grep -q "cuda    off: no CUDA device is available" $(CUDA_BUILD_DIR)/info.txt || \
	       { echo "cuda-check: info should say that no GPU is present"; exit 1; }; fi
	@echo "cuda-check: OK"

EXTRA_TESTS += test-triton cuda-check
