"""One rank of tests/test_hf_deepspeed.py: Trainer + DeepSpeed ZeRO-``stage`` on the CPU accelerator (gloo).

Launched by ``python -m torch.distributed.run --nproc_per_node 2 tests/_deepspeed_worker.py STAGE OUT``
with ``DS_ACCELERATOR=cpu``. For each architecture it trains a stock and a patched model with the
same data and config, and writes ``OUT/rank<r>.json``: the logged losses, what the fused op saw of the
tied weight each time it ran, and the shapes of the ZeRO partitions; rank 0 also saves each model
with ``save_model`` (ZeRO-3: consolidated on save) for the test to load back.
"""

import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _deepspeed_common import ARCHS, make_args, make_trainer  # noqa: E402

import tiedkernels.functional as tkf  # noqa: E402
import tiedkernels.hf as tkhf  # noqa: E402
from _hf_testing import build  # noqa: E402


def main(stage, out):
    seen = []  # (full shape of the weight the fused op read, its ZeRO status) per call
    real = tkf.linear_cross_entropy

    def spy(hidden, weight, labels, **kw):
        status = getattr(weight, "ds_status", None)
        seen.append({"shape": list(weight.shape), "status": getattr(status, "name", None),
                     "bias": None if kw.get("bias") is None else list(kw["bias"].shape)})
        return real(hidden, weight, labels, **kw)

    tkf.linear_cross_entropy = spy
    ds = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
          "gradient_clipping": "auto", "zero_allow_untested_optimizer": True,
          # every parameter partitioned (the default keeps small ones whole), and the whole model on save
          "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0,
                                "stage3_gather_16bit_weights_on_model_save": True}}
    res = {"world": dist.get_world_size() if dist.is_initialized() else 1}
    for arch in ARCHS:
        for kind in ("stock", "patched"):
            model = build(arch, dtype=torch.float32).train()
            if kind == "patched":
                tkhf.patch(model)
            n0 = len(seen)
            tr = make_trainer(model, make_args(os.path.join(out, f"{arch}-{kind}"), deepspeed=ds))
            tr.train()
            engine = tr.model_wrapped
            w = model.get_input_embeddings().weight
            res[f"{arch}-{kind}"] = {
                "losses": [h["loss"] for h in tr.state.log_history if "loss" in h],
                "fused_calls": seen[n0:],
                "engine": type(engine).__name__,
                "zero_stage": engine.zero_optimization_stage() if hasattr(engine, "zero_optimization_stage") else None,
                "local_weight_numel": w.numel(),
                "tied": model.get_output_embeddings().weight is w,
                "patched": tkhf.is_patched(model),
                "world": dist.get_world_size(),
            }
            tr.save_model(os.path.join(out, f"{arch}-{kind}", "final"))
            dist.barrier()
    with open(os.path.join(out, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump(res, f)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
