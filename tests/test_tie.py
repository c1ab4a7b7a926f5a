"""The one tied gradient (DESIGN section 3): exact against plain PyTorch in every arrangement
of the two roles, hooks fire once, micro-batch accumulation stays right."""

import pytest
import torch
import torch.nn.functional as F

import tiedkernels as tk

BACKENDS = ["cpu", "torch"]
V, D, B, T = 123, 16, 2, 7


def _setup(backend, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    head = tk.TiedEmbeddingHead(V, D, dtype=dtype, backend=backend)
    body = torch.nn.Sequential(torch.nn.Linear(D, D, dtype=dtype), torch.nn.Tanh())
    ids = torch.randint(0, V, (B, T))
    labels = torch.randint(0, V, (B, T))
    labels[0, 2] = -100
    return head, body, ids, labels


def _plain(weight, body, ids, labels, scale=1.0):
    """The stock arrangement: embedding lookup, body, linear logits, cross-entropy."""
    z = F.linear(body(F.embedding(ids, weight)), weight)
    return F.cross_entropy(z.reshape(-1, V), labels.reshape(-1)) * scale


@pytest.mark.parametrize("backend", BACKENDS)
def test_embed_body_loss_matches_plain(backend):
    head, body, ids, labels = _setup(backend)
    w_ref = head.weight.detach().clone().requires_grad_(True)
    loss = head.loss(body(head(ids)), labels)
    loss.backward()
    ref = _plain(w_ref, body, ids, labels)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    (g_ref,) = torch.autograd.grad(ref, [w_ref])
    torch.testing.assert_close(head.weight.grad, g_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_micro_batch_accumulation_and_hook(backend):
    head, body, ids, labels = _setup(backend)
    w_ref = head.weight.detach().clone().requires_grad_(True)
    seen = []
    head.weight.register_post_accumulate_grad_hook(lambda p: seen.append(p.grad.clone()))
    for step in range(3):
        torch.manual_seed(100 + step)
        ids = torch.randint(0, V, (B, T))
        labels = torch.randint(0, V, (B, T))
        head.loss(body(head(ids)), labels).backward()
        _plain(w_ref, body, ids, labels).backward()
        # fires once per backward, each time with the whole accumulated gradient
        assert len(seen) == step + 1
        torch.testing.assert_close(seen[-1], w_ref.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(head.weight.grad, w_ref.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_forwards_one_backward(backend):
    head, body, ids, labels = _setup(backend)
    w_ref = head.weight.detach().clone().requires_grad_(True)
    ids2, labels2 = torch.randint(0, V, (B, T)), torch.randint(0, V, (B, T))
    loss = head.loss(body(head(ids)), labels) + 0.5 * head.loss(body(head(ids2)), labels2)
    loss.backward()
    ref = _plain(w_ref, body, ids, labels) + _plain(w_ref, body, ids2, labels2, 0.5)
    ref.backward()
    torch.testing.assert_close(head.weight.grad, w_ref.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arrangement", ["embed_only", "head_only", "detached_body", "two_heads", "logits_view",
                                         "embed_no_grad", "head_before_embed_created"])
def test_roles_used_apart(backend, arrangement):
    head, body, ids, labels = _setup(backend)
    w = head.weight
    w_ref = w.detach().clone().requires_grad_(True)
    h_in = torch.randn(B, T, D, dtype=w.dtype)
    g = torch.randn(B, T, D, dtype=w.dtype)
    if arrangement == "embed_only":
        out, ref = (head(ids) * g).sum(), (F.embedding(ids, w_ref) * g).sum()
    elif arrangement == "head_only":
        out = head.loss(h_in, labels)
        ref = F.cross_entropy(F.linear(h_in, w_ref).reshape(-1, V), labels.reshape(-1))
    elif arrangement == "detached_body":
        e = head(ids)
        out = head.loss(body(e.detach()), labels) + (e * g).sum()
        ref = F.cross_entropy(F.linear(body(F.embedding(ids, w_ref).detach()), w_ref).reshape(-1, V),
                              labels.reshape(-1)) + (F.embedding(ids, w_ref) * g).sum()
    elif arrangement == "two_heads":
        h = body(head(ids))
        out = head.loss(h, labels) + 0.3 * head.loss(h, labels, label_smoothing=0.1)
        hr = body(F.embedding(ids, w_ref))
        zr = F.linear(hr, w_ref).reshape(-1, V)
        ref = F.cross_entropy(zr, labels.reshape(-1)) + 0.3 * F.cross_entropy(zr, labels.reshape(-1),
                                                                              label_smoothing=0.1)
    elif arrangement == "logits_view":
        z = head.output_embeddings(body(head(ids)))
        out = F.cross_entropy(z.reshape(-1, V), labels.reshape(-1))
        ref = _plain(w_ref, body, ids, labels)
    elif arrangement == "embed_no_grad":
        with torch.no_grad():
            e = head(ids)
        out = head.loss(body(e), labels)
        ref = F.cross_entropy(F.linear(body(F.embedding(ids, w_ref).detach()), w_ref).reshape(-1, V),
                              labels.reshape(-1))
    elif arrangement == "head_before_embed_created":
        l1 = head.loss(h_in, labels)
        e = head(ids)
        out = l1 + (e * g).sum()
        ref = (F.cross_entropy(F.linear(h_in, w_ref).reshape(-1, V), labels.reshape(-1))
               + (F.embedding(ids, w_ref) * g).sum())
    out.backward()
    ref.backward()
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_retain_graph_second_backward(backend):
    head, body, ids, labels = _setup(backend)
    w_ref = head.weight.detach().clone().requires_grad_(True)
    loss = head.loss(body(head(ids)), labels)
    loss.backward(retain_graph=True)
    first = head.weight.grad.clone()
    loss.backward()
    ref = _plain(w_ref, body, ids, labels)
    (g_ref,) = torch.autograd.grad(ref, [w_ref])
    torch.testing.assert_close(first, g_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(head.weight.grad, 2 * g_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_autograd_grad_and_padding_idx(backend):
    torch.manual_seed(3)
    head = tk.TiedEmbeddingHead(V, D, padding_idx=5, dtype=torch.float64, backend=backend)
    ids = torch.randint(0, V, (B, T))
    ids[0, :3] = 5
    labels = torch.randint(0, V, (B, T))
    w_ref = head.weight.detach().clone().requires_grad_(True)
    (gw,) = torch.autograd.grad(head.loss(head(ids) * 2, labels), [head.weight])
    ref = F.cross_entropy(F.linear(F.embedding(ids, w_ref, padding_idx=5) * 2, w_ref).reshape(-1, V),
                          labels.reshape(-1))
    (g_ref,) = torch.autograd.grad(ref, [w_ref])
    torch.testing.assert_close(gw, g_ref, rtol=1e-12, atol=1e-12)
    assert head.weight.grad is None


def test_bf16_tied_gradient_close_to_fp64():
    head, body, ids, labels = _setup("cpu", dtype=torch.bfloat16)
    w64 = head.weight.detach().double().requires_grad_(True)
    body64 = torch.nn.Sequential(torch.nn.Linear(D, D, dtype=torch.float64), torch.nn.Tanh())
    body64.load_state_dict({k: v.double() for k, v in body.state_dict().items()})
    head.loss(body(head(ids)), labels).backward()
    _plain(w64, body64, ids, labels).backward()
    err = (head.weight.grad.double() - w64.grad).abs().max().item()
    # bf16 keeps 8 bits: one rounding of each gradient entry is ~2^-9 relative
    assert err <= 2 ** -7 * w64.grad.abs().max().item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("head_kind", ["loss", "logits"])
def test_embedding_adds_into_head_buffer(backend, head_kind, monkeypatch):
    """The mechanism engages: the embedding's backward finds the head's buffer and returns none of its own."""
    from tiedkernels import _tie

    taken = []
    orig = _tie.TieState.take

    def spy(self, *a):
        buf = orig(self, *a)
        taken.append(buf is not None)
        return buf

    monkeypatch.setattr(_tie.TieState, "take", spy)
    head, body, ids, labels = _setup(backend)
    h = body(head(ids))
    if head_kind == "loss":
        loss = head.loss(h, labels)
    else:
        loss = F.cross_entropy(head.logits(h).reshape(-1, V), labels.reshape(-1))
    loss.backward()
    assert taken == [True]
