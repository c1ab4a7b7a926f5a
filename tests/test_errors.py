"""Bad and edge-case input, one test per row of DESIGN section 5, on every CPU backend."""

import math
import os
import re

import pytest
import torch

import tiedkernels as tk
from tiedkernels import reference as R

from _cpu_backends import BACKENDS_CPU
from tolerances import assert_close

F64 = torch.float64
N, D, V = 11, 6, 13

# The tests below take the conftest's `backend` fixture (the CPU backends); those of issue 10's items
# at the end also run on Triton where its interpreter is on in this process (`make test` runs them so
# in a process of their own: test_interpreter_cases_in_own_process).


def _op(backend, name):
    return getattr(torch.ops.tiedkernels, ("torch_" if backend == "torch" else "") + name).default


def _inputs(n=N, bias=True, dtype=F64):
    h = torch.randn(n, D, dtype=dtype, requires_grad=True)
    w = torch.randn(V, D, dtype=dtype, requires_grad=True)
    b = torch.randn(V, dtype=dtype, requires_grad=True) if bias else None
    return h, w, b, torch.randint(0, V, (n,))


def _names_value_and_v(excinfo, value):
    msg = str(excinfo.value)
    assert re.search(rf"(?<![\d-]){re.escape(str(value))}(?!\d)", msg), f"the message does not name {value}: {msg}"
    assert re.search(rf"\bV\s*=\s*{V}\b|\b{V}\b", msg), f"the message does not name V={V}: {msg}"


# ------------------------------------------------------------------------------------------
# an id or label outside [0, V) (and not ignore_index): IndexError/ValueError naming it and V;
# nothing already computed (the weight, an accumulated gradient) is lost


@pytest.mark.parametrize("bad", [V, -1, 10**6])
def test_out_of_range_id(backend, bad):
    w = torch.randn(V, D, requires_grad=True)
    ids = torch.tensor([[0, 1], [bad, 2]])
    with pytest.raises((IndexError, ValueError)) as e:
        tk.embedding(ids, w, backend=backend)
    _names_value_and_v(e, bad)


@pytest.mark.parametrize("bad", [V, -1])
def test_out_of_range_id_in_backward_leaves_the_gradient_buffer_unchanged(backend, bad):
    buf = torch.randn(V, D)
    before = buf.clone()
    ids = torch.tensor([3, bad, 4])
    with pytest.raises((IndexError, ValueError)) as e:
        _op(backend, "embedding_bwd_acc_")(buf, torch.randn(3, D), ids, None)
    _names_value_and_v(e, bad)
    assert torch.equal(buf, before), "the gradient buffer changed although the call raised"
    with pytest.raises((IndexError, ValueError)) as e:
        _op(backend, "embedding_bwd")(torch.randn(3, D), ids, V, None)
    _names_value_and_v(e, bad)


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("bad", [V, -5, 10**6])
def test_out_of_range_label(backend, bad, reduction):
    h, w, b, labels = _inputs()
    labels[0] = -100  # ignored: allowed
    labels[7] = bad
    # gradients of an earlier micro-batch are already accumulated: they must survive the error
    tk.linear_cross_entropy(h, w, torch.randint(0, V, (N,)), bias=b, backend=backend).backward()
    grads = [x.grad.clone() for x in (h, w, b)]
    params = [x.detach().clone() for x in (h, w, b)]
    for grad_mode in (True, False):
        with torch.set_grad_enabled(grad_mode), pytest.raises((IndexError, ValueError)) as e:
            tk.linear_cross_entropy(h, w, labels, bias=b, reduction=reduction, chunk_size=4, backend=backend)
        _names_value_and_v(e, bad)
    for x, g, p in zip((h, w, b), grads, params):
        assert torch.equal(x.grad, g) and torch.equal(x.detach(), p), "an error changed a parameter or its gradient"


def test_out_of_range_label_direct_ops(backend):
    """The ops themselves check too (the vocabulary-parallel code calls them directly)."""
    h, w, b, labels = (x.detach() if x is not None and x.is_floating_point() else x for x in _inputs())
    labels[3] = V
    lse = torch.zeros(N, dtype=F64)
    calls = {
        "lce_fwd": (h, w, b, labels, None, -100, 0.0, 0.0, 0.0, 1.0, 0, 0, 4, False, False, False),
        "lce_bwd": (torch.ones(N, dtype=F64), h, w, b, labels, lse, -100, 0.0, 0.0, 0.0, 1.0, 0, 0, 4, True, True,
                    True),
        "lce_stats": (h, w, b, labels, -100, 0.0, 1.0, 0, 0, 4),
    }
    for name, args in calls.items():
        with pytest.raises((IndexError, ValueError)) as e:
            _op(backend, name)(*args)
        _names_value_and_v(e, V)


# ------------------------------------------------------------------------------------------
# wrong dtype, wrong rank, h.shape[-1] != D, labels not matching h: ValueError naming both


def _both_named(excinfo, *shapes):
    msg = str(excinfo.value)
    for s in shapes:
        assert str(tuple(s)) in msg, f"the message does not name {tuple(s)}: {msg}"


def test_hidden_dim_mismatch(backend):
    h, w, b, labels = _inputs()
    h_bad = torch.randn(N, D + 1, dtype=F64)
    with pytest.raises(ValueError) as e:
        tk.logits(h_bad, w, backend=backend)
    _both_named(e, h_bad.shape, w.shape)
    with pytest.raises(ValueError) as e:
        tk.linear_cross_entropy(h_bad, w, labels, backend=backend)
    _both_named(e, h_bad.shape, w.shape)


@pytest.mark.parametrize("labels_shape", [(N + 1,), (1, N), (N, 1), ()])
def test_labels_shape_mismatch(backend, labels_shape):
    h, w, b, _ = _inputs()
    labels = torch.zeros(labels_shape, dtype=torch.long)
    with pytest.raises(ValueError) as e:
        tk.linear_cross_entropy(h, w, labels, backend=backend)
    _both_named(e, labels.shape, h.shape)


def test_bias_shape_mismatch(backend):
    h, w, _, labels = _inputs()
    b = torch.randn(V + 1, dtype=F64)
    for call in (lambda: tk.logits(h, w, bias=b, backend=backend),
                 lambda: tk.linear_cross_entropy(h, w, labels, bias=b, backend=backend)):
        with pytest.raises(ValueError) as e:
            call()
        _both_named(e, b.shape, w.shape)


@pytest.mark.parametrize("w_shape", [(V * D,), (V, D, 1), ()])
def test_weight_wrong_rank(backend, w_shape):
    w = torch.randn(w_shape, dtype=F64)
    h, _, _, labels = _inputs()
    for call in (lambda: tk.embedding(labels, w, backend=backend), lambda: tk.logits(h, w, backend=backend),
                 lambda: tk.linear_cross_entropy(h, w, labels, backend=backend)):
        with pytest.raises(ValueError) as e:
            call()
        _both_named(e, w.shape)


def test_hidden_wrong_rank(backend):
    w = torch.randn(V, D, dtype=F64)
    h = torch.tensor(1.0, dtype=F64)  # 0-dim: no feature dimension
    for call in (lambda: tk.logits(h, w, backend=backend),
                 lambda: tk.linear_cross_entropy(h, w, torch.tensor(0), backend=backend)):
        with pytest.raises(ValueError) as e:
            call()
        _both_named(e, h.shape, w.shape)
    with pytest.raises(ValueError, match="sequence dimension"):  # shift needs [..., T, D]
        tk.linear_cross_entropy(torch.randn(D, dtype=F64), w, torch.tensor(0), shift=True, backend=backend)


def test_wrong_dtypes(backend):
    h, w, b, labels = _inputs()
    cases = {
        "float ids": (lambda: tk.embedding(labels.double(), w, backend=backend), ["float64"]),
        "bool ids": (lambda: tk.embedding(labels > 3, w, backend=backend), ["bool"]),
        "integer weight": (lambda: tk.embedding(labels, w.long(), backend=backend), ["int64"]),
        "float labels": (lambda: tk.linear_cross_entropy(h, w, labels.float(), backend=backend), ["float32"]),
        "hidden vs weight": (lambda: tk.linear_cross_entropy(h.float(), w, labels, backend=backend),
                             ["float32", "float64"]),
        "logits hidden vs weight": (lambda: tk.logits(h, w.float(), backend=backend), ["float32", "float64"]),
        "bias vs weight": (lambda: tk.logits(h, w, bias=b.float(), backend=backend), ["float32", "float64"]),
    }
    for what, (call, names) in cases.items():
        with pytest.raises(ValueError) as e:
            call()
        for name in names:
            assert name in str(e.value), f"{what}: the message does not name {name}: {e.value}"


# ------------------------------------------------------------------------------------------
# all labels ignored: loss 0 (mean not NaN) and zero gradients


@pytest.mark.parametrize("reduction,num_items", [("none", None), ("sum", None), ("mean", None), ("sum", 4),
                                                 ("mean", torch.tensor(4))])
@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16], ids=["fp64", "fp32", "bf16"])
def test_all_labels_ignored(backend, dtype, reduction, num_items):
    h, w, b, _ = _inputs(dtype=dtype)
    labels = torch.full((N,), -100)
    opts = dict(bias=b, reduction=reduction, num_items_in_batch=num_items, label_smoothing=0.1, z_loss=1e-2,
                chunk_size=4, backend=backend)
    with torch.no_grad():  # the forward-only (recompute) path
        loss = tk.linear_cross_entropy(h, w, labels, **opts)
    assert loss.shape == ((N,) if reduction == "none" else ()) and torch.all(loss == 0), f"no-grad loss {loss}"
    loss = tk.linear_cross_entropy(h, w, labels, **opts)
    assert torch.all(loss == 0), f"loss {loss}"
    g = torch.full_like(loss, 1.5)
    grads = torch.autograd.grad(loss, [h, w, b], g)
    for name, gr, x in zip(("dh", "dW", "db"), grads, (h, w, b)):
        assert gr.shape == x.shape and torch.all(gr == 0), f"{name} is not zero: {gr}"


def test_all_labels_ignored_by_shift(backend):
    """shift=True with one position per sequence: no position has a next token."""
    h = torch.randn(3, 1, D, dtype=F64, requires_grad=True)
    w = torch.randn(V, D, dtype=F64, requires_grad=True)
    labels = torch.randint(0, V, (3, 1))
    loss = tk.linear_cross_entropy(h, w, labels, shift=True, backend=backend)
    assert loss.item() == 0
    dh, dw = torch.autograd.grad(loss, [h, w])
    assert torch.all(dh == 0) and torch.all(dw == 0)
    per_token = tk.linear_cross_entropy(h, w, labels, shift=True, reduction="none", backend=backend)
    assert per_token.shape == (3, 0)


# ------------------------------------------------------------------------------------------
# N == 0: an empty result (0 for sum/mean), zero gradients


@pytest.mark.parametrize("shape", [(0,), (2, 0)])
def test_empty_embedding(backend, shape):
    w = torch.randn(V, D, dtype=F64, requires_grad=True)
    ids = torch.zeros(shape, dtype=torch.long)
    out = tk.embedding(ids, w, backend=backend)
    assert out.shape == (*shape, D)
    (dw,) = torch.autograd.grad(out, [w], torch.ones_like(out))
    assert dw.shape == w.shape and torch.all(dw == 0)


@pytest.mark.parametrize("shape", [(0,), (2, 0)])
def test_empty_logits(backend, shape):
    h = torch.randn(*shape, D, dtype=F64, requires_grad=True)
    w = torch.randn(V, D, dtype=F64, requires_grad=True)
    b = torch.randn(V, dtype=F64, requires_grad=True)
    z = tk.logits(h, w, bias=b, softcap=3.0, backend=backend)
    assert z.shape == (*shape, V)
    dh, dw, db = torch.autograd.grad(z, [h, w, b], torch.ones_like(z))
    assert dh.shape == h.shape and torch.all(dw == 0) and torch.all(db == 0)


@pytest.mark.parametrize("reduction,num_items", [("none", None), ("sum", None), ("mean", None), ("sum", 7)])
@pytest.mark.parametrize("shape", [(0,), (2, 0)])
def test_empty_loss(backend, shape, reduction, num_items):
    h = torch.randn(*shape, D, dtype=F64, requires_grad=True)
    w = torch.randn(V, D, dtype=F64, requires_grad=True)
    b = torch.randn(V, dtype=F64, requires_grad=True)
    labels = torch.zeros(shape, dtype=torch.long)
    loss, lse = tk.linear_cross_entropy(h, w, labels, bias=b, reduction=reduction, num_items_in_batch=num_items,
                                        return_lse=True, backend=backend)
    assert lse.shape == shape
    if reduction == "none":
        assert loss.shape == shape
        g = torch.ones_like(loss)
    else:
        assert loss.shape == () and loss.item() == 0  # not NaN
        g = None
    dh, dw, db = torch.autograd.grad(loss, [h, w, b], g)
    assert dh.shape == h.shape and torch.all(dw == 0) and torch.all(db == 0)


# ------------------------------------------------------------------------------------------
# non-contiguous h, ids, labels (and incoming gradients): the same results as contiguous ones


def test_non_contiguous_embedding(backend):
    w = torch.randn(V, D, dtype=F64, requires_grad=True)
    ids = torch.randint(0, V, (7, 5)).t()  # [5, 7], strided
    g = torch.randn(D, 7, 5, dtype=F64).permute(2, 1, 0)  # a non-contiguous incoming gradient
    assert not ids.is_contiguous() and not g.is_contiguous()
    out = tk.embedding(ids, w, padding_idx=2, backend=backend)
    (dw,) = torch.autograd.grad(out, [w], g)
    out_c = tk.embedding(ids.contiguous(), w, padding_idx=2, backend=backend)
    (dw_c,) = torch.autograd.grad(out_c, [w], g.contiguous())
    assert torch.equal(out, out_c) and torch.equal(out, R.embedding(ids, w.detach()))
    assert_close(dw, dw_c, dtype=F64, name="dW")


def test_non_contiguous_logits(backend):
    w = torch.randn(V, D, dtype=F64, requires_grad=True)
    h = torch.randn(D, 4, 3, dtype=F64).permute(2, 1, 0).requires_grad_()  # [3, 4, D], strided
    hv = h * 1  # a non-leaf with the same strides
    assert not hv.is_contiguous()
    z = tk.logits(hv, w, softcap=3.0, backend=backend)
    g = torch.randn(V, 3, 4, dtype=F64).permute(1, 2, 0)
    dh, dw = torch.autograd.grad(z, [h, w], g)
    ref = R.logits(hv.detach().contiguous(), w.detach(), softcap=3.0)
    assert_close(z, ref, dtype=F64, name="logits")
    hc = h.detach().contiguous().requires_grad_()
    dh_c, dw_c = torch.autograd.grad(tk.logits(hc, w, softcap=3.0, backend=backend), [hc, w], g.contiguous())
    assert_close(dh, dh_c, dtype=F64, name="dh")
    assert_close(dw, dw_c, dtype=F64, name="dW")


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_non_contiguous_loss(backend, reduction):
    w = torch.randn(V, D, dtype=F64, requires_grad=True)
    big = torch.randn(2, 9, 2 * D, dtype=F64, requires_grad=True)
    h = big[:, :, ::2]  # [2, 9, D], stride 2 in the feature dimension
    labels = torch.randint(0, V, (9, 2)).t()  # [2, 9], transposed
    labels[0, 3] = -100
    assert not h.is_contiguous() and not labels.is_contiguous()
    opts = dict(reduction=reduction, shift=True, label_smoothing=0.1, chunk_size=4)
    loss = tk.linear_cross_entropy(h, w, labels, backend=backend, **opts)
    g = torch.randn(8, 2, dtype=F64).t() if reduction == "none" else torch.tensor(1.3, dtype=F64)
    dbig, dw = torch.autograd.grad(loss, [big, w], g)
    hc = h.detach().contiguous().requires_grad_()
    w2 = w.detach().clone().requires_grad_()
    ref = R.linear_cross_entropy(hc, w2, labels.contiguous(), **{k: v for k, v in opts.items() if k != "chunk_size"})
    rh, rw = torch.autograd.grad(ref, [hc, w2], g)
    assert_close(loss, ref, dtype=F64, name="loss")
    assert_close(dbig[:, :, ::2], rh, dtype=F64, name="dh")
    assert torch.all(dbig[:, :, 1::2] == 0)
    assert_close(dw, rw, dtype=F64, name="dW")


# ------------------------------------------------------------------------------------------
# NaN/Inf in h: propagated as PyTorch would, no crash


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_nan_inf_in_hidden(backend, bad, reduction):
    h, w, b, labels = _inputs()
    with torch.no_grad():
        h[2, 1] = bad
    labels[5] = -100
    loss = tk.linear_cross_entropy(h, w, labels, bias=b, reduction=reduction, chunk_size=4, backend=backend)
    g = torch.ones_like(loss) * 0.5
    grads = torch.autograd.grad(loss, [h, w, b], g)
    hr, wr, br = (x.detach().clone().requires_grad_() for x in (h, w, b))
    ref = R.linear_cross_entropy(hr, wr, labels, bias=br, reduction=reduction)
    rgrads = torch.autograd.grad(ref, [hr, wr, br], g)
    # the same values where finite, NaN exactly where PyTorch gives NaN, the same infinities
    assert_close(loss, ref.detach(), dtype=F64, name="loss")
    if reduction == "none":
        assert torch.isfinite(loss[[i for i in range(N) if i != 2]]).all(), "a bad row leaked into the others"
    for name, a, r in zip(("dh", "dW", "db"), grads, rgrads):
        assert_close(a, r, dtype=F64, name=name)


def test_nan_in_hidden_logits_and_embedding_weight(backend):
    h, w, b, labels = _inputs()
    with torch.no_grad():
        h[4, 0] = float("nan")
        w[3, 2] = float("inf")
    z = tk.logits(h, w, bias=b, backend=backend)
    assert_close(z, R.logits(h.detach(), w.detach(), bias=b.detach()), dtype=F64, name="logits")
    out = tk.embedding(torch.tensor([3, 4]), w, backend=backend)
    assert torch.equal(out, w.detach()[[3, 4]])


# ------------------------------------------------------------------------------------------
# V·D >= 2^31 and N·V >= 2^31: correct (64-bit offsets).  Shapes are chosen so that the data
# stays small: weights that are mostly zero (or never touched, so never resident), or a tiny D.

BIG_D = 8192
BIG_V = (1 << 31) // BIG_D + 3  # 262,147 rows of 8,192: V·D just above 2^31, row V-1 starts beyond it
_SPECIAL = [0, 1000, BIG_V // 2, BIG_V - 3, BIG_V - 2, BIG_V - 1]


@pytest.mark.slow
def test_vocab_times_dim_beyond_int32_embedding(backend):
    """Rows whose offset V·D exceeds 2^31, gathered and scattered.  The fp32 buffers (8.6 GB) are
    allocated but only the rows used are ever written, so almost none of it becomes resident."""
    w = torch.empty(BIG_V, BIG_D)
    ids = torch.tensor([BIG_V - 1, 0, BIG_V - 2, BIG_V - 1])
    rows = torch.randn(3, BIG_D)
    w[[BIG_V - 1, 0, BIG_V - 2]] = rows
    out = tk.embedding(ids, w, backend=backend)
    assert torch.equal(out, rows[[0, 1, 2, 0]])
    buf = torch.empty(BIG_V, BIG_D)
    buf[[BIG_V - 1, 0, BIG_V - 2]] = 1.0
    grad = torch.randn(4, BIG_D)
    _op(backend, "embedding_bwd_acc_")(buf, grad, ids, None)
    torch.testing.assert_close(buf[BIG_V - 1], 1.0 + grad[0] + grad[3], rtol=0, atol=1e-6)
    torch.testing.assert_close(buf[0], 1.0 + grad[1], rtol=0, atol=0)
    torch.testing.assert_close(buf[BIG_V - 2], 1.0 + grad[2], rtol=0, atol=0)


@pytest.fixture(scope="module")
def big_head():
    """A bf16 [262147, 8192] weight (4.3 GB), zero but for a few rows, some beyond offset 2^31."""
    gen = torch.Generator().manual_seed(1)
    w = torch.zeros(BIG_V, BIG_D, dtype=torch.bfloat16)
    special = (torch.randn(len(_SPECIAL), BIG_D, generator=gen) * 0.05).to(torch.bfloat16)
    w[_SPECIAL] = special
    yield w, special
    del w


@pytest.fixture(scope="module")
def big_case(big_head):
    """The inputs of the V·D > 2^31 loss test and plain PyTorch's bf16 answer for them, once for
    every backend: logits by F.linear, then F.cross_entropy on them in fp32 as a stock model does.
    Its dh GEMM dz @ W is taken over the special rows only: every other row of W is zero, so its
    terms are exactly zero whatever the order of summation (the whole [3, V] x [V, D] bf16 product
    takes minutes on a CPU without bf16 instructions, where ATen falls back to scalar code)."""
    w, special = big_head
    gen = torch.Generator().manual_seed(2)
    h = (torch.randn(3, BIG_D, generator=gen) * 0.05).to(torch.bfloat16)
    labels = torch.tensor([BIG_V - 1, BIG_V - 3, 5])  # two special rows beyond 2^31, one zero row
    g = torch.tensor(1.7)
    z = torch.nn.functional.linear(h, w).requires_grad_()
    z32 = z.float()
    lse_lp = torch.logsumexp(z32.detach(), 1)
    loss_lp = torch.nn.functional.cross_entropy(z32, labels, reduction="sum")
    (dz,) = torch.autograd.grad(loss_lp, [z], g)
    dh_lp = dz[:, _SPECIAL] @ w[_SPECIAL]
    assert dz.dtype == torch.bfloat16 and dh_lp.dtype == torch.bfloat16
    yield h, labels, g, lse_lp, loss_lp.detach(), dh_lp


@pytest.mark.slow
def test_vocab_times_dim_beyond_int32_loss(backend, big_head, big_case):
    """The fused loss and dh (frozen head) with V·D > 2^31, against the exact answer: the zero rows
    have logit 0, so the fp64 reference needs only the special rows and their count."""
    w, special = big_head
    h0, labels, g, lse_lp, ref_lp, dh_lp = big_case
    h = h0.clone().requires_grad_()
    loss, lse = tk.linear_cross_entropy(h, w, labels, reduction="sum", return_lse=True, backend=backend)
    (dh,) = torch.autograd.grad(loss, [h], g)
    # exact fp64 answer
    hd, sd = h.detach().double(), special.double()
    z = hd @ sd.t()  # [3, 6] logits of the special rows
    zeros = BIG_V - len(_SPECIAL)
    lse_ref = torch.logsumexp(torch.cat([z, torch.full((3, 1), float(torch.tensor(float(zeros)).log()),
                                                       dtype=F64)], 1), 1)
    col = {v: i for i, v in enumerate(_SPECIAL)}
    zy = torch.stack([z[i, col[int(y)]] if int(y) in col else torch.tensor(0.0, dtype=F64)
                      for i, y in enumerate(labels)])
    loss_ref = (lse_ref - zy).sum()
    p = torch.exp(z - lse_ref[:, None])
    dh_ref = p @ sd
    for i, y in enumerate(labels):
        if int(y) in col:
            dh_ref[i] -= sd[col[int(y)]]
    dh_ref *= 1.7
    # the bf16 baseline's error (plain PyTorch on the same bf16 tensors, big_case)
    tok_err = float((lse_lp.double() - lse_ref).abs().sum())
    assert_close(lse, lse_ref, lse_lp, dtype=torch.bfloat16, name="lse")
    assert_close(loss, loss_ref, dtype=torch.bfloat16, base=(tok_err + float((ref_lp.double() - loss_ref).abs()),) * 2,
                 name="loss")
    assert_close(dh, dh_ref, dh_lp, dtype=torch.bfloat16, name="dh")


N_BIG, V_BIG, D_SMALL = 33_000, 65_536, 8  # N·V = 2.16e9 > 2^31; logits never exist at once


@pytest.mark.slow
def test_tokens_times_vocab_beyond_int32_loss(backend):
    """N·V > 2^31 through the fused loss (chunked, so its memory stays small).  Only the first and
    last rows carry labels, so the fp64 reference is cheap; every row's logits are still computed
    and the labelled rows past N·V = 2^31 are checked one by one."""
    if backend == "torch" and not os.environ.get("TIEDKERNELS_TEST_HUGE_TORCH"):
        pytest.skip("the pure-PyTorch backend takes minutes at N·V > 2^31 on 2 cores; set "
                    "TIEDKERNELS_TEST_HUGE_TORCH=1 to run it (its ops are PyTorch's own, 64-bit throughout)")
    gen = torch.Generator().manual_seed(3)
    h = torch.randn(N_BIG, D_SMALL, generator=gen).requires_grad_()
    w = (torch.randn(V_BIG, D_SMALL, generator=gen) * 0.5).requires_grad_()
    labels = torch.full((N_BIG,), -100)
    live = torch.cat([torch.arange(0, 64), torch.arange(N_BIG - 192, N_BIG)])  # rows past 2^31 / V = 32,768
    labels[live] = torch.randint(0, V_BIG, (len(live),), generator=gen)
    labels[-1] = V_BIG - 1
    g = torch.tensor(1.7)
    loss, lse = tk.linear_cross_entropy(h, w, labels, reduction="sum", return_lse=True, label_smoothing=0.1,
                                        backend=backend)
    dh, dw = torch.autograd.grad(loss, [h, w], g)
    hl = h.detach()[live].double().requires_grad_()
    wl = w.detach().double().requires_grad_()
    ref, ref_lse = R.linear_cross_entropy(hl, wl, labels[live], reduction="sum", return_lse=True,
                                          label_smoothing=0.1)
    rh, rw = torch.autograd.grad(ref, [hl, wl], g.double())
    assert_close(loss, ref, dtype=torch.float32, name="loss")
    assert_close(lse[live], ref_lse, dtype=torch.float32, name="lse")
    assert_close(dh[live], rh, dtype=torch.float32, name="dh")
    dead = torch.ones(N_BIG, dtype=torch.bool)
    dead[live] = False
    assert torch.all(dh[dead] == 0), "an ignored row got a gradient"
    assert_close(dw, rw, dtype=torch.float32, name="dW")


# ------------------------------------------------------------------------------------------
# Issue 10's edge inputs: PyTorch's value or a clear error, on every backend (Triton too, under its
# interpreter).  Triton is only loaded where TRITON_INTERPRET=1 was set for this process, so that a
# plain run does not import it (test_triton.py must be able to switch the interpreter on).

def _triton_on():
    if os.environ.get("TRITON_INTERPRET", "0").lower() not in ("1", "true", "yes", "on"):
        return False
    from tiedkernels import backends

    return backends.why_not("triton", "cpu") is None


ALL = list(BACKENDS_CPU) + (["triton"] if _triton_on() else [])
F32 = torch.float32


def test_interpreter_cases_in_own_process():
    """The `triton` cases of this file, in a process of their own with the interpreter on."""
    import importlib.util
    import subprocess
    import sys

    if _triton_on():
        pytest.skip("the Triton interpreter is on in this process: the triton cases run here")
    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed (requirements/triton.txt)")
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-m", "pytest", os.path.abspath(__file__), "-q", "-k", "triton",
                        "-p", "no:cacheprovider", "-W", "ignore::DeprecationWarning"],
                       cwd=root, env=env, capture_output=True, text=True, timeout=900)
    tail = (r.stdout + r.stderr)[-4000:]
    assert r.returncode == 0, f"the triton cases failed (rc {r.returncode}):\n{tail}"
    passed = re.search(r"(\d+) passed", r.stdout)
    assert passed and int(passed.group(1)) >= 40 and "failed" not in r.stdout, tail


def test_error_class():
    """Shape, dtype, device and option errors are one class, both ValueError and RuntimeError."""
    assert issubclass(tk.TiedKernelsError, ValueError) and issubclass(tk.TiedKernelsError, RuntimeError)
    h, w, b, labels = _inputs()
    calls = [lambda: tk.logits(torch.randn(N, D + 1, dtype=F64), w),
             lambda: tk.linear_cross_entropy(h, w, labels[:-1]),
             lambda: tk.linear_cross_entropy(h, w, labels.float()),
             lambda: tk.linear_cross_entropy(h.float(), w, labels),
             lambda: tk.linear_cross_entropy(h, w, labels, reduction="avg"),
             lambda: tk.embedding(labels, w.long())]
    for call in calls:
        with pytest.raises(RuntimeError) as e:
            call()
        assert type(e.value) is tk.TiedKernelsError, f"{type(e.value).__name__}: {e.value}"


def _lce_ref(h, w, labels, g=None, **opts):
    """fp64 reference loss and its gradients for the tensors of `h, w, b` that require one."""
    bias = opts.pop("bias", None)
    leaves = [x.detach().double().requires_grad_() if x is not None else None for x in (h, w, bias)]
    out = R.linear_cross_entropy(leaves[0], leaves[1], labels, bias=leaves[2], **opts)
    loss = out[0] if isinstance(out, tuple) else out
    g = torch.ones_like(loss) if g is None else g.double()
    wrt = [x for x in leaves if x is not None]
    grads = torch.autograd.grad(loss, wrt, g, allow_unused=True)
    return out, grads


# item 3: every tensor argument on another device than the weight ------------------------------

@pytest.mark.parametrize("backend", ALL)
def test_argument_on_another_device(backend):
    from tiedkernels import distributed as tkd

    h, w, b, labels = _inputs()
    meta = {"h": h.detach().to("meta"), "b": b.detach().to("meta"), "y": labels.to("meta")}
    head = tk.TiedEmbeddingHead(V, D, bias=True, dtype=F64, backend=backend)
    calls = {
        "functional loss bias": lambda: tk.linear_cross_entropy(h, w, labels, bias=meta["b"], backend=backend),
        "functional loss labels": lambda: tk.linear_cross_entropy(h, w, meta["y"], backend=backend),
        "functional loss hidden": lambda: tk.linear_cross_entropy(meta["h"], w, labels, backend=backend),
        "functional loss num_items": lambda: tk.linear_cross_entropy(
            h, w, labels, reduction="sum", num_items_in_batch=torch.tensor(3.0, device="meta"), backend=backend),
        "functional logits bias": lambda: tk.logits(h, w, bias=meta["b"], backend=backend),
        "functional logits hidden": lambda: tk.logits(meta["h"], w, backend=backend),
        "functional embedding ids": lambda: tk.embedding(meta["y"], w, backend=backend),
        "module forward ids": lambda: head(meta["y"]),
        "module embed ids (no grad)": lambda: torch.no_grad()(head.embed)(meta["y"]),
        "module loss labels": lambda: head.loss(h, meta["y"]),
        "module loss bias": lambda: head.loss(h, labels, bias=meta["b"]),
        "module logits hidden": lambda: head.logits(meta["h"]),
        "output_embeddings hidden": lambda: head.output_embeddings(meta["h"]),
        "output_embeddings bias": lambda: head.output_embeddings(h, bias=meta["b"]),
        "vocab-parallel loss bias": lambda: tkd.vocab_parallel_linear_cross_entropy(h, w, labels, bias=meta["b"],
                                                                                    backend=backend),
        "vocab-parallel loss labels": lambda: tkd.vocab_parallel_linear_cross_entropy(h, w, meta["y"],
                                                                                      backend=backend),
        "vocab-parallel embedding ids": lambda: tkd.vocab_parallel_embedding(meta["y"], w, backend=backend),
        "weight on meta": lambda: tk.linear_cross_entropy(h, w.detach().to("meta"), labels, backend=backend),
    }
    for what, call in calls.items():
        with pytest.raises(tk.TiedKernelsError) as e:
            call()
        msg = str(e.value)
        assert "meta" in msg and "cpu" in msg, f"{what}: the message does not name both devices: {msg}"


# item 5: softcap = inf is the uncapped result ---------------------------------------------------

@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_softcap_inf_is_uncapped(backend, reduction):
    h, w, b, labels = _inputs()
    g = torch.randn(N, dtype=F64) if reduction == "none" else torch.tensor(0.7, dtype=F64)
    opts = dict(bias=b, reduction=reduction, label_smoothing=0.1, z_loss=1e-2, logit_scale=0.8)
    loss = tk.linear_cross_entropy(h, w, labels, softcap=float("inf"), chunk_size=4, backend=backend, **opts)
    grads = torch.autograd.grad(loss, [h, w, b], g)
    ref, rgrads = _lce_ref(h, w, labels, g, **opts)
    assert_close(loss, ref, dtype=F64, name="loss")
    for name, a, r in zip(("dh", "dW", "db"), grads, rgrads):
        assert_close(a, r, dtype=F64, name=name)
    z = tk.logits(h, w, bias=b, softcap=float("inf"), logit_scale=0.8, backend=backend)
    assert_close(z, R.logits(h.detach(), w.detach(), bias=b.detach(), logit_scale=0.8), dtype=F64, name="logits")
    head = tk.TiedEmbeddingHead(V, D, dtype=F64, softcap=float("inf"), backend=backend)
    assert_close(head.loss(h, labels), R.linear_cross_entropy(h.detach(), head.weight.detach(), labels), dtype=F64,
                 name="module loss")


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("cap", [0.0, -1.0, float("nan"), -float("inf")])
def test_softcap_out_of_range(backend, cap):
    h, w, b, labels = _inputs()
    for call in (lambda: tk.linear_cross_entropy(h, w, labels, softcap=cap, backend=backend),
                 lambda: tk.logits(h, w, softcap=cap, backend=backend)):
        with pytest.raises(tk.TiedKernelsError, match="softcap"):
            call()


# item 6: shift=True with T = 0 ------------------------------------------------------------------

@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_shift_with_empty_sequence(backend, reduction):
    h = torch.randn(2, 0, D, dtype=F64, requires_grad=True)
    w = torch.randn(V, D, dtype=F64, requires_grad=True)
    labels = torch.zeros(2, 0, dtype=torch.long)
    loss, lse = tk.linear_cross_entropy(h, w, labels, shift=True, reduction=reduction, return_lse=True,
                                        backend=backend)
    assert lse.shape == (2, 0)
    if reduction == "none":
        assert loss.shape == (2, 0)
    else:
        assert loss.shape == () and loss.item() == 0
    dh, dw = torch.autograd.grad(loss, [h, w], torch.ones_like(loss))
    assert dh.shape == h.shape and dw.shape == w.shape and torch.all(dw == 0)


# item 7: num_items_in_batch as a number or a 1-element tensor; bad counts and option values -------

@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("num_items", [7, 7.5, torch.tensor(7), torch.tensor([7]), torch.tensor([7.5]),
                                       torch.tensor([[7]], dtype=torch.int32)],
                         ids=["int", "float", "tensor0d", "tensor1", "tensor1f", "tensor11i32"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_num_items_in_batch_forms(backend, num_items, reduction):
    h, w, b, labels = _inputs()
    labels[2] = -100
    ref, rgrads = _lce_ref(h, w, labels, torch.tensor(1.3, dtype=F64), bias=b, reduction=reduction,
                           num_items_in_batch=float(num_items))
    loss = tk.linear_cross_entropy(h, w, labels, bias=b, reduction=reduction, num_items_in_batch=num_items,
                                   chunk_size=4, backend=backend)
    assert loss.shape == ()
    assert_close(loss, ref, dtype=F64, name="loss")
    grads = torch.autograd.grad(loss, [h, w, b], torch.tensor(1.3, dtype=F64))
    for name, a, r in zip(("dh", "dW", "db"), grads, rgrads):
        assert_close(a, r, dtype=F64, name=name)
    with torch.no_grad():
        assert_close(tk.linear_cross_entropy(h, w, labels, bias=b, reduction=reduction,
                                             num_items_in_batch=num_items, backend=backend), ref, dtype=F64,
                     name="no-grad loss")


@pytest.mark.parametrize("backend", ALL)
def test_num_items_in_batch_bad(backend):
    h, w, b, labels = _inputs()
    cases = {
        "a [2] tensor": (torch.tensor([3, 3]), tk.TiedKernelsError, "(2,)"),
        "an empty tensor": (torch.tensor([]), tk.TiedKernelsError, "(0,)"),
        "a bool tensor": (torch.tensor(True), tk.TiedKernelsError, "bool"),
        "zero": (0, tk.TiedKernelsError, "0"),
        "negative": (-2, tk.TiedKernelsError, "-2"),
        "NaN": (float("nan"), tk.TiedKernelsError, "nan"),
        "inf": (float("inf"), tk.TiedKernelsError, "inf"),
        "a string": ("7", TypeError, "str"),
        "True": (True, TypeError, "bool"),
    }
    for what, (value, cls, text) in cases.items():
        with pytest.raises(cls) as e:
            tk.linear_cross_entropy(h, w, labels, reduction="sum", num_items_in_batch=value, backend=backend)
        msg = str(e.value)
        assert "num_items_in_batch" in msg and text in msg, f"{what}: {msg}"


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("option,value", [("z_loss", float("nan")), ("z_loss", float("inf")), ("z_loss", -0.1),
                                          ("label_smoothing", float("nan")), ("label_smoothing", float("inf")),
                                          ("label_smoothing", 1.5), ("logit_scale", float("nan")),
                                          ("logit_scale", float("inf"))])
def test_option_out_of_range(backend, option, value):
    h, w, b, labels = _inputs()
    with pytest.raises(tk.TiedKernelsError) as e:
        tk.linear_cross_entropy(h, w, labels, backend=backend, **{option: value})
    assert option in str(e.value)
    if option == "logit_scale":
        with pytest.raises(tk.TiedKernelsError, match=option):
            tk.logits(h, w, logit_scale=value, backend=backend)


# item 8: what is not a tensor, D = 0, V = 0, soft targets, nn.Embedding's options ------------------

@pytest.mark.parametrize("backend", ALL)
def test_not_a_tensor(backend):
    h, w, b, labels = (x.detach() for x in _inputs())
    cases = {
        "hidden": [lambda v: tk.linear_cross_entropy(v, w, labels, backend=backend),
                   lambda v: tk.logits(v, w, backend=backend)],
        "weight": [lambda v: tk.linear_cross_entropy(h, v, labels, backend=backend),
                   lambda v: tk.embedding(labels, v, backend=backend)],
        "labels": [lambda v: tk.linear_cross_entropy(h, w, v, backend=backend)],
        "ids": [lambda v: tk.embedding(v, w, backend=backend)],
        "bias": [lambda v: tk.logits(h, w, bias=v, backend=backend),
                 lambda v: tk.linear_cross_entropy(h, w, labels, bias=v, backend=backend)],
    }
    values = {"hidden": h, "weight": w, "labels": labels, "ids": labels, "bias": b}
    for name, calls in cases.items():
        for value in (values[name].numpy(), None, values[name].tolist()):
            if value is None and name == "bias":
                continue  # bias=None is no bias
            for call in calls:
                with pytest.raises(TypeError) as e:
                    call(value)
                assert name in str(e.value) and type(value).__name__ in str(e.value), str(e.value)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_zero_feature_dim(backend, reduction):
    """D = 0: zero logits (plus the bias), as F.linear gives; without a bias the loss is log V."""
    h = torch.randn(3, 4, 0, dtype=F64, requires_grad=True)
    w = torch.randn(V, 0, dtype=F64, requires_grad=True)
    b = torch.randn(V, dtype=F64, requires_grad=True)
    labels = torch.randint(0, V, (3, 4))
    g = torch.randn(3, 4, dtype=F64) if reduction == "none" else torch.tensor(1.2, dtype=F64)
    loss = tk.linear_cross_entropy(h, w, labels, reduction=reduction, backend=backend)
    assert_close(loss, torch.full_like(loss, math.log(V)) if reduction == "none" else
                 torch.tensor(math.log(V), dtype=F64), dtype=F64, name="loss = log V")
    loss = tk.linear_cross_entropy(h, w, labels, bias=b, reduction=reduction, label_smoothing=0.2, backend=backend)
    ref, (rh, rw, rb) = _lce_ref(h, w, labels, g, bias=b, reduction=reduction, label_smoothing=0.2)
    assert_close(loss, ref, dtype=F64, name="loss with bias")
    dh, dw, db = torch.autograd.grad(loss, [h, w, b], g)
    assert dh.shape == h.shape and dw.shape == w.shape
    assert_close(db, rb, dtype=F64, name="db")
    z = tk.logits(h, w, bias=b, backend=backend)
    assert_close(z, b.detach().expand(3, 4, V), dtype=F64, name="logits")


@pytest.mark.parametrize("backend", ALL)
def test_zero_classes(backend):
    h, _, _, labels = _inputs()
    w = torch.randn(0, D, dtype=F64, requires_grad=True)
    for lab in (labels, torch.full((N,), -100), labels[:0]):
        hh = h[: lab.shape[0]]
        with pytest.raises(tk.TiedKernelsError) as e:
            tk.linear_cross_entropy(hh, w, lab, backend=backend)
        assert "V >= 1" in str(e.value) and "(0, 6)" in str(e.value)
    z = tk.logits(h, w, backend=backend)  # F.linear gives [N, 0]: so do we
    assert z.shape == (N, 0)


@pytest.mark.parametrize("backend", ALL)
def test_soft_targets_and_k_dimensional_refused(backend):
    h, w, b, labels = _inputs()
    probs = torch.softmax(torch.randn(N, V, dtype=F64), -1)
    with pytest.raises(tk.TiedKernelsError, match="probability \\(soft\\) targets"):
        tk.linear_cross_entropy(h, w, probs, backend=backend)
    with pytest.raises(tk.TiedKernelsError, match="K-dimensional"):
        tk.linear_cross_entropy(h, torch.randn(V, 3, D, dtype=F64), labels, backend=backend)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("opts", [dict(max_norm=1.0), dict(max_norm=0.7, norm_type=1.0, padding_idx=2),
                                  dict(scale_grad_by_freq=True), dict(sparse=True)],
                         ids=["max_norm", "max_norm_l1_pad", "scale_grad_by_freq", "sparse"])
def test_embedding_options_as_nn_embedding(backend, opts):
    """nn.Embedding's options do what they do on a stock tied model (max_norm renormalizes the one
    weight in place, so the head sees the renormalized rows)."""
    import torch.nn.functional as F
    from torch import nn

    head = tk.TiedEmbeddingHead(V, D, dtype=F64, backend=backend, **opts)
    stock = nn.Embedding(V, D, dtype=F64, **opts)
    with torch.no_grad():
        head.weight.mul_(2.0)
        stock.weight.copy_(head.weight)
    ids = torch.tensor([[1, 2, 2, 5], [7, 1, 2, 0]])
    labels = torch.randint(0, V, (2, 4))
    loss = head.loss(torch.tanh(head(ids) * 1.3), labels)
    loss.backward()
    ref = F.cross_entropy(F.linear(torch.tanh(stock(ids) * 1.3), stock.weight).reshape(-1, V), labels.reshape(-1))
    ref.backward()
    assert torch.equal(head.weight.detach(), stock.weight.detach()), "the weights differ after the lookup"
    assert_close(loss, ref, dtype=F64, name="loss")
    assert_close(head.weight.grad.to_dense(), stock.weight.grad.to_dense(), dtype=F64, name="dW")
    for k, v in opts.items():
        assert getattr(head, k) == v


def test_embedding_options_vocab_parallel_refused():
    from tiedkernels.distributed import VocabParallelTiedEmbeddingHead

    for k, v in (("max_norm", 1.0), ("scale_grad_by_freq", True), ("sparse", True)):
        with pytest.raises(NotImplementedError, match=k):
            VocabParallelTiedEmbeddingHead(V, D, **{k: v})


# item 11: autocast, as the stock head computes it -------------------------------------------------

@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_autocast_like_stock(backend, reduction):
    """Under torch.autocast (CPU, bf16) the projection runs in bf16 as F.linear does and the softmax in
    fp32 as F.cross_entropy does: the same as calling with bf16 inputs, on every backend; the loss is
    fp32 and the fp32 parameters get fp32 gradients."""
    import torch.nn.functional as F

    torch.manual_seed(5)
    n, d, v = 37, 32, 123
    h = torch.randn(n, d, requires_grad=True)
    w = (torch.randn(v, d) * 0.3).requires_grad_()
    b = torch.randn(v, requires_grad=True)
    labels = torch.randint(0, v, (n,))
    labels[3] = -100
    opts = dict(reduction=reduction, label_smoothing=0.1, softcap=5.0)
    g = torch.randn(n) if reduction == "none" else torch.tensor(1.4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = tk.linear_cross_entropy(h, w, labels, bias=b, backend=backend, chunk_size=8, **opts)
        z = tk.logits(h, w, bias=b, softcap=5.0, backend=backend)
        zs = F.linear(h, w, b)
        stock = F.cross_entropy(torch.tanh(zs / 5.0) * 5.0, labels, reduction=reduction, label_smoothing=0.1)
    assert loss.dtype == F32 and z.dtype == torch.bfloat16 and zs.dtype == torch.bfloat16
    grads = torch.autograd.grad(loss, [h, w, b], g)
    assert all(x.dtype == F32 for x in grads)
    # the same as the bf16 call outside autocast
    hb, wb, bb = (x.detach().bfloat16().requires_grad_() for x in (h, w, b))
    lb = tk.linear_cross_entropy(hb, wb, labels, bias=bb, backend=backend, chunk_size=8, **opts)
    torch.testing.assert_close(loss, lb, rtol=0, atol=0)
    gb = torch.autograd.grad(lb, [hb, wb, bb], g)
    for name, a, r in zip(("dh", "dW", "db"), grads, gb):
        torch.testing.assert_close(a, r.float(), rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
    torch.testing.assert_close(z, tk.logits(hb, wb, bias=bb, softcap=5.0, backend=backend), rtol=0, atol=0)
    # and within the bf16 rule of the stock head's result (fp64 reference on the bf16-rounded inputs)
    ref64, rgrads = _lce_ref(hb, wb, labels, g, bias=bb, **opts)
    sgrads = torch.autograd.grad(stock, [h, w, b], g)
    if reduction == "none":
        assert_close(loss, ref64, stock, dtype=torch.bfloat16, name="loss vs stock")
    else:
        tok_err = float((R.linear_cross_entropy(hb.detach(), wb.detach(), labels, bias=bb.detach(),
                                                reduction="none", label_smoothing=0.1, softcap=5.0).double()
                         - R.linear_cross_entropy(hb.detach(), wb.detach(), labels, bias=bb.detach(),
                                                  reduction="none", label_smoothing=0.1, softcap=5.0,
                                                  upcast=True)).abs().sum()) / (n - 1)
        assert_close(loss, ref64, dtype=torch.bfloat16, base=(tok_err, tok_err), name="loss vs stock")
    for name, a, s, r in zip(("dh", "dW", "db"), grads, sgrads, rgrads):
        assert_close(a, r, s, dtype=torch.bfloat16, name=name)


@pytest.mark.parametrize("backend", ALL)
def test_autocast_module_tied(backend):
    """The module under autocast: embedding in fp32 (as nn.Embedding), head in bf16, one fp32 gradient."""
    head = tk.TiedEmbeddingHead(V, D, backend=backend)
    ids = torch.randint(0, V, (2, 5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = head(ids)
        loss = head.loss(torch.tanh(x), ids, shift=True)
    assert x.dtype == F32 and loss.dtype == F32
    loss.backward()
    # the same computation spelled out: fp32 lookup, the head's inputs cast to bf16, autograd's own sum
    w = head.weight.detach().clone().requires_grad_()
    ref = tk.linear_cross_entropy(torch.tanh(tk.embedding(ids, w, backend=backend)).bfloat16(), w.bfloat16(), ids,
                                  shift=True, backend=backend)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=0, atol=0)
    assert head.weight.grad.dtype == F32
    assert_close(head.weight.grad, w.grad, dtype=F32, name="dW")


@pytest.mark.parametrize("backend", ALL)
def test_autocast_vocab_parallel_like_single_device(backend):
    """The vocabulary-parallel loss (one rank, no group) under autocast: the bf16 call's result."""
    from tiedkernels.distributed import vocab_parallel_linear_cross_entropy as vp_lce

    h = torch.randn(9, D, requires_grad=True)
    w = torch.randn(V, D, requires_grad=True)
    labels = torch.randint(0, V, (9,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = vp_lce(h, w, labels, label_smoothing=0.1, backend=backend)
    assert loss.dtype == F32
    dh, dw = torch.autograd.grad(loss, [h, w])
    hb, wb = (x.detach().bfloat16().requires_grad_() for x in (h, w))
    ref = vp_lce(hb, wb, labels, label_smoothing=0.1, backend=backend)
    torch.testing.assert_close(loss, ref, rtol=0, atol=0)
    rh, rw = torch.autograd.grad(ref, [hb, wb])
    assert dh.dtype == F32 and dw.dtype == F32
    torch.testing.assert_close(dh, rh.float(), rtol=0, atol=0)
    torch.testing.assert_close(dw, rw.float(), rtol=0, atol=0)
