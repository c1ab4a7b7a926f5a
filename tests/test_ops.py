"""Correctness of the three ops (embedding, logits, fused linear + cross-entropy) on every CPU
backend, against the unchunked fp64 reference, with a random incoming gradient.

Layout (Liger style): one table of options per op, crossed with backend x dtype (x reduction);
then the odd shapes, gradcheck, opcheck, the schema copy, and the op-level properties
(second backward, frozen weight, lse, per-shard stats and sharded backward).
"""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import tiedkernels as tk
from tiedkernels import reference as R
from tiedkernels._schemas import SCHEMAS

from _cpu_backends import BACKENDS_CPU
from tolerances import assert_close

DTYPES = [torch.float64, torch.float32, torch.bfloat16]
DTYPE_IDS = ["fp64", "fp32", "bf16"]
N, D, V = 37, 32, 123  # N prime: no chunk size in (1, N) divides it; V odd
CHUNK = 16  # the chunk size of the option rows (3 chunks, the last one short)
F64 = torch.float64


def _op(backend, name):
    prefix = "torch_" if backend == "torch" else ""
    return getattr(torch.ops.tiedkernels, prefix + name).default


def _incoming(out, seed=1):
    """A random incoming gradient: a scalar in [1.5, 2.5] (never 1) or a per-element tensor in [-1, 1]."""
    gen = torch.Generator().manual_seed(seed)
    if out.dim() == 0:
        g = torch.empty((), dtype=F64).uniform_(1.5, 2.5, generator=gen)
    else:
        g = torch.rand(out.shape, dtype=F64, generator=gen) * 2 - 1
    return g.to(out.dtype)


def _fwd_bwd(fn, leaves, seed=1):
    """(outputs..., grads of the leaves that require grad) of fn under a random incoming gradient."""
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    wrt = [x for x in leaves if x is not None and x.requires_grad]
    grads = torch.autograd.grad(outs[0], wrt, _incoming(outs[0], seed)) if wrt else ()
    it = iter(grads)
    full = [next(it) if (x is not None and x.requires_grad) else None for x in leaves]
    return [o.detach() for o in outs], full


def _leaves(tensors, dtype):
    return [None if t is None else t.detach().to(dtype).requires_grad_(t.requires_grad) for t in tensors]


def _check_all(names, kernel, ref64, reflp, dtype, ctx, bases=None):
    for name, a, r, rl in zip(names, kernel, ref64, reflp or [None] * len(names)):
        if r is None:
            assert a is None, f"{ctx}: {name} should be None"
            continue
        assert a is not None, f"{ctx}: {name} missing"
        assert a.dtype == (r.dtype if dtype == F64 else (rl.dtype if rl is not None else a.dtype)), \
            f"{ctx}: {name} dtype {a.dtype}"
        assert_close(a, r, rl, dtype=dtype, name=f"{ctx}: {name}", base=(bases or {}).get(name))


def _compare(kernel_fn, ref_fn, inputs, dtype, names, ctx, bases=None):
    """Run the kernel on ``inputs`` cast to ``dtype``, the reference in fp64 on the same values,
    and (low precision only) the reference in ``dtype``; compare outputs and gradients."""
    lp = _leaves(inputs, dtype)
    kernel_out, kernel_grads = _fwd_bwd(kernel_fn, lp)
    ref_out, ref_grads = _fwd_bwd(ref_fn, _leaves(lp, F64))
    reflp = None
    if dtype not in (torch.float32, F64):
        lo, lg = _fwd_bwd(ref_fn, _leaves(lp, dtype))
        reflp = lo + lg
    assert len(kernel_out) == len(ref_out), f"{ctx}: {len(kernel_out)} outputs, reference {len(ref_out)}"
    _check_all(names, kernel_out + kernel_grads, ref_out + ref_grads, reflp, dtype, ctx, bases)
    return kernel_out, kernel_grads


# ------------------------------------------------------------------------------------------
# fused linear + cross-entropy: every option x reduction x dtype x backend

# Data keys (shape, bias, ignore, label_dtype) shape the inputs; the rest are call options.
# Rows other than "defaults" run with chunk_size=CHUNK (does not divide N).
LCE_OPTIONS = {
    "defaults": dict(chunk_size=None),
    "ignore_index": dict(ignore=0.3),
    "ignore_index_custom": dict(ignore=0.3, ignore_index=5),
    "label_smoothing": dict(label_smoothing=0.1),
    "z_loss": dict(z_loss=1e-2),
    "softcap": dict(softcap=4.0),
    "logit_scale": dict(logit_scale=0.7),
    "bias": dict(bias=True),
    "num_items_int": dict(ignore=0.3, num_items_in_batch=50),
    "num_items_tensor": dict(ignore=0.3, num_items_in_batch="tensor"),
    "shift": dict(shape=(3, 13), shift=True),
    "return_lse": dict(ignore=0.2, return_lse=True),
    "int32_labels": dict(ignore=0.2, label_dtype=torch.int32),
    "chunk_1": dict(chunk_size=1),
    "batch_3d": dict(shape=(4, 9)),
    "everything": dict(shape=(3, 13), bias=True, ignore=0.3, label_dtype=torch.int32, label_smoothing=0.1,
                       z_loss=1e-2, softcap=4.0, logit_scale=0.7, num_items_in_batch="tensor", shift=True,
                       return_lse=True, chunk_size=5),
}
_DATA_KEYS = ("shape", "bias", "ignore", "label_dtype")


def _lce_params():
    out = []
    for name, opts in LCE_OPTIONS.items():
        for reduction in ("none", "sum", "mean"):
            if reduction == "none" and "num_items_in_batch" in opts and name != "everything":
                continue  # num_items_in_batch divides a summed loss: a ValueError with "none" (test_errors)
            out.append(pytest.param(name, reduction, id=f"{name}-{reduction}"))
    return out


def lce_inputs(*, shape=(N,), v=V, d=D, bias=False, ignore=0.0, ignore_index=-100, label_dtype=torch.int64,
               w_scale=0.5):
    """fp64 inputs; logits have a standard deviation of about w_scale * sqrt(d) (~2.8 here)."""
    h = torch.randn(*shape, d, dtype=F64, requires_grad=True)
    w = (torch.randn(v, d, dtype=F64) * w_scale).requires_grad_()
    b = torch.randn(v, dtype=F64).requires_grad_() if bias else None
    labels = torch.randint(0, v, shape)
    if ignore:
        labels[torch.rand(shape) < ignore] = ignore_index
        labels.view(-1)[0] = ignore_index  # at least one ignored token
    return h, w, b, labels.to(label_dtype)


def _scalar_loss_base(inputs, labels, dtype, opts):
    """For a summed (sum/mean/num_items) low-precision loss: the (rms, max) baseline error of the
    same-precision reference, as its per-token errors summed without the luck of cancellation
    (one random draw of a signed sum is no measure of accuracy).  None where not needed."""
    if dtype in (torch.float32, F64) or opts.get("reduction", "mean") == "none":
        return None
    tok_opts = {k: v for k, v in opts.items() if k not in ("num_items_in_batch", "return_lse")}
    tok_opts["reduction"] = "none"
    hl, wl, bl = _leaves(inputs, dtype)
    tok_lp = R.linear_cross_entropy(hl, wl, labels, bias=bl, **tok_opts)
    tok_64 = R.linear_cross_entropy(hl.double(), wl.double(), labels, bias=None if bl is None else bl.double(),
                                    **tok_opts)
    eff = labels[..., 1:] if opts.get("shift") else labels
    if opts.get("num_items_in_batch") is not None:
        denom = float(opts["num_items_in_batch"])
    elif opts.get("reduction", "mean") == "mean":
        denom = float((eff != opts.get("ignore_index", -100)).sum().clamp(min=1))
    else:
        denom = 1.0
    total = float((tok_lp.detach().double() - tok_64.detach()).abs().sum()) / denom
    return {"loss": (total, total)}


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case,reduction", _lce_params())
@pytest.mark.parametrize("backend", BACKENDS_CPU)
def test_linear_cross_entropy(backend, case, reduction, dtype):
    opts = dict(LCE_OPTIONS[case])
    data = {k: opts.pop(k) for k in _DATA_KEYS if k in opts}
    if "ignore_index" in opts:
        data["ignore_index"] = opts["ignore_index"]
    opts.setdefault("chunk_size", CHUNK)
    if opts.get("num_items_in_batch") == "tensor":
        opts["num_items_in_batch"] = torch.tensor(50)
    if reduction == "none":
        opts.pop("num_items_in_batch", None)
    h, w, b, labels = lce_inputs(**data)
    chunk = opts.pop("chunk_size")
    ref_opts = dict(opts, reduction=reduction)

    def kernel(h_, w_, b_):
        return tk.linear_cross_entropy(h_, w_, labels, bias=b_, chunk_size=chunk, backend=backend, **ref_opts)

    def ref(h_, w_, b_):
        return R.linear_cross_entropy(h_, w_, labels, bias=b_, **ref_opts)

    bases = _scalar_loss_base([h, w, b], labels, dtype, ref_opts)
    names = ["loss"] + (["lse"] if opts.get("return_lse") else []) + ["dh", "dW", "db"]
    out, _ = _compare(kernel, ref, [h, w, b], dtype, names, f"{backend}/{case}/{reduction}", bases)
    assert out[0].dtype == (F64 if dtype == F64 else torch.float32)  # the loss is fp32 (fp64 for fp64)


# ------------------------------------------------------------------------------------------
# embedding

EMB_OPTIONS = {
    "plain": dict(),
    "padding_idx": dict(padding_idx=3),
    "padding_idx_negative": dict(padding_idx=-V + 4),  # = 4 after normalization
    "int32_ids": dict(id_dtype=torch.int32),
    "ids_2d": dict(shape=(4, 9)),
    "everything": dict(shape=(4, 9), id_dtype=torch.int32, padding_idx=3),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", list(EMB_OPTIONS))
@pytest.mark.parametrize("backend", BACKENDS_CPU)
def test_embedding(backend, case, dtype):
    opts = dict(EMB_OPTIONS[case])
    shape = opts.pop("shape", (N,))
    id_dtype = opts.pop("id_dtype", torch.int64)
    ids = torch.randint(0, 12, shape)  # many repeated rows: the backward must sum them
    ids.view(-1)[:3] = torch.tensor([3, 4, V - 1])  # the padding rows and the last row appear
    ids = ids.to(id_dtype)
    w = torch.randn(V, D, dtype=F64, requires_grad=True)

    def kernel(w_):
        return tk.embedding(ids, w_, backend=backend, **opts)

    def ref(w_):
        return R.embedding(ids, w_, **opts)

    _, (dw,) = _compare(kernel, ref, [w], dtype, ["out", "dW"], f"{backend}/{case}")
    pad = opts.get("padding_idx")
    if pad is not None:
        assert torch.all(dw[pad % V] == 0), "the padding row must get no gradient"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("padding_idx", [None, 3])
@pytest.mark.parametrize("backend", BACKENDS_CPU)
def test_embedding_bwd_acc_adds_into_buffer(backend, padding_idx, dtype):
    """embedding_bwd_acc_ adds its rows into an existing gradient (the tied-gradient path)."""
    ids = torch.randint(0, 12, (5, 7))
    ids[0, 0] = 3
    grad = torch.randn(5, 7, D, dtype=F64)
    base = torch.randn(V, D, dtype=F64)
    expect = base.clone()
    keep = ids.reshape(-1) != (padding_idx if padding_idx is not None else -1)
    expect.index_add_(0, ids.reshape(-1)[keep], grad.reshape(-1, D)[keep])
    buf = base.to(dtype)
    _op(backend, "embedding_bwd_acc_")(buf, grad.to(dtype), ids, padding_idx)
    if dtype == torch.bfloat16:
        # same-precision reference: PyTorch's own bf16 index_add_ into the bf16 buffer
        lowp = base.to(dtype).index_add_(0, ids.reshape(-1)[keep], grad.to(dtype).reshape(-1, D)[keep])
        assert_close(buf, expect, lowp, dtype=dtype, name="embedding_bwd_acc_")
    else:
        assert_close(buf, expect, dtype=dtype, name="embedding_bwd_acc_")


# ------------------------------------------------------------------------------------------
# logits

LOGITS_OPTIONS = {
    "plain": dict(),
    "bias": dict(bias=True),
    "logit_scale": dict(logit_scale=0.7),
    "softcap": dict(softcap=4.0),
    "hidden_3d": dict(shape=(4, 9)),
    "everything": dict(shape=(4, 9), bias=True, logit_scale=0.7, softcap=4.0),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", list(LOGITS_OPTIONS))
@pytest.mark.parametrize("backend", BACKENDS_CPU)
def test_logits(backend, case, dtype):
    opts = dict(LOGITS_OPTIONS[case])
    h, w, b, _ = lce_inputs(shape=opts.pop("shape", (N,)), bias=opts.pop("bias", False))

    def kernel(h_, w_, b_):
        return tk.logits(h_, w_, bias=b_, backend=backend, **opts)

    def ref(h_, w_, b_):
        return R.logits(h_, w_, bias=b_, **opts)

    _compare(kernel, ref, [h, w, b], dtype, ["logits", "dh", "dW", "db"], f"{backend}/{case}")


@pytest.mark.parametrize("reduction", ["none", "sum"])
@pytest.mark.parametrize("backend", BACKENDS_CPU)
def test_bf16_dw_accumulates_in_fp32(backend, reduction):
    """128 chunks of 4 rows: a dW summed across chunks in bf16 (Liger #512) drifts to several
    ulps of the result, while one fp32 accumulator stays within plain PyTorch's error."""
    h, w, b, labels = lce_inputs(shape=(512,), bias=True)

    def kernel(h_, w_, b_):
        return tk.linear_cross_entropy(h_, w_, labels, bias=b_, reduction=reduction, chunk_size=4, backend=backend)

    def ref(h_, w_, b_):
        return R.linear_cross_entropy(h_, w_, labels, bias=b_, reduction=reduction)

    _compare(kernel, ref, [h, w, b], torch.bfloat16, ["loss", "dh", "dW", "db"], f"{backend}/{reduction}",
             _scalar_loss_base([h, w, b], labels, torch.bfloat16, dict(reduction=reduction)))


# ------------------------------------------------------------------------------------------
# odd shapes: V > 65,536 (beyond 16-bit column indices), V odd

BIG_V = 70_001


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("backend", BACKENDS_CPU)
def test_linear_cross_entropy_large_vocab(backend, reduction, dtype):
    h, w, b, labels = lce_inputs(shape=(9,), v=BIG_V, d=8, bias=True, ignore=0.2)
    labels[1], labels[2] = BIG_V - 1, 65_536  # targets beyond 16 bits
    opts = dict(reduction=reduction, label_smoothing=0.1, softcap=8.0, return_lse=True)

    def kernel(h_, w_, b_):
        return tk.linear_cross_entropy(h_, w_, labels, bias=b_, chunk_size=4, backend=backend, **opts)

    def ref(h_, w_, b_):
        return R.linear_cross_entropy(h_, w_, labels, bias=b_, **opts)

    _compare(kernel, ref, [h, w, b], dtype, ["loss", "lse", "dh", "dW", "db"], f"{backend}/V={BIG_V}",
             _scalar_loss_base([h, w, b], labels, dtype, opts))


@pytest.mark.parametrize("backend", BACKENDS_CPU)
def test_embedding_and_logits_large_vocab(backend):
    ids = torch.tensor([BIG_V - 1, 65_536, 0, BIG_V - 1, 65_535])
    w = torch.randn(BIG_V, 8, dtype=torch.float32, requires_grad=True)
    _compare(lambda w_: tk.embedding(ids, w_, backend=backend), lambda w_: R.embedding(ids, w_), [w],
             torch.float32, ["out", "dW"], f"{backend}/embedding V={BIG_V}")
    # fp64 for the logits: with a dense random incoming gradient, dh sums 70,001 products of
    # O(1), beyond what the fp32 row of the table is meant for.
    h = torch.randn(5, 8, dtype=F64, requires_grad=True)
    _compare(lambda h_, w_: tk.logits(h_, w_, softcap=6.0, backend=backend),
             lambda h_, w_: R.logits(h_, w_, softcap=6.0), [h, w.detach().double().requires_grad_()],
             F64, ["logits", "dh", "dW"], f"{backend}/logits V={BIG_V}")


@pytest.mark.parametrize("backend", BACKENDS_CPU)
def test_lse_of_many_near_equal_logits(backend):
    """2^20 logits of 0 and one of 1: the exact lse is log(V - 1 + e).  Nearly equal terms are
    the worst case for a running fp32 sum (and the usual shape of an LM's long tail)."""
    v = 1 << 20
    w = torch.zeros(v, 1)
    w[5] = 1.0
    h = torch.ones(3, 1)
    labels = torch.tensor([5, 0, v - 1])
    loss, lse = tk.linear_cross_entropy(h, w, labels, reduction="none", return_lse=True, backend=backend)
    exact = torch.full((3,), math.log(v - 1 + math.e), dtype=F64)
    assert_close(lse, exact, dtype=torch.float32, name="lse")
    assert_close(loss, exact - torch.tensor([1.0, 0.0, 0.0], dtype=F64), dtype=torch.float32, name="loss")


# ------------------------------------------------------------------------------------------
# gradcheck in fp64 (small shapes; numerical vs analytical Jacobian)

GRADCHECK_LCE = {
    "none": dict(reduction="none"),
    "mean": dict(reduction="mean"),
    "sum_num_items": dict(reduction="sum", num_items_in_batch=3),
    "none_all_options": dict(reduction="none", label_smoothing=0.2, z_loss=0.05, softcap=2.0, logit_scale=1.3),
    "mean_all_options": dict(reduction="mean", label_smoothing=0.2, z_loss=0.05, softcap=2.0, logit_scale=1.3),
}


@pytest.mark.parametrize("case", list(GRADCHECK_LCE))
@pytest.mark.parametrize("backend", BACKENDS_CPU)
def test_gradcheck_linear_cross_entropy(backend, case):
    h, w, b, labels = lce_inputs(shape=(2, 3), v=7, d=3, bias=True, w_scale=1.0)
    labels[0, 1] = -100
    opts = GRADCHECK_LCE[case]
    fn = lambda h_, w_, b_: tk.linear_cross_entropy(h_, w_, labels, bias=b_, shift=True, chunk_size=2,  # noqa: E731
                                                    backend=backend, **opts)
    # The rows with every option compare the full Jacobian; the others its random projections
    # (gradcheck's fast mode), which is enough to tell a reduction's scaling apart.
    assert torch.autograd.gradcheck(fn, (h, w, b), fast_mode="all_options" not in case)


@pytest.mark.parametrize("backend", BACKENDS_CPU)
def test_gradcheck_logits(backend):
    h, w, b, _ = lce_inputs(shape=(2, 3), v=7, d=3, bias=True, w_scale=1.0)
    assert torch.autograd.gradcheck(
        lambda h_, w_, b_: tk.logits(h_, w_, bias=b_, logit_scale=1.3, softcap=2.0, backend=backend), (h, w, b))
    assert torch.autograd.gradcheck(lambda h_, w_: tk.logits(h_, w_, backend=backend), (h, w))


@pytest.mark.parametrize("backend", BACKENDS_CPU)
def test_gradcheck_embedding(backend):
    # (padding_idx is left out on purpose: its row does change the output, yet by definition
    # gets no gradient, so the numerical Jacobian disagrees; test_embedding checks that row.)
    w = torch.randn(7, 3, dtype=F64, requires_grad=True)
    ids = torch.tensor([[1, 2, 1], [6, 0, 1]])
    assert torch.autograd.gradcheck(lambda w_: tk.embedding(ids, w_, backend=backend), (w,))


# ------------------------------------------------------------------------------------------
# torch.library.opcheck on every op of every backend


def _opcheck_samples():
    """(op name, args) pairs: each op, with the variants that take different code paths."""
    n, d, v = 9, 5, 11
    h = torch.randn(n, d, requires_grad=True)
    w = torch.randn(v, d, requires_grad=True)
    b = torch.randn(v, requires_grad=True)
    labels = torch.randint(0, v, (n,))
    labels[2] = -100
    ids = torch.randint(0, v, (3, 4))
    emb_grad = torch.randn(3, 4, d)
    lse = torch.logsumexp(h.detach() @ w.detach().t() + b.detach(), dim=1)
    z = h.detach() @ w.detach().t()
    loss_opts = (-100, 0.1, 0.01, 4.0, 0.7)  # ignore_index, label_smoothing, z_loss, softcap, logit_scale
    shard_w = torch.randn(6, d, requires_grad=True)  # rows 8..13 of a V=11 vocabulary: 3 real, 3 padding
    shard_b = torch.randn(6, requires_grad=True)
    cw = torch.rand(v) + 0.5  # class weights [vocab_total]
    return [
        ("embedding_fwd", (w, ids, None)),
        ("embedding_fwd", (w, ids.int(), 3)),
        ("embedding_bwd", (emb_grad, ids, v, None)),
        ("embedding_bwd", (emb_grad, ids.int(), v, 3)),
        ("embedding_bwd_acc_", (torch.randn(v, d), emb_grad, ids, None)),
        ("embedding_bwd_acc_", (torch.randn(v, d), emb_grad, ids.int(), 3)),
        ("logits_fwd", (h, w, None, 1.0, 0.0)),
        ("logits_fwd", (h, w, b, 0.7, 4.0)),
        ("logits_bwd", (torch.randn(n, v), z, h.detach(), w.detach(), None, 1.0, 0.0, True, True, False)),
        ("logits_bwd", (torch.randn(n, v), z, h.detach(), w.detach(), b.detach(), 0.7, 4.0, True, False, True)),
        # lce_fwd: per-token (no grad_scale), gradient-in-forward (grad_scale), partial flags, sharded
        ("lce_fwd", (h, w, b, labels, None, *loss_opts, 0, 0, 4, False, False, False)),
        ("lce_fwd", (h, w, b, labels, torch.tensor(0.25), *loss_opts, 0, 0, 4, True, True, True)),
        ("lce_fwd", (h, w, None, labels.int(), torch.tensor(1.0), *loss_opts, 0, 0, 100, True, False, False)),
        ("lce_fwd", (h, shard_w, shard_b, labels, None, *loss_opts, 8, v, 4, False, False, False)),
        ("lce_bwd", (torch.randn(n), h.detach(), w.detach(), b.detach(), labels, lse, *loss_opts, 0, 0, 4,
                     True, True, True)),
        ("lce_bwd", (torch.randn(n), h.detach(), shard_w.detach(), shard_b.detach(), labels, lse, *loss_opts, 8,
                     v, 4, True, True, False)),
        ("lce_stats", (h.detach(), w.detach(), b.detach(), labels, -100, 4.0, 0.7, 0, 0, 4)),
        ("lce_stats", (h.detach(), shard_w.detach(), shard_b.detach(), labels, -100, 4.0, 0.7, 8, v, 4)),
        # the optional arguments: class weights, statistics, the lse's incoming gradient
        ("lce_fwd", (h, w, b, labels, None, *loss_opts, 0, 0, 4, False, False, False, cw, True)),
        ("lce_fwd", (h, w, b, labels, torch.tensor(0.25), *loss_opts, 0, 0, 4, True, True, True, cw, True)),
        ("lce_fwd", (h, shard_w, shard_b, labels, torch.tensor(0.5), *loss_opts, 8, v, 4, True, True, True, cw,
                     True)),
        ("lce_bwd", (torch.randn(n), h.detach(), w.detach(), b.detach(), labels, lse, *loss_opts, 0, 0, 4,
                     True, True, True, cw, torch.randn(n))),
        ("lce_bwd", (torch.randn(n), h.detach(), shard_w.detach(), shard_b.detach(), labels, lse, *loss_opts, 8,
                     v, 4, True, True, False, None, torch.randn(n))),
        ("lce_stats", (h.detach(), shard_w.detach(), shard_b.detach(), labels, -100, 4.0, 0.7, 8, v, 4, cw)),
    ]


_SAMPLES = _opcheck_samples()


def test_opcheck_samples_cover_every_op():
    assert {name for name, _ in _SAMPLES} == set(SCHEMAS)


# The gradient-in-forward sample: its backward must not scale the dh/dW/db tensors the forward
# returned in place while a caller still holds them (see test_backward_leaves_forward_outputs_alone).
_GIF_SAMPLE = 11


def _fresh(args):
    return tuple(a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
                 for a in args)


@pytest.mark.parametrize("i", [pytest.param(i, id=f"{n}-{i}") for i, (n, _) in enumerate(_SAMPLES)])
@pytest.mark.parametrize("backend", BACKENDS_CPU)
def test_opcheck(backend, i):
    name, args = _SAMPLES[i]
    torch.library.opcheck(_op(backend, name), _fresh(args))


@pytest.mark.parametrize("backend", BACKENDS_CPU)
def test_backward_leaves_forward_outputs_alone(backend):
    """The gradient-in-forward backward scales its gradients by the incoming scalar; the dh/dW/db
    outputs a direct caller of the op still holds must not change (AOT autograd relies on it)."""
    assert _SAMPLES[_GIF_SAMPLE][0] == "lce_fwd" and _SAMPLES[_GIF_SAMPLE][1][4] is not None
    h, w, b, labels = lce_inputs(bias=True)
    loss, _, dh, dw, db, _, _ = _op(backend, "lce_fwd")(h, w, b, labels, torch.tensor(0.25, dtype=F64), -100, 0.0, 0.0,
                                                 0.0, 1.0, 0, 0, CHUNK, True, True, True)
    before = [t.clone() for t in (dh, dw, db)]
    loss.backward(torch.tensor(3.0, dtype=F64))
    assert_close(h.grad, 3 * before[0], dtype=F64, name="dh")
    for name, t, t0 in zip(("dh", "dW", "db"), (dh, dw, db), before):
        assert torch.equal(t, t0), f"backward changed the forward's {name} output"


# ------------------------------------------------------------------------------------------
# the schemas: C++ (compiled ops) == tiedkernels/_schemas.py == the torch backend's copies


@pytest.mark.skipif("cpu" not in BACKENDS_CPU, reason="the compiled extension is not built")
def test_cpp_schemas_match_python_copy():
    compiled = {n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("tiedkernels::")}
    # the Python backends register the same ops under a prefix ("torch_", and "triton_" once any test
    # has imported the Triton backend); only the compiled, unprefixed ones are compared here
    compiled = {n for n in compiled if not n.startswith(("torch_", "triton_"))}
    # the token-level objectives' ops are defined in Python, once, for every device
    from tiedkernels.objectives import PYTHON_OPS

    assert compiled - set(PYTHON_OPS) == set(SCHEMAS)
    for name, sig in SCHEMAS.items():
        assert str(getattr(torch.ops.tiedkernels, name).default._schema) == f"tiedkernels::{name}{sig}"


def test_torch_backend_schemas_match_python_copy():
    for name, sig in SCHEMAS.items():
        assert str(getattr(torch.ops.tiedkernels, "torch_" + name).default._schema) == f"tiedkernels::torch_{name}{sig}"


# ------------------------------------------------------------------------------------------
# op-level properties


def _ref_grads(h, w, b, labels, g, **opts):
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_() if b is not None else None
    loss = R.linear_cross_entropy(h64, w64, labels, bias=b64, **opts)
    wrt = [x for x in (h64, w64, b64) if x is not None]
    return loss.detach(), torch.autograd.grad(loss, wrt, torch.as_tensor(g, dtype=loss.dtype))


@pytest.mark.parametrize("first_grad", [1.0, 0.3])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("backend", BACKENDS_CPU)
def test_second_backward_retain_graph(backend, reduction, first_grad):
    """The scalar loss computes its gradients in forward; a second backward must recompute them
    with its own incoming gradient, not reuse (or re-scale) the first one's."""
    h, w, b, labels = lce_inputs(bias=True, ignore=0.2)
    opts = dict(reduction=reduction, label_smoothing=0.1, z_loss=1e-2)
    loss = tk.linear_cross_entropy(h, w, labels, bias=b, chunk_size=CHUNK, backend=backend, **opts)
    for g in (first_grad, 2.5, -0.7):
        for x in (h, w, b):
            x.grad = None
        loss.backward(torch.tensor(g, dtype=loss.dtype), retain_graph=True)
        _, (rh, rw, rb) = _ref_grads(h, w, b, labels, g, **opts)
        for name, a, r in (("dh", h.grad, rh), ("dW", w.grad, rw), ("db", b.grad, rb)):
            assert_close(a, r, dtype=F64, name=f"backward with grad {g}: {name}")


class _OpLog(TorchDispatchMode):
    """Records every tiedkernels op call (arguments and results)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.namespace == "tiedkernels":
            self.calls.append((func._opname.removeprefix("torch_"), args, out))
        return out


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("backend", BACKENDS_CPU)
def test_frozen_weight_skips_dw(backend, reduction):
    h, w, b, labels = lce_inputs(ignore=0.2)
    w.requires_grad_(False)
    with _OpLog() as log:
        loss = tk.linear_cross_entropy(h, w, labels, reduction=reduction, chunk_size=CHUNK, backend=backend)
        g = _incoming(loss)
        (dh,) = torch.autograd.grad(loss, [h], g)
    h64 = h.detach().requires_grad_()
    ref = R.linear_cross_entropy(h64, w, labels, reduction=reduction)
    (rh,) = torch.autograd.grad(ref, [h64], g)
    assert_close(dh, rh, dtype=F64, name="dh with a frozen weight")
    calls = [(name, args, out) for name, args, out in log.calls if name in ("lce_fwd", "lce_bwd")]
    assert calls, "no fused-loss op ran"
    for name, args, out in calls:
        flags = args[-3:]
        assert flags[1] is False, f"{name} was asked for dW of a frozen weight: flags {flags}"
        dw = out[3] if name == "lce_fwd" else out[1]
        assert dw.numel() == 0, f"{name} returned a dW of shape {tuple(dw.shape)} for a frozen weight"
    assert any(args[-3] for _, args, _ in calls), "dh was never requested"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("backend", BACKENDS_CPU)
def test_return_lse_values(backend, dtype):
    """lse is the logsumexp of the final logits (after bias, scale and softcap), ignored tokens included."""
    h, w, b, labels = lce_inputs(shape=(3, 13), bias=True, ignore=0.3)
    h, w, b = (x.detach().to(dtype) for x in (h, w, b))
    opts = dict(bias=b, logit_scale=0.7, softcap=4.0)
    for shift in (False, True):
        loss, lse = tk.linear_cross_entropy(h, w, labels, shift=shift, return_lse=True, chunk_size=CHUNK,
                                            backend=backend, **opts)
        z = R.logits(h, w, upcast=True, **opts)
        expect = torch.logsumexp(z, dim=-1)
        if shift:
            expect = expect[..., :-1]
        assert lse.dtype == (F64 if dtype == F64 else torch.float32)
        assert_close(lse, expect, dtype=dtype, name=f"lse (shift={shift})")


SHARD = 50  # rows per shard of the V=123 vocabulary: [0, 50), [50, 100), [100, 123) + 27 padding rows


def _shards(w, b):
    """(vocab_start, weight shard, bias shard) padded to SHARD rows with random (to-be-masked) rows."""
    out = []
    for start in range(0, V, SHARD):
        ws, bs = w[start : start + SHARD], b[start : start + SHARD]
        pad = SHARD - ws.shape[0]
        if pad:
            ws = torch.cat([ws, torch.randn(pad, w.shape[1], dtype=w.dtype) * 5])
            bs = torch.cat([bs, torch.randn(pad, dtype=b.dtype) * 5])
        out.append((start, ws, bs))
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("backend", BACKENDS_CPU)
def test_lce_stats_per_shard(backend, dtype):
    h, w, b, labels = lce_inputs(bias=True, ignore=0.2)
    h, w, b = (x.detach().to(dtype) for x in (h, w, b))
    opts = dict(logit_scale=0.7, softcap=4.0)

    def stats_of(z):  # per-shard stats of the full [N, V] logits z
        rows = []
        safe = labels.clamp(min=0)
        for start in range(0, V, SHARD):
            stop = min(start + SHARD, V)
            inside = (labels != -100) & (labels >= start) & (labels < stop)
            zy = torch.where(inside, z.gather(1, safe[:, None]).squeeze(1), torch.zeros((), dtype=z.dtype))
            rows.append(torch.stack([torch.logsumexp(z[:, start:stop], 1), zy, z[:, start:stop].sum(1)]))
        return rows

    ref64 = stats_of(R.logits(h, w, bias=b, upcast=True, **opts))
    reflp = stats_of(R.logits(h, w, bias=b, **opts).float()) if dtype == torch.bfloat16 else [None] * len(ref64)
    locals_ = []
    for (start, ws, bs), r64, rlp in zip(_shards(w, b), ref64, reflp):
        st = _op(backend, "lce_stats")(h, ws, bs, labels, -100, 4.0, 0.7, start, V, 7)
        assert st.shape == (3, N) and st.dtype == (F64 if dtype == F64 else torch.float32)
        for k, what in enumerate(("local lse", "target logit", "sum of logits")):
            assert_close(st[k], r64[k], None if rlp is None else rlp[k], dtype=dtype,
                         name=f"shard {start}: {what}")
        locals_.append(st[0])
    # the shards' local lse combine to the global one
    glob = torch.logsumexp(torch.stack(locals_).double(), 0)
    full = torch.logsumexp(R.logits(h, w, bias=b, upcast=True, **opts), 1)
    if dtype != torch.bfloat16:
        assert_close(glob, full, dtype=dtype, name="combined lse")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("backend", BACKENDS_CPU)
def test_lce_bwd_sharded(backend, dtype):
    """lce_bwd on vocabulary shards with the global lse: dW/db rows of each shard equal the
    full reference's, padding rows get exactly zero, and the shards' dh sum to the full dh."""
    h, w, b, labels = lce_inputs(bias=True, ignore=0.2)
    h, w, b = (x.detach().to(dtype) for x in (h, w, b))
    opts = dict(label_smoothing=0.1, z_loss=1e-2, softcap=4.0, logit_scale=0.7)
    g = torch.rand(N, dtype=F64) * 2 - 1
    h64, w64, b64 = (x.double().clone().requires_grad_() for x in (h, w, b))
    loss, lse = R.linear_cross_entropy(h64, w64, labels, bias=b64, reduction="none", return_lse=True, **opts)
    rh, rw, rb = torch.autograd.grad(loss, [h64, w64, b64], g)
    dh_sum = torch.zeros(N, D, dtype=F64)
    for start, ws, bs in _shards(w, b):
        stop = min(start + SHARD, V)
        dh, dw, db = _op(backend, "lce_bwd")(g.to(lse.dtype if dtype == F64 else torch.float32), h, ws, bs,
                                             labels, lse.detach().to(F64 if dtype == F64 else torch.float32),
                                             -100, 0.1, 1e-2, 4.0, 0.7, start, V, 7, True, True, True)
        valid = stop - start
        assert_close(dw[:valid], rw[start:stop], dtype=dtype, name=f"shard {start}: dW")
        assert_close(db[:valid], rb[start:stop], dtype=dtype, name=f"shard {start}: db")
        assert torch.all(dw[valid:] == 0) and torch.all(db[valid:] == 0), "padding rows got a gradient"
        dh_sum += dh.double()
    assert_close(dh_sum, rh, dtype=dtype, name="sum of the shards' dh")
