"""Every autograd mode gives PyTorch's derivative, on every backend (the Triton kernels through the
interpreter), never a silent zero or a gradient that silently stops:

* forward-mode AD (``torch.func.jvp`` and ``torch.autograd.forward_ad``),
* ``create_graph=True`` (a gradient penalty: Hessian-vector products in every input, and
  ``gradgradcheck``, which also differentiates in the incoming gradient),
* ``torch.func`` transforms (``grad``, ``vmap``, ``jacrev``, ``jacfwd``, ``hessian``, per-sample
  gradients as ``vmap(grad)``), and ``vmap`` over the backward (``is_grads_batched``),
* the same through ``TiedEmbeddingHead`` (embedding and head tied on one weight).

Each is checked in fp64 against the plain reference (``tiedkernels.reference``: F.linear, then the
loss written out) under the same transform, with random tangents and incoming gradients, odd shapes
(N = 10 or 2 x 5 tokens, D = 5, V = 11, chunks of 3 rows) and every option.
"""

import inspect
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import tiedkernels as tk
from tiedkernels import backends
from tiedkernels import reference as R

from _cpu_backends import BACKENDS_CPU
from tolerances import assert_close

F64 = torch.float64
B_, T, D, V = 2, 5, 5, 11
CHUNK = 3


def _triton_here():
    return backends.why_not("triton", "cpu") is None


# The Triton kernels run on CPU tensors only when TRITON_INTERPRET=1 was set before Triton was
# imported; in the main test process it is not, and test_gpu_kernel_cases_under_the_interpreter
# runs these cases in a process of their own.
BACKENDS = BACKENDS_CPU + (["triton"] if _triton_here() else [])


# Where a path never runs a kernel (forward-mode AD and torch.func route to plain PyTorch before
# any kernel), the Triton backend runs one case: enough to show the routing.
def _pairs(cases, triton_cases):
    return [(b, c) for b in BACKENDS for c in cases if b != "triton" or c in triton_cases]


CASES = {
    "plain_mean": dict(),
    "bias_sum": dict(reduction="sum", bias=True),
    "none_all_options": dict(reduction="none", bias=True, label_smoothing=0.2, z_loss=0.05, softcap=2.0,
                             logit_scale=1.3, ignore_index=3),
    "mean_all_options_shift": dict(reduction="mean", bias=True, label_smoothing=0.1, z_loss=0.02, softcap=3.0,
                                   logit_scale=0.7, shift=True),
    "sum_num_items_shift": dict(reduction="sum", num_items_in_batch=4, shift=True, label_smoothing=0.3),
    "none_return_lse": dict(reduction="none", bias=True, z_loss=0.1, return_lse=True),
}


def _inputs(bias, seed=0, ignore_index=-100):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(B_, T, D, dtype=F64, generator=gen)
    w = torch.randn(V, D, dtype=F64, generator=gen)
    b = torch.randn(V, dtype=F64, generator=gen) if bias else None
    y = torch.randint(0, V, (B_, T), generator=gen)
    y[0, 1] = ignore_index
    y[1, 3] = 3  # also ignored where ignore_index=3
    return h, w, b, y


def _case_inputs(case):
    return _inputs(CASES[case].get("bias", False), ignore_index=CASES[case].get("ignore_index", -100))


def _rand_like(t, seed):
    if t is None:
        return None
    return torch.randn(t.shape, dtype=t.dtype, generator=torch.Generator().manual_seed(seed))


def _fns(case, backend, y):
    """(tiedkernels fn, reference fn) of (h, w, b) -> outputs (a tuple when return_lse)."""
    opts = {k: v for k, v in CASES[case].items() if k != "bias"}

    def tk_fn(h, w, b):
        return tk.linear_cross_entropy(h, w, y, bias=b, chunk_size=CHUNK, backend=backend, **opts)

    def ref_fn(h, w, b):
        return R.linear_cross_entropy(h, w, y, bias=b, **opts)

    return tk_fn, ref_fn


def _tuple(x):
    return x if isinstance(x, tuple) else (x,)


def _leaves(h, w, b):
    return [t.clone().requires_grad_() if t is not None else None for t in (h, w, b)]


def _close(actual, ref, name):
    assert actual is not None, f"{name}: missing"
    assert_close(actual, ref, dtype=F64, name=name)


# ------------------------------------------------------------------------------------------
# forward-mode AD


@pytest.mark.parametrize("backend_all,case", _pairs(CASES, ["none_all_options"]))
def test_jvp_linear_cross_entropy(backend_all, case):
    h, w, b, y = _case_inputs(case)
    tk_fn, ref_fn = _fns(case, backend_all, y)
    primals = (h, w, b)
    tangents = tuple(_rand_like(t, 10 + i) for i, t in enumerate(primals))
    if b is None:
        tk_fn_, ref_fn_ = (lambda h_, w_: tk_fn(h_, w_, None)), (lambda h_, w_: ref_fn(h_, w_, None))
        primals, tangents = primals[:2], tangents[:2]
    else:
        tk_fn_, ref_fn_ = tk_fn, ref_fn
    out, tan = torch.func.jvp(tk_fn_, primals, tangents)
    rout, rtan = torch.func.jvp(ref_fn_, primals, tangents)
    for i, (o, t, ro, rt) in enumerate(zip(_tuple(out), _tuple(tan), _tuple(rout), _tuple(rtan))):
        _close(o, ro, f"{case} jvp primal {i}")
        _close(t, rt, f"{case} jvp tangent {i}")
        assert rt.abs().max() > 1e-3, "the reference tangent should not be ~0 (the test would prove nothing)"

    # the same through torch.autograd.forward_ad, a tangent on one input at a time
    for k in range(len(primals)):
        with fwAD.dual_level():
            args = [fwAD.make_dual(p, t) if i == k else p for i, (p, t) in enumerate(zip(primals, tangents))]
            got = [fwAD.unpack_dual(o).tangent for o in _tuple(tk_fn_(*args))]
            rargs = [fwAD.make_dual(p, t) if i == k else p for i, (p, t) in enumerate(zip(primals, tangents))]
            want = [fwAD.unpack_dual(o).tangent for o in _tuple(ref_fn_(*rargs))]
        for i, (g, r) in enumerate(zip(got, want)):
            _close(g, r, f"{case} forward_ad tangent {i} (tangent on input {k})")


@pytest.mark.parametrize("backend_all", BACKENDS)
def test_jvp_logits_and_embedding(backend_all):
    h, w, b, y = _inputs(True)
    th, tw, tb = (_rand_like(t, 20 + i) for i, t in enumerate((h, w, b)))
    for opts in (dict(), dict(logit_scale=1.3, softcap=2.0)):
        out, tan = torch.func.jvp(lambda h_, w_, b_: tk.logits(h_, w_, bias=b_, backend=backend_all, **opts),
                                  (h, w, b), (th, tw, tb))
        rout, rtan = torch.func.jvp(lambda h_, w_, b_: R.logits(h_, w_, bias=b_, **opts), (h, w, b), (th, tw, tb))
        _close(out, rout, f"logits {opts}")
        _close(tan, rtan, f"logits jvp {opts}")
        with fwAD.dual_level():
            got = fwAD.unpack_dual(tk.logits(fwAD.make_dual(h, th), w, bias=b, backend=backend_all, **opts)).tangent
        _close(got, torch.func.jvp(lambda h_: R.logits(h_, w, bias=b, **opts), (h,), (th,))[1],
               f"logits forward_ad {opts}")
    ids = y.clamp(min=0)
    out, tan = torch.func.jvp(lambda w_: tk.embedding(ids, w_, padding_idx=2, backend=backend_all), (w,), (tw,))
    _close(out, F.embedding(ids, w), "embedding")
    _close(tan, F.embedding(ids, tw), "embedding jvp")
    with fwAD.dual_level():
        got = fwAD.unpack_dual(tk.embedding(ids, fwAD.make_dual(w, tw), backend=backend_all)).tangent
    _close(got, F.embedding(ids, tw), "embedding forward_ad")


# ------------------------------------------------------------------------------------------
# create_graph=True: gradients that can be differentiated


def _grad_then_hvp(fn, leaves, seed):
    """First derivatives under a random incoming gradient (create_graph=True), then the gradient of a
    random projection of them: sum_i <dL/dx_i, r_i>, i.e. Hessian-vector products in every input."""
    outs = _tuple(fn(*leaves))
    wrt = [x for x in leaves if x is not None]
    gouts = [_rand_like(o, seed + i) if o.dim() else torch.tensor(1.7, dtype=F64) for i, o in enumerate(outs)]
    firsts = torch.autograd.grad(outs, wrt, gouts, create_graph=True)
    pen = sum((g * _rand_like(g, seed + 50 + i)).sum() for i, g in enumerate(firsts))
    seconds = torch.autograd.grad(pen, wrt, allow_unused=True)
    return firsts, seconds


@pytest.mark.parametrize("backend_all,case", _pairs(CASES, ["none_all_options", "mean_all_options_shift",
                                                          "none_return_lse"]))
def test_create_graph_linear_cross_entropy(backend_all, case):
    h, w, b, y = _case_inputs(case)
    tk_fn, ref_fn = _fns(case, backend_all, y)
    firsts, seconds = _grad_then_hvp(tk_fn, _leaves(h, w, b), seed=30)
    rfirsts, rseconds = _grad_then_hvp(ref_fn, _leaves(h, w, b), seed=30)
    for name, g, r in zip(("dh", "dW", "db"), firsts, rfirsts):
        assert g.requires_grad, f"{case}: {name} from create_graph=True must carry a graph"
        _close(g, r, f"{case} {name}")
    for name, g, r in zip(("d(dh)", "d(dW)", "d(db)"), seconds, rseconds):
        assert r is not None and r.abs().max() > 1e-3
        _close(g, r, f"{case} second derivative {name}")


@pytest.mark.parametrize("backend_all,case", _pairs(["none_all_options", "mean_all_options_shift"],
                                                    ["mean_all_options_shift"]))
def test_gradgradcheck_linear_cross_entropy(backend_all, case):
    h, w, b, y = _case_inputs(case)
    tk_fn, _ = _fns(case, backend_all, y)
    assert torch.autograd.gradgradcheck(tk_fn, tuple(_leaves(h, w, b)), fast_mode=True)


@pytest.mark.parametrize("backend_all", BACKENDS)
def test_gradgradcheck_logits_and_embedding(backend_all):
    h, w, b, y = _inputs(True)
    leaves = tuple(_leaves(h, w, b))
    assert torch.autograd.gradgradcheck(
        lambda h_, w_, b_: tk.logits(h_, w_, bias=b_, logit_scale=1.3, softcap=2.0, backend=backend_all), leaves,
        fast_mode=True)
    ids = y.clamp(min=0)
    # the embedding is linear in W: its second derivative is 0, its gradient linear in the incoming one
    assert torch.autograd.gradgradcheck(lambda w_: tk.embedding(ids, w_, padding_idx=2, backend=backend_all),
                                        (leaves[1],))


@pytest.mark.parametrize("backend_all", BACKENDS)
def test_gradient_penalty_through_the_tied_module(backend_all):
    """embed -> body -> fused loss on one tied weight: the first gradient (both roles in one buffer
    on the ordinary path) must carry a graph, and the penalty's gradient match plain PyTorch's."""
    torch.manual_seed(0)
    head = tk.TiedEmbeddingHead(V, D, bias=True, backend=backend_all, dtype=F64)
    body = torch.nn.Sequential(torch.nn.Linear(D, D), torch.nn.Tanh()).double()
    ids = torch.randint(0, V, (B_, T))
    labels = ids.clone()
    labels[0, 0] = -100
    params = [head.weight, head.bias, *body.parameters()]

    def step(loss_fn, embed):
        loss = loss_fn(body(embed(ids)), labels)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        pen = sum(g.square().sum() for g in grads)
        return [g.detach() for g in grads], torch.autograd.grad(pen, params)

    got = step(lambda x, y: head.loss(x, y, shift=True, z_loss=0.01, chunk_size=CHUNK), head)
    want = step(lambda x, y: R.linear_cross_entropy(x, head.weight, y, bias=head.bias, shift=True, z_loss=0.01),
                lambda i: F.embedding(i, head.weight))
    for i, (g, r) in enumerate(zip(got[0] + list(got[1]), want[0] + list(want[1]))):
        _close(g, r, f"tied module: gradient/penalty gradient {i}")

    # the ordinary backward afterwards still shares one buffer and is right
    head.zero_grad()
    head.loss(body(head(ids)), labels, shift=True).backward()
    w2 = head.weight.detach().clone().requires_grad_()
    R.linear_cross_entropy(body(F.embedding(ids, w2)), w2, labels, bias=head.bias, shift=True).backward()
    _close(head.weight.grad, w2.grad, "tied module: ordinary backward after the penalty")


# ------------------------------------------------------------------------------------------
# torch.func transforms


@pytest.mark.parametrize("backend_all,case", _pairs(["plain_mean", "none_all_options", "mean_all_options_shift",
                                                     "sum_num_items_shift"], ["mean_all_options_shift"]))
def test_func_transforms_linear_cross_entropy(backend_all, case):
    h, w, b, y = _inputs(True, ignore_index=CASES[case].get("ignore_index", -100))
    tk_fn, ref_fn = _fns(case, backend_all, y)
    scalar = CASES[case].get("reduction", "mean") != "none"

    def red(fn):
        if scalar:
            return fn
        g = _rand_like(torch.empty(B_, T), 40)
        return lambda *a: (fn(*a) * g).sum()

    tk_s, ref_s = red(tk_fn), red(ref_fn)
    for name, tr in (("grad", lambda f: torch.func.grad(f, argnums=(0, 1, 2))),
                     ("jacrev", lambda f: torch.func.jacrev(f, argnums=(0, 1, 2))),
                     ("jacfwd", lambda f: torch.func.jacfwd(f, argnums=(0, 1, 2)))):
        for i, (g, r) in enumerate(zip(tr(tk_s)(h, w, b), tr(ref_s)(h, w, b))):
            _close(g, r, f"{case} {name} wrt input {i}")
    hess = torch.func.hessian(lambda h_: tk_s(h_, w, b))(h)
    _close(hess, torch.func.hessian(lambda h_: ref_s(h_, w, b))(h), f"{case} hessian in hidden")
    # vmap over a batch of weights (the loss of each)
    ws = torch.stack([w, 0.5 * w, -w])
    _close(torch.func.vmap(lambda w_: tk_fn(h, w_, b))(ws), torch.stack([ref_fn(h, w_, b) for w_ in ws]),
           f"{case} vmap over weights")


@pytest.mark.parametrize("backend_all", BACKENDS)
def test_per_sample_gradients(backend_all):
    """vmap(grad): one gradient of the weight per sequence, as Opacus-style training computes."""
    h, w, b, y = _inputs(True)

    def tk_loss(w_, b_, h_, y_):
        return tk.linear_cross_entropy(h_[None], w_, y_[None], bias=b_, shift=True, label_smoothing=0.1,
                                       chunk_size=CHUNK, backend=backend_all)

    def ref_loss(w_, b_, h_, y_):
        return R.linear_cross_entropy(h_[None], w_, y_[None], bias=b_, shift=True, label_smoothing=0.1)
    got = torch.func.vmap(torch.func.grad(tk_loss, argnums=(0, 1)), in_dims=(None, None, 0, 0))(w, b, h, y)
    for i, g in enumerate(got):
        for s in range(B_):
            r = torch.func.grad(ref_loss, argnums=(0, 1))(w, b, h[s], y[s])[i]
            _close(g[s], r, f"per-sample gradient {i} of sample {s}")


class _EmbedThenLoss(torch.nn.Module):
    def __init__(self, head):
        super().__init__()
        self.head = head

    def forward(self, ids):
        return self.head.loss(self.head(ids).tanh(), ids, shift=True, chunk_size=CHUNK)


@pytest.mark.parametrize("backend_all", BACKENDS)
def test_func_grad_of_the_tied_module(backend_all):
    torch.manual_seed(0)
    model = _EmbedThenLoss(tk.TiedEmbeddingHead(V, D, backend=backend_all, dtype=F64))
    ids = torch.randint(0, V, (B_, T))
    params = {k: v.detach() for k, v in model.named_parameters()}
    got = torch.func.grad(lambda p: torch.func.functional_call(model, p, (ids,)))(params)["head.weight"]
    w = params["head.weight"].clone().requires_grad_()
    R.linear_cross_entropy(F.embedding(ids, w).tanh(), w, ids, shift=True).backward()
    _close(got, w.grad, "torch.func.grad of the tied module's weight (both roles)")


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("backend_all", BACKENDS)
def test_vmap_over_the_backward(backend_all, reduction):
    """is_grads_batched runs the op's backward under vmap (a Jacobian in one call)."""
    h, w, b, y = _inputs(True)
    outs, refs = [], []
    for fn, acc in ((tk.linear_cross_entropy, outs), (R.linear_cross_entropy, refs)):
        leaves = _leaves(h, w, b)
        kw = dict(chunk_size=CHUNK, backend=backend_all) if fn is tk.linear_cross_entropy else {}
        loss = fn(*leaves[:2], y, bias=leaves[2], reduction=reduction, label_smoothing=0.1, **kw)
        gouts = torch.randn((4, *loss.shape), dtype=F64, generator=torch.Generator().manual_seed(7))
        acc.extend(torch.autograd.grad(loss, leaves, gouts, is_grads_batched=True))
    for i, (g, r) in enumerate(zip(outs, refs)):
        _close(g, r, f"batched backward ({reduction}) wrt input {i}")


# ------------------------------------------------------------------------------------------
# the returned lse is differentiable (Cut Cross-Entropy's z-loss from the lse)


@pytest.mark.parametrize("case", ["none", "mean", "sum_shift_smoothing"])
@pytest.mark.parametrize("backend_all", BACKENDS)
def test_lse_is_differentiable(backend_all, case):
    opts = {"none": dict(reduction="none"), "mean": dict(reduction="mean", z_loss=0.01),
            "sum_shift_smoothing": dict(reduction="sum", shift=True, label_smoothing=0.2, softcap=2.5,
                                        logit_scale=1.2)}[case]
    h, w, b, y = _inputs(True)
    grads = []
    for fn, kw in ((tk.linear_cross_entropy, dict(chunk_size=CHUNK, backend=backend_all)),
                   (R.linear_cross_entropy, {})):
        leaves = _leaves(h, w, b)
        loss, lse = fn(*leaves[:2], y, bias=leaves[2], return_lse=True, **opts, **kw)
        assert lse.requires_grad
        g_loss = _rand_like(loss, 60) if loss.dim() else torch.tensor(0.8, dtype=F64)
        total = (loss * g_loss).sum() + 1e-2 * lse.square().mean() + (lse * _rand_like(lse, 61)).sum()
        grads.append(torch.autograd.grad(total, leaves))
        # the lse alone (the loss unused: its incoming gradient is None)
        leaves = _leaves(h, w, b)
        _, lse = fn(*leaves[:2], y, bias=leaves[2], return_lse=True, **opts, **kw)
        grads.append(torch.autograd.grad((lse * _rand_like(lse, 62)).sum(), leaves))
    for i, (g, r) in enumerate(zip(grads[0] + grads[1], grads[2] + grads[3])):
        _close(g, r, f"lse backward ({case}): gradient {i}")


# ------------------------------------------------------------------------------------------
# class weights and the statistics in every mode (PyTorch's F.cross_entropy(weight=) is the truth)


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("backend_all", BACKENDS)
def test_class_weights_in_every_mode(backend_all, reduction):
    h, w, b, y = _inputs(True)
    c = torch.rand(V, dtype=F64, generator=torch.Generator().manual_seed(70)) + 0.2

    def tk_fn(h_, w_, b_):
        return tk.linear_cross_entropy(h_, w_, y, bias=b_, class_weight=c, reduction=reduction, label_smoothing=0.1,
                                       softcap=2.5, chunk_size=CHUNK, backend=backend_all)

    def ref_fn(h_, w_, b_):
        z = 2.5 * torch.tanh(F.linear(h_, w_, b_) / 2.5)
        out = F.cross_entropy(z.reshape(-1, V), y.reshape(-1), weight=c, reduction=reduction, label_smoothing=0.1)
        return out.reshape(y.shape) if reduction == "none" else out

    tangents = tuple(_rand_like(t, 71 + i) for i, t in enumerate((h, w, b)))
    _close(torch.func.jvp(tk_fn, (h, w, b), tangents)[1], torch.func.jvp(ref_fn, (h, w, b), tangents)[1],
           f"class weights ({reduction}): jvp")
    for name, tr in (("grad", torch.func.grad), ("jacrev", torch.func.jacrev)):
        gy = _rand_like(y.double(), 72)
        red = (lambda f: f) if reduction == "mean" else (lambda f: lambda *a: (f(*a) * gy).sum())
        for i, (g, r) in enumerate(zip(tr(red(tk_fn), argnums=(0, 1, 2))(h, w, b),
                                       tr(red(ref_fn), argnums=(0, 1, 2))(h, w, b))):
            _close(g, r, f"class weights ({reduction}): torch.func.{name} wrt input {i}")
    firsts, seconds = _grad_then_hvp(tk_fn, _leaves(h, w, b), seed=73)
    rfirsts, rseconds = _grad_then_hvp(ref_fn, _leaves(h, w, b), seed=73)
    for i, (g, r) in enumerate(zip(firsts + seconds, rfirsts + rseconds)):
        _close(g, r, f"class weights ({reduction}): create_graph derivative {i}")
    # class_weight itself gets no derivative: asking for one is an error, never a silent zero
    with pytest.raises(NotImplementedError, match="class_weight"):
        torch.func.grad(lambda c_: tk.linear_cross_entropy(h, w, y, class_weight=c_, backend=backend_all))(c)
    with pytest.raises(NotImplementedError, match="class_weight"):
        torch.func.jvp(lambda c_: tk.linear_cross_entropy(h, w, y, class_weight=c_, backend=backend_all), (c,),
                       (torch.ones_like(c),))


@pytest.mark.parametrize("backend_all", BACKENDS)
def test_statistics_under_transforms(backend_all):
    """return_stats under torch.func: the same statistics as the ordinary call, a loss that differentiates."""
    h, w, b, y = _inputs(True)
    kw = dict(bias=b, shift=True, z_loss=0.01, return_stats=True, chunk_size=CHUNK, backend=backend_all)
    eager = tk.linear_cross_entropy(h, w, y, **kw)

    def loss_and_stats(h_):
        st = tk.linear_cross_entropy(h_, w, y, **kw)
        return st.loss, (st.predictions, st.accuracy, st.entropy, st.z_loss)

    g, aux = torch.func.grad(loss_and_stats, has_aux=True)(h)
    assert torch.equal(aux[0], eager.predictions)
    for name, a, r in zip(("accuracy", "entropy", "z_loss"), aux[1:], (eager.accuracy, eager.entropy, eager.z_loss)):
        _close(a, r, f"statistics under torch.func.grad: {name}")
    _close(g, torch.func.grad(lambda h_: R.linear_cross_entropy(h_, w, y, bias=b, shift=True, z_loss=0.01))(h),
           "statistics under torch.func.grad: the loss's gradient")


# (collected where the public function has these options; the ops and the differentiable path do)
_OPTIONS = inspect.signature(tk.linear_cross_entropy).parameters
if "class_weight" not in _OPTIONS:
    del test_class_weights_in_every_mode
if "return_stats" not in _OPTIONS:
    del test_statistics_under_transforms


# ------------------------------------------------------------------------------------------
# the ordinary path is untouched


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "tiedkernels":
            self.names.append(func._opname.removeprefix("torch_").removeprefix("triton_"))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("backend_all", BACKENDS)
def test_ordinary_backward_stays_fused(backend_all, reduction):
    h, w, b, y = _inputs(True)
    leaves = _leaves(h, w, b)
    with _OpLog() as log:
        loss = tk.linear_cross_entropy(*leaves[:2], y, bias=leaves[2], reduction=reduction, chunk_size=CHUNK,
                                       backend=backend_all)
        loss.backward(_rand_like(loss, 3) if loss.dim() else None)
    # gradient-in-forward for the scalar (nothing in backward); one recompute for reduction="none"
    assert log.names == (["lce_fwd"] if reduction == "mean" else ["lce_fwd", "lce_bwd"]), log.names


# ------------------------------------------------------------------------------------------
# the Triton kernels, in a process with the interpreter on


@pytest.mark.skipif(_triton_here(), reason="the Triton backend runs in this process: its cases ran above")
def test_gpu_kernel_cases_under_the_interpreter():
    pytest.importorskip("triton", reason="Triton is not installed (requirements/triton.txt)")
    env = dict(os.environ, TRITON_INTERPRET="1")
    here = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "triton",
                           os.path.join(here, "test_autograd_modes.py")],
                          env=env, cwd=os.path.dirname(here), capture_output=True, text=True, timeout=900)
    tail = (proc.stdout + proc.stderr)[-3000:]
    assert proc.returncode == 0, tail
    assert " passed" in tail and "skipped" not in tail.split("passed")[-1], tail


# The vocabulary-parallel loss has the ordinary backward only: every other mode is a clear error
# naming the mode (never PyTorch's internal setup_context / out= messages, never a silent zero).
def _vp_modes():
    from tiedkernels.distributed import vocab_parallel_linear_cross_entropy as vp

    gen = torch.Generator().manual_seed(7)
    h = torch.randn(6, 4, dtype=torch.float64, generator=gen)
    w = torch.randn(10, 4, dtype=torch.float64, generator=gen)
    y = torch.randint(0, 10, (6,), generator=gen)

    def create_graph():
        hh = h.clone().requires_grad_()
        torch.autograd.grad(vp(hh, w, y), hh, create_graph=True)

    def forward_ad():
        import torch.autograd.forward_ad as fwad

        with fwad.dual_level():
            vp(fwad.make_dual(h, torch.randn_like(h)), w, y)

    return {
        "create_graph=True": create_graph,
        "forward-mode AD": forward_ad,
        "torch.func": lambda: torch.func.grad(lambda a: vp(a, w, y))(h),
        "vmap": lambda: torch.func.vmap(lambda a: vp(a, w, y))(h[None]),
    }


@pytest.mark.parametrize("mode", ["create_graph=True", "forward-mode AD", "torch.func", "vmap"])
def test_vocab_parallel_refuses_other_modes_by_name(mode):
    expected = "torch.func" if mode == "vmap" else mode
    with pytest.raises(NotImplementedError, match="vocabulary-parallel loss has the ordinary backward only.*"
                       + re.escape(expected)):
        _vp_modes()[mode]()


def test_vocab_parallel_ordinary_backward_still_works():
    from tiedkernels.distributed import vocab_parallel_linear_cross_entropy as vp

    gen = torch.Generator().manual_seed(8)
    h = torch.randn(6, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(10, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    y = torch.randint(0, 10, (6,), generator=gen)
    got = torch.autograd.grad(vp(h, w, y), (h, w))
    want = torch.autograd.grad(F.cross_entropy(h @ w.T, y), (h, w))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
