"""Token-level objectives (tiedkernels.objectives) against plain fp64 PyTorch on full logits.

Every entry point (``token_log_probs``, ``linear_token_objective``, ``grpo_loss``) with random per-token
constants and incoming gradients, ignored tokens, every reduction, shift, bias, logit scale (scalar and per
token), softcap and temperature (scalar, per sample, per token), odd shapes (V=123, V > 65536), the
low-precision dtypes, the tied module, torch.compile, opcheck of the custom ops, and the errors."""

import pytest
import torch

import tiedkernels as tk
from tiedkernels import objectives as O
from tiedkernels.functional import TiedKernelsError
from _rl_reference import final_logits, token_stats, trl_grpo_loss

F64 = torch.float64


def _data(b=3, t=11, d=16, v=123, seed=0, dtype=F64, bias=False):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(b, t, d, generator=g, dtype=F64).to(dtype).requires_grad_()
    w = (torch.randn(v, d, generator=g, dtype=F64) * 0.5).to(dtype).requires_grad_()
    bb = (torch.randn(v, generator=g, dtype=F64) * 0.3).to(dtype).requires_grad_() if bias else None
    y = torch.randint(0, v, (b, t), generator=g)
    y[0, 2] = -100
    y[1, 5:7] = -100
    return h, w, bb, y, g


def _policy(lp, ent, adv, old):
    """A clipped policy-gradient objective with an entropy bonus: every term of dz in play."""
    r = torch.exp(lp - old)
    return -torch.min(r * adv, r.clamp(0.8, 1.2) * adv) - 0.05 * ent + 0.01 * lp * lp


def _reference(h, w, b, y, consts, *, logit_scale=1.0, softcap=None, temperature=None, shift=False, token_weight=None,
               reduction="mean", num_items=None, objective=_policy):
    if shift:
        y = torch.cat([y[..., 1:], torch.full_like(y[..., :1], -100)], -1)
    z = final_logits(h, w, b, logit_scale, softcap, temperature)
    lp, ent, _ = token_stats(z, y)
    keep = y != -100
    val = torch.where(keep, objective(lp, ent, **consts), torch.zeros((), dtype=lp.dtype))
    if token_weight is not None:
        val = val * token_weight
    if shift:
        val, keep = val[..., :-1], keep[..., :-1]
    if reduction == "none":
        return val
    if num_items is not None:
        return val.sum() / num_items
    return val.sum() / keep.sum().clamp(min=1) if reduction == "mean" else val.sum()


def _pad(x, shift):
    """A per-token tensor of the output shape, padded back to the labels' shape for the reference."""
    return torch.cat([x, torch.zeros_like(x[..., :1])], -1) if shift else x


def _grads(out, inputs, up):
    return torch.autograd.grad(out, [x for x in inputs if x is not None], up)


CASES = [
    dict(),
    dict(bias=True, logit_scale=0.7, softcap=4.0),
    dict(temperature="token", shift=True),
    dict(temperature="sample", bias=True, softcap=3.0, reduction="sum"),
    dict(logit_scale="token", temperature=0.6, token_weight=True),
    dict(reduction="none", shift=True, bias=True),
    dict(reduction="sum", num_items=7.0, chunk=1),
]


@pytest.mark.parametrize("case", CASES, ids=[",".join(f"{k}={v}" for k, v in c.items()) or "plain" for c in CASES])
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_objective_matches_full_logits(case, backend):
    h, w, b, y, g = _data(bias=case.get("bias", False))
    shift = case.get("shift", False)
    out_shape = (3, 10) if shift else (3, 11)
    adv = torch.randn(3, 1, generator=g, dtype=F64)  # per sequence, broadcast
    old = torch.randn(out_shape, generator=g, dtype=F64) * 0.3 - 4.0
    opts = {}
    ref_opts = {}
    if case.get("logit_scale") == "token":
        s = torch.rand(out_shape, generator=g, dtype=F64) + 0.5
        opts["logit_scale"], ref_opts["logit_scale"] = s, _pad(s, shift)
    elif "logit_scale" in case:
        opts["logit_scale"] = ref_opts["logit_scale"] = case["logit_scale"]
    if case.get("temperature") == "token":
        t = torch.rand(out_shape, generator=g, dtype=F64) + 0.5
        opts["temperature"], ref_opts["temperature"] = t, _pad(t, shift) + (1 if shift else 0) * (
            torch.arange(11) == 10).to(F64)
    elif case.get("temperature") == "sample":
        t = torch.rand(3, 1, generator=g, dtype=F64) + 0.5
        opts["temperature"], ref_opts["temperature"] = t, t.expand(3, 11)
    elif "temperature" in case:
        opts["temperature"] = ref_opts["temperature"] = case["temperature"]
    if "softcap" in case:
        opts["softcap"] = ref_opts["softcap"] = case["softcap"]
    tw = None
    if case.get("token_weight"):
        tw = torch.rand(out_shape, generator=g, dtype=F64)
        opts["token_weight"] = tw
    reduction = case.get("reduction", "mean")
    out = O.linear_token_objective(h, w, y, _policy, consts={"adv": adv, "old": old}, bias=b, shift=shift,
                                   reduction=reduction, num_items_in_batch=case.get("num_items"),
                                   chunk_size=case.get("chunk", 4), backend=backend, **opts)
    ref = _reference(h, w, b, y, {"adv": adv, "old": _pad(old, shift)}, shift=shift, reduction=reduction,
                     token_weight=None if tw is None else _pad(tw, shift), num_items=case.get("num_items"), **ref_opts)
    up = torch.randn(out.shape, generator=g, dtype=F64) if reduction == "none" else torch.tensor(1.7, dtype=F64)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for a, r in zip(_grads(out, (h, w, b), up), _grads(ref, (h, w, b), up)):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)


def test_token_log_probs_gradients_of_all_three():
    h, w, b, y, g = _data(bias=True)
    temp = torch.rand(3, 1, generator=g, dtype=F64) + 0.5
    res = tk.token_log_probs(h, w, y, bias=b, softcap=5.0, logit_scale=1.3, temperature=temp, chunk_size=5)
    lp, ent, lse = token_stats(final_logits(h, w, b, 1.3, 5.0, temp.expand(3, 11)), y)
    ups = [torch.randn(3, 11, generator=g, dtype=F64) for _ in range(3)]
    for got, want in zip(res, (lp, ent, lse)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    mine = _grads(sum((x * u).sum() for x, u in zip(res, ups)), (h, w, b), None)
    ref = _grads(sum((x * u).sum() for x, u in zip((lp, ent, lse), ups)), (h, w, b), None)
    for a, r in zip(mine, ref):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)


def test_default_objective_is_the_cross_entropy_and_stats_are_returned():
    h, w, b, y, _ = _data(bias=True)
    out = O.linear_token_objective(h, w, y, bias=b, return_stats=True)
    ce = tk.linear_cross_entropy(h, w, y, bias=b)
    torch.testing.assert_close(out.loss, ce, rtol=1e-12, atol=1e-12)
    lp, ent, lse = token_stats(final_logits(h, w, b), y)
    for got, want in zip(out[1:], (lp, ent, lse)):
        assert not got.requires_grad
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g1 = torch.autograd.grad(out.loss, (h, w, b))
    g2 = torch.autograd.grad(ce, (h, w, b))
    for a, r in zip(g1, g2):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-13)


def test_large_vocabulary_and_empty_and_all_ignored():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(5, 8, generator=g, dtype=F64, requires_grad=True)
    w = torch.randn(70001, 8, generator=g, dtype=F64, requires_grad=True)
    y = torch.tensor([0, 70000, -100, 12345, 69999])
    adv, old = torch.randn(5, generator=g, dtype=F64), torch.full((5,), -11.0, dtype=F64)
    out = O.linear_token_objective(h, w, y, _policy, consts={"adv": adv, "old": old}, chunk_size=2)
    ref = _reference(h, w, None, y, {"adv": adv, "old": old})
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for a, r in zip(torch.autograd.grad(out, (h, w)), torch.autograd.grad(ref, (h, w))):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-13)
    # all ignored: loss 0, gradients 0; empty: 0
    h2 = torch.randn(4, 8, dtype=F64, requires_grad=True)
    out = O.linear_token_objective(h2, w, torch.full((4,), -100), _policy, consts={"adv": adv[:4], "old": old[:4]})
    assert out.item() == 0.0
    (gh,) = torch.autograd.grad(out, h2)
    assert torch.equal(gh, torch.zeros_like(gh))
    e = torch.zeros(0, 8, dtype=F64, requires_grad=True)
    assert O.linear_token_objective(e, w, torch.zeros(0, dtype=torch.long)).item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_against_fp64(dtype):
    h, w, b, y, g = _data(dtype=dtype, d=32, v=301)
    adv = torch.randn(3, 11, generator=g, dtype=F64)
    old = torch.randn(3, 11, generator=g, dtype=F64) * 0.3 - 5.5
    out = O.linear_token_objective(h, w, y, _policy, consts={"adv": adv, "old": old}, chunk_size=8)
    assert out.dtype == torch.float32
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = _reference(h64, w64, None, y, {"adv": adv, "old": old})
    tol = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}[dtype]
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    for a, r in zip(torch.autograd.grad(out, (h, w)), torch.autograd.grad(ref, (h64, w64))):
        assert a.dtype == dtype
        err = (a.double() - r).abs().max() / r.abs().max()
        assert err < tol * 2, err


def test_tied_module_writes_one_gradient_equal_to_plain_pytorch():
    head = tk.TiedEmbeddingHead(123, 16, dtype=F64)
    ids = torch.randint(0, 123, (2, 9), generator=torch.Generator().manual_seed(0))
    adv = torch.randn(2, 1, dtype=F64)
    h = torch.tanh(head(ids) * 2)
    loss = head.token_objective(h, ids, _policy, consts={"adv": adv, "old": torch.full((2, 8), -5.0, dtype=F64)},
                                shift=True)
    loss.backward()
    mine = head.weight.grad.clone()
    w = head.weight.detach().clone().requires_grad_()
    h2 = torch.tanh(torch.nn.functional.embedding(ids, w) * 2)
    ref = _reference(h2, w, None, ids, {"adv": adv, "old": torch.full((2, 9), -5.0, dtype=F64)}, shift=True)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mine, w.grad, rtol=1e-10, atol=1e-12)


def test_second_backward_with_retain_graph_and_unsupported_modes():
    h, w, b, y, g = _data()
    adv, old = torch.randn(3, 11, generator=g, dtype=F64), torch.full((3, 11), -5.0, dtype=F64)
    out = O.linear_token_objective(h, w, y, _policy, consts={"adv": adv, "old": old}, chunk_size=4)
    g1 = torch.autograd.grad(out, (h, w), retain_graph=True)
    g2 = torch.autograd.grad(out, (h, w), torch.tensor(2.0, dtype=F64))
    for a, c in zip(g1, g2):
        torch.testing.assert_close(2 * a, c, rtol=1e-12, atol=1e-14)
    out = O.linear_token_objective(h, w, y, _policy, consts={"adv": adv, "old": old})
    with pytest.raises(NotImplementedError, match="second derivatives"):
        torch.autograd.grad(out, h, create_graph=True)
    tl = tk.token_log_probs(h, w, y)
    with pytest.raises(NotImplementedError, match="second derivatives"):
        torch.autograd.grad(tl.entropy.sum(), h, create_graph=True)
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        hd = fwAD.make_dual(h.detach(), torch.randn_like(h))
        with pytest.raises(NotImplementedError, match="forward-mode"):
            tk.token_log_probs(hd, w.detach(), y)
    with pytest.raises(NotImplementedError, match="forward-mode|torch.func"):
        torch.func.grad(lambda x: O.linear_token_objective(x, w.detach(), y))(h.detach())


def test_torch_compile_fullgraph_equals_eager():
    h, w, b, y, g = _data(bias=True)
    adv, old = torch.randn(3, 11, generator=g, dtype=F64), torch.full((3, 11), -5.0, dtype=F64)

    def f(h, w, b):
        return O.linear_token_objective(h, w, y, _policy, consts={"adv": adv, "old": old}, bias=b, softcap=5.0)

    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True)(h, w, b)
    want = f(h, w, b)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, r in zip(torch.autograd.grad(got, (h, w, b)), torch.autograd.grad(want, (h, w, b))):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-13)


def test_opcheck_of_the_custom_ops():
    h, w, b, y, g = _data(bias=True)
    h2, yy = h.detach().reshape(-1, 16), y.reshape(-1)
    t = torch.rand(33, generator=g, dtype=torch.float32) + 0.5
    for args in ((h2, w.detach(), b.detach(), yy, None, None, -100, 1.0, 0.0, 4),
                 (h2.float(), w.detach().float(), None, yy, t, 1 / t, -100, 0.5, 3.0, 7)):
        torch.library.opcheck(torch.ops.tiedkernels.token_stats.default, args)
        grad = torch.randn(3, 33, generator=g, dtype=args[0].dtype if args[0].dtype == F64 else torch.float32)
        torch.library.opcheck(torch.ops.tiedkernels.token_stats_bwd.default,
                              (grad, *args[:10], True, True, args[2] is not None))


def test_grpo_loss_matches_trl_for_every_loss_type():
    h, w, _, ids, g = _data(b=4, t=7)
    ids = ids.clamp(min=0)  # completion tokens are real tokens; the mask says which count
    mask = (torch.rand(4, 7, generator=g) > 0.25).to(F64)
    mask[3] = 0  # an empty completion
    adv = torch.randn(4, generator=g, dtype=F64)
    with torch.no_grad():
        lp0, _, _ = token_stats(final_logits(h, w), torch.where(mask.bool(), ids, -100))
    old = lp0 + 0.3 * torch.randn(4, 7, generator=g, dtype=F64)
    ref_lp = lp0 + 0.2 * torch.randn(4, 7, generator=g, dtype=F64)
    isr = torch.rand(4, 7, generator=g, dtype=F64) + 0.5
    settings = [dict(loss_type=t) for t in O.GRPO_LOSS_TYPES] + [
        dict(loss_type="grpo", beta=0.1, delta=1.5, entropy_coef=0.05, epsilon_high=0.28, use_bias_correction_kl=True),
        dict(loss_type="dapo", num_items_in_batch=13, importance_sampling_ratio=isr, beta=0.04),
        dict(loss_type="dr_grpo", max_completion_length=9),
        dict(loss_type="bnpo", importance_sampling_level="sequence", beta=0.04),
        dict(loss_type="dapo", top_entropy_quantile=0.4, entropy_coef=0.1),
        dict(loss_type="cispo", epsilon_high=1.1),
    ]
    for kw in settings:
        out = tk.grpo_loss(h, w, ids, adv, completion_mask=mask, old_log_probs=old, ref_log_probs=ref_lp,
                           chunk_size=5, **kw)
        lp, ent, _ = token_stats(final_logits(h, w), torch.where(mask.bool(), ids, -100))
        rk = dict(kw)
        rk["epsilon_high"] = rk.pop("epsilon_high", 0.2)
        if rk["loss_type"] == "dr_grpo":
            rk.setdefault("max_completion_length", 7)
        want, metrics = trl_grpo_loss(lp, ent, mask, adv, old, ref_lp, **rk)
        torch.testing.assert_close(out.loss, want, rtol=1e-12, atol=1e-12, msg=str(kw))
        for a, r in zip(torch.autograd.grad(out.loss, (h, w)), torch.autograd.grad(want, (h, w))):
            torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-13, msg=str(kw))
        assert set(out.metrics) == set(metrics), kw
        for k, v in metrics.items():
            torch.testing.assert_close(out.metrics[k].double(), torch.tensor(v, dtype=F64), rtol=1e-12, atol=1e-12,
                                       equal_nan=True, msg=f"{kw} {k}")
    # old_log_probs omitted: ratio 1 with the gradient of the log-prob, as TRL's on-policy step
    out = tk.grpo_loss(h, w, ids, adv, completion_mask=mask, loss_type="grpo")
    lp, ent, _ = token_stats(final_logits(h, w), torch.where(mask.bool(), ids, -100))
    want, _ = trl_grpo_loss(lp, ent, mask, adv, loss_type="grpo")
    torch.testing.assert_close(out.loss, want, rtol=1e-12, atol=1e-12)
    for a, r in zip(torch.autograd.grad(out.loss, (h, w)), torch.autograd.grad(want, (h, w))):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-13)


def test_errors_name_the_problem():
    h, w, b, y, g = _data()
    adv = torch.randn(3, 11, dtype=F64)
    with pytest.raises(TiedKernelsError, match="one value per token"):
        O.linear_token_objective(h, w, y, lambda lp, ent: lp.sum())
    with pytest.raises(TiedKernelsError, match="floating"):
        O.linear_token_objective(h, w, y, lambda lp, ent: (lp > 0))
    with pytest.raises(TiedKernelsError, match="from finite inputs"):
        O.linear_token_objective(h, w, y, lambda lp, ent: torch.log(lp))  # log of a negative number
    with pytest.raises(TypeError, match="callable"):
        O.linear_token_objective(h, w, y, 3.0)
    with pytest.raises(TiedKernelsError, match="does not broadcast"):
        O.linear_token_objective(h, w, y, lambda lp, ent, a: a * lp, consts={"a": torch.ones(5, dtype=F64)})
    with pytest.raises(NotImplementedError, match="detach"):
        O.linear_token_objective(h, w, y, lambda lp, ent, a: a * lp, consts={"a": adv.requires_grad_()})
    with pytest.raises(TiedKernelsError, match="keyword"):
        O.linear_token_objective(h, w, y, consts={"not a name": adv.detach()})
    with pytest.raises(TiedKernelsError, match="is on meta but labels is on cpu"):
        O.linear_token_objective(h, w, y, consts={"a": torch.ones(3, 11, device="meta")})
    with pytest.raises(TiedKernelsError, match="temperature must be positive"):
        tk.token_log_probs(h, w, y, temperature=torch.zeros(3, 1))
    with pytest.raises(TiedKernelsError, match="temperature must be positive"):
        tk.token_log_probs(h, w, y, temperature=-1.0)
    with pytest.raises(NotImplementedError, match="temperature gets no gradient"):
        tk.token_log_probs(h, w, y, temperature=torch.tensor(2.0, requires_grad=True))
    with pytest.raises(TiedKernelsError, match="reduction"):
        O.linear_token_objective(h, w, y, reduction="batchmean")
    with pytest.raises(TiedKernelsError, match="num_items_in_batch"):
        O.linear_token_objective(h, w, y, reduction="none", num_items_in_batch=3)
    with pytest.raises(IndexError, match="123"):
        O.linear_token_objective(h, w, torch.full((3, 11), 123))
    with pytest.raises(TiedKernelsError, match="loss_type"):
        tk.grpo_loss(h, w, y.clamp(min=0), adv.detach(), loss_type="vespo")
    with pytest.raises(TiedKernelsError, match="ref_log_probs"):
        tk.grpo_loss(h, w, y.clamp(min=0), adv.detach(), beta=0.1)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_per_token_logit_scale_in_linear_cross_entropy_and_logits(reduction):
    h, w, b, y, g = _data(bias=True)
    s = torch.rand(3, 1, generator=g, dtype=F64) + 0.5  # one scale per sample
    for return_lse in (False, True):
        out = tk.linear_cross_entropy(h, w, y, bias=b, logit_scale=s, softcap=4.0, reduction=reduction, shift=True,
                                      return_lse=return_lse)
        z = final_logits(h, w, b, s.expand(3, 11), 4.0)[:, :-1]
        ref = torch.nn.functional.cross_entropy(z.reshape(-1, 123), y[:, 1:].reshape(-1), reduction=reduction)
        ref = ref.view(3, 10) if reduction == "none" else ref
        loss = out[0] if return_lse else out
        torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
        total = loss.sum() + (out[1].sum() * 0.3 if return_lse else 0)
        want = ref.sum() + (torch.logsumexp(z, -1).sum() * 0.3 if return_lse else 0)
        for a, r in zip(torch.autograd.grad(total, (h, w, b)), torch.autograd.grad(want, (h, w, b))):
            torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-13)
    lg = tk.logits(h, w, bias=b, logit_scale=s, softcap=4.0)
    torch.testing.assert_close(lg, final_logits(h, w, b, s.expand(3, 11), 4.0), rtol=1e-13, atol=1e-13)
    with pytest.raises(NotImplementedError, match="label_smoothing"):
        tk.linear_cross_entropy(h, w, y, logit_scale=s, label_smoothing=0.1)
    with pytest.raises(TiedKernelsError, match="does not broadcast"):
        tk.logits(h, w, logit_scale=torch.ones(4, 1, dtype=F64))


def test_minus_inf_logits_give_pytorchs_finite_values():
    """A vocabulary entry masked with a -inf bias: probability 0, never 0 · inf in the entropy or its gradient."""
    h, w, b, y, g = _data(bias=True)
    bias = b.detach().clone()
    bias[[3, 50, 77]] = float("-inf")
    y = torch.where(torch.isin(y, torch.tensor([3, 50, 77])), 4, y)
    bias.requires_grad_()
    adv, old = torch.randn(3, 11, generator=g, dtype=F64), torch.full((3, 11), -5.0, dtype=F64)
    res = tk.token_log_probs(h, w, y, bias=bias)
    out = O.linear_token_objective(h, w, y, _policy, consts={"adv": adv, "old": old}, bias=bias, chunk_size=5)
    ref = _reference(h, w, bias, y, {"adv": adv, "old": old})
    lp, ent, lse = token_stats(final_logits(h, w, bias), y)
    for got, want in zip(res, (lp, ent, lse)):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for a, r in zip(torch.autograd.grad(out, (h, w, bias)), torch.autograd.grad(ref, (h, w, bias))):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-13)
    (gh,) = torch.autograd.grad((res.entropy * 0.5 + res.log_probs).sum(), h)
    assert torch.isfinite(gh).all()
    # a large entropy coefficient: the clamped -inf logits times it must not overflow into 0 * inf
    out = O.linear_token_objective(h, w, y, lambda lp, ent: -lp - 1e3 * ent, bias=bias, chunk_size=5)
    ref = _reference(h, w, bias, y, {}, objective=lambda lp, ent: -lp - 1e3 * ent)
    for a, r in zip(torch.autograd.grad(out, (h, w, bias)), torch.autograd.grad(ref, (h, w, bias))):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-10)
