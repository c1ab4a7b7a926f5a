"""The Triton backend on CPU tensors, through the Triton interpreter (TRITON_INTERPRET=1).

The core's parametrized checks (tests/test_ops.py: every option x reduction, fp32 and bf16,
N=37, V=123, D=32, random incoming gradients, against the fp64 reference with the shared
tolerances) run here with ``backend="triton"``; then what is specific to these kernels: the
embedding's deterministic path, bad ids and labels, empty and non-contiguous inputs, NaN,
tracing through ``triton_op``, how the backend reports itself; and the chunked loss's own paths:
vocabulary splits, -inf logits, the softcap's precision and its infinite limit, Cut
Cross-Entropy's lse rule for fp16/bf16, class weights, argmax/entropy and grad_lse; NaN and
+-inf logits against plain PyTorch; bf16 rounding.  The GPU-only code paths are reached without a
GPU: inductor's lowering of the multi-chunk dW on fake CUDA tensors, and the device guard and the
asynchronous index check with torch.cuda mocked and every host read trapped.

Triton reads TRITON_INTERPRET when it is imported, so this module sets it at collection,
before anything imports Triton.  That does not change what the rest of the suite runs:
``backend="auto"`` never picks Triton for CPU tensors.  When another module of the same run
imported Triton first (transformers/peft do), the interpreter cannot be switched on any more:
the module is then skipped with that reason, and ``make test-triton`` (part of ``make test``)
runs it in a process of its own.
"""

import contextlib
import os
import subprocess
import sys

if "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import tiedkernels as tk  # noqa: E402
from tiedkernels import backends  # noqa: E402
from tiedkernels import reference as R  # noqa: E402

pytest.importorskip("triton", reason="Triton is not installed (requirements/triton.txt)")
if backends.why_not("triton", "cpu") is not None:
    pytest.skip(f"the Triton interpreter is off in this process ({backends.why_not('triton', 'cpu')}); "
                "`make test-triton` runs this file on its own", allow_module_level=True)

import test_ops as core  # noqa: E402  (the core's tables and helpers; tests/ is on sys.path)
from tolerances import assert_close  # noqa: E402

B = "triton"
F64 = torch.float64
LOWP = [torch.float32, torch.bfloat16]
LOWP_IDS = ["fp32", "bf16"]


@pytest.fixture(autouse=True)
def _interpret():
    reason = backends.why_not(B, "cpu")
    if reason is not None:
        pytest.fail(f"the Triton backend should run under the interpreter: {reason}")
    yield


def _triton_op(backend, name):
    assert backend == B
    return backends.get(B).op(name)


@pytest.fixture
def triton_ops(monkeypatch):
    """The core's op-level tests call ``_op(backend, name)``: route it to the triton_* ops."""
    monkeypatch.setattr(core, "_op", _triton_op)


# ------------------------------------------------------------------------------------------
# the core's tables


@pytest.mark.parametrize("dtype", LOWP, ids=LOWP_IDS)
@pytest.mark.parametrize("case,reduction", core._lce_params())
def test_linear_cross_entropy(case, reduction, dtype):
    core.test_linear_cross_entropy(B, case, reduction, dtype)


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_linear_cross_entropy_fp64_everything(reduction):
    """fp64 through the same kernels (fp64 accumulators): the tight fp64 tolerance holds."""
    core.test_linear_cross_entropy(B, "everything", reduction, F64)


def test_linear_cross_entropy_fp16():
    core.test_linear_cross_entropy(B, "everything", "mean", torch.float16)


@pytest.mark.parametrize("dtype", LOWP, ids=LOWP_IDS)
@pytest.mark.parametrize("case", list(core.EMB_OPTIONS))
def test_embedding(case, dtype):
    core.test_embedding(B, case, dtype)


@pytest.mark.parametrize("dtype", LOWP, ids=LOWP_IDS)
@pytest.mark.parametrize("padding_idx", [None, 3])
def test_embedding_bwd_acc_adds_into_buffer(triton_ops, padding_idx, dtype):
    core.test_embedding_bwd_acc_adds_into_buffer(B, padding_idx, dtype)


@pytest.mark.parametrize("dtype", LOWP, ids=LOWP_IDS)
@pytest.mark.parametrize("case", list(core.LOGITS_OPTIONS))
def test_logits(case, dtype):
    core.test_logits(B, case, dtype)


@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_bf16_dw_accumulates_in_fp32(reduction):
    core.test_bf16_dw_accumulates_in_fp32(B, reduction)


def test_lse_of_many_near_equal_logits():
    core.test_lse_of_many_near_equal_logits(B)


def test_large_vocab_beyond_16_bit_columns():
    """V=70,001 with targets at 65,536 and V-1 (fp32, every gradient)."""
    core.test_linear_cross_entropy_large_vocab(B, "none", torch.float32)


@pytest.mark.parametrize("case", list(core.GRADCHECK_LCE))
def test_gradcheck_linear_cross_entropy(case):
    core.test_gradcheck_linear_cross_entropy(B, case)


def test_gradcheck_logits_and_embedding():
    core.test_gradcheck_logits(B)
    core.test_gradcheck_embedding(B)


def _opcheck_params():
    """The core's samples, with the core's expected failure (if it still marks one) marked the same way."""
    known = getattr(core, "_ALIASING_BUG", None)
    gif = getattr(core, "_GIF_SAMPLE", None)
    out = []
    for i, (name, _) in enumerate(core._SAMPLES):
        marks = pytest.mark.xfail(strict=True, reason=known) if (known and i == gif) else ()
        out.append(pytest.param(i, id=f"{name}-{i}", marks=marks))
    return out


@pytest.mark.parametrize("i", _opcheck_params())
def test_opcheck(triton_ops, i):
    """Schema, fake kernel, autograd registration and the AOT trace (the op stays one node under
    the interpreter; tests/test_cuda.py traces into the kernels on a GPU)."""
    core.test_opcheck(B, i)


def test_backward_leaves_forward_outputs_alone(triton_ops):
    core.test_backward_leaves_forward_outputs_alone(B)


@pytest.mark.parametrize("first_grad", [1.0, 0.3])
def test_second_backward_retain_graph(first_grad):
    core.test_second_backward_retain_graph(B, "mean", first_grad)


def test_return_lse_values():
    core.test_return_lse_values(B, torch.float32)


@pytest.mark.parametrize("dtype", LOWP, ids=LOWP_IDS)
def test_lce_stats_per_shard(triton_ops, dtype):
    core.test_lce_stats_per_shard(B, dtype)


def test_lce_bwd_sharded(triton_ops):
    core.test_lce_bwd_sharded(B, torch.float32)


# ------------------------------------------------------------------------------------------
# specific to these kernels


def test_schemas_match_python_copy():
    """Same argument names, types and defaults as _schemas.py; triton_op spells int as SymInt."""
    from tiedkernels._schemas import SCHEMAS

    for name, sig in SCHEMAS.items():
        got = str(backends.get(B).op(name)._schema).replace("SymInt", "int").replace("(a0!)", "(a!)")
        assert got == f"tiedkernels::triton_{name}{sig.replace('SymInt', 'int')}"


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_frozen_weight_skips_dw(reduction):
    """W.requires_grad=False: the ops are asked for dh only and return no dW."""
    h, w, b, labels = core.lce_inputs(ignore=0.2)
    h = h.detach().float().requires_grad_()
    w = w.detach().float()
    with core._OpLog() as log:
        loss = tk.linear_cross_entropy(h, w, labels, reduction=reduction, backend=B)
        g = core._incoming(loss)
        (dh,) = torch.autograd.grad(loss, [h], g)
    h64 = h.detach().double().requires_grad_()
    ref = R.linear_cross_entropy(h64, w.double(), labels, reduction=reduction)
    (rh,) = torch.autograd.grad(ref, [h64], g.double())
    assert_close(dh, rh, dtype=torch.float32, name="dh with a frozen weight")
    calls = [(n, a, o) for n, a, o in log.calls if n in ("triton_lce_fwd", "triton_lce_bwd")]
    assert calls, "no triton fused-loss op ran"
    for name, args, out in calls:
        assert args[-2] is False, f"{name} was asked for dW of a frozen weight"
        dw = out[3] if name == "triton_lce_fwd" else out[1]
        assert dw.numel() == 0
    assert any(args[-3] for _, args, _ in calls), "dh was never requested"


def _dense_scatter(v, d, ids, grad, padding_idx=None):
    keep = ids.reshape(-1) != (-1 if padding_idx is None else padding_idx)
    return torch.zeros(v, d, dtype=F64).index_add_(0, ids.reshape(-1)[keep], grad.double().reshape(-1, d)[keep])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_embedding_backward_deterministic_path(monkeypatch, dtype):
    """Under torch.use_deterministic_algorithms(True) the backward takes the sorted, atomic-free
    path (the atomic kernel is replaced by a trap here) and sums each row in fp32."""
    from tiedkernels.triton import embedding as emb

    class Trap:
        def __getitem__(self, grid):
            raise AssertionError("the atomic scatter kernel ran in deterministic mode")

    v, d = 29, 40
    ids = torch.randint(0, 6, (7, 11))
    ids[0, :3] = torch.tensor([v - 1, 2, 2])
    grad = torch.randn(7, 11, d, dtype=F64)
    expect = _dense_scatter(v, d, ids, grad, padding_idx=2)
    monkeypatch.setattr(emb, "_scatter_atomic_kernel", Trap())
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        op = backends.get(B).op("embedding_bwd")
        out = op(grad.to(dtype), ids, v, 2)
        again = op(grad.to(dtype), ids, v, 2)
    finally:
        torch.use_deterministic_algorithms(prev)
    assert torch.equal(out, again)
    assert torch.all(out[2] == 0), "the padding row got a gradient"
    # Each row: its contributions summed in fp32 in position order, then one rounding.
    acc = torch.zeros(v, d, dtype=torch.float32)
    flat, g32 = ids.reshape(-1), grad.to(dtype).float().reshape(-1, d)
    for i in range(flat.numel()):
        if flat[i] != 2:
            acc[flat[i]] += g32[i]
    # one rounding of the fp32 sum, to nearest as torch rounds (the kernels round bf16 by hand: the
    # interpreter's own conversion truncates)
    assert torch.equal(out, acc.to(dtype)), "not the fixed-order fp32 sum, rounded once"
    assert (expect - out.double()).abs().max() < (1e-5 if dtype == torch.float32 else 0.05)


def test_embedding_backward_atomic_path_fp32():
    """fp32 outside deterministic mode: the atomic kernel, same sums."""
    v, d = 29, 40
    ids = torch.randint(0, 6, (7, 11))
    grad = torch.randn(7, 11, d)
    out = backends.get(B).op("embedding_bwd")(grad, ids, v, None)
    torch.testing.assert_close(out.double(), _dense_scatter(v, d, ids, grad), rtol=1e-6, atol=1e-6)


def test_bad_label_raises_with_value_and_v():
    h = torch.randn(6, 16, requires_grad=True)
    w = torch.randn(37, 16, requires_grad=True)
    labels = torch.tensor([1, 2, -100, 37, 4, 5])
    for reduction in ("mean", "none"):
        with pytest.raises(IndexError, match=r"label 37 at position 3 is outside \[0, V\) for V=37"):
            tk.linear_cross_entropy(h, w, labels, reduction=reduction, backend=B)
    with pytest.raises(IndexError, match=r"label -5 at position 0"):
        tk.linear_cross_entropy(h, w, torch.tensor([-5, 1, 2, 3, 4, 5]), backend=B)


def test_bad_id_raises_with_value_and_v():
    w = torch.randn(10, 8, requires_grad=True)
    with pytest.raises(IndexError, match=r"id 10 at position 2 is outside \[0, V\) for V=10"):
        tk.embedding(torch.tensor([[0, 1], [10, 3]]), w, backend=B)
    with pytest.raises(IndexError, match=r"id -1 at position 0"):
        backends.get(B).op("embedding_bwd")(torch.randn(2, 8), torch.tensor([-1, 2]), 10, None)


def test_kernels_mark_bad_entries_nan_when_unchecked(monkeypatch):
    """With the host check off (TIEDKERNELS_CHECK_INDICES=0; also what happens while tracing or
    capturing a CUDA graph) the kernels still read nothing out of bounds: the bad token's loss,
    gradient row and embedding row are NaN."""
    monkeypatch.setenv("TIEDKERNELS_CHECK_INDICES", "0")
    h = torch.randn(5, 16)
    w = torch.randn(37, 16)
    labels = torch.tensor([1, 99, -100, 3, 4])
    loss, lse, dh, dw, db, *_ = backends.get(B).op("lce_fwd")(h, w, None, labels, torch.ones(()), -100, 0.0, 0.0, 0.0,
                                                          1.0, 0, 0, 8, True, True, False)
    tok, *_ = backends.get(B).op("lce_fwd")(h, w, None, labels, None, -100, 0.0, 0.0, 0.0, 1.0, 0, 0, 8, False,
                                            False, False)
    assert torch.isnan(tok[1]) and torch.isfinite(tok[[0, 2, 3, 4]]).all() and tok[2] == 0
    assert torch.isnan(loss)
    assert torch.isnan(dh[1]).all() and torch.isfinite(dh[[0, 2, 3, 4]]).all()
    e = backends.get(B).op("embedding_fwd")(w, torch.tensor([0, 37, -2, 5]), None)
    assert torch.isnan(e[1]).all() and torch.isnan(e[2]).all()
    assert torch.equal(e[0], w[0]) and torch.equal(e[3], w[5])


def test_all_ignored_and_empty():
    h = torch.randn(5, 16, requires_grad=True)
    w = torch.randn(37, 16, requires_grad=True)
    labels = torch.full((5,), -100)
    loss = tk.linear_cross_entropy(h, w, labels, backend=B)
    loss.backward()
    assert loss.item() == 0 and torch.all(h.grad == 0) and torch.all(w.grad == 0)
    h0 = torch.randn(0, 16, requires_grad=True)
    for reduction, shape in (("none", (0,)), ("sum", ()), ("mean", ())):
        out = tk.linear_cross_entropy(h0, w, torch.zeros(0, dtype=torch.long), reduction=reduction, backend=B)
        assert out.shape == shape and (out.numel() == 0 or out.item() == 0)
    assert tk.embedding(torch.zeros(0, dtype=torch.long), w, backend=B).shape == (0, 16)


def test_non_contiguous_inputs():
    hb, w, b, lb = core.lce_inputs(shape=(13, 3), bias=True, ignore=0.2)
    h = hb.detach().float().transpose(0, 1).requires_grad_()  # [3, 13, D], non-contiguous
    labels = lb.t()
    w = w.detach().float().requires_grad_()
    assert not h.is_contiguous() and not labels.is_contiguous()
    loss = tk.linear_cross_entropy(h, w, labels, reduction="none", label_smoothing=0.1, backend=B)
    g = core._incoming(loss)
    dh, dw = torch.autograd.grad(loss, [h, w], g)
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = R.linear_cross_entropy(h64, w64, labels, reduction="none", label_smoothing=0.1)
    rh, rw = torch.autograd.grad(ref, [h64, w64], g.double())
    for name, a, r in (("loss", loss, ref), ("dh", dh, rh), ("dW", dw, rw)):
        assert_close(a, r, dtype=torch.float32, name=name)


def test_nan_in_hidden_propagates_to_its_token_only():
    h, w, _, labels = core.lce_inputs()
    h, w = h.detach().float(), w.detach().float()
    h[4, 7] = float("nan")
    tok = tk.linear_cross_entropy(h, w, labels, reduction="none", backend=B)
    ref = R.linear_cross_entropy(h.double(), w.double(), labels, reduction="none")
    assert torch.isnan(tok[4]) and torch.isnan(ref[4])
    keep = torch.arange(h.shape[0]) != 4
    assert_close(tok[keep], ref[keep], dtype=torch.float32, name="other tokens")


def test_traces_under_torch_compile():
    """torch.compile(fullgraph=True) traces through the triton_op bodies (aot_eager: the
    interpreter has no compiled GPU code to inline) and gives the eager result."""
    h, w, b, labels = core.lce_inputs(shape=(2, 9), bias=True, ignore=0.2)
    h, w, b = (x.detach().float().requires_grad_() for x in (h, w, b))

    def step(h_, w_, b_):
        ids = labels.clamp(min=0)
        e = tk.embedding(ids, w_, backend=B)
        return tk.linear_cross_entropy(h_ + e, w_, labels, bias=b_, shift=True, label_smoothing=0.1, softcap=4.0,
                                       backend=B)

    eager = step(h, w, b)
    ge = torch.autograd.grad(eager, [h, w, b])
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(h, w, b)
    gc = torch.autograd.grad(compiled, [h, w, b])
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)
    for a, r in zip(gc, ge):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------
# availability


def test_why_not_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    assert "TRITON_INTERPRET=1" in backends.why_not(B, "cpu")
    with pytest.raises(RuntimeError, match="backend 'triton' cannot run here"):
        tk.linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2]), backend=B)
    if not torch.cuda.is_available():
        assert backends.why_not(B, "cuda") == "no CUDA device is available"


def test_import_without_triton():
    """`import tiedkernels` works when Triton is missing, and the backend says why it is off."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import tiedkernels, torch\n"
        "from tiedkernels import backends\n"
        "print(backends.why_not('triton', 'cpu'))\n"
        "print(tiedkernels.linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2])).item())\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("Triton is not installed")
    assert float(lines[1]) > 0


# ------------------------------------------------------------------------------------------
# the chunked driver: vocabulary splits, -inf logits, the softcap, fp32 logits, new options


@pytest.fixture
def split_rows(monkeypatch):
    """Narrow tiles and a large pretend SM count: every chunk's rows are split across the
    vocabulary (the path short chunks take on a GPU), and each split walks several tiles."""
    from tiedkernels.triton import cross_entropy as ce

    monkeypatch.setattr(ce, "row_config", lambda dtype, v, interpret=False: (16, 4))
    monkeypatch.setattr(ce, "INTERPRET_SMS", 12)
    assert ce.splits(16, 123, 16, 12) == (3, 48)  # 8 tiles of 16 columns: 3 splits of 3 tiles (the last 2)
    assert ce.splits(5, 123, 16, 12) == (8, 16)  # a short chunk: one tile per split
    yield ce


@pytest.mark.parametrize("case,reduction,dtype", [("everything", "none", torch.float32),
                                                  ("everything", "mean", torch.bfloat16),
                                                  ("ignore_index", "sum", torch.bfloat16),
                                                  ("return_lse", "mean", torch.float32)],
                         ids=["everything-none-fp32", "everything-mean-bf16", "ignore_index-sum-bf16",
                              "return_lse-mean-fp32"])
def test_vocabulary_splits(split_rows, case, reduction, dtype):
    core.test_linear_cross_entropy(B, case, reduction, dtype)


def test_lce_stats_per_shard_with_splits(split_rows, triton_ops):
    core.test_lce_stats_per_shard(B, torch.float32)


def _masked(where, eps_rows=9, d=16, v=37):
    gen = torch.Generator().manual_seed(5)
    h = torch.randn(eps_rows, d, generator=gen, dtype=F64).abs() + 0.1  # positive: a -inf weight gives -inf
    w = torch.randn(v, d, generator=gen, dtype=F64) * 0.5
    b = torch.randn(v, generator=gen, dtype=F64)
    if where == "bias":
        b[5] = float("-inf")
    else:
        w[5] = 0.0
        w[5, 0] = float("-inf")
        b = None
    labels = torch.randint(0, v, (eps_rows,), generator=gen)
    labels[labels == 5] = 6
    labels[2] = -100
    return h, w, b, labels


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("where", ["bias", "weight"])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_minus_inf_logit_gives_pytorchs_loss(where, eps, reduction):
    """A masked vocabulary entry (a -inf bias, or a weight row that makes its logit -inf):
    PyTorch's finite loss without smoothing (the smoothing term is never 0 * inf), PyTorch's own
    value (inf) with it, and PyTorch's gradients where they are finite."""
    h, w, b, labels = _masked(where)
    h32 = h.float().requires_grad_()
    w32 = w.float().requires_grad_()
    b32 = b.float().requires_grad_() if b is not None else None
    loss = tk.linear_cross_entropy(h32, w32, labels, bias=b32, label_smoothing=eps, reduction=reduction, backend=B)
    h64, w64 = h.clone().requires_grad_(), w.clone().requires_grad_()
    b64 = b.clone().requires_grad_() if b is not None else None
    z = torch.nn.functional.linear(h64, w64, b64)
    assert torch.isinf(z[:, 5]).all()
    ref = torch.nn.functional.cross_entropy(z, labels, label_smoothing=eps, reduction=reduction)
    if eps == 0:
        assert torch.isfinite(loss).all() and torch.isfinite(ref).all()
    else:
        assert torch.isinf(ref[labels != -100] if reduction == "none" else ref).all()
    torch.testing.assert_close(loss.double(), ref, rtol=2e-5, atol=2e-5)
    if eps > 0:
        return
    g = core._incoming(loss)
    wrt = [w32] + ([b32, h32] if b is not None else [])
    ref_wrt = [w64] + ([b64, h64] if b is not None else [])  # dh is NaN in both with a -inf weight entry
    got = torch.autograd.grad(loss, wrt, g)
    want = torch.autograd.grad(ref, ref_wrt, g.double())
    for name, a, r in zip(("dW", "db", "dh"), got, want):
        assert torch.isfinite(a).all(), name
        assert_close(a, r, dtype=torch.float32, name=name)


def test_softcap_inf_is_the_uncapped_result():
    h, w, b, labels = core.lce_inputs(bias=True, ignore=0.2)
    leaves = [x.detach().float().requires_grad_() for x in (h, w, b)]
    out = {}
    for cap in (float("inf"), None):
        loss = tk.linear_cross_entropy(*leaves[:2], labels, bias=leaves[2], softcap=cap, label_smoothing=0.1,
                                       reduction="none", backend=B)
        grads = torch.autograd.grad(loss, leaves, core._incoming(loss))
        logits = tk.logits(leaves[0], leaves[1], bias=leaves[2], softcap=cap, backend=B)
        out[cap] = (loss, *grads, logits)
    for a, r in zip(out[float("inf")], out[None]):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, r, rtol=0, atol=0)


def _errors(a, ref):
    from tolerances import errors

    return errors(a, ref)


@pytest.mark.parametrize("cap", [1500.0, 300.0, 30.0])
def test_softcap_error_within_twice_pytorchs(cap):
    """fp32 loss and gradients with a softcap: RMS and max error against fp64 at most 2x plain
    PyTorch's fp32 (torch.tanh).  The former tanh, 1 - 2/(exp(2x) + 1), was 58x at softcap=1500:
    it loses everything below 1e-7 absolute of tanh(z/c), i.e. 1e-4 of the logit."""
    gen = torch.Generator().manual_seed(11)
    n, d, v = 40, 64, 300
    h = torch.randn(n, d, generator=gen, dtype=F64)
    w = torch.randn(v, d, generator=gen, dtype=F64) * 0.5
    labels = torch.randint(0, v, (n,), generator=gen)

    def plain(h_, w_):
        z = torch.nn.functional.linear(h_, w_)
        return torch.nn.functional.cross_entropy(cap * torch.tanh(z / cap), labels, reduction="sum")

    def run(fn, dtype):
        a, b = h.to(dtype).requires_grad_(), w.to(dtype).requires_grad_()
        loss = fn(a, b)
        return (loss, *torch.autograd.grad(loss, [a, b]))

    ref = run(plain, F64)
    pt = run(plain, torch.float32)
    ours = run(lambda a, b: tk.linear_cross_entropy(a, b, labels, softcap=cap, reduction="sum", backend=B),
               torch.float32)
    for name, o, p, r in zip(("loss", "dh", "dW"), ours, pt, ref):
        (o_rms, o_max), (p_rms, p_max) = _errors(o, r), _errors(p, r)
        assert o_rms <= 2 * p_rms + 1e-9 and o_max <= 2 * p_max + 1e-9, (name, o_rms, p_rms, o_max, p_max)
    # the logits op's elementwise softcap on the same fp32 logits as torch.tanh
    z32 = torch.nn.functional.linear(h.float(), w.float())
    got = tk.logits(h.float(), w.float(), softcap=cap, backend=B)
    exact = cap * torch.tanh(z32.double() / cap)
    (o_rms, o_max), (p_rms, p_max) = _errors(got, exact), _errors(cap * torch.tanh(z32 / cap), exact)
    assert o_rms <= 2 * p_rms and o_max <= 2 * p_max, (o_rms, p_rms, o_max, p_max)


def test_softcap_tanh_pointwise_within_twice_torchs():
    """The kernels' fp32 tanh at every point of a dense grid over each of its pieces (the polynomial
    near 0, the two short polynomials, the exp formula, the saturated tail): its error in ulps
    against fp64 at most twice torch.tanh's worst on the same grid, and never above 0.75 ulp.
    The logits op with W = [[1]] and softcap 1 computes exactly tanh(x) of its hidden column."""
    x = torch.cat([torch.linspace(-12, 12, 240_001), torch.tensor([0.0, 0.55, -0.55, 1.0, -1.0, 2.0, -2.0])])
    x = x.float()
    got = tk.logits(x[:, None], torch.ones(1, 1), softcap=1.0, backend=B)[:, 0]
    exact = torch.tanh(x.double())
    ulp = (exact.abs() * 2.0**-23).clamp(min=2.0**-149)
    ours = ((got.double() - exact).abs() / ulp)
    theirs = ((torch.tanh(x).double() - exact).abs() / ulp)
    for lo, hi in ((0, 0.55), (0.55, 1), (1, 2), (2, 10), (10, 13)):
        band = (x.abs() >= lo) & (x.abs() < hi)
        o, t = float(ours[band].max()), float(theirs[band].max())
        assert o <= max(2 * float(theirs.max()), 1e-12) and o <= 0.75, (lo, hi, o, t)
    assert torch.equal(got[x.abs() >= 10], torch.sign(x[x.abs() >= 10]))
    assert bool((got[x > 0] > 0).all()) and bool((got[x < 0] < 0).all()) and got[x == 0].eq(0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("opts", ["bias", "softcap", "bias+softcap+scale"])
def test_lse_meets_cut_cross_entropy_rule(dtype, opts):
    """Cut Cross-Entropy's test_lse rule, per row: |exact - lse| <= |exact - same-dtype PyTorch|
    + 1e-5, with a bias or a softcap: the chunk's logits stay fp32 until the bias, the scale and
    the softcap are applied (PyTorch here: logits in the input dtype, logsumexp in fp32)."""
    gen = torch.Generator().manual_seed(7)
    n, d, v = 48, 64, 500
    h = torch.randn(n, d, generator=gen, dtype=F64).to(dtype)
    w = (torch.randn(v, d, generator=gen, dtype=F64) * 0.3).to(dtype)
    b = (torch.randn(v, generator=gen, dtype=F64) * 2).to(dtype) if "bias" in opts else None
    cap = 7.0 if "softcap" in opts else None
    scale = 0.8 if "scale" in opts else 1.0
    labels = torch.randint(0, v, (n,), generator=gen)

    def transform(z):
        z = z * scale
        return cap * torch.tanh(z / cap) if cap else z

    exact = torch.logsumexp(transform(torch.nn.functional.linear(h.double(), w.double(),
                                                                  b.double() if b is not None else None)), dim=1)
    same = torch.logsumexp(transform(torch.nn.functional.linear(h, w, b)).float(), dim=1).double()
    _, lse = tk.linear_cross_entropy(h, w, labels, bias=b, softcap=cap, logit_scale=scale, reduction="none",
                                     return_lse=True, backend=B)
    err, allowed = (exact - lse.double()).abs(), (exact - same).abs() + 1e-5
    assert (err <= allowed).all(), f"{int((err > allowed).sum())} rows fail; worst {float((err - allowed).max())}"


def _new_option_inputs(dtype, v=41, n=23, d=16):
    gen = torch.Generator().manual_seed(13)
    h = torch.randn(n, d, generator=gen, dtype=F64)
    w = torch.randn(v, d, generator=gen, dtype=F64) * 0.5
    b = torch.randn(v, generator=gen, dtype=F64)
    w[[7, 20]] = w[3].clone()  # classes 3, 7 and 20 tie (20 in another split under split_rows): argmax picks 3
    b[[7, 20]] = b[3].clone()
    h[0] = w[3] * 4
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[[1, 5]] = -100
    cw = torch.rand(v, generator=gen, dtype=F64) + 0.2
    return [x.to(dtype) for x in (h, w, b)] + [labels, cw.to(torch.float32 if dtype != F64 else F64)]


def _torch_op(name):
    return getattr(torch.ops.tiedkernels, "torch_" + name).default


@pytest.mark.parametrize("splits", [False, True], ids=["rows", "splits"])
@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16], ids=["fp64", "fp32", "bf16"])
def test_class_weight_stats_and_grad_lse(request, splits, dtype):
    """class_weight, return_stats (argmax, entropy) and grad_lse against the torch backend's
    template on the same values in fp64, with label smoothing, z-loss, softcap, scale, bias and
    ignored tokens; and the weighted mean against F.cross_entropy(weight=)."""
    if splits:
        request.getfixturevalue("split_rows")
    h, w, b, labels, cw = _new_option_inputs(dtype)
    n = h.shape[0]
    opts = (-100, 0.1, 1e-2, 6.0, 0.9, 0, 0, 5)
    gen = torch.Generator().manual_seed(2)
    g = torch.rand(n, generator=gen, dtype=F64) * 2 - 1
    gl = torch.rand(n, generator=gen, dtype=F64) * 2 - 1
    tri = (backends.get(B).op("lce_fwd"), backends.get(B).op("lce_bwd"), backends.get(B).op("lce_stats"))
    ref = (_torch_op("lce_fwd"), _torch_op("lce_bwd"), _torch_op("lce_stats"))
    h64, w64, b64, cw64 = h.double(), w.double(), b.double(), cw.double()
    got_f = tri[0](h, w, b, labels, None, *opts, False, False, False, cw, True)
    want_f = ref[0](h64, w64, b64, labels, None, *opts, False, False, False, cw64, True)
    tol = torch.float32 if dtype == torch.bfloat16 else dtype  # the same values: only the arithmetic differs
    for name, a, r in zip(("loss", "lse"), got_f[:2], want_f[:2]):
        assert_close(a, r, dtype=tol, name=name)
    assert torch.equal(got_f[5], want_f[5]), "argmax"
    assert got_f[5][0] == 3
    assert_close(got_f[6], want_f[6], dtype=tol, name="entropy")
    sdt = got_f[1].dtype
    got_b = tri[1](g.to(sdt), h, w, b, labels, got_f[1], *opts, True, True, True, cw, gl.to(sdt))
    want_b = ref[1](g, h64, w64, b64, labels, want_f[1], *opts, True, True, True, cw64, gl)
    # bf16: dz is rounded to bf16 for the GEMMs, as PyTorch's own backward does (and the interpreter
    # rounds toward zero): a few bf16 ulps, far below what a wrong or missing term moves
    rtol, atol = {F64: (1e-10, 1e-12), torch.float32: (1e-4, 1e-5), torch.bfloat16: (2 ** -5, 1e-2)}[dtype]
    for name, a, r in zip(("dh", "dW", "db"), got_b, want_b):
        torch.testing.assert_close(a.double(), r, rtol=rtol, atol=atol, msg=lambda m, name=name: f"{name}: {m}")
    st = tri[2](h, w, b, labels, -100, 6.0, 0.9, 0, 0, 5, cw)
    assert_close(st, ref[2](h64, w64, b64, labels, -100, 6.0, 0.9, 0, 0, 5, cw64), dtype=tol, name="shard stats")
    if dtype == F64:
        z = 6.0 * torch.tanh((torch.nn.functional.linear(h64, w64, b64) * 0.9) / 6.0)
        keep = labels != -100
        cy = cw64[labels[keep]]
        mean = (got_f[0].sum() - 1e-2 * (cy * got_f[1][keep] ** 2).sum()) / cy.sum()  # without the z-loss term
        want = torch.nn.functional.cross_entropy(z, labels, weight=cw64, label_smoothing=0.1)
        torch.testing.assert_close(mean, want)


# ------------------------------------------------------------------------------------------
# the GPU code paths, traced with fake CUDA tensors (no GPU here)


def _fake_cuda(*specs):
    """Fake CUDA tensors of the given (shape, dtype), and their mode: a CPU-only torch traces with them."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=False)
    with mode:
        return mode, [torch.empty(shape, dtype=dtype, device="cuda") for shape, dtype in specs]


def _lower_for_cuda(fn, specs):
    """What torch.compile(backend="inductor") does to ``fn`` on a GPU, up to code generation: trace it
    over fake CUDA tensors with functionalization and inductor's decompositions, then run inductor's
    lowering on the graph (which raises LoweringException for an op it cannot lower).  Returns the
    traced graph's ops."""
    from torch._inductor.decomposition import select_decomp_table
    from torch._inductor.graph import GraphLowering
    from torch._inductor.virtualized import V
    from torch.fx.experimental.proxy_tensor import make_fx

    mode, args = _fake_cuda(*specs)
    with mode:
        gm = make_fx(torch.func.functionalize(fn, remove="mutations"), tracing_mode="fake",
                     decomposition_table=select_decomp_table())(*args)
    with V.set_fake_mode(mode):
        graph = GraphLowering(gm)
        with V.set_graph_handler(graph):
            graph.run(*args)
    return {str(node.target) for node in gm.graph.nodes if node.op == "call_function"}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_multi_chunk_dw_lowers_under_inductor_on_cuda(monkeypatch, dtype):
    """The fused loss's bf16/fp16 weight gradient over several chunks on a GPU (the first chunk's
    fp32-output GEMM, then vocabulary tiles added into the fp32 dW): inductor lowers its graph.
    ``addmm`` with an out dtype functionalized to ``aten.addmm.dtype``, whose lowering raised
    (``tuned_addmm() takes 3 positional arguments but 4 were given``), so torch.compile crashed
    on any N > chunk."""
    from types import SimpleNamespace

    from tiedkernels.triton import cross_entropy as ce

    v, d, rows = 37, 16, 8
    monkeypatch.setattr(ce, "DW_TILE_BYTES", 10 * d * 2)  # 10 vocabulary rows per tile: 4 tiles
    args = SimpleNamespace(v=v, d=d)

    def two_chunks(dz1, h1, dz2, h2):
        dw = ce._Args._add_dw(args, None, dz1, h1, True)
        return ce._Args._add_dw(args, dw, dz2, h2, True)

    ops = _lower_for_cuda(two_chunks, [((rows, v), dtype), ((rows, d), dtype)] * 2)
    assert "aten.addmm.dtype" not in ops and "aten.mm.dtype" in ops, ops


def test_dw_tiles_accumulate_in_fp32(monkeypatch):
    """``add_dw_lowp`` without an fp32-output GEMM (older torch; and the CPU has no ``mm.dtype``):
    each tile's product rounded once, the sum over chunks kept in fp32, every tile (the last one
    short) added."""
    from tiedkernels.triton import cross_entropy as ce

    monkeypatch.setattr(ce, "_has_dtype_mm", lambda: False)

    gen = torch.Generator().manual_seed(3)
    v, d, rows, chunks = 37, 16, 8, 64
    dzs = [torch.randn(rows, v, generator=gen).to(torch.bfloat16) for _ in range(chunks)]
    hs = [torch.randn(rows, d, generator=gen).to(torch.bfloat16) for _ in range(chunks)]
    dw = torch.zeros(v, d)
    rounded = torch.zeros(v, d, dtype=F64)
    for dz, h in zip(dzs, hs):
        assert ce.add_dw_lowp(dw, dz, h, 10) is dw
        rounded += (dz.t() @ h).double()
    # the fp32 sum of the once-rounded tile products: only fp32 rounding on top (64 additions)
    torch.testing.assert_close(dw.double(), rounded, rtol=1e-5, atol=1e-5)


_HOST_READS = ("item", "tolist", "__bool__", "__int__", "__index__", "__float__")


class _GpuPath:
    """CPU tensors sent down the ops' GPU path (the device guard, the asynchronous index check) with
    torch.cuda mocked: logs the device each guard, stream and event gets, the guard around each
    kernel launch, and every host read of a tensor's value (but the check's own pinned buffer)."""

    def __init__(self, monkeypatch):
        from tiedkernels.triton import _common, cross_entropy, embedding, logits

        self.guards, self.launches, self.events, self.reads, self.hosts = [], [], [], [], []
        log = self

        class Guard:
            def __init__(self, device):
                self.device = torch.device(device)

            def __enter__(self):
                log.guards.append(self.device)

            def __exit__(self, *exc):
                log.guards.pop()

        class Event:
            def record(self, stream):
                log.events.append(("record", stream, list(log.guards)))

            def synchronize(self):
                log.events.append(("wait", len(log.launches)))

        def pinned(n):
            buf = torch.empty((n,), dtype=torch.int64)
            log.hosts.append(buf)
            return buf

        def launcher(kernel):
            real = _common.launcher(kernel)

            class Grid:
                def __getitem__(self, grid):
                    def launch(*args, **kwargs):
                        log.launches.append((kernel.__name__, list(log.guards)))
                        return real[grid](*args, **kwargs)

                    return launch

            return Grid()

        monkeypatch.setattr(_common, "on_gpu", lambda t: True)
        monkeypatch.setattr(_common, "pinned", pinned)
        monkeypatch.setattr(torch.cuda, "device", Guard)
        monkeypatch.setattr(torch.cuda, "Event", Event)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: ("stream", torch.device(device)))
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
        for mod in (cross_entropy, embedding, logits):
            monkeypatch.setattr(mod, "launcher", launcher)
        for name in _HOST_READS:
            real = getattr(torch.Tensor, name)

            def read(t, *args, _real=real, _name=name, **kwargs):
                if not any(t is h for h in log.hosts):
                    log.reads.append(_name)
                return _real(t, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, read)


def _gpu_path_calls():
    """(name, op arguments) of every op, on small CPU tensors."""
    h, w, b, labels = core.lce_inputs(shape=(9,), bias=True, ignore=0.2)
    h, w, b = h.detach().float(), w.detach().float(), b.detach().float()
    n, v = h.shape[0], w.shape[0]
    ids = labels.clamp(min=0)
    opts = (-100, 0.1, 1e-3, 5.0, 0.9, 0, 0, 4)
    lse = torch.logsumexp(torch.nn.functional.linear(h, w, b), 1)
    logits = tk.logits(h, w, bias=b, softcap=5.0, backend=B)
    return [
        ("lce_fwd", (h, w, b, labels, torch.ones(()), *opts, True, True, True, None, True)),
        ("lce_fwd", (h, w, b, labels, None, *opts, False, False, False)),
        ("lce_bwd", (torch.rand(n), h, w, b, labels, lse, *opts, True, True, True, None, torch.rand(n))),
        ("lce_stats", (h, w, b, labels, -100, 5.0, 0.9, 0, 0, 4)),
        ("embedding_fwd", (w, ids, None)),
        ("embedding_bwd", (h, ids, v, 2)),
        ("embedding_bwd_acc_", (torch.zeros_like(w), h, ids, None)),
        ("logits_fwd", (h, w, b, 0.9, 5.0)),
        ("logits_bwd", (torch.randn_like(logits), logits, h, w, b, 0.9, 5.0, True, True, True)),
    ]


@pytest.mark.parametrize("i", range(9))
def test_gpu_path_guards_device_and_reads_nothing(monkeypatch, i):
    """Every op launches its kernels with its tensors' device made current (Triton launches on the
    current device and stream), queues its index check on that device's stream, and reads no
    tensor value on the host before its kernels are queued (``flat[pos]`` with a 0-dim device
    tensor was an ``.item()``, a full device sync, on every call); then it waits for the check's
    own copy only, after the last launch."""
    name, args = _gpu_path_calls()[i]
    dev = args[0].device
    log = _GpuPath(monkeypatch)
    backends.get(B).op(name)(*args)
    assert log.reads == [], f"{name} read tensor values on the host: {log.reads}"
    assert log.launches, f"{name} launched nothing"
    for kernel, guards in log.launches:
        assert guards == [dev], f"{name}: {kernel} launched under the guards {guards}"
    if name.startswith("logits"):
        assert log.events == []
        return
    (_, stream, guards), (wait, launched) = log.events
    assert stream == ("stream", dev) and guards == [dev], (stream, guards)
    assert wait == "wait" and launched == len(log.launches), "the host waited before the op's kernels were queued"


def test_gpu_path_still_names_the_bad_value(monkeypatch):
    """The asynchronous check still raises the IndexError with the value, position and V."""
    log = _GpuPath(monkeypatch)
    h = torch.randn(6, 16)
    w = torch.randn(37, 16)
    labels = torch.tensor([1, 2, -100, 37, 4, 5])
    with pytest.raises(IndexError, match=r"label 37 at position 3 is outside \[0, V\) for V=37 and is not "
                                         r"ignore_index=-100"):
        backends.get(B).op("lce_fwd")(h, w, None, labels, None, -100, 0.0, 0.0, 0.0, 1.0, 0, 0, 4, False, False,
                                      False)
    with pytest.raises(IndexError, match=r"id -3 at position 1 is outside \[0, V\) for V=37"):
        backends.get(B).op("embedding_fwd")(w, torch.tensor([[0, -3], [40, 1]]), None)
    assert log.reads == []


def test_device_guard_and_record_on_fake_cuda_tensors(monkeypatch):
    """The real pieces with fake CUDA tensors: the guard names the tensor's own device (cuda:1 here,
    not the current one), and the check's record is built by device ops only (a host read of a
    fake tensor's value would raise)."""
    from tiedkernels.triton import _common

    mode, (flat, on1) = _fake_cuda(((12,), torch.int64), ((3,), torch.float32))
    with mode:
        on1 = torch.empty((3,), device="cuda:1")
        bad = (flat < 0) | (flat >= 7)
        reads = []
        for name in _HOST_READS:
            real = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name,
                                lambda t, *a, _r=real, _n=name, **k: reads.append(_n) or _r(t, *a, **k))
        record = _common.device_record(flat, bad)
        assert record.shape == (3,) and record.dtype == torch.int64 and record.device.type == "cuda"
    assert reads == []
    guard = _common.device_guard(on1)
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(_common.device_guard(torch.ones(1)), contextlib.nullcontext)
    with pytest.raises(RuntimeError, match=r"ids is on cpu but the weight on cuda:1"):
        _common.same_device(on1, ids=torch.tensor([0]))


def test_bf16_logits_round_to_nearest_like_torch():
    """bf16 logits with a bias and a softcap on tiny shapes (V=7, D=2, softcap 12.5): the logits and
    every gradient within the bound every other backend meets.  The kernels' fp32 -> bf16 stores
    truncated under the interpreter (a GPU rounds to nearest): a one-sided error that the bias
    gradient sums over the rows, 2.5x the bound (the logits 1.3x at these scales)."""
    for seed, (n, scale) in enumerate([(5, 1.0), (64, 3.0), (64, 8.0), (256, 8.0)]):
        gen = torch.Generator().manual_seed(seed)
        h = torch.randn(n, 2, generator=gen, dtype=F64) * scale
        w = torch.randn(7, 2, generator=gen, dtype=F64) * scale
        b = torch.randn(7, generator=gen, dtype=F64) * scale
        core._compare(lambda h_, w_, b_: tk.logits(h_, w_, bias=b_, softcap=12.5, backend=B),
                      lambda h_, w_, b_: R.logits(h_, w_, bias=b_, softcap=12.5), [h, w, b], torch.bfloat16,
                      ["logits", "dh", "dW", "db"], f"seed {seed}")


def test_round_to_bf16_is_torchs():
    """The kernels' fp32 -> bf16 store rounds as torch does (to nearest, ties to even): the logits
    op's scale on bf16 logits (W = [[1]]) gives fp32 products that are exact, among them ties,
    carries into the exponent, overflow to inf, both signs, infinities and NaN.  (No subnormal
    inputs: the interpreter's own bf16 -> fp32 load mangles them; a GPU's does not.)"""
    gen = torch.Generator().manual_seed(4)
    special = torch.tensor([1.0, 1 + 2**-7, 2 - 2**-7, 3.3895e38, 2.0**-125, float("inf"), 0.0, float("nan")])
    mags = torch.randn(4000, generator=gen) * 10.0 ** torch.randint(-36, 38, (4000,), generator=gen).float()
    mags = mags[mags.abs() >= 2.0**-125]
    x = torch.cat([special, -special, mags]).bfloat16()
    for scale in (1 + 2**-8, 1.5 + 2**-9, 1 - 2**-9, 0.75):
        got = tk.logits(x[:, None], torch.ones(1, 1, dtype=torch.bfloat16), logit_scale=scale, backend=B)[:, 0]
        want = (x.float() * scale).bfloat16()
        assert torch.equal(got.isnan(), want.isnan()), scale
        keep = ~want.isnan()
        assert torch.equal(got[keep], want[keep]), (scale, int((got[keep] != want[keep]).sum()))


def _nonfinite_inputs(case):
    """(h, w, b, labels) whose logits hold NaN, +inf or -inf; row 2 is ignored."""
    gen = torch.Generator().manual_seed(21)
    n, d, v = 9, 16, 123
    h = torch.randn(n, d, generator=gen)
    w = torch.randn(v, d, generator=gen) * 0.5
    b = torch.randn(v, generator=gen)
    b[40] = 9.0  # a large finite logit before the NaN column
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[2] = -100
    if case == "nan_column":
        b[100] = float("nan")  # every row; in the last split under split_rows
    elif case == "nan_row":
        h[3, 2] = float("nan")
        h[2, 5] = float("nan")
    elif case == "inf_hidden":
        h[4, 1] = float("inf")  # +inf and -inf logits in row 4
        h[2, 0] = float("inf")
    elif case == "inf_weight":
        w[70, 0] = float("inf")  # column 70: +inf where h[:, 0] > 0, -inf where < 0
    elif case == "fp16_overflow":
        h, w, b = (h * 300).half(), (w * 300).half(), None  # logits ~2e5: +-inf in fp16
        h[5] = h[5] / 1000
    return h, w, b, labels


@pytest.mark.parametrize("reduction", ["none", "sum"])
@pytest.mark.parametrize("splits", [False, True], ids=["rows", "splits"])
@pytest.mark.parametrize("case", ["nan_column", "nan_row", "inf_hidden", "inf_weight", "fp16_overflow"])
def test_nonfinite_logits_give_pytorchs_values(request, case, splits, reduction):
    """Plain PyTorch's values (F.linear, then F.cross_entropy in fp32) for logits with NaN, +inf or
    -inf: a row with a NaN or +inf logit has a NaN loss (log_softmax is inf - inf there, not inf)
    and NaN gradients, on an ignored row too (0 * NaN); torch.argmax's prediction (the first NaN
    wins); torch.logsumexp's lse; a NaN entropy where the softmax is NaN.  The kernels handle NaN
    themselves: tl.max/tl.argmax skip it on a GPU but not under the interpreter."""
    if splits:
        request.getfixturevalue("split_rows")
    h, w, b, labels = _nonfinite_inputs(case)
    leaves = [x.clone().requires_grad_() for x in (h, w, b) if x is not None]
    z = torch.nn.functional.linear(*leaves)
    ref = torch.nn.functional.cross_entropy(z.float(), labels, reduction=reduction)
    g = torch.rand(labels.shape[0], generator=torch.Generator().manual_seed(1)) + 0.5
    ref_grads = torch.autograd.grad(ref, leaves, g if reduction == "none" else None)
    broken = torch.log_softmax(z.detach().float(), -1).isnan().any(-1)
    assert broken.any()
    ours = [x.clone().requires_grad_() for x in (h, w, b) if x is not None]
    st = tk.linear_cross_entropy(ours[0], ours[1], labels, bias=ours[2] if b is not None else None,
                                 reduction=reduction, return_stats=True, backend=B)
    grads = torch.autograd.grad(st.loss, ours, g if reduction == "none" else None)
    tol = dict(rtol=1e-4, atol=1e-5) if h.dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(st.loss.float(), ref, equal_nan=True, **tol)
    assert torch.equal(st.predictions, z.detach().float().argmax(-1)), (st.predictions, z.float().argmax(-1))
    torch.testing.assert_close(st.lse.float(), torch.logsumexp(z.detach().float(), -1), equal_nan=True, **tol)
    assert torch.equal(st.entropy.isnan(), broken)
    for name, a, r in zip(("dh", "dW", "db"), grads, ref_grads):
        assert torch.equal(a.isnan(), r.isnan()), (name, int(a.isnan().sum()), int(r.isnan().sum()))
        if h.dtype == torch.float32:
            torch.testing.assert_close(a, r, equal_nan=True, **tol, msg=lambda m, name=name: f"{name}: {m}")
