# The one-shot GPU check (benchmarks/gpu_check.py), for a machine with an NVIDIA GPU and no
# network:
#   make gpu-check OUT=dir             preflight (driver, nvcc against torch's CUDA, ninja, setuptools,
#                                      compute-sanitizer), build for this GPU's architecture only,
#                                      tests/test_cuda.py per backend (triton even when the build
#                                      fails), benchmarks/test_bench_gpu.py, compute-sanitizer memcheck;
#                                      dir/gpu_check.json + dir/RESULTS.md, results streamed under dir/logs
#   make gpu-check WHEELS=dir ...      first install the wheels of requirements/gpu-check.txt found in
#                                      dir (no index, into build/gpu-check-site: on PYTHONPATH, its bin/
#                                      on PATH for every step)
#   make gpu-check GPU_BUDGET=s ...    the run's hard limit in seconds (default 540: 9 minutes)
#   make gpu-check DRY_RUN=1           the plumbing without a GPU: names each step it skips
# It uses the machine's own Python (GPU_PYTHON, default python3, the one that holds a CUDA torch),
# never this checkout's venv; the dry run uses the venv.  `make test` runs the dry run with a failing
# build and a hanging step injected (gpu-check-dry).
GPU_PYTHON ?= python3
GPU_BUDGET ?= 540
OUT ?= build/gpu-check
GPU_CHECK_DRY_OUT := build/gpu-check-dry

.PHONY: gpu-check gpu-check-dry

ifdef DRY_RUN
gpu-check: install
	$(BIN)/python -m benchmarks.gpu_check --dry-run --out $(OUT)
else
GPU_SITE := $(abspath build/gpu-check-site)
gpu-check:
	PYTHONUNBUFFERED=1 $(GPU_PYTHON) -m benchmarks.gpu_check --out $(OUT) --python $(GPU_PYTHON) \
	  --budget $(GPU_BUDGET) --site $(GPU_SITE) $(if $(WHEELS),--wheels $(WHEELS))
endif

# The dry run of `make test`, with a build that fails and a test step that hangs after 3 tests
# (cut at a 40 s budget): the exit status must say it failed, and the JSON must show that the
# Triton tests still ran after the failed build and kept the 3 results streamed before the hang,
# and that the steps after the hang still ran and reported.
gpu-check-dry: install
	rm -rf $(GPU_CHECK_DRY_OUT)
	$(BIN)/python -m benchmarks.gpu_check --dry-run --out $(GPU_CHECK_DRY_OUT) --inject-build-failure \
	  --inject-hang test-triton --step-budget test-triton=40; test $$? -eq 1
	$(BIN)/python -c "import json, sys; r = json.load(open('$(GPU_CHECK_DRY_OUT)/gpu_check.json')); \
	  s = {x['step']: x['status'] for x in r['steps']}; print('gpu-check dry run:', s); \
	  t = r['tests']['test-triton']; print('test-triton before the hang:', t['finished'], t['counts']); \
	  sys.exit(0 if r['dry_run'] and not r['ok'] and s['build'] == 'failed' and s['test-cuda'] == 'skipped' \
	    and s['test-triton'] == 'timeout' and t['finished'] == 3 and t['counts']['skipped'] == 3 \
	    and all(s[k] == 'ok' for k in ('env', 'preflight', 'test-collect', 'bench-collect', 'memcheck-case')) \
	    and all(s[k] == 'skipped' for k in ('bench', 'memcheck')) else 1)"
	grep -q '| test-triton | timeout |' $(GPU_CHECK_DRY_OUT)/RESULTS.md

EXTRA_TESTS += gpu-check-dry
