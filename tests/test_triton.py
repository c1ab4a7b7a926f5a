"""The Triton backend on CPU tensors, through the Triton interpreter (TRITON_INTERPRET=1).

The core's parametrized checks (tests/test_ops.py: every option x reduction, fp32 and bf16,
N=37, V=123, D=32, random incoming gradients, against the fp64 reference with the shared
tolerances) run here with ``backend="triton"``; then what is specific to these kernels: the
embedding's deterministic path, bad ids and labels, empty and non-contiguous inputs, NaN,
tracing through ``triton_op``, and how the backend reports itself.

Triton reads TRITON_INTERPRET when it is imported, so this module sets it at collection,
before anything imports Triton.  That does not change what the rest of the suite runs:
``backend="auto"`` never picks Triton for CPU tensors.  When another module of the same run
imported Triton first (transformers/peft do), the interpreter cannot be switched on any more:
the module is then skipped with that reason, and ``make test-triton`` (part of ``make test``)
runs it in a process of its own.
"""

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
    if dtype == torch.float32:
        assert torch.equal(out, acc), "not the fixed-order fp32 sum"
    else:
        # one rounding of the fp32 sum; the interpreter (triton 3.9) rounds fp32 -> bf16 toward
        # zero rather than to nearest, so allow the one bf16 ulp that makes
        torch.testing.assert_close(out, acc.to(dtype), rtol=2 ** -7, atol=0)
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
