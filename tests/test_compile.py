"""torch.compile(fullgraph=True) of an embed -> body -> fused-loss training step equals eager."""

import pytest
import torch

import tiedkernels as tk


class TinyLM(torch.nn.Module):
    def __init__(self, v, d, backend):
        super().__init__()
        self.head = tk.TiedEmbeddingHead(v, d, backend=backend)
        self.body = torch.nn.Sequential(torch.nn.Linear(d, d), torch.nn.GELU(), torch.nn.LayerNorm(d))

    def forward(self, ids, labels):
        return self.head.loss(self.body(self.head(ids)), labels, shift=True, label_smoothing=0.05)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_compiled_step_equals_eager(backend):
    torch.manual_seed(0)
    v, d = 123, 32
    eager = TinyLM(v, d, backend)
    compiled_model = TinyLM(v, d, backend)
    compiled_model.load_state_dict(eager.state_dict())
    ids = torch.randint(0, v, (2, 9))
    labels = ids.clone()
    labels[0, :2] = -100

    loss_e = eager(ids, labels)
    loss_e.backward()

    torch._dynamo.reset()
    step = torch.compile(compiled_model, fullgraph=True, backend="inductor")
    loss_c = step(ids, labels)
    loss_c.backward()

    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    for (name, pe), (_, pc) in zip(eager.named_parameters(), compiled_model.named_parameters()):
        torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-4, atol=1e-6, msg=name)
