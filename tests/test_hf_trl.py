"""TRL's SFTTrainer on a patched model: what it trains with and what it logs.

TRL 1.16's SFTTrainer installs its own chunked LM head (``add_fused_lm_head``: per-token log-probs,
entropy and top-1 hits without the full logits) and calls the model with ``fused_lm_head=True``;
its loss, ``mean_token_accuracy`` and ``entropy`` come from that pass, which wraps ``model.forward``
(the patched one included) and projects through ``lm_head`` itself: with SFTTrainer's default loss
the tiedkernels fused op is not the one that runs. On a patched model the logged figures must be
what the stock model logs, and the model must stay patched and tied.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

import tiedkernels.hf as tkhf  # noqa: E402
from tiedkernels.hf._testing import build  # noqa: E402

VOCAB = 101


def tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def dataset():
    # A few short sequences repeated, so that a few steps at a high learning rate make some top-1
    # predictions right (mean_token_accuracy above 0).
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, VOCAB, (12,), generator=g).tolist() for _ in range(2)] * 4
    return datasets.Dataset.from_dict({"input_ids": rows})


def run(model, out, peft_config=None):
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=str(out), per_device_train_batch_size=2, max_steps=6, learning_rate=5e-2,
                     logging_steps=1, report_to=[], use_cpu=True, seed=0, save_strategy="no",
                     dataloader_num_workers=0, bf16=False)
    tr = SFTTrainer(model=model, args=args, train_dataset=dataset(), processing_class=tokenizer(),
                    peft_config=peft_config)
    tr.train()
    run.trainer = tr
    return [{k: h[k] for k in ("loss", "mean_token_accuracy", "entropy")} for h in tr.state.log_history if "loss" in h]


def test_sft_trainer_logs_what_stock_logs(tmp_path):
    ref = run(build("llama", vocab=VOCAB, dtype=torch.float32).train(), tmp_path / "stock")
    model = tkhf.patch(build("llama", vocab=VOCAB, dtype=torch.float32).train())
    got = run(model, tmp_path / "patched")
    assert len(got) == len(ref) == 6
    for key in ("loss", "mean_token_accuracy", "entropy"):
        torch.testing.assert_close(torch.tensor([h[key] for h in got]), torch.tensor([h[key] for h in ref]),
                                   atol=1e-5, rtol=1e-5, msg=key)
    assert max(h["mean_token_accuracy"] for h in ref) > 0
    assert tkhf.is_patched(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_sft_trainer_with_lora_logs_what_stock_logs(tmp_path):
    """SFTTrainer with a PEFT LoRA config (attention projections): same logged loss, accuracy and entropy
    as the stock model under the same config; the base model stays patched and tied under the adapter,
    and only the adapter trained."""
    peft = pytest.importorskip("peft")

    def lora():
        return peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                               task_type="CAUSAL_LM")

    ref = run(build("llama", vocab=VOCAB, dtype=torch.float32).train(), tmp_path / "stock", lora())
    base = tkhf.patch(build("llama", vocab=VOCAB, dtype=torch.float32).train())
    w0 = base.model.embed_tokens.weight.detach().clone()
    got = run(base, tmp_path / "patched", lora())
    trained = run.trainer.model
    assert len(got) == len(ref) == 6
    for key in ("loss", "mean_token_accuracy", "entropy"):
        torch.testing.assert_close(torch.tensor([h[key] for h in got]), torch.tensor([h[key] for h in ref]),
                                   atol=1e-5, rtol=1e-5, msg=key)
    assert ref[-1]["loss"] < ref[0]["loss"]
    inner = trained.get_base_model()
    assert tkhf.is_patched(inner)
    assert inner.lm_head.weight is inner.model.embed_tokens.weight
    torch.testing.assert_close(inner.model.embed_tokens.weight.detach(), w0, atol=0, rtol=0)  # frozen
    assert any("lora_" in n for n, p in trained.named_parameters() if p.requires_grad)
