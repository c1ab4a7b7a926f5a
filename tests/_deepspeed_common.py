"""What tests/test_hf_deepspeed.py and its worker ranks share: the data, the Trainer config."""

import torch

# llama: no bias; bert: the head's bias is a parameter that ZeRO-3 partitions too.
ARCHS = ("llama", "bert")
STEPS = 3
PER_RANK = 2  # rows per rank and step; the one-process reference takes 2 ranks' worth at once


class Rows(torch.utils.data.Dataset):
    """Full-length rows, no padding: each rank's mean loss has the same token count, so the mean of
    the ranks' means is the mean over the global batch (what one process computes)."""

    def __init__(self, n=PER_RANK * 2 * STEPS, t=12, v=96):
        self.x = torch.randint(3, v, (n, t), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


def make_args(out, batch=PER_RANK, **kw):
    from transformers import TrainingArguments

    kw.setdefault("use_cpu", True)
    return TrainingArguments(output_dir=out, per_device_train_batch_size=batch, max_steps=STEPS, learning_rate=0.5,
                             optim="sgd", logging_steps=1, report_to=[], seed=0, save_strategy="no",
                             dataloader_num_workers=0, **kw)


def make_trainer(model, args):
    """A Trainer that reads the rows in order: with 2 ranks, step k's global batch is the rows one
    process with twice the batch reads at step k."""
    from transformers import Trainer

    class InOrder(Trainer):
        def _get_train_sampler(self, *a, **k):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    return InOrder(model=model, args=args, train_dataset=Rows())
