"""A seeded random fuzz of the fused loss against the fp64 reference, on every CPU backend.

Each case draws every option of ``linear_cross_entropy`` at once (reduction, label smoothing,
z-loss, softcap incl. inf, logit scale, bias, ignore_index inside or outside [0, V),
num_items_in_batch as a number or a 0-dim/[1] tensor, shift, return_lse, chunk size), odd shapes
(V = 123 among them, D = 0, empty batches), int32 labels, non-contiguous hidden states and labels,
frozen weights or hidden states, no-grad calls, the module path (embedding and loss on the one
weight), a random incoming gradient (or exactly 1), and a second backward after
``retain_graph=True``; every result and gradient is compared with ``tiedkernels.reference``
in fp64 on the same input values (fp32 inputs: the fp32 tolerances of ``tolerances.py``).

``TIEDKERNELS_FUZZ_CASES`` (default 1000 per backend) and ``TIEDKERNELS_FUZZ_SEED`` change the
draw; a failure names its case, and ``TIEDKERNELS_FUZZ_ONLY=<case>`` reruns just that one.
"""

import inspect
import math
import os
import random

import pytest
import torch
import torch.nn.functional as F

import tiedkernels as tk
from tiedkernels import reference as R

from tolerances import assert_close

CASES = int(os.environ.get("TIEDKERNELS_FUZZ_CASES", "1000"))
SEED = int(os.environ.get("TIEDKERNELS_FUZZ_SEED", "0"))
ONLY = os.environ.get("TIEDKERNELS_FUZZ_ONLY")
BATCH = 100
F64 = torch.float64
# class weights and the per-token statistics: drawn where this version has them (and its reference)
NEW_OPTIONS = all(k in inspect.signature(f).parameters for f in (tk.linear_cross_entropy, R.linear_cross_entropy)
                  for k in ("class_weight", "return_stats"))


def draw(i):
    """The options of case ``i`` (plain Python values: the failure message prints them)."""
    rng = random.Random(SEED * 1_000_003 + i)
    pick = rng.choice
    c = {"dtype": pick(["fp64", "fp64", "fp32"])}
    c["lead"] = [pick([1, 2, 3, 5, 8]) for _ in range(pick([1, 1, 2, 2, 3]))]
    if rng.random() < 0.03:
        c["lead"][rng.randrange(len(c["lead"]))] = 0  # an empty batch
    c["D"] = 0 if rng.random() < 0.02 else pick([1, 2, 3, 5, 8, 16, 17, 32, 33, 64])
    c["V"] = pick([1, 2, 7, 31, 64, 123, 123, 128, 257])
    c["mode"] = pick(["functional"] * 6 + ["module"] * 2 + ["tied"] * 2)
    if c["mode"] == "tied" and c["D"] == 0:
        c["mode"] = "module"
    c["bias"] = rng.random() < 0.4 and c["mode"] == "functional"
    c["bias_grad"] = c["bias"] and rng.random() < 0.8
    c["h_grad"] = rng.random() < 0.85
    c["w_grad"] = rng.random() < 0.75 or c["mode"] == "tied"
    c["grad_mode"] = rng.random() < 0.88
    r = rng.random()
    c["ignore_index"] = -100 if r < 0.7 else (rng.randrange(c["V"]) if r < 0.9 else -1)
    c["p_ignore"] = pick([0.0, 0.0, 0.1, 0.5, 1.0])
    c["reduction"] = pick(["none", "sum", "mean"])
    c["label_smoothing"] = 0.0 if rng.random() < 0.5 else pick([round(rng.random(), 3), 1.0])
    c["z_loss"] = 0.0 if rng.random() < 0.6 else float(f"{10 ** rng.uniform(-4, 0):.3g}")
    r = rng.random()
    c["softcap"] = None if r < 0.6 else (math.inf if r < 0.67 else round(rng.uniform(0.5, 30), 2))
    r = rng.random()
    c["logit_scale"] = 1.0 if r < 0.6 else (0.0 if r < 0.63 else round(rng.uniform(-2, 3), 3))
    c["num_items"] = None
    if c["reduction"] != "none" and rng.random() < 0.4:
        c["num_items"] = (pick(["int", "float", "tensor0", "tensor1"]), rng.randint(1, 100))
    c["shift"] = len(c["lead"]) >= 2 and rng.random() < 0.3
    c["return_lse"] = rng.random() < 0.4
    c["chunk_size"] = None if rng.random() < 0.5 else rng.randint(1, 40)
    c["int32"] = rng.random() < 0.3
    c["h_strided"] = rng.random() < 0.3 and c["mode"] == "functional"
    c["h_transposed"] = c["h_strided"] and len(c["lead"]) >= 2 and rng.random() < 0.5
    c["y_strided"] = rng.random() < 0.2 and len(c["lead"]) >= 2
    c["grad_one"] = rng.random() < 0.15
    c["second_backward"] = rng.random() < 0.25
    c["logits"] = rng.random() < 0.2 and c["mode"] == "functional"
    c["body_scale"] = round(rng.uniform(0.3, 2.0), 3)
    # drawn last, so that the options above keep their draws
    c["class_weight"] = NEW_OPTIONS and rng.random() < 0.3
    c["return_stats"] = NEW_OPTIONS and rng.random() < 0.2
    if c["return_stats"]:
        c["return_lse"] = False
    return c


def _tensors(c, gen):
    dt = torch.float64 if c["dtype"] == "fp64" else torch.float32
    lead, d, v = c["lead"], c["D"], c["V"]
    w = (torch.randn(v, d, generator=gen, dtype=F64) * (1.5 / math.sqrt(max(d, 1)))).to(dt)
    if c["h_transposed"]:  # transposed leading dimensions
        h = torch.randn(lead[1], lead[0], *lead[2:], d, generator=gen, dtype=F64).to(dt).transpose(0, 1)
    elif c["h_strided"]:  # a stride-2 feature dimension
        h = torch.randn(*lead, 2 * d, generator=gen, dtype=F64).to(dt)[..., ::2]
    else:
        h = torch.randn(*lead, d, generator=gen, dtype=F64).to(dt)
    y = torch.randint(0, v, tuple(lead), generator=gen)
    y = y.masked_fill(torch.rand(tuple(lead), generator=gen) < c["p_ignore"], c["ignore_index"])
    if c["int32"]:
        y = y.to(torch.int32)
    if c["y_strided"]:  # the same values in a transposed layout
        y = y.transpose(0, 1).contiguous().transpose(0, 1)
    b = torch.randn(v, generator=gen, dtype=F64).to(dt) if c["bias"] else None
    ids = torch.randint(0, v, tuple(lead), generator=gen)
    cw = (torch.rand(v, generator=gen, dtype=F64) * 1.9 + 0.05).to(dt) if c["class_weight"] else None
    return dt, w, h, y, b, ids, cw


def _num_items(c):
    if c["num_items"] is None:
        return None, None
    kind, n = c["num_items"]
    value = {"int": n, "float": n + 0.5, "tensor0": torch.tensor(n), "tensor1": torch.tensor([float(n)])}[kind]
    return value, float(n + 0.5 if kind == "float" else n)


def run_case(i, backend):
    c = draw(i)
    gen = torch.Generator().manual_seed(SEED * 7919 + i)
    dt, w0, h0, y, b0, ids, cw = _tensors(c, gen)
    nib, nib_ref = _num_items(c)
    opts = dict(ignore_index=c["ignore_index"], reduction=c["reduction"], label_smoothing=c["label_smoothing"],
                z_loss=c["z_loss"], softcap=c["softcap"], logit_scale=c["logit_scale"], shift=c["shift"],
                return_lse=c["return_lse"])
    if c["class_weight"] or c["return_stats"]:
        opts.update(class_weight=cw, return_stats=c["return_stats"])
    ref_opts = dict(opts, softcap=None if c["softcap"] == math.inf else c["softcap"], num_items_in_batch=nib_ref)
    tol = F64 if dt == F64 else torch.float32

    # --- the call under test
    with torch.set_grad_enabled(c["grad_mode"]):
        if c["mode"] == "functional":
            w = w0.clone().requires_grad_(c["w_grad"])
            h = h0.detach().requires_grad_(c["h_grad"])  # keeps h0's strides
            b = b0.clone().requires_grad_(c["bias_grad"]) if b0 is not None else None
            out = tk.linear_cross_entropy(h, w, y, bias=b, num_items_in_batch=nib, chunk_size=c["chunk_size"],
                                          backend=backend, **opts)
            wrt = [t for t in (h, w, b) if t is not None and t.requires_grad]
        else:
            head = tk.TiedEmbeddingHead(c["V"], c["D"], dtype=dt, backend=backend, _weight=w0.clone(),
                                        _freeze=not c["w_grad"])
            w = head.weight
            if c["mode"] == "tied":  # embed -> body -> loss on the one weight: the shared gradient buffer
                h = None
                hid = torch.tanh(head(ids) * c["body_scale"])
            else:
                h = h0.clone().requires_grad_(c["h_grad"])
                hid = h
            out = head.loss(hid, y, num_items_in_batch=nib, chunk_size=c["chunk_size"], **opts)
            wrt = [t for t in (h, w) if t is not None and t.requires_grad]
    loss = out[0] if (c["return_lse"] or c["return_stats"]) else out

    # --- the fp64 reference on the same values
    w64 = w0.detach().double().requires_grad_()
    b64 = b0.detach().double().requires_grad_() if b0 is not None else None
    if c["mode"] == "tied":
        h64 = None
        hid64 = torch.tanh(F.embedding(ids, w64) * c["body_scale"])
        if dt != F64:  # the module's body ran in fp32: the loss saw fp32 hidden states
            hid64 = torch.tanh(F.embedding(ids, w64.detach().float()) * c["body_scale"]).double() + (
                hid64 - hid64.detach())
    else:
        h64 = h0.detach().double().requires_grad_()
        hid64 = h64
    if cw is not None:
        ref_opts["class_weight"] = cw.double()
    rout = R.linear_cross_entropy(hid64, w64, y, bias=b64, **ref_opts)
    rloss = rout[0] if (c["return_lse"] or c["return_stats"]) else rout
    assert_close(loss, rloss, dtype=tol, name=f"case {i} loss")
    if c["return_lse"]:
        assert_close(out[1], rout[1], dtype=tol, name=f"case {i} lse")
    if c["return_stats"]:
        _check_stats(i, out, rout[1], tol)
    if c["logits"]:
        z = tk.logits(h0, w0, bias=b0, softcap=c["softcap"], logit_scale=c["logit_scale"], backend=backend)
        zr = R.logits(h0.double(), w0.double(), bias=None if b0 is None else b0.double(),
                      softcap=ref_opts["softcap"], logit_scale=c["logit_scale"])
        assert_close(z, zr, dtype=tol, name=f"case {i} logits")
    if not (c["grad_mode"] and wrt):
        assert not loss.requires_grad, f"case {i}: the loss requires a gradient that nothing asked for"
        return
    assert loss.requires_grad, f"case {i}: the loss carries no gradient for {len(wrt)} inputs that need one"
    ref_wrt = {id(h): h64, id(w): w64}
    if c["mode"] == "functional" and b0 is not None:
        ref_wrt[id(b)] = b64

    # --- gradients: a random incoming gradient (or exactly 1), then a second backward
    rounds = 2 if c["second_backward"] else 1
    for r in range(rounds):
        g = torch.ones_like(loss) if (c["grad_one"] and r == 0) else torch.randn(loss.shape, generator=gen,
                                                                                 dtype=loss.dtype)
        grads = torch.autograd.grad(loss, wrt, g, retain_graph=r + 1 < rounds)
        refs = torch.autograd.grad(rloss, [ref_wrt[id(t)] for t in wrt], g.double(), retain_graph=True,
                                   allow_unused=True)
        for t, a, ref in zip(wrt, grads, refs):
            name = "dW" if t is w else ("db" if b0 is not None and c["mode"] == "functional" and t is b else "dh")
            if ref is None:
                ref = torch.zeros_like(t, dtype=F64)
            assert a.dtype == t.dtype and a.shape == t.shape, f"case {i} {name}: {a.dtype} {tuple(a.shape)}"
            assert_close(a, ref, dtype=tol, name=f"case {i} {name} (backward {r + 1})")


def _check_stats(i, st, ref, tol):
    """The statistics of the same pass against the reference's (computed from the full logits)."""
    for name in ("lse", "z_loss", "entropy"):
        assert_close(getattr(st, name), ref[name].detach(), dtype=tol, name=f"case {i} stats.{name}")
        assert not getattr(st, name).requires_grad, f"case {i} stats.{name} carries a gradient"
    pred, rpred = st.predictions, ref["predictions"]
    assert pred.dtype == torch.int64 and pred.shape == rpred.shape, f"case {i} predictions {pred.dtype} {pred.shape}"
    if tol == F64:  # fp32 logits may order two near-equal logits otherwise than fp64 does
        assert torch.equal(pred, rpred), f"case {i} predictions differ from the reference's argmax"
        assert_close(st.accuracy, ref["accuracy"].double(), dtype=F64, name=f"case {i} stats.accuracy")


def _cases(batch):
    if ONLY is not None:
        return [int(x) for x in ONLY.split(",")] if batch == 0 else []
    return range(batch * BATCH, min(CASES, (batch + 1) * BATCH))


@pytest.mark.parametrize("batch", range(max(1, math.ceil(CASES / BATCH))))
def test_fuzz(backend, batch):
    for i in _cases(batch):
        try:
            run_case(i, backend)
        except Exception as e:
            raise AssertionError(f"fuzz case {i} failed on backend {backend!r} (rerun it alone with "
                                 f"TIEDKERNELS_FUZZ_ONLY={i}); options: {draw(i)}\n{type(e).__name__}: {e}") from e


def test_draw_covers_every_option():
    """The draw reaches every option and form it claims to (so the fuzz cannot quietly narrow)."""
    if ONLY is not None or CASES < 1000:
        pytest.skip("a reduced run (TIEDKERNELS_FUZZ_CASES < 1000 or TIEDKERNELS_FUZZ_ONLY): the full draw is "
                    "checked on the default 1,000 cases")
    cs = [draw(i) for i in range(CASES)]

    def some(pred):
        return sum(1 for c in cs if pred(c))

    checks = {
        "V=123": some(lambda c: c["V"] == 123), "D=0": some(lambda c: c["D"] == 0),
        "empty batch": some(lambda c: 0 in c["lead"]), "int32 labels": some(lambda c: c["int32"]),
        "strided hidden": some(lambda c: c["h_strided"]), "strided labels": some(lambda c: c["y_strided"]),
        "frozen weight": some(lambda c: not c["w_grad"]), "frozen hidden": some(lambda c: not c["h_grad"]),
        "second backward": some(lambda c: c["second_backward"]), "no grad": some(lambda c: not c["grad_mode"]),
        "softcap inf": some(lambda c: c["softcap"] == math.inf), "softcap": some(lambda c: c["softcap"] not in
                                                                                (None, math.inf)),
        "tied module": some(lambda c: c["mode"] == "tied"), "module": some(lambda c: c["mode"] == "module"),
        "bias": some(lambda c: c["bias"]), "ignore_index in range": some(lambda c: c["ignore_index"] >= 0),
        "all ignored": some(lambda c: c["p_ignore"] == 1.0),
        **({"class_weight": some(lambda c: c["class_weight"]), "return_stats": some(lambda c: c["return_stats"]),
            "class_weight with smoothing, stats, tied": some(lambda c: c["class_weight"] and c["label_smoothing"]
                                                             and c["return_stats"] and c["mode"] == "tied")}
           if NEW_OPTIONS else {}),
        "every option at once": some(lambda c: c["label_smoothing"] and c["z_loss"] and c["softcap"]
                                     and c["logit_scale"] != 1.0 and c["shift"] and c["num_items"]),
        **{f"num_items {k}": some(lambda c, k=k: c["num_items"] and c["num_items"][0] == k)
           for k in ("int", "float", "tensor0", "tensor1")},
        **{f"reduction {r}": some(lambda c, r=r: c["reduction"] == r) for r in ("none", "sum", "mean")},
    }
    missing = [k for k, n in checks.items() if n == 0]
    assert not missing, f"the draw never produces: {missing}"
