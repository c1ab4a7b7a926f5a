"""tiedkernels' GRPO and distillation losses against Liger Kernel's chunked losses
(``liger_kernel.chunked_loss``: ``LigerFusedLinearGRPOLoss``, ``LigerFusedLinearJSDLoss``) and the fp64
reference on full logits (tests/_rl_reference.py), in value and gradient, where they define the same math;
and the providers of benchmarks/rl_report.py computing one loss.

Where Liger's math differs and how the comparison makes it equal:

* GRPO: Liger's per-token log-probs are float32 whatever the input dtype (its selective log-softmax
  accumulates in float32), so in fp64 Liger agrees to float32 precision only. Its loss types, clipping,
  k3 KL (``beta`` against ``ref_per_token_logps``), temperature and normalisations are TRL's; its
  ``advantages`` are per completion ``[B]`` only; it computes no entropy. Its logged ``kl`` and clip ratio
  are TRL's ``kl`` and ``clip_ratio/region_mean``.
* JSD: Liger's ``beta`` is TRL's (0 forward KL(teacher‖student), 1 reverse KL, mixture (1-β)·student +
  β·teacher); the loss is ``weight_soft_loss · divergence + weight_hard_loss · CE`` averaged over the scored
  tokens, so tiedkernels' ``alpha`` is Liger's ``weight_hard_loss`` with ``weight_soft_loss = 1 - alpha``
  (Liger's defaults, 0.5 / 0.5, are not TRL's GKD, which has no hard loss). Both divide both logits by the
  temperature and take the hard loss on the untempered student logits. Liger's hard loss is computed in
  float32 whatever the dtype (its ``log_softmax(logits.float())``), and its divergence in the logits'
  dtype (bf16 in bf16: not compared here); the loss value it returns is summed in a float32 scalar in any
  dtype (its gradients keep the dtype).
"""

import os
import sys

import pytest
import torch

import tiedkernels as tk
from _rl_reference import final_logits, jsd, token_stats, trl_grpo_loss
from tolerances import TOLERANCES

try:
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss, LigerFusedLinearJSDLoss
    _LIGER_WHY = None
except Exception as e:  # noqa: BLE001
    _LIGER_WHY = (f"liger_kernel is not importable ({type(e).__name__}: {e}); "
                  "pip install -r requirements/bench.txt")

needs_liger = pytest.mark.skipif(_LIGER_WHY is not None, reason=_LIGER_WHY or "")

B, T, D, V = 3, 7, 16, 123
F32 = TOLERANCES[torch.float32]


def _close(actual, expected, dtype, name):
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=tol.atol, rtol=tol.rtol,
                               msg=lambda m: f"{name} ({dtype}): {m}")


def _incoming():
    """A random incoming gradient for the loss, exact in float32 (Liger's JSD returns a float32 loss,
    so its backward receives the incoming gradient rounded to float32)."""
    return float(torch.randint(24, 90, ())) / 64


def _grpo_inputs(dtype):
    h = torch.randn(B, T, D, dtype=torch.float64).mul(0.7).to(dtype)
    w = torch.randn(V, D, dtype=torch.float64).mul(0.5).to(dtype)
    ids = torch.randint(0, V, (B, T))
    lengths = torch.tensor([T, 4, 1])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(dtype)
    adv = torch.randn(B, dtype=dtype)
    with torch.no_grad():
        lp0, _, _ = token_stats(final_logits(h.double(), w.double()), ids)
    old = (lp0 + 0.3 * torch.randn(B, T, dtype=torch.float64)).to(dtype)  # some ratios outside 1 ± 0.2
    ref = (lp0 + 0.3 * torch.randn(B, T, dtype=torch.float64)).to(dtype)
    return h, w, ids, mask, adv, old, ref


@needs_liger
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("loss_type,temperature", [("dapo", 1.0), ("grpo", 0.7), ("bnpo", 1.0)])
def test_grpo_liger_tiedkernels_reference(dtype, loss_type, temperature):
    h, w, ids, mask, adv, old, ref = _grpo_inputs(dtype)
    g = torch.tensor(_incoming())
    beta, eps = 0.04, 0.2

    # fp64 reference: TRL's loss on per-token stats of the full logits
    h64, w64 = h.detach().double().clone().requires_grad_(), w.detach().double().clone().requires_grad_()
    lp, ent, _ = token_stats(final_logits(h64, w64, temperature=temperature), ids)
    want, want_m = trl_grpo_loss(lp, ent, mask.double(), adv.double(), old.double(), ref.double(), loss_type=loss_type,
                                 epsilon_low=eps, epsilon_high=eps, beta=beta)
    (want * g.double()).backward()

    ht, wt = h.clone().requires_grad_(), w.clone().requires_grad_()
    out = tk.grpo_loss(ht, wt, ids, adv, completion_mask=mask, old_log_probs=old, ref_log_probs=ref,
                       loss_type=loss_type, epsilon=eps, beta=beta, temperature=temperature, chunk_size=5,
                       backend="cpu")
    (out.loss * g.to(dtype)).backward()

    mod = LigerFusedLinearGRPOLoss(beta=beta, compiled=False, use_ref_model=True, chunk_size=1, epsilon_low=eps,
                                   epsilon_high=eps, loss_type=loss_type, temperature=temperature)
    hl, wl = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss_l, (kl_l, clip_l) = mod(hl, wl, ids, mask, adv, ref_per_token_logps=ref, old_per_token_logps=old)
    (loss_l * g.to(dtype)).backward()

    # tiedkernels against fp64, at its dtype's tolerance
    _close(out.loss, want, dtype, "tiedkernels loss")
    _close(ht.grad, h64.grad, dtype, "tiedkernels dh")
    _close(wt.grad, w64.grad, dtype, "tiedkernels dW")
    # Liger against fp64: float32 at best (its log-probs are float32 in any dtype)
    tol = F32
    for name, a, b in (("loss", loss_l, want), ("dh", hl.grad, h64.grad), ("dW", wl.grad, w64.grad),
                       ("kl metric", kl_l, torch.tensor(want_m["kl"])),
                       ("clip metric", clip_l, torch.tensor(want_m["clip_ratio/region_mean"]))):
        torch.testing.assert_close(a.double(), b.double(), atol=tol.atol, rtol=tol.rtol,
                                   msg=lambda m, name=name: f"liger {name} ({dtype}) vs fp64 reference: {m}")
    # and the two against each other, with the metrics tiedkernels logs
    torch.testing.assert_close(out.loss.double(), loss_l.double(), atol=tol.atol, rtol=tol.rtol)
    torch.testing.assert_close(ht.grad.double(), hl.grad.double(), atol=tol.atol, rtol=tol.rtol)
    torch.testing.assert_close(wt.grad.double(), wl.grad.double(), atol=tol.atol, rtol=tol.rtol)
    torch.testing.assert_close(out.metrics["kl"].double(), kl_l.double(), atol=tol.atol, rtol=tol.rtol)
    torch.testing.assert_close(out.metrics["clip_ratio/region_mean"].double(), clip_l.double(), atol=tol.atol,
                               rtol=tol.rtol)
    assert 0 < float(clip_l) < 1, "the inputs must clip some ratios and not others"


def _jsd_reference(h, w, ht, wt, y, beta, temperature, alpha):
    zs, zt = final_logits(h, w), final_logits(ht, wt)
    keep = y != -100
    div = jsd(zs / temperature, zt / temperature, beta)
    ce = torch.logsumexp(zs, -1) - zs.gather(-1, torch.where(keep, y, 0)[:, None]).squeeze(-1)
    n = keep.sum().clamp(min=1)
    return ((1 - alpha) * torch.where(keep, div, 0 * div).sum() + alpha * torch.where(keep, ce, 0 * ce).sum()) / n


@needs_liger
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("beta,temperature,alpha", [(0.5, 1.0, 0.0), (0.0, 2.0, 0.0), (1.0, 0.8, 0.0),
                                                    (0.3, 1.5, 0.4)])
def test_jsd_liger_tiedkernels_reference(dtype, beta, temperature, alpha):
    n, dt = 21, 24  # the teacher's D differs from the student's: both accept it
    h = torch.randn(n, D, dtype=torch.float64).mul(0.7).to(dtype)
    w = torch.randn(V, D, dtype=torch.float64).mul(0.5).to(dtype)
    th = torch.randn(n, dt, dtype=torch.float64).mul(0.7).to(dtype)
    tw = torch.randn(V, dt, dtype=torch.float64).mul(0.6).to(dtype)
    y = torch.randint(0, V, (n,))
    y[[0, 5, 6, 20]] = -100
    g = _incoming()

    h64, w64 = h.detach().double().clone().requires_grad_(), w.detach().double().clone().requires_grad_()
    want = _jsd_reference(h64, w64, th.double(), tw.double(), y, beta, temperature, alpha)
    (want * g).backward()

    ht_, wt_ = h.clone().requires_grad_(), w.clone().requires_grad_()
    got = tk.linear_distillation_loss(ht_, wt_, y, teacher_hidden=th, teacher_weight=tw, divergence="jsd", beta=beta,
                                      temperature=temperature, alpha=alpha, chunk_size=8, backend="cpu")
    (got * g).backward()

    mod = LigerFusedLinearJSDLoss(weight_hard_loss=alpha, weight_soft_loss=1 - alpha, beta=beta, ignore_index=-100,
                                  temperature=temperature, compiled=False, chunk_size=8)
    hl, wl = h.clone().requires_grad_(), w.clone().requires_grad_()
    got_l = mod(hl, wl, th, tw, y)
    (got_l * g).backward()

    _close(got, want, dtype, "tiedkernels loss")
    _close(ht_.grad, h64.grad, dtype, "tiedkernels dh")
    _close(wt_.grad, w64.grad, dtype, "tiedkernels dW")
    # Liger: its divergence in the input dtype, its hard loss in float32, its loss value summed in a
    # float32 scalar
    ltol = dtype if alpha == 0.0 else torch.float32
    assert got_l.dtype == torch.float32
    _close(got_l, want, torch.float32, "liger loss")
    _close(hl.grad, h64.grad, ltol, "liger dh")
    _close(wl.grad, w64.grad, ltol, "liger dW")


# ---------------------------------------------------------------------------------------------
# the benchmark's providers compute one loss (so their timings compare the same math)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("job", ["grpo", "jsd"])
def test_benchmark_providers_agree(job):
    from benchmarks import rl_report as RL

    case = RL.RLCase(job, 48, 16, 123, "float64")
    x = RL.Inputs(case, seed=3)
    h64, w64 = x.h.clone().requires_grad_(), x.w.clone().requires_grad_()
    if job == "grpo":
        b, t = x.bt
        lp, ent, _ = token_stats(final_logits(h64, w64), x.y)
        want, _ = trl_grpo_loss(lp.view(b, t), ent.view(b, t), x.mask.double(), x.adv.double(), x.old.double(),
                                x.ref.double(), loss_type="dapo", beta=RL.GRPO["beta"],
                                epsilon_low=RL.GRPO["epsilon"], epsilon_high=RL.GRPO["epsilon"])
    else:
        want = _jsd_reference(h64, w64, x.ht, x.wt, x.y, RL.JSD["beta"], RL.JSD["temperature"], 0.0)
    want.backward()
    ran = []
    for name in RL.PROVIDERS:
        if RL.why_not(name) is not None:
            continue
        step = RL.build(name, case, x)
        step.run()
        out = step._keep["out"]
        loss = out[0] if isinstance(out, tuple) else out
        hl, wl = x.leaves()
        # fp64 throughout, but Liger's GRPO log-probs and both its loss values are float32 (module docstring)
        tol = torch.float32 if (name == "liger" and job == "grpo") else torch.float64
        _close(loss, want, torch.float32 if name == "liger" else tol, f"{name} loss")
        _close(hl.grad, h64.grad, tol, f"{name} dh")
        _close(wl.grad, w64.grad, tol, f"{name} dW")
        step.reset()
        ran.append(name)
    assert {"tiedkernels-cpu", "plain"} <= set(ran)
