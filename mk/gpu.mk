# The one-shot GPU check (benchmarks/gpu_check.py), for a machine with an NVIDIA GPU and no
# network:
#   make gpu-check OUT=dir             build for this GPU's architecture only, tests/test_cuda.py
#                                      (both GPU backends), benchmarks/test_bench_gpu.py,
#                                      compute-sanitizer memcheck; dir/gpu_check.json + dir/RESULTS.md
#   make gpu-check WHEELS=dir ...      first install the wheels of requirements/gpu-check.txt
#                                      found in dir (no index, into build/gpu-check-site)
#   make gpu-check DRY_RUN=1           the plumbing without a GPU: names each step it skips
# It uses the machine's own Python (GPU_PYTHON, default python3, the one that holds a CUDA torch),
# never this checkout's venv; the dry run uses the venv.  `make test` runs the dry run.
GPU_PYTHON ?= python3
OUT ?= build/gpu-check
GPU_CHECK_DRY_OUT := build/gpu-check-dry

.PHONY: gpu-check gpu-check-dry

ifdef DRY_RUN
gpu-check: install
	$(BIN)/python -m benchmarks.gpu_check --dry-run --out $(OUT)
else
GPU_SITE := $(abspath build/gpu-check-site)
gpu-check:
	$(if $(WHEELS),$(GPU_PYTHON) -m pip install -q --no-index --no-deps --no-compile --upgrade --target $(GPU_SITE) $(WHEELS)/*.whl)
	$(if $(WHEELS),PYTHONPATH=$(GPU_SITE)$${PYTHONPATH:+:$$PYTHONPATH}) PYTHONUNBUFFERED=1 \
	  $(GPU_PYTHON) -m benchmarks.gpu_check --out $(OUT) --python $(GPU_PYTHON)
endif

# The dry run of `make test`: the plumbing runs here, then its outputs are checked.
gpu-check-dry: install
	rm -rf $(GPU_CHECK_DRY_OUT)
	$(BIN)/python -m benchmarks.gpu_check --dry-run --out $(GPU_CHECK_DRY_OUT)
	$(BIN)/python -c "import json, sys; r = json.load(open('$(GPU_CHECK_DRY_OUT)/gpu_check.json')); \
	  s = {x['step']: x['status'] for x in r['steps']}; print('gpu-check dry run:', s); \
	  sys.exit(0 if r['ok'] and r['dry_run'] and all(s[k] == 'skipped' for k in ('build', 'test', 'bench', 'memcheck')) else 1)"

EXTRA_TESTS += gpu-check-dry
