"""Non-finite inputs (+inf, -inf, NaN in hidden, weight or bias) give PyTorch's values.

PyTorch's value is what a stock model computes: ``F.linear`` logits (scaled, softcapped), then
``F.cross_entropy`` plus ``z_loss · c_y · torch.logsumexp(z)²``; the returned lse is
``torch.logsumexp``.  The two differ on a row holding +inf: ``logsumexp`` gives +inf there,
``cross_entropy`` (through ``log_softmax``) NaN, so such a token's loss is NaN whatever its
target, and its gradients are NaN.  Checked here on the ``torch`` and ``cpu`` backends and the
vocabulary-parallel loss, every option, against that stock computation (not against
``reference.py``, whose ``lse - z_y`` is +inf there).
"""

import itertools

import pytest
import torch
import torch.nn.functional as F

import tiedkernels
from tiedkernels import backends
from tiedkernels.distributed import vocab_parallel_linear_cross_entropy

V, D, N = 5, 3, 4
IGNORE = -100
NONFINITE = {"+inf": float("inf"), "-inf": float("-inf"), "nan": float("nan")}
TOL = {torch.float64: 1e-10, torch.float32: 2e-5}


def stock(h, w, y, b=None, *, reduction="mean", label_smoothing=0.0, z_loss=0.0, softcap=None, logit_scale=1.0,
          class_weight=None, return_lse=False):
    """The loss as a stock model computes it (DESIGN section 1 with PyTorch's own ops)."""
    z = F.linear(h, w, b)
    if logit_scale != 1.0:
        z = z * logit_scale
    if softcap is not None:
        z = torch.tanh(z / softcap) * softcap
    z = z.double() if z.dtype == torch.float64 else z.float()
    lse = torch.logsumexp(z, -1)
    ce = F.cross_entropy(z, y, weight=class_weight, ignore_index=IGNORE, label_smoothing=label_smoothing,
                         reduction="none")
    keep = y != IGNORE
    cy = class_weight.to(z.dtype)[torch.where(keep, y, 0)] if class_weight is not None else torch.ones_like(lse)
    tok = ce + torch.where(keep, z_loss * cy * lse * lse, torch.zeros_like(lse))
    if reduction == "none":
        loss = tok
    elif reduction == "sum":
        loss = tok.sum()
    else:
        loss = tok.sum() / torch.where(keep, cy, torch.zeros_like(cy)).sum()
    return (loss, lse) if return_lse else loss


def _same(actual, expected, dtype, what):
    """Equal NaN positions, equal infinities, the finite values within the dtype's tolerance."""
    a, e = actual.detach().double(), expected.detach().double()
    assert torch.equal(a.isnan(), e.isnan()), f"{what}: NaN at {a.isnan().nonzero().tolist()}, PyTorch's at " \
                                              f"{e.isnan().nonzero().tolist()}\n{a}\n{e}"
    torch.testing.assert_close(a.nan_to_num(nan=0.0), e.nan_to_num(nan=0.0), rtol=TOL[dtype], atol=TOL[dtype],
                               msg=lambda m: f"{what}: {m}\n{a}\n{e}")


def _inputs(where, value, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, dtype=torch.float64, generator=g)
    w = torch.randn(V, D, dtype=torch.float64, generator=g)
    b = torch.randn(V, dtype=torch.float64, generator=g)
    cw = torch.rand(V, dtype=torch.float64, generator=g) + 0.5
    # one entry: hidden's hits one token's whole row of logits, weight's and bias's one class of every token
    {"hidden": h, "weight": w, "bias": b}[where].view(-1)[seed % 3] = value
    y = torch.arange(N) % V
    y[-1] = IGNORE  # the lse of an ignored token is still returned (and differentiated)
    return (t.to(dtype) for t in (h, w, b, cw)), y


def _grads(loss, lse, leaves, g_loss, g_lse):
    ((loss * g_loss).sum() + (lse * g_lse).sum()).backward()
    return [t.grad for t in leaves]


# each option on and off, alone and together (a bias in half the cases, always for a bias entry)
_OPTIONS = [
    dict(reduction="none"),
    dict(reduction="mean", z_loss=1e-3),
    dict(reduction="none", label_smoothing=0.1, bias=True),
    dict(reduction="mean", z_loss=1e-3, label_smoothing=0.1, class_weight=True, bias=True),
    dict(reduction="none", softcap=3.0, logit_scale=0.7, z_loss=1e-3),
    dict(reduction="sum", logit_scale=0.7, class_weight=True, label_smoothing=0.1),
    dict(reduction="none", softcap=3.0, bias=True, class_weight=True),
    dict(reduction="mean", z_loss=1e-2, label_smoothing=0.2, softcap=3.0, logit_scale=1.3, class_weight=True,
         bias=True),
]


def _cases(where):
    for opts in _OPTIONS:
        opts = dict(opts)
        use_cw, use_bias = opts.pop("class_weight", False), opts.pop("bias", False)
        yield opts, use_cw, use_bias or where == "bias"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("value", list(NONFINITE))
@pytest.mark.parametrize("where", ["hidden", "weight", "bias"])
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_nonfinite_inputs_match_pytorch(backend, where, value, dtype):
    """Loss, lse, and the gradients of random incoming gradients for both, every option."""
    if backends.why_not(backend, "cpu") is not None:
        pytest.skip(backends.why_not(backend, "cpu"))
    for seed in range(2):
        (h, w, b, cw), y = _inputs(where, NONFINITE[value], seed, dtype)
        for opts, use_cw, use_bias in _cases(where):
            what = f"{backend} {where}={value} seed={seed} {opts} class_weight={use_cw} bias={use_bias}"
            cwt = cw if use_cw else None
            g = torch.Generator().manual_seed(seed)
            g_loss = torch.randn((N,) if opts["reduction"] == "none" else (), dtype=dtype, generator=g)
            g_lse = torch.randn(N, dtype=dtype, generator=g)
            mine, theirs = [], []
            for fn, out in ((lambda *a, **k: tiedkernels.linear_cross_entropy(*a[:3], bias=a[3], backend=backend, **k),
                             mine), (stock, theirs)):
                leaves = [t.clone().requires_grad_() for t in ((h, w, b) if use_bias else (h, w))]
                loss, lse = fn(*leaves[:2], y, leaves[2] if use_bias else None, class_weight=cwt, return_lse=True,
                               **opts)
                out += [loss, lse, *_grads(loss, lse, leaves, g_loss, g_lse)]
            for name, a, e in zip(("loss", "lse", "dh", "dW", "db"), mine, theirs):
                _same(a, e, dtype, f"{what} {name}")


@pytest.mark.parametrize("transform", [False, True], ids=["fused", "vmap"])
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_inf_hidden_with_z_loss_is_nan(backend, transform):
    """The fuzz's case: a +inf hidden entry makes the token's logits ±inf; PyTorch's loss is NaN
    (its log_softmax is NaN on the row), with or without the z-loss, whose lse is +inf.  Under a
    torch.func transform (the chunked plain-op path) too."""
    if backends.why_not(backend, "cpu") is not None:
        pytest.skip(backends.why_not(backend, "cpu"))
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, D, dtype=torch.float64, generator=g)
    w = torch.randn(V, D, dtype=torch.float64, generator=g)
    h[1, 0] = float("inf")
    z = F.linear(h, w)
    y = torch.tensor([0, int(z[1].argmin()), 2])  # the token's target logit is -inf: lse - z_y = +inf
    assert z[1, y[1]] == float("-inf")
    for lam in (0.0, 1e-3):
        def fn(hh):
            return tiedkernels.linear_cross_entropy(hh, w, y, z_loss=lam, reduction="none", return_lse=True,
                                                    backend=backend)

        if transform:
            loss, lse = (t[0] for t in torch.func.vmap(fn)(h[None]))
        else:
            loss, lse = fn(h)
        assert loss[1].isnan() and lse[1] == float("inf"), (lam, loss, lse)
        assert loss[[0, 2]].isfinite().all()


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("where", ["hidden", "weight"])
def test_vocab_parallel_nonfinite_matches_pytorch(backend, where):
    """The vocabulary-parallel loss (one process, padding rows) builds its loss from the shards'
    statistics: the same NaN on a row holding +inf, the same lse, the same gradients."""
    if backends.why_not(backend, "cpu") is not None:
        pytest.skip(backends.why_not(backend, "cpu"))
    dtype = torch.float64
    for value in NONFINITE.values():
        (h, w, b, cw), y = _inputs(where, value, 1, dtype)
        for opts in (dict(z_loss=1e-3, label_smoothing=0.1, reduction="none"),
                     dict(z_loss=1e-2, reduction="mean", class_weight=cw),
                     dict(reduction="sum", softcap=3.0, logit_scale=0.7)):
            what = f"{backend} {where}={value} {opts}"
            g_loss = torch.linspace(0.5, 1.5, N, dtype=dtype) if opts["reduction"] == "none" else torch.tensor(0.7,
                                                                                                           dtype=dtype)
            g_lse = torch.linspace(-1, 1, N, dtype=dtype)
            wp = torch.cat([w, torch.full((2, D), 5.0, dtype=dtype)])  # padding rows, masked
            hs, ws = h.clone().requires_grad_(), wp.clone().requires_grad_()
            loss, lse = vocab_parallel_linear_cross_entropy(hs, ws, y, vocab_size=V, return_lse=True, backend=backend,
                                                            **opts)
            mine = [loss, lse, *_grads(loss, lse, (hs, ws), g_loss, g_lse)]
            hr, wr = h.clone().requires_grad_(), wp.clone().requires_grad_()
            loss, lse = stock(hr, wr[:V], y, return_lse=True, **opts)
            theirs = [loss, lse, *_grads(loss, lse, (hr, wr), g_loss, g_lse)]
            for name, a, e in zip(("loss", "lse", "dh", "dW"), mine, theirs):
                _same(a, e, dtype, f"{what} {name}")


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("where", ["hidden", "weight", "bias"])
def test_nonfinite_stats(backend, where):
    """return_stats on the same inputs: the loss is PyTorch's, the statistics those of the
    reference's definitions (the entropy of a row holding +inf is NaN: its softmax is NaN everywhere,
    as TRL's logsumexp(z) - Σ p z gives; only entries of probability exactly 0 are left out; the argmax is
    torch.argmax's)."""
    from tiedkernels import reference

    if backends.why_not(backend, "cpu") is not None:
        pytest.skip(backends.why_not(backend, "cpu"))
    dtype = torch.float64
    for value, seed in itertools.product(NONFINITE, range(2)):
        (h, w, b, cw), y = _inputs(where, NONFINITE[value], seed, dtype)
        for opts in (dict(reduction="none", z_loss=1e-3, label_smoothing=0.1), dict(reduction="mean", z_loss=1e-2),
                     dict(reduction="sum", softcap=3.0, logit_scale=0.7)):
            what = f"{backend} {where}={value} seed={seed} {opts}"
            s = tiedkernels.linear_cross_entropy(h, w, y, bias=b, return_stats=True, backend=backend, **opts)
            _same(s.loss, stock(h, w, y, b, **opts), dtype, f"{what} loss")
            _, ref = reference.linear_cross_entropy(h, w, y, bias=b, return_stats=True, **opts)
            for name in ("lse", "z_loss", "entropy", "accuracy"):
                _same(getattr(s, name), ref[name], dtype, f"{what} {name}")
            assert torch.equal(s.predictions, ref["predictions"]), f"{what} predictions"
