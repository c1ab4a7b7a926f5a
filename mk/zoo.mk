# The whole transformers model zoo: tests/test_hf_zoo.py with TIEDKERNELS_ZOO=all patches every
# (model type, class) of the causal-LM, masked-LM and seq2seq auto mappings against its stock twin,
# on transformers v5 (.venv) and on the v4 line (.venv-hf4). `make test` runs a fixed sample of it
# inside test-core and test-hf4; this target runs all of it (README, Hugging Face section: the time).
.PHONY: test-zoo

test-zoo: hf-deps $(HF4_STAMP)
	TIEDKERNELS_ZOO=all $(BIN)/python -m pytest tests/test_hf_zoo.py -q -rs -k test_zoo
	TIEDKERNELS_ZOO=all $(HF4_BIN)/python -m pytest tests/test_hf_zoo.py -q -rs -k test_zoo

# Each pair: patch, a training step, logits, save/load, meta-device init, a separately stored head,
# generate, eval mode with labels (tests/_hf_testing.py zoo_check). Not in EXTRA_TESTS for its time.
# Measured on 2 busy cores: about 19 minutes on v5 (5.25, 284 pairs), 3 on v4 (4.51.3, 177 pairs).
