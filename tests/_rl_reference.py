"""Plain fp64 references for the token-level objectives and distillation: full logits, PyTorch autograd.

``trl_grpo_loss`` follows TRL 1.16 GRPOTrainer._compute_loss line by line (one process, no gradient
accumulation), on per-token log-probs and entropies computed from full logits."""

import torch
import torch.nn.functional as F


def final_logits(h, w, b=None, logit_scale=1.0, softcap=None, temperature=None):
    z = h @ w.T
    if b is not None:
        z = z + b
    z = z * logit_scale if not isinstance(logit_scale, torch.Tensor) else z * logit_scale[..., None]
    if softcap is not None:
        z = torch.tanh(z / softcap) * softcap
    if temperature is not None:
        z = z / (temperature[..., None] if isinstance(temperature, torch.Tensor) else temperature)
    return z


def token_stats(z, labels, ignore_index=-100):
    """(logp of the label, 0 where ignored; entropy; lse) per token from full logits."""
    ls = torch.log_softmax(z, -1)
    keep = labels != ignore_index
    lp = ls.gather(-1, torch.where(keep, labels, 0)[..., None]).squeeze(-1)
    lp = torch.where(keep, lp, torch.zeros_like(lp))
    p = ls.exp()
    # an entry of probability 0 (a -inf logit) adds 0, and so does its gradient (clamp, not where: the
    # gradient of p * -inf through a where would be 0 * inf; -1e30, not the dtype's lowest, so that the
    # gradient of p stays finite times a large incoming gradient)
    ent = -(p * ls.clamp(min=-1e30)).sum(-1)
    return lp, ent, torch.logsumexp(z, -1)


def trl_grpo_loss(lp, ent, mask, advantages, old=None, ref=None, *, loss_type="dapo", epsilon_low=0.2,
                  epsilon_high=0.2, delta=None, beta=0.0, use_bias_correction_kl=False,
                  importance_sampling_level="token", importance_sampling_ratio=None, entropy_coef=0.0,
                  top_entropy_quantile=1.0, max_completion_length=None, num_items_in_batch=None, sapo_pos=1.0,
                  sapo_neg=1.05):
    """TRL's loss and metrics (as floats) from per-token log-probs and entropies [B, T]."""
    metrics = {}
    per_token_logps, entropies = lp, ent
    if top_entropy_quantile < 1.0:
        local = entropies[mask.bool()].float()
        thr = torch.quantile(local, 1 - top_entropy_quantile)
        entropy_mask = ((entropies * mask.float()) >= thr) & mask.bool()
    else:
        entropy_mask = None
    advantages = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    old_per_token_logps = per_token_logps.detach() if old is None else old
    log_ratio = per_token_logps - old_per_token_logps
    if importance_sampling_level == "token":
        log_importance_weights = log_ratio
    else:
        log_importance_weights = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(log_importance_weights)
    if beta != 0.0:
        per_token_kl = torch.exp(ref - per_token_logps) - (ref - per_token_logps) - 1
        if use_bias_correction_kl:
            per_token_kl = per_token_kl * coef_1
    if loss_type == "cispo":
        clamped_ratios = torch.clamp(coef_1, max=epsilon_high).detach()
        per_token_loss = -clamped_ratios * advantages * per_token_logps
    elif loss_type in ["grpo", "bnpo", "dr_grpo", "dapo", "luspo"]:
        coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
        if delta is not None:
            coef_1 = torch.clamp(coef_1, max=delta)
        per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    elif loss_type == "sapo":
        temperatures = torch.where(advantages > 0, sapo_pos, sapo_neg)
        per_token_loss = -(torch.sigmoid(temperatures * (coef_1 - 1)) * 4 / temperatures) * advantages
    if entropy_mask is not None:
        per_token_loss = per_token_loss * entropy_mask
    if importance_sampling_ratio is not None:
        per_token_loss = per_token_loss * importance_sampling_ratio
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * per_token_kl
    if loss_type in ["grpo", "sapo"]:
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_completion_length)
    elif loss_type in ["cispo", "dapo"]:
        normalizer = (mask.sum() if num_items_in_batch is None else torch.as_tensor(num_items_in_batch)).clamp(min=1.0)
        loss = (per_token_loss * mask).sum() / normalizer
    elif loss_type == "luspo":
        loss = (per_token_loss * mask).sum(-1).mean()
    if entropy_coef:
        effective_mask = mask if entropy_mask is None else mask * entropy_mask
        loss = loss - entropy_coef * (entropies * effective_mask).sum() / effective_mask.sum().clamp(min=1.0)

    def masked_seq_mean(x):
        if x.shape[1] == 1:
            return x.squeeze(1)
        return (x * mask).sum(-1) / mask.sum(-1)

    def global_masked_mean(x):
        if x.shape[1] == 1:
            return float(x.sum() / x.shape[0])
        return float((x * mask).sum() / mask.sum().float().clamp(min=1.0))

    def nan_ext(x, fn):
        x = x[~torch.isnan(x)]
        return float(fn(x)) if x.numel() else float("nan")

    if beta != 0.0:
        metrics["kl"] = global_masked_mean(per_token_kl.detach())
    metrics["entropy"] = global_masked_mean(entropies.detach())
    c1 = coef_1.detach()
    if loss_type in ["grpo", "bnpo", "dr_grpo", "dapo", "luspo"]:
        low = ((c1 < 1 - epsilon_low) & (advantages < 0)).double()
        high = ((c1 > 1 + epsilon_high) & (advantages > 0)).double()
        metrics["clip_ratio/low_mean"] = global_masked_mean(low)
        metrics["clip_ratio/high_mean"] = global_masked_mean(high)
        metrics["clip_ratio/region_mean"] = global_masked_mean((low.bool() | high.bool()).double())
        metrics["clip_ratio/low_min"] = nan_ext(masked_seq_mean(low), torch.min)
        metrics["clip_ratio/high_max"] = nan_ext(masked_seq_mean(high), torch.max)
    elif loss_type == "cispo":
        metrics["cispo_clip_ratio"] = global_masked_mean(((c1 > epsilon_high) & (advantages > 0)).double())
    return loss, metrics


def jsd(student_logits, teacher_logits, beta):
    """TRL GKDTrainer.generalized_jsd_loss's per-token divergence (before masking and reduction)."""
    s = F.log_softmax(student_logits, -1)
    t = F.log_softmax(teacher_logits, -1)
    if beta == 0:
        d = F.kl_div(s, t, reduction="none", log_target=True)
    elif beta == 1:
        d = F.kl_div(t, s, reduction="none", log_target=True)
    else:
        bt = torch.tensor(beta, dtype=s.dtype)
        m = torch.logsumexp(torch.stack([s + torch.log1p(-bt), t + torch.log(bt)]), dim=0)
        d = beta * F.kl_div(m, t, reduction="none", log_target=True) + \
            (1 - beta) * F.kl_div(m, s, reduction="none", log_target=True)
    return d.sum(-1)
