"""Vocabulary parallelism on ``torch.distributed``: the tied embedding and the fused loss
over a weight split by rows across a tensor-parallel group.

Rank ``r`` of a group of ``P`` ranks owns rows ``[r·S, r·S + S)`` of ``W[V, D]`` with
``S = shard_rows(V, P, m) = m·ceil(V / (m·P))``: the vocabulary is padded to ``P·S`` (a
multiple of ``m·P``) and the padding rows sit at the end of the last shards.  With ``m = 1``
this is DTensor's ``Shard(0)`` layout (rank ``r`` starts at ``r·ceil(V/P)``), so a DTensor
weight is used as it is.  Padded columns are masked to ``-inf`` in the loss (zero
probability, zero gradient) and no id ever reads them.

Communication per step (``N`` tokens, hidden size ``D``; see the README for volumes):

* embedding: forward one all-reduce (SUM) of ``[N, D]``; backward none.  With sequence
  parallelism the all-reduce is a reduce-scatter and the backward one all-gather.
* loss: forward one all-gather of a ``[2, N]`` fp32 pair per rank (local logsumexp and the
  local linear term of the loss); backward one all-reduce of ``dh [N, D]`` in fp32 (none with
  ``reduce_grad_input=False``).  With sequence parallelism the forward also all-gathers the
  hidden states and the backward reduce-scatters ``dh`` (fp32) instead.
* ``dW`` and ``db`` need no collective: each rank's gradient is exactly its shard's.

Only ``torch.distributed`` collectives are used.  ``process_group=None`` means one device.
"""

import math

import torch
import torch.distributed as dist
from torch import nn

from . import _composite, _index_check, _tie, backends
from . import functional as tkf
from ._torch_backend import check_index_range, cross_entropy_lse
from .module import TiedEmbeddingHead, TiedOutputEmbedding

__all__ = [
    "PipelineTie",
    "VocabParallelTiedEmbeddingHead",
    "clip_grad_norm_",
    "fully_shard_tied",
    "grad_norm",
    "shard_range",
    "shard_rows",
    "vocab_parallel_embedding",
    "vocab_parallel_linear_cross_entropy",
]

_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


# ---------------------------------------------------------------------------------------
# groups and the shard layout


def _is_dtensor(t):
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return False
    return isinstance(t, DTensor)


def _as_group(process_group):
    """A ProcessGroup (or None) from a ProcessGroup, a 1-D DeviceMesh, or None."""
    if process_group is None:
        return None
    try:
        from torch.distributed.device_mesh import DeviceMesh
    except ImportError:  # pragma: no cover
        DeviceMesh = ()
    if isinstance(process_group, DeviceMesh):
        if process_group.ndim != 1:
            raise tkf.TiedKernelsError(f"tiedkernels: a vocabulary-parallel mesh must be 1-D, got {process_group.ndim} dims; "
                             "pass mesh[<tensor-parallel dim name>]")
        return process_group.get_group()
    return process_group


def _world(group):
    return 1 if group is None else dist.get_world_size(group)


def _rank(group):
    return 0 if group is None else dist.get_rank(group)


def shard_rows(vocab_size, world_size, pad_to_multiple_of=1):
    """Rows of ``W`` each rank holds: ``ceil(V / P)`` rounded up to a multiple of ``pad_to_multiple_of``."""
    if vocab_size <= 0 or world_size <= 0 or pad_to_multiple_of <= 0:
        raise tkf.TiedKernelsError(f"tiedkernels: need V, P, m > 0, got V={vocab_size}, P={world_size}, m={pad_to_multiple_of}")
    m = int(pad_to_multiple_of)
    return m * math.ceil(vocab_size / (m * world_size))


def shard_range(vocab_size, rank, world_size, pad_to_multiple_of=1):
    """``(start, stop)``: the real (unpadded) vocabulary rows rank ``rank`` owns; ``stop - start``
    can be smaller than ``shard_rows`` (padding) or even 0 on the last ranks."""
    s = shard_rows(vocab_size, world_size, pad_to_multiple_of)
    start = min(rank * s, vocab_size)
    return start, min(start + s, vocab_size)


def _dtensor_shard(weight, what="weight"):
    """(local tensor, vocab_start, global V, group) of a ``Shard(0)`` DTensor on a 1-D mesh."""
    from torch.distributed.tensor import Shard

    mesh = weight.device_mesh
    if mesh.ndim != 1 or tuple(weight.placements) != (Shard(0),):
        raise tkf.TiedKernelsError(f"tiedkernels: a DTensor {what} must be Shard(0) on a 1-D mesh, got placements "
                         f"{tuple(weight.placements)} on a {mesh.ndim}-D mesh")
    v = weight.shape[0]
    p, r = mesh.size(), mesh.get_local_rank()
    start, stop = shard_range(v, r, p)
    local = weight.to_local()
    if local.shape[0] != stop - start:
        raise tkf.TiedKernelsError(f"tiedkernels: the DTensor {what}'s local shard has {local.shape[0]} rows but the Shard(0) "
                         f"layout gives rank {r} rows [{start}, {stop})")
    return local, start, v, mesh.get_group()


# ---------------------------------------------------------------------------------------
# the collectives, as autograd functions


def _moved(x, dim):
    return x.movedim(dim, 0).contiguous() if dim != 0 else x.contiguous()


def _gather_dim(x, dim, group):
    p = _world(group)
    xm = _moved(x, dim)
    out = xm.new_empty((p * xm.shape[0], *xm.shape[1:]))
    _all_gather(out, xm, group=group)
    return out.movedim(0, dim) if dim != 0 else out


def _scatter_dim(x, dim, group, reduce_dtype=None):
    """Reduce-scatter (SUM) along ``dim`` (in ``reduce_dtype`` when given)."""
    p = _world(group)
    if x.shape[dim] % p:
        raise tkf.TiedKernelsError(f"tiedkernels: sequence parallelism splits dim {dim} of shape {tuple(x.shape)} over {p} "
                         "ranks: it must divide evenly")
    dt = x.dtype
    xm = _moved(x if reduce_dtype is None else x.to(reduce_dtype), dim)
    out = xm.new_empty((xm.shape[0] // p, *xm.shape[1:]))
    _reduce_scatter(out, xm, group=group)
    out = out.movedim(0, dim) if dim != 0 else out
    return out.to(dt)


def _reduce_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


class _AllReduceForward(torch.autograd.Function):
    """Forward all-reduce (SUM), backward identity: the embedding's partial sums."""

    @staticmethod
    def forward(ctx, x, group):
        if x.is_contiguous():
            ctx.mark_dirty(x)  # x is our own masked copy: reduce it in place
        else:
            x = x.contiguous()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, g):
        return g, None


class _ReduceScatterForward(torch.autograd.Function):
    """Forward reduce-scatter along ``dim``, backward all-gather (sequence-parallel embedding)."""

    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _scatter_dim(x, dim, group)

    @staticmethod
    def backward(ctx, g):
        return _gather_dim(g, ctx.dim, ctx.group), None, None


class _GatherForward(torch.autograd.Function):
    """Forward all-gather along ``dim``, backward reduce-scatter in fp32 (sequence-parallel
    hidden states entering the vocabulary-parallel head: the ranks' partial ``dh`` are summed)."""

    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _gather_dim(x, dim, group)

    @staticmethod
    def backward(ctx, g):
        return _scatter_dim(g, ctx.dim, ctx.group, _reduce_dtype(g.dtype)), None, None


class _GatherLastDim(torch.autograd.Function):
    """Forward all-gather of vocabulary-parallel logits along the last dim; backward keeps this
    rank's columns (every rank holds the same downstream graph)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        ctx.cols = x.shape[-1]
        return _gather_dim(x, x.dim() - 1, group)

    @staticmethod
    def backward(ctx, g):
        r = _rank(ctx.group)
        return g[..., r * ctx.cols:(r + 1) * ctx.cols], None


# ---------------------------------------------------------------------------------------
# the embedding


def _check_ids_range(ids, vocab_size):
    """``(pending, bad)`` as the torch backend's ``check_index_range``: an IndexError at once on the
    CPU, and on CUDA the flat device mask ``bad`` (the caller gives those ids NaN rows; its lookups
    never leave a shard's rows) and ``pending.finish()`` once the embedding is queued.  Without
    ``vocab_size`` only negative ids can be caught."""
    if ids.numel() == 0 or torch.compiler.is_compiling():
        return _index_check._DONE, None
    if vocab_size is not None:
        return check_index_range(ids, vocab_size, "id")
    bad = ids.reshape(-1) < 0
    return _index_check.check_indices(ids, None, "id", bad=bad), bad if _index_check.on_gpu(ids) else None


def _nan_rows(out, ids, bad):
    """NaN rows of the embedding ``out`` at the ids that ``_check_ids_range`` found bad on the device."""
    return out if bad is None else torch.where(bad.view(ids.shape).unsqueeze(-1), float("nan"), out)


def _local_embed(ids, weight, vocab_start, valid, padding_idx, backend, tie):
    """This shard's rows of ``W[ids]``: ids outside ``[vocab_start, vocab_start + valid)`` read local
    row 0 and are zeroed (so they also send no gradient)."""
    local = ids.long() - vocab_start
    inside = (local >= 0) & (local < valid)
    local = torch.where(inside, local, torch.zeros_like(local))
    pad = None
    if padding_idx is not None and vocab_start <= padding_idx < vocab_start + valid:
        pad = padding_idx - vocab_start
    if weight.shape[0] == 0:  # an empty shard: nothing of ours to look up
        return weight.new_zeros((*ids.shape, weight.shape[1]))
    b = backends.resolve(backend, weight.device)
    if tie and _tie.usable(weight):
        out = _tie.embed(weight, local, pad, b)
    else:
        out = b.op("embedding_fwd")(weight, local, pad)
    return out.masked_fill(~inside.unsqueeze(-1), 0)


def _reduce_embedding(out, group, sequence_parallel, seq_dim):
    if _world(group) == 1:
        return out
    if sequence_parallel:
        return _ReduceScatterForward.apply(out, seq_dim, group)
    return _AllReduceForward.apply(out, group)


def _norm_seq_dim(sequence_dim, ndim):
    if ndim == 0:
        raise tkf.TiedKernelsError("tiedkernels: sequence parallelism needs ids/labels with at least one dimension")
    if not -ndim <= sequence_dim < ndim:
        raise tkf.TiedKernelsError(f"tiedkernels: sequence_dim {sequence_dim} is outside the {ndim} dims of ids/labels")
    return sequence_dim % ndim


def vocab_parallel_embedding(ids, weight_shard, *, vocab_start=None, vocab_size=None, process_group=None,
                             sequence_parallel=False, sequence_dim=-1, padding_idx=None, backend="auto"):
    """``W[ids]`` with ``W`` split by rows over ``process_group``.

    ``ids [*]`` are global ids (the same on every rank); ``weight_shard [Vl, D]`` holds global rows
    ``[vocab_start, vocab_start + Vl)`` (rows past ``vocab_size`` are padding).  ``weight_shard`` may
    be a ``Shard(0)`` DTensor, then ``vocab_start``, ``vocab_size`` and the group come from it.
    Returns ``[*, D]`` on every rank (one all-reduce); with ``sequence_parallel`` this rank's
    slice of it along ``sequence_dim`` (a dim of ``ids``; one reduce-scatter).  ``padding_idx`` is a
    global id whose row gets no gradient.
    """
    if _is_dtensor(weight_shard):
        weight_shard, vocab_start, v, process_group = _dtensor_shard(weight_shard)
        vocab_size = v if vocab_size is None else vocab_size
    group = _as_group(process_group)
    tkf.check_weight(weight_shard, "weight_shard")
    tkf.check_index_dtype(ids, "ids")
    if ids.device != weight_shard.device:
        raise tkf.TiedKernelsError(f"tiedkernels: ids are on {ids.device} but weight_shard on {weight_shard.device}")
    if vocab_start is None:
        if group is not None:
            raise tkf.TiedKernelsError("tiedkernels: vocab_start is required with a process_group (the first global row of "
                             "weight_shard)")
        vocab_start = 0
    vl = weight_shard.shape[0]
    if vocab_size is None and group is None:
        vocab_size = vocab_start + vl
    if vocab_size is not None:
        vocab_size = int(vocab_size)
        if padding_idx is not None:
            padding_idx = tkf.normalize_padding_idx(padding_idx, vocab_size)
        pending, bad = _check_ids_range(ids, vocab_size)
        valid = max(0, min(vl, vocab_size - vocab_start))
    else:
        # Without the global V only negative ids can be caught here; ids past every shard read zeros.
        if padding_idx is not None and padding_idx < 0:
            raise tkf.TiedKernelsError("tiedkernels: a negative padding_idx needs vocab_size")
        pending, bad = _check_ids_range(ids, None)
        valid = vl
    seq_dim = _norm_seq_dim(sequence_dim, ids.dim()) if sequence_parallel else None
    out = _nan_rows(_local_embed(ids, weight_shard, vocab_start, valid, padding_idx, backend, tie=False), ids, bad)
    out = _reduce_embedding(out, group, sequence_parallel, seq_dim)
    pending.finish()
    return out


# ---------------------------------------------------------------------------------------
# the fused loss


class _Config:
    __slots__ = ("op_stats", "op_bwd", "opts", "group", "reduce_dh", "eps", "z_loss", "vocab_size", "class_weight",
                 "grad_filter")


_UNSUPPORTED_MODE = ("tiedkernels: the vocabulary-parallel loss has the ordinary backward only; {mode} is not "
                     "supported there (the single-device linear_cross_entropy supports it)")


class _VocabParallelLCE(torch.autograd.Function):
    """Per-token loss ``[N]`` (0 at ignored tokens) and the global logsumexp ``[N]``, both differentiable."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, cfg):
        (ignore_index, softcap, logit_scale, vocab_start, vocab_total, chunk) = cfg.opts
        if weight.shape[0] == 0:  # an empty shard (DTensor's last ranks when P does not divide V)
            pending, bad = check_index_range(labels, vocab_total, "label", ignore_index)  # as the other ranks' kernels do
            stats = hidden.new_zeros((3, hidden.shape[0]), dtype=_reduce_dtype(hidden.dtype))
            stats[0] = float("-inf")
            if bad is not None:  # CUDA: NaN statistics for a bad label, as the other ranks' ops give
                stats = torch.where(bad, float("nan"), stats)
            pending.finish()
        else:
            stats = cfg.op_stats(hidden, weight, bias, labels, ignore_index, softcap, logit_scale, vocab_start,
                                 vocab_total, chunk, class_weight=cfg.class_weight)
        eps = cfg.eps
        # The loss is lse·(1 + λ·lse) - [(1-ε)·z_y + (ε/V)·Σ_j z_j]: the bracket is a sum over
        # shards, lse a logsumexp over shards, so one [2, N] pair per rank is all that travels.
        # With class weights c (the whole vocabulary's, on every rank), S = Σ c:
        # lse·(c_y(1-ε) + (ε/V)·S + λ·c_y·lse) - [(1-ε)·c_y·z_y + (ε/V)·Σ_j c_j z_j].
        cw = cfg.class_weight
        if cw is not None:
            keep = labels != ignore_index
            # a bad label (reported by the check, or NaN with the check off) reads c[0], never out of bounds
            safe = torch.where(keep & (labels >= 0) & (labels < cw.shape[0]), labels, 0).long()
            cy = torch.where(keep, cw.to(stats.dtype)[safe], 0.0)
            zy = stats[1] * cy
        else:
            zy = stats[1]
        lin = zy * (1.0 - eps) + stats[2] * (eps / cfg.vocab_size) if eps else zy
        p = _world(cfg.group)
        if p > 1:
            pair = torch.stack([stats[0], lin])
            out = pair.new_empty((p * 2, pair.shape[1]))
            _all_gather(out, pair, group=cfg.group)
            out = out.view(p, 2, -1)
            lse = torch.logsumexp(out[:, 0], dim=0)
            lin = out[:, 1].sum(0)
        else:
            lse = stats[0]
        ce_lse = cross_entropy_lse(lse)  # NaN where a logit is +inf, as in PyTorch's cross_entropy
        if cw is None:
            tok = ce_lse - lin
            if cfg.z_loss:
                tok = tok + cfg.z_loss * lse * lse
        else:
            coef = cy * (1.0 - eps) + (eps / cfg.vocab_size) * cw.to(lse.dtype).sum() if eps else cy
            tok = ce_lse * coef - lin
            if cfg.z_loss:
                tok = tok + cfg.z_loss * cy * lse * lse
        tok = tok.masked_fill(labels == ignore_index, 0)
        ctx.cfg = cfg
        ctx.has_bias = bias is not None
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.set_materialize_grads(False)
        return tok, lse

    @staticmethod
    def backward(ctx, g_tok, g_lse):
        # lse is differentiable (a z-loss built from the returned lse): its incoming gradient adds
        # g_lse·softmax(z) to this shard's dz, ignored tokens included as on one device; with the
        # global lse saved, softmax over the local columns is exactly this shard's part of it, so dh
        # still takes the one all-reduce below and dW/db stay local.
        need = ctx.needs_input_grad
        want = (need[0], need[1], need[2] and ctx.has_bias)
        if (g_tok is None and g_lse is None) or not any(want):
            return None, None, None, None, None
        if torch.is_grad_enabled():
            raise NotImplementedError(_UNSUPPORTED_MODE.format(mode="create_graph=True (a double backward)"))
        cfg = ctx.cfg
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        (ignore_index, softcap, logit_scale, vocab_start, vocab_total, chunk) = cfg.opts
        if weight.shape[0] == 0:
            dh, dw = torch.zeros_like(hidden), torch.zeros_like(weight)
            db = torch.zeros_like(bias) if bias is not None else None
        else:
            g = lse.new_zeros(lse.shape) if g_tok is None else g_tok.contiguous()
            extra = {} if g_lse is None else {"grad_lse": g_lse.contiguous()}
            if cfg.grad_filter:
                # each rank filters its own columns: the bound per element is the single-device one
                extra["grad_filter"] = cfg.grad_filter
            dh, dw, db = cfg.op_bwd(g, hidden, weight, bias, labels, lse, ignore_index, cfg.eps, cfg.z_loss, softcap,
                                    logit_scale, vocab_start, vocab_total, chunk, *want,
                                    class_weight=cfg.class_weight, **extra)
            valid = max(0, min(weight.shape[0], vocab_total - vocab_start))
            if want[1] and valid < weight.shape[0]:
                # padding rows: their dz is 0, but 0 times an infinite hidden state is NaN in dzᵀh
                dw[valid:] = 0
        if want[0] and cfg.reduce_dh and _world(cfg.group) > 1:
            # Megatron's lesson: sum the ranks' partial dh in fp32, not in bf16.
            acc = dh.to(_reduce_dtype(dh.dtype))
            dist.all_reduce(acc, group=cfg.group)
            dh = acc.to(dh.dtype)
        return (dh if want[0] else None, dw if want[1] else None, db if want[2] else None, None, None)


def vocab_parallel_linear_cross_entropy(hidden, weight_shard, labels, *, vocab_start=None, vocab_size=None,
                                        process_group=None, bias=None, ignore_index=-100, reduction="mean",
                                        label_smoothing=0.0, z_loss=0.0, softcap=None, logit_scale=1.0,
                                        num_items_in_batch=None, shift=False, return_lse=False, chunk_size=None,
                                        backend="auto", sequence_parallel=False, sequence_dim=-1,
                                        reduce_grad_input=True, class_weight=None, grad_filter=None):
    """``linear_cross_entropy`` with ``W`` (and ``bias``) split by rows over ``process_group``.

    ``weight_shard [Vl, D]`` holds global rows ``[vocab_start, vocab_start + Vl)``; rows (columns of
    the logits) at or past ``vocab_size`` are padding, masked out.  ``labels`` are global ids, the
    same on every rank, and so is the result.  ``weight_shard`` (and ``bias``) may be ``Shard(0)``
    DTensors; then ``vocab_start``, ``vocab_size`` and the group come from the weight.

    ``sequence_parallel``: ``hidden`` is this rank's slice along ``sequence_dim`` (a dim of
    ``labels``, default the last), ``labels`` are the full labels; the hidden states are all-gathered
    here and ``dh`` comes back reduce-scattered.  ``reduce_grad_input=False`` leaves ``dh`` as this
    rank's partial sum (for a caller that reduces it itself).  Every other option is
    ``linear_cross_entropy``'s.  Label smoothing uses the mean over the whole vocabulary.
    ``class_weight`` is the whole vocabulary's ``[vocab_size]`` weights, the same on every rank.
    ``grad_filter`` as in ``linear_cross_entropy``: each rank leaves out of its backward GEMMs the
    columns of its shard that the filter skips (the loss is exact).
    """
    if _is_dtensor(weight_shard):
        weight_shard, vocab_start, v, process_group = _dtensor_shard(weight_shard)
        vocab_size = v if vocab_size is None else vocab_size
        if _is_dtensor(bias):
            bias = bias.to_local()
    if _is_dtensor(hidden):
        hidden = hidden.to_local()
    mode = _composite.mode(hidden, weight_shard, bias)
    if mode is not None:
        raise NotImplementedError(_UNSUPPORTED_MODE.format(mode=mode))
    group = _as_group(process_group)
    p = _world(group)
    tkf.check_weight(weight_shard, "weight_shard")
    if vocab_start is None:
        if group is not None:
            raise tkf.TiedKernelsError("tiedkernels: vocab_start is required with a process_group (the first global row of "
                             "weight_shard)")
        vocab_start = 0
    if vocab_size is None:
        if group is not None:
            raise tkf.TiedKernelsError("tiedkernels: vocab_size (the global, unpadded V) is required with a process_group")
        vocab_size = vocab_start + weight_shard.shape[0]
    vocab_size = int(vocab_size)
    if not 0 <= vocab_start:
        raise tkf.TiedKernelsError(f"tiedkernels: vocab_start must be >= 0, got {vocab_start}")
    if sequence_parallel and not reduce_grad_input:
        raise tkf.TiedKernelsError("tiedkernels: with sequence_parallel the gathered hidden states' gradient is reduce-scattered "
                         "here; reduce_grad_input=False has no meaning")
    tkf.check_index_dtype(labels, "labels")
    if sequence_parallel and p > 1:
        if hidden.dim() != labels.dim() + 1:
            raise tkf.TiedKernelsError(f"tiedkernels: hidden has shape {tuple(hidden.shape)} and labels {tuple(labels.shape)}: "
                             "hidden must be labels' shape (sliced along sequence_dim) plus D")
        hidden = _GatherForward.apply(hidden, _norm_seq_dim(sequence_dim, labels.dim()), group)
    hidden, weight_shard, bias = tkf.autocast_inputs(hidden, weight_shard, bias)
    tkf.check_hidden(hidden, weight_shard, "weight_shard")
    tkf.check_bias(bias, weight_shard, "weight_shard")
    what = " (after gathering the sequence-parallel slices)" if sequence_parallel and p > 1 else ""
    tkf.check_loss_options(hidden, labels, reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss,
                           num_items_in_batch=num_items_in_batch, shift=shift, context=what)
    cap = tkf._softcap_value(softcap)
    lscale = tkf._logit_scale_value(logit_scale)
    gfilter = tkf.grad_filter_value(grad_filter, hidden.dtype)
    hidden, weight_shard = tkf._nonempty_dim(hidden, weight_shard)
    d = weight_shard.shape[1]
    lab = tkf.shift_labels(labels, ignore_index) if shift else labels
    h2 = hidden.reshape(labels.numel(), d)
    lab = lab.reshape(-1)
    n = h2.shape[0]
    b = backends.resolve(backend, weight_shard.device)
    cfg = _Config()
    cfg.op_stats, cfg.op_bwd = b.op("lce_stats"), b.op("lce_bwd")
    cfg.opts = (int(ignore_index), cap, lscale, int(vocab_start), vocab_size,
                tkf.chunk_rows(n, weight_shard.shape[0], chunk_size))
    # With sequence parallelism the gather's backward reduce-scatters dh: no all-reduce here.
    cfg.group, cfg.reduce_dh = group, bool(reduce_grad_input) and not (sequence_parallel and p > 1)
    cfg.eps, cfg.z_loss, cfg.vocab_size = float(label_smoothing), float(z_loss), vocab_size
    if class_weight is not None:
        tkf._require_tensor(class_weight, "class_weight")
        tkf.check_device(class_weight, "class_weight", weight_shard, "weight_shard")
        if class_weight.shape != (vocab_size,) or not class_weight.is_floating_point():
            raise tkf.TiedKernelsError(f"tiedkernels: class_weight must be a floating [vocab_size] = [{vocab_size}] "
                                       f"tensor (the whole vocabulary's), got {class_weight.dtype} "
                                       f"{tuple(class_weight.shape)}")
        if class_weight.requires_grad:
            raise NotImplementedError("tiedkernels: class_weight gets no gradient; pass class_weight.detach()")
    cfg.class_weight = class_weight
    cfg.grad_filter = gfilter
    with tkf.no_autocast(weight_shard.device):
        tok, lse = _VocabParallelLCE.apply(h2, weight_shard, bias, lab, cfg)
    denom = tkf.loss_denominator(lab, reduction, ignore_index, num_items_in_batch, tok.dtype, class_weight)
    loss = tkf.reduce_tokens(tok, labels.shape, reduction, denom, shift)
    return tkf.finish(loss, lse, labels.shape, shift, return_lse)


# ---------------------------------------------------------------------------------------
# the module


class VocabParallelTiedEmbeddingHead(TiedEmbeddingHead):
    """``TiedEmbeddingHead`` whose weight is split by rows over a tensor-parallel group.

    Each rank owns ``weight [S, D]`` (``S = shard_rows(V, P, pad_to_multiple_of)``), global rows
    ``[vocab_start, vocab_start + S)``; rows at or past ``V`` are zero padding that no id reads and
    the loss masks.  ``embed``/``forward`` return the full embeddings (one all-reduce),
    ``loss`` the full loss (one ``[2, N]`` all-gather, one ``dh`` all-reduce in backward),
    ``logits`` the full ``[*, V]`` logits (or this rank's columns with ``gather_output=False``).
    Both roles' gradients land in the one local shard.

    ``state_dict()`` holds the full ``[V, D]`` weight (and ``[V]`` bias), gathered from every rank
    (a collective: call it on all ranks), so checkpoints match the single-device layout;
    ``load_state_dict`` takes the full tensors and keeps this rank's rows.

    Built by ``TiedEmbeddingHead(V, D, process_group=...)`` (or ``device_mesh=``, or a ``Shard(0)``
    DTensor ``_weight``).  ``_weight`` may also be the full ``[V, D]`` weight or this rank's shard.
    """

    def __init__(self, num_embeddings, embedding_dim, *, process_group=None, device_mesh=None, padding_idx=None,
                 bias=False, device=None, dtype=None, backend="auto", logit_scale=1.0, softcap=None,
                 pad_to_multiple_of=1, sequence_parallel=False, sequence_dim=-1, _weight=None, _freeze=False,
                 max_norm=None, norm_type=2.0, scale_grad_by_freq=False, sparse=False):
        nn.Module.__init__(self)
        for name, value, default in (("max_norm", max_norm, None), ("scale_grad_by_freq", scale_grad_by_freq, False),
                                     ("sparse", sparse, False)):
            if value != default:
                raise NotImplementedError(f"tiedkernels: {name}={value!r} is not supported by the vocabulary-parallel "
                                          "head (nn.Embedding's option would act on this rank's rows only); "
                                          "leave it at its default")
        if process_group is not None and device_mesh is not None:
            raise tkf.TiedKernelsError("tiedkernels: pass process_group or device_mesh, not both")
        group = _as_group(device_mesh if device_mesh is not None else process_group)
        if group is None and _is_dtensor(_weight):
            group = _weight.device_mesh.get_group() if _weight.device_mesh.ndim == 1 else None
        v, d = int(num_embeddings), int(embedding_dim)
        p, r = _world(group), _rank(group)
        rows = shard_rows(v, p, pad_to_multiple_of)
        start, stop = shard_range(v, r, p, pad_to_multiple_of)
        self.process_group = group
        self.num_embeddings, self.embedding_dim = v, d
        self.padding_idx = tkf.normalize_padding_idx(padding_idx, v)
        self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse = None, float(norm_type), False, False
        self.backend, self.logit_scale, self.softcap = backend, logit_scale, softcap
        self.pad_to_multiple_of = int(pad_to_multiple_of)
        self.sequence_parallel, self.sequence_dim = bool(sequence_parallel), sequence_dim
        self.vocab_start, self.vocab_stop, self.shard_size = start, stop, rows
        w = self._local_rows(_weight, (v, d), device, dtype)
        self.weight = nn.Parameter(w, requires_grad=not _freeze)
        bias_p = None
        if bias:
            bias_p = nn.Parameter(torch.zeros(rows, device=w.device, dtype=w.dtype))
            self.bias = bias_p
        else:
            self.register_parameter("bias", None)
        out = _VocabParallelOutputEmbedding(self, bias_p)
        self.__dict__["output_embeddings"] = out
        self.register_state_dict_post_hook(_full_state_dict_hook)
        self.register_load_state_dict_pre_hook(_shard_state_dict_hook)

    # -- layout -------------------------------------------------------------------------
    @property
    def world_size(self):
        return _world(self.process_group)

    def _local_rows(self, full, shape, device, dtype):
        """This rank's padded ``[S, ...]`` rows of ``full`` (a full tensor, a local shard, a DTensor,
        or None for a fresh initialisation like ``nn.Embedding``'s)."""
        v = shape[0]
        start, stop, rows = self.vocab_start, self.vocab_stop, self.shard_size
        if full is None:
            local = torch.empty((rows, *shape[1:]), device=device, dtype=dtype)
            nn.init.normal_(local)
            local[stop - start:] = 0
            if self.padding_idx is not None and start <= self.padding_idx < stop:
                local[self.padding_idx - start] = 0
            return local
        if _is_dtensor(full):
            if tuple(full.shape) != tuple(shape):
                raise tkf.TiedKernelsError(f"tiedkernels: DTensor weight has global shape {tuple(full.shape)}, expected "
                                 f"{tuple(shape)}")
            from torch.distributed.tensor import Shard
            if (full.device_mesh.ndim == 1 and tuple(full.placements) == (Shard(0),)
                    and full.device_mesh.get_group() is self.process_group and self.pad_to_multiple_of == 1):
                part = full.to_local()  # DTensor's Shard(0) rows are exactly ours
            else:
                part = full.full_tensor()[start:stop]
        elif tuple(full.shape) == tuple(shape):
            part = full[start:stop]
        elif tuple(full.shape[1:]) == tuple(shape[1:]) and full.shape[0] in (rows, stop - start):
            part = full[: stop - start]
        else:
            raise tkf.TiedKernelsError(f"tiedkernels: _weight has shape {tuple(full.shape)}; expected the full "
                             f"{tuple(shape)} or this rank's shard ({rows} or {stop - start} rows)")
        part = part.detach()
        local = part.new_zeros((rows, *shape[1:]), device=device, dtype=dtype)
        local[: stop - start] = part
        return local

    # -- the embedding ------------------------------------------------------------------
    def embed(self, ids):
        tkf.check_index_dtype(ids, "ids")
        tkf.check_device(ids, "ids", self.weight)
        pending, bad = _check_ids_range(ids, self.num_embeddings)
        seq_dim = _norm_seq_dim(self.sequence_dim, ids.dim()) if self.sequence_parallel else None
        out = _local_embed(ids, self.weight, self.vocab_start, self.vocab_stop - self.vocab_start, self.padding_idx,
                           self.backend, tie=True)
        out = _reduce_embedding(_nan_rows(out, ids, bad), self.process_group, self.sequence_parallel, seq_dim)
        pending.finish()
        return out

    # -- the head -----------------------------------------------------------------------
    def _hidden(self, hidden):
        if self.sequence_parallel and self.world_size > 1:
            return _GatherForward.apply(hidden, hidden.dim() - 1 + self.sequence_dim if self.sequence_dim < 0
                                        else self.sequence_dim, self.process_group)
        return hidden

    def logits(self, hidden, *, gather_output=True, **opts):
        """Full ``[*, V]`` logits (an all-gather), or this rank's ``[*, S]`` columns."""
        opts = self._head_opts(opts)
        bias = opts.pop("bias", self.bias)
        z = tkf.logits(self._hidden(hidden), _tie.head_weight(self.weight), bias=bias, **opts)
        if not gather_output:
            return z
        if self.world_size > 1:
            z = _GatherLastDim.apply(z, self.process_group)
        return z[..., : self.num_embeddings]

    def loss(self, hidden, labels, **opts):
        opts = self._head_opts(opts)
        bias = opts.pop("bias", self.bias)
        opts.setdefault("sequence_parallel", self.sequence_parallel)
        opts.setdefault("sequence_dim", self.sequence_dim)
        return vocab_parallel_linear_cross_entropy(
            hidden, _tie.head_weight(self.weight), labels, vocab_start=self.vocab_start,
            vocab_size=self.num_embeddings, process_group=self.process_group, bias=bias, **opts)

    # -- checkpoints ----------------------------------------------------------------------
    def full_tensor(self, name="weight"):
        """The full ``[V, ...]`` tensor of parameter ``name`` (a collective)."""
        t = getattr(self, name).detach()
        if _is_dtensor(t):  # under FSDP2: first this rank's vocabulary shard, whole
            t = t.full_tensor()
        if self.world_size > 1:
            t = _gather_dim(t.contiguous(), 0, self.process_group)
        return t[: self.num_embeddings]

    def extra_repr(self):
        s = (f"{self.num_embeddings}, {self.embedding_dim}, shard=[{self.vocab_start}, {self.vocab_stop}) of "
             f"{self.shard_size} rows, world_size={self.world_size}")
        if self.padding_idx is not None:
            s += f", padding_idx={self.padding_idx}"
        if self.bias is not None:
            s += ", bias=True"
        if self.sequence_parallel:
            s += f", sequence_parallel=True, sequence_dim={self.sequence_dim}"
        return s + f", backend={self.backend!r}"


def _full_state_dict_hook(module, state_dict, prefix, local_metadata):
    for name in ("weight", "bias"):
        key = prefix + name
        if key in state_dict and getattr(module, name) is not None:
            state_dict[key] = module.full_tensor(name)


def _shard_state_dict_hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                           error_msgs):
    for name in ("weight", "bias"):
        key = prefix + name
        param = getattr(module, name)
        if key not in state_dict or param is None:
            continue
        t = state_dict[key]
        full = (module.num_embeddings, *param.shape[1:])
        if tuple(t.shape) == full or _is_dtensor(t):
            local = module._local_rows(t, full, param.device, param.dtype)
            if _is_dtensor(param):  # under FSDP2: shard our rows as the parameter is sharded
                from torch.distributed.tensor import distribute_tensor

                local = distribute_tensor(local, param.device_mesh, param.placements)
            state_dict[key] = local


class _VocabParallelOutputEmbedding(TiedOutputEmbedding):
    """The output side of a vocabulary-parallel head: ``forward`` gives the full logits."""

    def __init__(self, head, bias=None):
        super().__init__(head, bias)
        self.out_features = head.num_embeddings

    def forward(self, hidden, **opts):
        return self.head.logits(hidden, **opts)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"tied=True, vocab_parallel=True")


# ---------------------------------------------------------------------------------------
# FSDP2


def fully_shard_tied(head, **fsdp_kwargs):
    """``fully_shard(head)``: the one tied weight in one FSDP2 group, with ``embed``, ``logits`` and
    ``loss`` registered as forward methods (so each unshards the weight like ``forward``).
    Shard the head before its parent (``fully_shard(model)`` afterwards).

    ``head.output_embeddings`` (registered elsewhere in a model, or nowhere) holds the same
    ``Parameter``; FSDP2 learns it as a shared module here, so every unshard and reshard sets the
    weight (and bias) on both sides."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    out = head.__dict__.get("output_embeddings")
    key = "_tiedkernels_output_embeddings"
    if out is not None:
        head._modules[key] = out  # seen by fully_shard's walk of the module tree only
    try:
        fully_shard(head, **fsdp_kwargs)
    finally:
        head._modules.pop(key, None)
    for name in ("embed", "logits", "loss"):
        register_fsdp_forward_method(head, name)
    return head


# ---------------------------------------------------------------------------------------
# pipeline stages


class PipelineTie:
    """The tied weight when the embedding and the head sit on different pipeline stages.

    Each of the two stages holds a copy (its tensor-parallel shard, if any) in ``weight``;
    ``tie_group`` holds exactly those two ranks (one per end of the pipeline, same data- and
    tensor-parallel coordinates).  ``src`` is the global rank whose copy is the truth at start
    (the embedding's stage).  Megatron's scheme: ``broadcast_weight()`` once at start,
    ``all_reduce_grad()`` after the data-parallel gradient sync and before the optimizer step,
    and the copy counted once in the gradient norm (``counts_in_norm`` is True on ``src``
    only; pass the ties to ``grad_norm``/``clip_grad_norm_``).
    """

    def __init__(self, weight, tie_group, *, src):
        if dist.get_world_size(tie_group) != 2:
            raise tkf.TiedKernelsError(f"tiedkernels: a pipeline tie group has two ranks, this one has "
                             f"{dist.get_world_size(tie_group)}")
        self.weight = weight
        self.group = tie_group
        self.src = int(src)
        self.counts_in_norm = dist.get_rank() == self.src

    def broadcast_weight(self):
        """Make both copies equal to ``src``'s (once, before training)."""
        with torch.no_grad():
            w = self.weight.data
            buf = w if w.is_contiguous() else w.contiguous()
            dist.broadcast(buf, src=self.src, group=self.group)
            if buf is not w:
                w.copy_(buf)

    def all_reduce_grad(self):
        """Sum the two stages' gradients into both copies (after the data-parallel sync)."""
        w = self.weight
        if w.grad is None:
            w.grad = torch.zeros_like(w)
        g = w.grad
        acc = g if g.dtype == _reduce_dtype(g.dtype) and g.is_contiguous() else g.to(_reduce_dtype(g.dtype))
        dist.all_reduce(acc, group=self.group)
        if acc is not g:
            g.copy_(acc)


def grad_norm(parameters, *, ties=(), process_group=None, norm_type=2.0):
    """The total gradient norm of a model spread over ``process_group`` (e.g. the pipeline group),
    a pipeline-tied copy counted once: the copies whose tie says ``counts_in_norm=False`` are left
    out.  One all-reduce (SUM, or MAX for the inf-norm)."""
    parameters = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    skip = {id(t.weight) for t in ties if not t.counts_in_norm}
    grads = [p.grad for p in parameters if p.grad is not None and id(p) not in skip]
    norm_type = float(norm_type)
    dev = parameters[0].device if parameters else torch.device("cpu")
    dt = torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32
    if norm_type == math.inf:
        local = torch.zeros(1, dtype=dt, device=dev)
        for g in grads:
            local = torch.maximum(local, g.detach().abs().max().to(dt))
        if process_group is not None:
            dist.all_reduce(local, op=dist.ReduceOp.MAX, group=process_group)
        return local[0]
    acc = torch.zeros(1, dtype=dt, device=dev)
    for g in grads:
        acc += g.detach().to(dt).abs().pow(norm_type).sum()
    if process_group is not None:
        dist.all_reduce(acc, group=process_group)
    return acc[0].pow(1.0 / norm_type)


def clip_grad_norm_(parameters, max_norm, *, ties=(), process_group=None, norm_type=2.0, eps=1e-6):
    """``torch.nn.utils.clip_grad_norm_`` over a pipeline-parallel model with tied copies
    (see ``grad_norm``). Every copy, tied or not, is scaled by the same factor."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    parameters = list(parameters)
    total = grad_norm(parameters, ties=ties, process_group=process_group, norm_type=norm_type)
    coef = (float(max_norm) / (total + eps)).clamp(max=1.0)
    for p in parameters:
        if p.grad is not None:
            p.grad.detach().mul_(coef.to(p.grad.dtype))
    return total
