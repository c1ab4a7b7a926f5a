# DeepSpeed and TRL (requirements/stacks.txt) go into the main venv behind a stamp, before
# test-core: tests/test_hf_trl.py and tests/test_hf_deepspeed.py skip themselves without them.
# The install must leave torch and transformers as they are; the check after it fails otherwise.
STACKS_STAMP := $(VENV)/.tiedkernels-stacks-installed

.PHONY: stacks-deps

$(STACKS_STAMP): $(STAMP) requirements/stacks.txt | hf-deps
	$(BIN)/python -c "import torch, transformers; print(torch.__version__, transformers.__version__)" > $@.before
	DS_BUILD_OPS=0 $(BIN)/python -m pip install -r requirements/stacks.txt
	$(BIN)/python -c "import torch, transformers; print(torch.__version__, transformers.__version__)" > $@.after
	cmp $@.before $@.after || { echo "requirements/stacks.txt changed torch or transformers in $(VENV)"; exit 1; }
	rm -f $@.before $@.after
	touch $@

stacks-deps: $(STACKS_STAMP)

test-core: stacks-deps
