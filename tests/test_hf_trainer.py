"""A patched model in transformers' Trainer: same losses as stock, gradient accumulation included."""

import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from transformers import Trainer, TrainingArguments  # noqa: E402

import tiedkernels.hf as tkhf  # noqa: E402
from _hf_testing import build  # noqa: E402


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=8, t=12, v=96):
        self.x = torch.randint(3, v, (n, t), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


def test_patched_forward_keeps_the_stock_signature():
    stock = build("llama")
    model = tkhf.patch(build("llama"))
    assert inspect.signature(model.forward) == inspect.signature(stock.forward)
    assert model.forward.__doc__ == stock.forward.__doc__


def run(model, tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, per_device_eval_batch_size=4,
                             gradient_accumulation_steps=2, max_steps=3, learning_rate=1e-2, logging_steps=1,
                             report_to=[], use_cpu=True, seed=0, save_strategy="no", dataloader_num_workers=0)
    tr = Trainer(model=model, args=args, train_dataset=Tokens(), eval_dataset=Tokens(n=4))
    tr.train()
    losses = [h["loss"] for h in tr.state.log_history if "loss" in h]
    return losses, tr.evaluate()["eval_loss"]


def test_trainer_losses_equal_stock(tmp_path):
    # float32 both ways; the fused and the stock losses differ by float32 rounding only (~1e-7
    # relative per step, three optimizer steps): 1e-5.
    ref_losses, ref_eval = run(build("llama", dtype=torch.float32).train(), tmp_path / "stock")
    model = tkhf.patch(build("llama", dtype=torch.float32).train())
    losses, ev = run(model, tmp_path / "patched")
    assert len(losses) == 3
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.tensor(ev), torch.tensor(ref_eval), atol=1e-5, rtol=1e-5)
    assert tkhf.is_patched(model)
