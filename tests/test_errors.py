"""Bad and edge-case input, one test per row of DESIGN section 5, on every CPU backend."""

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

pytestmark = pytest.mark.parametrize("backend", BACKENDS_CPU)


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


@pytest.mark.slow
def test_vocab_times_dim_beyond_int32_loss(backend, big_head):
    """The fused loss and dh (frozen head) with V·D > 2^31, against the exact answer: the zero rows
    have logit 0, so the fp64 reference needs only the special rows and their count."""
    w, special = big_head
    gen = torch.Generator().manual_seed(2)
    h = (torch.randn(3, BIG_D, generator=gen) * 0.05).to(torch.bfloat16).requires_grad_()
    labels = torch.tensor([BIG_V - 1, BIG_V - 3, 5])  # two special rows beyond 2^31, one zero row
    g = torch.tensor(1.7)
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
    # bf16 baseline: plain PyTorch on the same bf16 tensors ([3, V] logits are small)
    h2 = h.detach().clone().requires_grad_()
    ref_lp, lse_lp = R.linear_cross_entropy(h2, w, labels, reduction="sum", return_lse=True)
    (dh_lp,) = torch.autograd.grad(ref_lp, [h2], g)
    tok_err = float((torch.logsumexp(R.logits(h2.detach(), w).float(), 1).double() - lse_ref).abs().sum())
    assert_close(lse, lse_ref, lse_lp, dtype=torch.bfloat16, name="lse")
    assert_close(loss, loss_ref, dtype=torch.bfloat16, base=(tok_err + float((ref_lp.detach() - loss_ref).abs()),) * 2,
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
