"""DeepSpeed ZeRO-2 and ZeRO-3 through transformers' Trainer, 2 CPU processes on loopback gloo.

ZeRO-3 keeps each parameter partitioned except inside the forward and backward of the module that owns
it; a fused loss computed after the output layer returned would read an empty partition (the failure of
other fused heads under ZeRO-3). A patched model computes its loss inside the output layer's call, so
ZeRO gathers the tied weight for it. Each rank (tests/_deepspeed_worker.py) trains a stock and a patched
model; here: the losses equal stock's and one process's, the fused op read the whole weight (and bias)
every time, the weights after training equal one process's, and the checkpoint (ZeRO-3: one tied copy)
loads into a stock and a patched model.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytest.importorskip("deepspeed")

import tiedkernels as tk  # noqa: E402
import tiedkernels.hf as tkhf  # noqa: E402
from _hf_testing import build  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _deepspeed_common import ARCHS, PER_RANK, STEPS, Rows, make_args, make_trainer  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
WORLD = 2
# fp32, three SGD steps: stock and fused losses differ by float32 rounding (~1e-7 relative per step).
TOL = dict(atol=1e-5, rtol=1e-5)


def _launch(stage, out):
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("PYTHONPATH", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--standalone",
           os.path.join(HERE, "_deepspeed_worker.py"), str(stage), str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert p.returncode == 0, f"ZeRO-{stage} ranks failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    return [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(WORLD)]


@pytest.fixture(scope="module", params=[2, 3], ids=["zero2", "zero3"])
def zero(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"zero{request.param}")
    return request.param, out, _launch(request.param, out)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """Stock, one process, no DeepSpeed, each step the two ranks' rows at once: losses and final weights."""
    out = tmp_path_factory.mktemp("one")
    ref = {}
    for arch in ARCHS:
        model = build(arch, dtype=torch.float32).train()
        tr = make_trainer(model, make_args(str(out / arch), batch=PER_RANK * WORLD))
        tr.train()
        ref[arch] = ([h["loss"] for h in tr.state.log_history if "loss" in h],
                     {k: v.detach().clone() for k, v in model.state_dict().items()})
    return ref


def _close(got, want, what):
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), **TOL, msg=what)


@pytest.mark.parametrize("arch", ARCHS)
def test_trains_like_stock_and_one_process(zero, one_process, arch):
    stage, _, ranks = zero
    ref_losses, _ = one_process[arch]
    for r, res in enumerate(ranks):
        stock, patched = res[f"{arch}-stock"], res[f"{arch}-patched"]
        for run in (stock, patched):
            assert run["engine"] == "DeepSpeedEngine" and run["zero_stage"] == stage and run["world"] == WORLD, run
            assert run["tied"], run
            assert len(run["losses"]) == STEPS
        if stage == 3:  # partitioned outside forward and backward: nothing of W is held whole here
            assert stock["local_weight_numel"] == patched["local_weight_numel"] == 0
        assert patched["patched"]
        _close(patched["losses"], stock["losses"], f"rank {r}: patched against stock")
        if arch != "bert":
            # BertForMaskedLM takes **kwargs, so Trainer assumes it divides by num_items_in_batch and
            # multiplies its (plain mean) loss by the number of processes: stock and patched alike log
            # twice one process's loss there. Its weights are compared to one process's below.
            _close(patched["losses"], ref_losses, f"rank {r}: 2 ranks against one process")
        # The fused loss ran once per step, and each time read the whole weight (a partition is [0]).
        model = build(arch, dtype=torch.float32)
        v, d = model.get_input_embeddings().weight.shape
        calls = patched["fused_calls"]
        assert len(calls) == STEPS, calls
        for c in calls:
            assert c["shape"] == [v, d] and c["status"] in (None, "AVAILABLE"), c
            if arch == "bert":
                assert c["bias"] == [v], c
        assert stock["fused_calls"] == []


def _saved(path):
    from safetensors import safe_open

    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("arch", ARCHS)
def test_checkpoint_one_tied_copy_loads_into_stock_and_patched(zero, one_process, arch):
    stage, out, _ = zero
    _, ref_state = one_process[arch]
    stock_cls = type(build(arch))
    saved = {kind: _saved(out / f"{arch}-{kind}" / "final") for kind in ("stock", "patched")}
    assert set(saved["patched"]) == set(saved["stock"])
    emb = {"llama": "model.embed_tokens.weight", "bert": "bert.embeddings.word_embeddings.weight"}[arch]
    head = {"llama": "lm_head.weight", "bert": "cls.predictions.decoder.weight"}[arch]
    if stage == 3:  # the consolidated state dict: one tied copy
        assert emb in saved["patched"] and head not in saved["patched"], sorted(saved["patched"])
    else:  # Trainer's ZeRO-2 save writes both names, stock and patched alike: the same values
        assert emb in saved["patched"] and head in saved["patched"], sorted(saved["patched"])
        torch.testing.assert_close(saved["patched"][head], saved["patched"][emb], atol=0, rtol=0)
    for k, t in saved["patched"].items():
        torch.testing.assert_close(t, saved["stock"][k], **TOL, msg=k)
        torch.testing.assert_close(t, ref_state[k], **TOL, msg=f"{k} against one process")
    tied = saved["patched"][emb]
    # into a stock model and into a patched one: the same weights, the same loss
    stock = stock_cls.from_pretrained(str(out / f"{arch}-patched" / "final")).float().eval()
    assert stock.get_output_embeddings().weight is stock.get_input_embeddings().weight
    patched = tkhf.patch(stock_cls.from_pretrained(str(out / f"{arch}-patched" / "final")).float().eval())
    x = Rows()[0]["input_ids"][None]
    with torch.no_grad():
        want = stock(input_ids=x, labels=x).loss
        got = patched(input_ids=x, labels=x).loss
    torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(patched.get_input_embeddings().weight, tied, atol=0, rtol=0)


def test_an_ungathered_partition_is_a_clear_error():
    """The fused op reading a ZeRO-3 partition outside its module's call is refused by name (never a
    loss from an empty weight)."""

    class Status:
        name = "NOT_AVAILABLE"

    w = torch.nn.Parameter(torch.empty(0))
    w.ds_shape, w.ds_status = torch.Size([10, 4]), Status()
    with pytest.raises(tk.TiedKernelsError, match="ZeRO-3 partition .*full shape \\(10, 4\\).* not gathered"):
        tk.linear_cross_entropy(torch.randn(3, 4), w, torch.tensor([1, 2, 3]))
    with pytest.raises(tk.TiedKernelsError, match="ZeRO-3 partition"):
        tk.logits(torch.randn(3, 4), w)
