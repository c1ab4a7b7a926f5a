"""Fused distillation (tiedkernels.distill) against TRL's generalized_jsd_loss math on full fp64 logits."""

import pytest
import torch
import torch.nn.functional as F

import tiedkernels as tk
from tiedkernels.functional import TiedKernelsError
from _rl_reference import final_logits, jsd

F64 = torch.float64


def _data(n=29, d=16, dt=24, v=123, seed=0, dtype=F64, bias=False):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=F64).to(dtype).requires_grad_()
    w = (torch.randn(v, d, generator=g, dtype=F64) * 0.5).to(dtype).requires_grad_()
    b = (torch.randn(v, generator=g, dtype=F64) * 0.3).to(dtype).requires_grad_() if bias else None
    ht = torch.randn(n, dt, generator=g, dtype=F64).to(dtype)
    wt = (torch.randn(v, dt, generator=g, dtype=F64) * 0.5).to(dtype)
    y = torch.randint(0, v, (n,), generator=g)
    y[[2, 5, 17]] = -100
    return h, w, b, ht, wt, y, g


def _ref(h, w, b, ht, wt, y, *, beta, temperature=1.0, alpha=0.0, reduction="mean", num_items=None, logit_scale=1.0,
         softcap=None, t_scale=1.0, t_cap=None, tb=None):
    zs = final_logits(h, w, b, logit_scale, softcap)
    zt = final_logits(ht, wt, tb, t_scale, t_cap)
    keep = y != -100
    d = jsd(zs / temperature, zt / temperature, beta)
    ce = F.cross_entropy(zs, torch.where(keep, y, 0), reduction="none")
    tok = torch.where(keep, (1 - alpha) * d + alpha * ce, torch.zeros((), dtype=d.dtype))
    if reduction == "none":
        return tok
    if num_items is not None:
        return tok.sum() / num_items
    return tok.sum() / keep.sum().clamp(min=1) if reduction in ("mean", "batchmean") else tok.sum()


SETTINGS = [
    dict(divergence="forward_kl"),
    dict(divergence="reverse_kl", temperature=2.0, alpha=0.3, reduction="sum"),
    dict(divergence="jsd", beta=0.5, temperature=0.7, alpha=0.5, reduction="none"),
    dict(divergence="jsd", beta=0.1, bias=True, softcap=4.0, logit_scale=0.8, reduction="batchmean"),
    dict(divergence="jsd", beta=0.9, num_items=11.0, t_cap=6.0, t_scale=1.5, chunk=1),
    dict(divergence="jsd", beta=0.0),
    dict(divergence="jsd", beta=1.0, temperature=3.0),
]


@pytest.mark.parametrize("s", SETTINGS, ids=[",".join(f"{k}={v}" for k, v in s.items()) for s in SETTINGS])
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_matches_trl_on_full_logits(s, backend):
    s = dict(s)
    h, w, b, ht, wt, y, g = _data(bias=s.pop("bias", False))
    beta = {"forward_kl": 0.0, "reverse_kl": 1.0}.get(s["divergence"], s.get("beta"))
    reduction = s.get("reduction", "mean")
    out = tk.linear_distillation_loss(
        h, w, y, teacher_hidden=ht, teacher_weight=wt, divergence=s["divergence"], beta=s.get("beta", 0.5),
        temperature=s.get("temperature", 1.0), alpha=s.get("alpha", 0.0), reduction=reduction,
        num_items_in_batch=s.get("num_items"), bias=b, logit_scale=s.get("logit_scale", 1.0), softcap=s.get("softcap"),
        teacher_logit_scale=s.get("t_scale", 1.0), teacher_softcap=s.get("t_cap"), chunk_size=s.get("chunk", 6),
        backend=backend)
    ref = _ref(h, w, b, ht, wt, y, beta=beta, temperature=s.get("temperature", 1.0), alpha=s.get("alpha", 0.0),
               reduction=reduction, num_items=s.get("num_items"), logit_scale=s.get("logit_scale", 1.0),
               softcap=s.get("softcap"), t_scale=s.get("t_scale", 1.0), t_cap=s.get("t_cap"))
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-13)
    up = torch.randn(out.shape, generator=g, dtype=F64) if reduction == "none" else torch.tensor(0.7, dtype=F64)
    params = [x for x in (h, w, b) if x is not None]
    for a, r in zip(torch.autograd.grad(out, params, up), torch.autograd.grad(ref, params, up)):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-13)


def test_teacher_logits_tensor_and_callable_and_stats():
    h, w, _, ht, wt, y, g = _data()
    zt = ht @ wt.T
    a = tk.linear_distillation_loss(h, w, y, teacher_hidden=ht, teacher_weight=wt, return_stats=True)
    b = tk.linear_distillation_loss(h, w, y, teacher_logits=zt, return_stats=True)
    c = tk.linear_distillation_loss(h, w, y, teacher_logits=lambda start, rows: zt[start:start + rows], chunk_size=4)
    torch.testing.assert_close(a.loss, b.loss, rtol=0, atol=0)
    torch.testing.assert_close(a.loss, c, rtol=1e-14, atol=1e-14)
    keep = y != -100
    torch.testing.assert_close(a.divergence, torch.where(keep, jsd(h @ w.T, zt, 0.5), torch.zeros((), dtype=F64)))
    ls = torch.log_softmax(h @ w.T, -1)
    torch.testing.assert_close(a.entropy, -(ls.exp() * ls).sum(-1))
    assert not a.divergence.requires_grad and not a.entropy.requires_grad


def test_teacher_gets_no_gradient_and_tied_student_one_buffer():
    head = tk.TiedEmbeddingHead(123, 16, dtype=F64)
    teacher_w = torch.randn(123, 24, dtype=F64, requires_grad=True)
    ids = torch.randint(0, 123, (2, 9), generator=torch.Generator().manual_seed(0))
    th = torch.randn(2, 9, 24, dtype=F64, requires_grad=True)
    h = torch.tanh(head(ids) * 2)
    loss = head.distillation_loss(h, ids, teacher_hidden=th, teacher_weight=teacher_w, shift=True, alpha=0.2,
                                  temperature=1.5)
    loss.backward()
    assert teacher_w.grad is None and th.grad is None
    w = head.weight.detach().clone().requires_grad_()
    h2 = torch.tanh(F.embedding(ids, w) * 2)
    y = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], 1)
    ref = _ref(h2[:, :-1].reshape(-1, 16), w, None, th.detach()[:, :-1].reshape(-1, 24), teacher_w.detach(),
               y[:, :-1].reshape(-1), beta=0.5, temperature=1.5, alpha=0.2)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(head.weight.grad, w.grad, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_against_fp64(dtype):
    h, w, _, ht, wt, y, _ = _data(dtype=dtype, d=32, v=301)
    out = tk.linear_distillation_loss(h, w, y, teacher_hidden=ht, teacher_weight=wt, beta=0.3, chunk_size=8)
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = _ref(h64, w64, None, ht.double(), wt.double(), y, beta=0.3)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    for a, r in zip(torch.autograd.grad(out, (h, w)), torch.autograd.grad(ref, (h64, w64))):
        assert a.dtype == dtype
        assert (a.double() - r).abs().max() / r.abs().max() < 2 * tol


def test_retain_graph_and_unsupported_modes():
    h, w, _, ht, wt, y, _ = _data()
    out = tk.linear_distillation_loss(h, w, y, teacher_hidden=ht, teacher_weight=wt)
    g1 = torch.autograd.grad(out, h, retain_graph=True)[0]
    g2 = torch.autograd.grad(out, h, torch.tensor(3.0, dtype=F64))[0]  # recomputed: the first took the forward's
    torch.testing.assert_close(3 * g1, g2, rtol=1e-12, atol=1e-14)
    out = tk.linear_distillation_loss(h, w, y, teacher_hidden=ht, teacher_weight=wt)
    with pytest.raises(NotImplementedError, match="second derivatives"):
        torch.autograd.grad(out, h, create_graph=True)


def test_errors():
    h, w, _, ht, wt, y, _ = _data()
    with pytest.raises(TiedKernelsError, match="one of the two"):
        tk.linear_distillation_loss(h, w, y)
    with pytest.raises(TiedKernelsError, match="one vocabulary"):
        tk.linear_distillation_loss(h, w, y, teacher_hidden=ht, teacher_weight=wt[:100])
    with pytest.raises(TiedKernelsError, match="one teacher state per student token"):
        tk.linear_distillation_loss(h, w, y, teacher_hidden=ht[:5], teacher_weight=wt)
    with pytest.raises(TiedKernelsError, match="divergence"):
        tk.linear_distillation_loss(h, w, y, teacher_hidden=ht, teacher_weight=wt, divergence="tvd")
    with pytest.raises(TiedKernelsError, match="beta"):
        tk.linear_distillation_loss(h, w, y, teacher_hidden=ht, teacher_weight=wt, beta=1.5)
    with pytest.raises(TiedKernelsError, match="temperature"):
        tk.linear_distillation_loss(h, w, y, teacher_hidden=ht, teacher_weight=wt, temperature=0.0)
    with pytest.raises(TiedKernelsError, match="alpha"):
        tk.linear_distillation_loss(h, w, y, teacher_hidden=ht, teacher_weight=wt, alpha=-0.1)
    with pytest.raises(TiedKernelsError, match="teacher_logits has shape"):
        tk.linear_distillation_loss(h, w, y, teacher_logits=torch.zeros(29, 122, dtype=F64))
    with pytest.raises(TiedKernelsError, match=r"must return \[3, V\]"):
        tk.linear_distillation_loss(h, w, y, teacher_logits=lambda s, r: torch.zeros(2, 123, dtype=F64), chunk_size=3)
    with pytest.raises(TiedKernelsError, match="teacher_weight is on meta"):
        tk.linear_distillation_loss(h, w, y, teacher_hidden=ht.to("meta"), teacher_weight=wt.to("meta"))
