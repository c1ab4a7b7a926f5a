"""Vocabulary parallelism, FSDP2 and the pipeline tie on 2 gloo processes (CPU, loopback).

One spawn runs every check (a spawn costs seconds); each check's outcome on each rank is
written to a file and reported by its own pytest test.  Everything is fp64 and compared
with the single-process result (the unchunked reference, or plain autograd) at 1e-10.
"""

import json
import os
import socket
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

WORLD = 2
TIMEOUT_S = 60
TOL = dict(rtol=1e-10, atol=1e-10)
V, D = 11, 6  # V odd: the shards are uneven, rank 1 holds a padding row


def _close(actual, expected, what):
    torch.testing.assert_close(actual, expected, **TOL, msg=lambda m: f"{what}: {m}")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------
# the checks (run on every rank, same data on every rank: seeded alike)


def _labels(shape, vocab, ignore_index=-100, frac=0.25, gen=None):
    y = torch.randint(0, vocab, shape, generator=gen)
    drop = torch.rand(shape, generator=gen) < frac
    return torch.where(drop, torch.full_like(y, ignore_index), y)


def _padded_shard(full, rank, m=1, fill=None):
    """This rank's rows of ``full`` padded to the shard size; padding rows get ``fill`` (random
    garbage by default, to prove they are masked)."""
    from tiedkernels.distributed import shard_range, shard_rows

    rows = shard_rows(full.shape[0], WORLD, m)
    start, stop = shard_range(full.shape[0], rank, WORLD, m)
    out = torch.randn((rows, *full.shape[1:]), dtype=full.dtype) * 3 if fill is None else \
        torch.full((rows, *full.shape[1:]), fill, dtype=full.dtype)
    out[: stop - start] = full[start:stop]
    return out, start, stop


LOSS_CASES = [
    # (pad multiple m, sequence parallel, options); the lse is returned, with a random incoming
    # gradient, unless return_lse=False
    (1, False, dict(reduction="mean", return_lse=False, chunk_size=5)),
    (4, False, dict(reduction="sum", label_smoothing=0.1, z_loss=1e-3, chunk_size=3)),
    (1, True, dict(reduction="none", bias=True, softcap=3.0, logit_scale=0.7, chunk_size=5)),
    (4, True, dict(reduction="mean", shift=True, num_items_in_batch=7, label_smoothing=0.2, chunk_size=4)),
    (1, False, dict(reduction="mean", ignore_index=7, label_smoothing=0.1, z_loss=1e-2, softcap=2.0, bias=True,
                    return_lse=True, chunk_size=5)),
    (1, True, dict(reduction="sum", shift=True, z_loss=1e-3, logit_scale=1.3)),  # default chunk size
    (4, False, dict(reduction="mean", all_ignored=True, label_smoothing=0.1, return_lse=False, chunk_size=5)),
    (1, True, dict(reduction="sum", all_ignored=True, z_loss=1e-2, chunk_size=5)),  # the lse of ignored tokens
    (4, True, dict(reduction="mean", vocab=3, label_smoothing=0.1, z_loss=1e-3, chunk_size=5)),  # rank 1: all padding
    # class weights (the whole vocabulary's on every rank)
    (4, False, dict(reduction="mean", class_weight=True, label_smoothing=0.1, z_loss=1e-2, bias=True, chunk_size=3)),
    (1, True, dict(reduction="none", class_weight=True, label_smoothing=0.2, softcap=3.0, chunk_size=5)),
    (4, False, dict(reduction="sum", class_weight=True, ignore_index=7, shift=True, num_items_in_batch=5,
                    chunk_size=4)),
]


def check_loss(rank, group):
    """Loss, lse, dh, each rank's dW and db shard against the fp64 single-process reference and
    the single-device op, on every CPU backend (the compiled kernels, and the pure-torch fallback),
    with random incoming gradients for the loss and the lse (a z-loss built from the returned lse);
    the collectives per step are the same with and without the lse's gradient."""
    from torch.distributed.tensor.debug import CommDebugMode

    import tiedkernels
    from tiedkernels import backends, reference
    from tiedkernels.distributed import vocab_parallel_linear_cross_entropy

    c10d = torch.ops.c10d
    expected_counts = {
        False: {c10d._allgather_base_: 1, c10d.allreduce_: 1},  # the [2, N] stats; dh
        True: {c10d._allgather_base_: 2, c10d._reduce_scatter_base_: 1},  # + the hidden slices; dh scattered
    }

    names = [b for b in ("cpu", "torch") if backends.why_not(b, "cpu") is None]
    assert "torch" in names
    B, T = 2, 6
    for i, (backend, (m, sp, opts)) in enumerate((b, c) for b in names for c in LOSS_CASES):
        opts = dict(opts)
        what = f"{backend} case {i % len(LOSS_CASES)} (m={m}, sp={sp}, {opts})"
        use_bias = opts.pop("bias", False)
        chunk = opts.pop("chunk_size", None)
        ii = opts.get("ignore_index", -100)
        all_ignored = opts.pop("all_ignored", False)
        vocab = opts.pop("vocab", V)
        g = torch.Generator().manual_seed(100 + i)
        w = torch.randn(vocab, D, dtype=torch.float64, generator=g)
        b = torch.randn(vocab, dtype=torch.float64, generator=g) if use_bias else None
        h = torch.randn(B, T, D, dtype=torch.float64, generator=g)
        y = _labels((B, T), vocab, ii, gen=g)
        if all_ignored:
            y = torch.full_like(y, ii)
        if ii == 7:
            y[0, 0] = 7  # an ignore_index that is a real id, once at least
        if opts.pop("class_weight", False):
            opts["class_weight"] = torch.rand(vocab, dtype=torch.float64, generator=g) + 0.25
        opts.setdefault("return_lse", True)
        t_out = T - 1 if opts.get("shift") else T
        gout = torch.randn((B, t_out) if opts["reduction"] == "none" else (), dtype=torch.float64, generator=g)
        glse = torch.randn(B, t_out, dtype=torch.float64, generator=g)

        def backward(out):
            loss, lse = out if opts["return_lse"] else (out, None)
            ((loss * gout).sum() + ((lse * glse).sum() if lse is not None else 0)).backward()
            return loss.detach(), lse.detach() if lse is not None else None

        # the single-process truth, and the single-device op
        wr, hr = w.clone().requires_grad_(), h.clone().requires_grad_()
        br = b.clone().requires_grad_() if use_bias else None
        ref_loss, ref_lse = backward(reference.linear_cross_entropy(hr, wr, y, bias=br, **opts))
        w1, h1 = w.clone().requires_grad_(), h.clone().requires_grad_()
        b1 = b.clone().requires_grad_() if use_bias else None
        one_loss, _ = backward(tiedkernels.linear_cross_entropy(h1, w1, y, bias=b1, chunk_size=chunk, backend=backend,
                                                                **opts))

        # this rank's shard
        ws, start, stop = _padded_shard(w, rank, m)
        ws.requires_grad_()
        bs = _padded_shard(b, rank, m)[0].requires_grad_() if use_bias else None
        if sp:
            hl = h.chunk(WORLD, dim=1)[rank].clone().requires_grad_()
        else:
            hl = h.clone().requires_grad_()
        with CommDebugMode() as comm:
            loss, lse = backward(vocab_parallel_linear_cross_entropy(
                hl, ws, y, vocab_start=start, vocab_size=vocab, process_group=group, bias=bs, sequence_parallel=sp,
                chunk_size=chunk, backend=backend, **opts))
        counts = {k: v for k, v in comm.get_comm_counts().items() if v}
        assert counts == expected_counts[sp], f"{what}: collectives per step {counts}"
        _close(loss, ref_loss, f"{what} loss")
        _close(loss, one_loss, f"{what} loss against the single-device op")
        if lse is not None:
            _close(lse, ref_lse, f"{what} lse")
        ref_dh, one_dh = (hr.grad.chunk(WORLD, dim=1)[rank], h1.grad.chunk(WORLD, dim=1)[rank]) if sp else \
            (hr.grad, h1.grad)
        _close(hl.grad, ref_dh, f"{what} dh")
        _close(hl.grad, one_dh, f"{what} dh against the single-device op")
        n = stop - start
        _close(ws.grad[:n], wr.grad[start:stop], f"{what} dW shard")
        _close(ws.grad[:n], w1.grad[start:stop], f"{what} dW shard against the single-device op")
        assert torch.count_nonzero(ws.grad[n:]) == 0, f"{what}: padding rows got a gradient"
        if use_bias:
            _close(bs.grad[:n], br.grad[start:stop], f"{what} db shard")
            assert torch.count_nonzero(bs.grad[n:]) == 0, f"{what}: padding bias got a gradient"
        if all_ignored and lse is None:
            assert loss.item() == 0 and torch.count_nonzero(ws.grad) == 0 and torch.count_nonzero(hl.grad) == 0
        elif all_ignored:  # the loss is 0, but the lse of an ignored token is a real lse with a gradient
            assert loss.item() == 0 and torch.count_nonzero(hl.grad) > 0


def check_loss_no_group_and_partial_dh(rank, group):
    """process_group=None is the single-device op; reduce_grad_input=False leaves this rank's part
    of dh (the parts sum to the full dh); a second backward recomputes the same gradients."""
    import tiedkernels
    from tiedkernels.distributed import vocab_parallel_linear_cross_entropy

    g = torch.Generator().manual_seed(7)
    w = torch.randn(V, D, dtype=torch.float64, generator=g)
    h = torch.randn(9, D, dtype=torch.float64, generator=g)
    y = _labels((9,), V, gen=g)
    opts = dict(label_smoothing=0.1, z_loss=1e-3, softcap=4.0, chunk_size=4)
    w1, h1 = w.clone().requires_grad_(), h.clone().requires_grad_()
    single = tiedkernels.linear_cross_entropy(h1, w1, y, **opts)
    single.backward()
    w2, h2 = w.clone().requires_grad_(), h.clone().requires_grad_()
    local = vocab_parallel_linear_cross_entropy(h2, w2, y, **opts)
    local.backward()
    _close(local, single.detach(), "no group: loss")
    _close(h2.grad, h1.grad, "no group: dh")
    _close(w2.grad, w1.grad, "no group: dW")

    ws, start, _ = _padded_shard(w, rank)
    ws.requires_grad_()
    h3 = h.clone().requires_grad_()
    loss = vocab_parallel_linear_cross_entropy(h3, ws, y, vocab_start=start, vocab_size=V, process_group=group,
                                               reduce_grad_input=False, **opts)
    _close(loss, single.detach(), "partial dh: loss")
    loss.backward(retain_graph=True)
    part = h3.grad.clone()
    total = part.clone()
    dist.all_reduce(total, group=group)
    _close(total, h1.grad, "partial dh: sum of the ranks' parts")
    # a second backward through the same graph: the same gradients again
    h3.grad, ws.grad = None, None
    loss.backward()
    _close(h3.grad, part, "second backward: dh")


def check_embedding(rank, group):
    """Output and each rank's weight-gradient shard, sequence parallel on and off, padding_idx."""
    from tiedkernels.distributed import vocab_parallel_embedding

    g = torch.Generator().manual_seed(3)
    w = torch.randn(V, D, dtype=torch.float64, generator=g)
    ids = torch.randint(0, V, (2, 6), generator=g)
    ids[0, :3] = torch.tensor([0, 8, 10])  # both ends and the padding_idx
    for m, sp, pad in ((1, False, None), (4, True, 8), (1, True, None), (4, False, -3)):
        what = f"embedding m={m} sp={sp} padding_idx={pad}"
        gout = torch.randn(2, 6, D, dtype=torch.float64, generator=g)
        wr = w.clone().requires_grad_()
        ref = F.embedding(ids, wr, padding_idx=None if pad is None else pad % V)
        (ref * gout).sum().backward()
        ws, start, stop = _padded_shard(w, rank, m)
        ws.requires_grad_()
        out = vocab_parallel_embedding(ids, ws, vocab_start=start, vocab_size=V, process_group=group,
                                       sequence_parallel=sp, padding_idx=pad)
        mine = gout.chunk(WORLD, dim=1)[rank] if sp else gout
        _close(out, ref.detach().chunk(WORLD, dim=1)[rank] if sp else ref.detach(), f"{what}: output")
        (out * mine).sum().backward()
        n = stop - start
        _close(ws.grad[:n], wr.grad[start:stop], f"{what}: dW shard")
        assert torch.count_nonzero(ws.grad[n:]) == 0, f"{what}: padding rows got a gradient"
    bad = ids.clone()
    bad[1, 2] = V
    try:
        vocab_parallel_embedding(bad, ws, vocab_start=start, vocab_size=V, process_group=group)
    except IndexError as e:
        assert str(V) in str(e)
    else:
        raise AssertionError("an id >= V was not refused")


class _Body(nn.Module):
    """A token-wise stand-in for the transformer (sequence parallelism keeps it local)."""

    def __init__(self, d, dtype):
        super().__init__()
        self.fc = nn.Linear(d, d, dtype=dtype)

    def forward(self, x):
        return torch.tanh(self.fc(x))


def _reference_step(w, body, ids, y, **opts):
    """The single-process tied step in plain autograd: returns loss, dW, body grads."""
    from tiedkernels import reference

    wr = w.clone().requires_grad_()
    loss = reference.linear_cross_entropy(body(F.embedding(ids, wr)), wr, y, **opts)
    loss.backward()
    grads = [p.grad.clone() for p in body.parameters()]
    body.zero_grad()
    return loss.detach(), wr.grad, grads


def check_module(rank, group):
    """TiedEmbeddingHead(process_group=...) through a whole step (embed, body, loss), sequence
    parallel on and off; logits; both roles' gradients in the one shard; collectives per step."""
    from torch.distributed.tensor.debug import CommDebugMode

    from tiedkernels import TiedEmbeddingHead
    from tiedkernels.distributed import VocabParallelTiedEmbeddingHead

    c10d = torch.ops.c10d
    g = torch.Generator().manual_seed(11)
    w = torch.randn(V, D, dtype=torch.float64, generator=g)
    ids = torch.randint(0, V, (2, 6), generator=g)
    y = _labels((2, 6), V, gen=g)
    opts = dict(label_smoothing=0.1, z_loss=1e-3)
    torch.manual_seed(5)
    body = _Body(D, torch.float64)
    ref_loss, ref_dw, ref_body = _reference_step(w, body, ids, y, **opts)
    expected_counts = {
        False: {c10d.allreduce_: 2, c10d._allgather_base_: 1},
        True: {c10d._reduce_scatter_base_: 2, c10d._allgather_base_: 3},
    }
    for m, sp in ((1, False), (4, True), (1, True), (4, False)):
        what = f"module m={m} sp={sp}"
        head = TiedEmbeddingHead(V, D, process_group=group, dtype=torch.float64, _weight=w, pad_to_multiple_of=m,
                                 sequence_parallel=sp)
        assert isinstance(head, VocabParallelTiedEmbeddingHead), type(head)
        assert head.weight.shape[0] == head.shard_size
        with CommDebugMode() as comm:
            h = body(head(ids))
            loss = head.loss(h, y, **opts)
            loss.backward()
        counts = {k: v for k, v in comm.get_comm_counts().items() if v}
        assert counts == expected_counts[sp], f"{what}: collectives per step {dict(counts)}"
        _close(loss, ref_loss, f"{what}: loss")
        start, stop = head.vocab_start, head.vocab_stop
        _close(head.weight.grad[: stop - start], ref_dw[start:stop], f"{what}: dW shard (embedding + head)")
        assert torch.count_nonzero(head.weight.grad[stop - start:]) == 0
        for p, r in zip(body.parameters(), ref_body):
            if sp:  # the body saw this rank's tokens only: its replicated parameters' grads are summed
                dist.all_reduce(p.grad, group=group)
            _close(p.grad, r, f"{what}: body grad")
        body.zero_grad()

        # logits: gathered, and the gradient through them
        hx = torch.randn(2, 6, D, dtype=torch.float64, generator=g)
        gz = torch.randn(2, 6, V, dtype=torch.float64, generator=g)
        wr = w.clone().requires_grad_()
        zr = F.linear(hx, wr)
        (zr * gz).sum().backward()
        head.weight.grad = None
        hin = hx.chunk(WORLD, dim=1)[rank] if sp else hx
        z = head.logits(hin)
        _close(z, zr.detach(), f"{what}: logits")
        assert head.output_embeddings.weight is head.weight and head.output_embeddings.out_features == V
        (z * gz).sum().backward()
        _close(head.weight.grad[: stop - start], wr.grad[start:stop], f"{what}: dW through logits")


def check_state_dict(rank, group):
    """state_dict holds the full [V, D] (and [V] bias); load_state_dict takes the full tensors
    (e.g. from a single-device TiedEmbeddingHead) and keeps this rank's rows."""
    from tiedkernels import TiedEmbeddingHead

    torch.manual_seed(21)  # the single-device head is built alike on both ranks
    single = TiedEmbeddingHead(V, D, bias=True, padding_idx=2, dtype=torch.float64)
    with torch.no_grad():
        single.bias.normal_()
    for m in (1, 4):
        torch.manual_seed(100 + rank)  # different random shards on the two ranks
        vp = TiedEmbeddingHead(V, D, bias=True, padding_idx=2, process_group=group, pad_to_multiple_of=m,
                               dtype=torch.float64)
        sd = vp.state_dict()
        assert set(sd) == {"weight", "bias"} and sd["weight"].shape == (V, D) and sd["bias"].shape == (V,)
        mine = sd["weight"][vp.vocab_start:vp.vocab_stop]
        _close(mine, vp.weight.detach()[: vp.vocab_stop - vp.vocab_start], f"m={m}: own rows in the state dict")
        assert torch.count_nonzero(sd["weight"][2]) == 0, "padding_idx row not zero at init"
        vp.load_state_dict(single.state_dict())
        n = vp.vocab_stop - vp.vocab_start
        _close(vp.weight.detach()[:n], single.weight.detach()[vp.vocab_start:vp.vocab_stop], f"m={m}: loaded rows")
        assert torch.count_nonzero(vp.weight.detach()[n:]) == 0, "padding rows not zero after load"
        _close(vp.bias.detach()[:n], single.bias.detach()[vp.vocab_start:vp.vocab_stop], f"m={m}: loaded bias")
        back = vp.state_dict()
        _close(back["weight"], single.weight.detach(), f"m={m}: round trip weight")
        _close(back["bias"], single.bias.detach(), f"m={m}: round trip bias")
        other = TiedEmbeddingHead(V, D, bias=True, padding_idx=2, dtype=torch.float64)
        other.load_state_dict(back)  # and a single-device head loads it back
        _close(other.weight.detach(), single.weight.detach(), f"m={m}: single-device load")


def check_dtensor(rank, group):
    """A Shard(0) DTensor weight: functional loss and embedding, and the module built on a mesh."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from tiedkernels import TiedEmbeddingHead
    from tiedkernels import reference
    from tiedkernels.distributed import vocab_parallel_embedding, vocab_parallel_linear_cross_entropy

    mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("tp",))
    g = torch.Generator().manual_seed(31)
    w = torch.randn(V, D, dtype=torch.float64, generator=g)
    h = torch.randn(8, D, dtype=torch.float64, generator=g)
    y = _labels((8,), V, gen=g)
    ids = torch.randint(0, V, (8,), generator=g)
    gout = torch.randn(8, D, dtype=torch.float64, generator=g)
    wr, hr = w.clone().requires_grad_(), h.clone().requires_grad_()
    ref = reference.linear_cross_entropy(hr, wr, y, label_smoothing=0.1) + (F.embedding(ids, wr) * gout).sum()
    ref.backward()

    dt = distribute_tensor(w.clone(), mesh, [Shard(0)]).requires_grad_()
    hl = h.clone().requires_grad_()
    loss = vocab_parallel_linear_cross_entropy(hl, dt, y, label_smoothing=0.1, chunk_size=3)
    emb = vocab_parallel_embedding(ids, dt)
    total = loss + (emb * gout).sum()
    _close(total, ref.detach(), "DTensor: loss")
    total.backward()
    _close(hl.grad, hr.grad, "DTensor: dh")
    _close(dt.grad.full_tensor(), wr.grad, "DTensor: dW")

    # V = 1: DTensor gives rank 1 an empty [0, D] shard
    w1 = torch.randn(1, D, dtype=torch.float64, generator=g)
    ids1 = torch.zeros(8, dtype=torch.long)
    wr1, hr1 = w1.clone().requires_grad_(), h.clone().requires_grad_()
    ref1 = reference.linear_cross_entropy(hr1, wr1, ids1, z_loss=0.1) + (F.embedding(ids1, wr1) * gout).sum()
    ref1.backward()
    dt1 = distribute_tensor(w1.clone(), mesh, [Shard(0)]).requires_grad_()
    assert dt1.to_local().shape[0] == (1 if rank == 0 else 0)
    hl1 = h.clone().requires_grad_()
    out1 = vocab_parallel_linear_cross_entropy(hl1, dt1, ids1, z_loss=0.1) + (vocab_parallel_embedding(ids1, dt1)
                                                                              * gout).sum()
    _close(out1, ref1.detach(), "DTensor V=1: loss")
    out1.backward()
    _close(hl1.grad, hr1.grad, "DTensor V=1: dh")
    _close(dt1.grad.full_tensor(), wr1.grad, "DTensor V=1: dW")

    for kw in (dict(device_mesh=mesh["tp"], _weight=w), dict(_weight=distribute_tensor(w.clone(), mesh, [Shard(0)]))):
        head = TiedEmbeddingHead(V, D, dtype=torch.float64, **kw)
        h2 = h.clone().requires_grad_()
        loss = head.loss(h2, y, label_smoothing=0.1) + (head(ids) * gout).sum()
        _close(loss, ref.detach(), f"mesh module {list(kw)}: loss")
        loss.backward()
        _close(h2.grad, hr.grad, f"mesh module {list(kw)}: dh")
        _close(head.state_dict()["weight"], w, f"mesh module {list(kw)}: state dict")
        n = head.vocab_stop - head.vocab_start
        _close(head.weight.grad[:n], wr.grad[head.vocab_start:head.vocab_stop], f"mesh module {list(kw)}: dW")


class _Tiny(nn.Module):
    def __init__(self, head, d):
        super().__init__()
        self.head = head
        self.body = _Body(d, torch.float64)

    def forward(self, ids, labels):
        return self.head.loss(self.body(self.head.embed(ids)), labels, label_smoothing=0.1)


def check_fsdp2(rank, group):
    """FSDP2 data parallel: the tied weight in one fully_shard group; the averaged, sharded
    gradients equal the single-process gradients of the whole batch."""
    from torch.distributed.fsdp import fully_shard

    from tiedkernels import TiedEmbeddingHead
    from tiedkernels.distributed import fully_shard_tied

    g = torch.Generator().manual_seed(41)
    ids = torch.randint(0, V, (4, 5), generator=g)
    y = torch.randint(0, V, (4, 5), generator=g)  # no ignored tokens: each rank's mean is over 10 tokens
    torch.manual_seed(6)
    model = _Tiny(TiedEmbeddingHead(V, D, dtype=torch.float64), D)
    w0 = model.head.weight.detach().clone()
    ref_loss, ref_dw, ref_body = _reference_step(w0, model.body, ids, y, label_smoothing=0.1)

    fully_shard_tied(model.head)
    fully_shard(model)
    mine = slice(2 * rank, 2 * rank + 2)
    loss = model(ids[mine], y[mine])
    loss.backward()
    both = loss.detach().clone()
    dist.all_reduce(both, group=group)
    _close(both / WORLD, ref_loss, "FSDP2: loss")
    params = dict(model.named_parameters())
    assert "head.weight" in params and len([k for k in params if k.endswith("weight")]) == 2, list(params)
    _close(params["head.weight"].grad.full_tensor(), ref_dw, "FSDP2: tied dW")
    for (name, p), r in zip(model.body.named_parameters(), ref_body):
        _close(p.grad.full_tensor(), r, f"FSDP2: body {name}")


def check_pipeline_tie(rank, group):
    """Two stages: the embedding on stage 0, the head on stage 1, each with a copy of W.
    After broadcast, backward and the tie's all-reduce, both copies hold the tied gradient;
    the gradient norm counts it once and clipping matches torch's on the single model."""
    from tiedkernels import TiedEmbeddingHead
    from tiedkernels.distributed import PipelineTie, clip_grad_norm_, grad_norm

    g = torch.Generator().manual_seed(51)
    w = torch.randn(V, D, dtype=torch.float64, generator=g)
    ids = torch.randint(0, V, (3, 4), generator=g)
    y = _labels((3, 4), V, gen=g)
    torch.manual_seed(8)
    body0, body1 = _Body(D, torch.float64), _Body(D, torch.float64)

    # single process: the whole model, one weight
    wr = w.clone().requires_grad_()
    from tiedkernels import reference
    ref = reference.linear_cross_entropy(body1(body0(F.embedding(ids, wr))), wr, y)
    ref.backward()
    ref_params = [wr, *body0.parameters(), *body1.parameters()]
    raw = [p.grad.clone() for p in ref_params]
    ref_inf = max(gr.abs().max() for gr in raw)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref_params, max_norm=0.5)
    ref_grads = [p.grad.clone() for p in ref_params]
    assert ref_norm > 0.5, "pick a smaller max_norm: clipping must act"
    for p in ref_params[1:]:
        p.grad = None

    # two stages; stage 1 starts from a different weight: the broadcast fixes it
    start_w = w.clone() if rank == 0 else torch.zeros(V, D, dtype=torch.float64)
    head = TiedEmbeddingHead(V, D, dtype=torch.float64, _weight=start_w)
    tie_group = dist.new_group([0, 1], backend="gloo")
    tie = PipelineTie(head.weight, tie_group, src=0)
    tie.broadcast_weight()
    _close(head.weight.detach(), w, "pipeline: weight after broadcast")
    act = torch.empty(3, 4, D, dtype=torch.float64)
    if rank == 0:
        out = body0(head(ids))
        dist.send(out.detach(), dst=1)
        dist.recv(act, src=1)
        out.backward(act)
        mine = [head.weight, *body0.parameters()]
    else:
        dist.recv(act, src=0)
        act.requires_grad_()
        loss = head.loss(body1(act), y)
        loss.backward()
        dist.send(act.grad, dst=0)
        _close(loss.detach(), ref.detach(), "pipeline: loss")
        mine = [head.weight, *body1.parameters()]
    # (a data-parallel sync would run here) then the tie
    tie.all_reduce_grad()
    _close(head.weight.grad, raw[0], "pipeline: tied gradient on this stage")
    assert tie.counts_in_norm == (rank == 0)
    norm = grad_norm(mine, ties=[tie], process_group=group)
    _close(norm, ref_norm, "pipeline: grad norm counts the tie once")
    _close(grad_norm(mine, ties=[tie], process_group=group, norm_type=float("inf")), ref_inf, "pipeline: inf norm")
    clip_grad_norm_(mine, 0.5, ties=[tie], process_group=group)
    _close(head.weight.grad, ref_grads[0], "pipeline: clipped tied gradient")
    own = ref_grads[1:3] if rank == 0 else ref_grads[3:5]
    for p, r in zip(mine[1:], own):
        _close(p.grad, r, "pipeline: clipped stage gradient")


def _patched_tiny_llama(seed):
    """(a patched tiny fp64 Llama, a [4, 6] batch of ids), or "SKIP: ..." without transformers."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as e:
        return f"SKIP: transformers is not installed ({e})"
    import tiedkernels.hf as tkhf

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V * 3, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
                      tie_word_embeddings=True)
    model = tkhf.patch(LlamaForCausalLM(cfg).double())
    return model, torch.randint(0, cfg.vocab_size, (4, 6))


def check_hf_fsdp2(rank, group):
    """A patched tiny Hugging Face causal LM trains one step under FSDP2 (each decoder layer its own
    group; the embedding and lm_head, one Parameter, in the root group) with the single-process
    result: loss, every gradient and every updated parameter."""
    import copy

    from torch.distributed.fsdp import fully_shard

    built = _patched_tiny_llama(61)
    if isinstance(built, str):
        return built
    model, ids = built
    import tiedkernels.hf as tkhf
    from tiedkernels.hf._lazy import LazyLogits

    single = copy.deepcopy(tkhf.patch(model))
    assert single.lm_head.weight is single.model.embed_tokens.weight
    opt_ref = torch.optim.SGD(single.parameters(), lr=0.5)
    ref_loss = single(input_ids=ids, labels=ids).loss
    ref_loss.backward()
    ref_grads = {k: p.grad.clone() for k, p in single.named_parameters()}
    opt_ref.step()

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    mine = slice(2 * rank, 2 * rank + 2)  # equal token counts: the mean of the ranks' means is the mean
    out = model(input_ids=ids[mine], labels=ids[mine])
    assert isinstance(out.logits, LazyLogits), "the patched model did not take the fused loss path"
    loss = out.loss
    loss.backward()
    both = loss.detach().clone()
    dist.all_reduce(both, group=group)
    _close(both / WORLD, ref_loss.detach(), "HF FSDP2: loss")
    names = [k for k, _ in model.named_parameters()]
    assert names == list(ref_grads), "the patched model's parameters changed under FSDP2"
    for k, p in model.named_parameters():
        _close(p.grad.full_tensor(), ref_grads[k], f"HF FSDP2: grad {k}")
    opt.step()
    ref_params = dict(single.named_parameters())
    for k, p in model.named_parameters():
        _close(p.detach().full_tensor(), ref_params[k].detach(), f"HF FSDP2: {k} after one step")
    assert model.lm_head.weight is model.model.embed_tokens.weight


def check_hf_fsdp1(rank, group):
    """The same under FSDP1 (``FullyShardedDataParallel``, one unit per decoder layer by transformers'
    auto-wrap policy, the embedding and lm_head in the root unit), with ``use_orig_params`` off and on:
    loss, every gradient and every parameter after one step equal one process's, the fused path taken,
    and the full state dict holds the tied weight under both names, loadable into a stock model."""
    import copy
    import functools

    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    built = _patched_tiny_llama(67)
    if isinstance(built, str):
        return built
    base, ids = built
    import tiedkernels.hf as tkhf
    from tiedkernels.hf._lazy import LazyLogits
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    cfg = base.config
    mine = slice(2 * rank, 2 * rank + 2)
    policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={LlamaDecoderLayer})
    for use_orig in (False, True):
        what = f"HF FSDP1 (use_orig_params={use_orig})"
        single = copy.deepcopy(base)
        ref_loss = single(input_ids=ids, labels=ids).loss
        ref_loss.backward()
        ref_grads = {k: p.grad.clone() for k, p in single.named_parameters()}
        torch.optim.SGD(single.parameters(), lr=0.5).step()

        model = copy.deepcopy(base)
        assert tkhf.is_patched(model) and model.lm_head.weight is model.model.embed_tokens.weight
        fm = FSDP(model, auto_wrap_policy=policy, device_id=torch.device("cpu"), use_orig_params=use_orig,
                  process_group=group)
        opt = torch.optim.SGD(fm.parameters(), lr=0.5)
        out = fm(input_ids=ids[mine], labels=ids[mine])
        assert isinstance(out.logits, LazyLogits), f"{what}: the patched model did not take the fused loss path"
        out.loss.backward()
        both = out.loss.detach().clone()
        dist.all_reduce(both, group=group)
        _close(both / WORLD, ref_loss.detach(), f"{what}: loss")
        if use_orig:  # FSDP1 gathers gradients only for its original parameters
            with FSDP.summon_full_params(fm, with_grads=True):
                for k, p in model.named_parameters():
                    _close(p.grad, ref_grads[_orig_name(k)], f"{what}: grad {k}")
        opt.step()
        cfg_sd = FullStateDictConfig(offload_to_cpu=False, rank0_only=False)
        with FSDP.state_dict_type(fm, StateDictType.FULL_STATE_DICT, cfg_sd):
            sd = fm.state_dict()
        ref_sd = single.state_dict()
        for k, t in ref_sd.items():
            _close(sd[k], t, f"{what}: {k} after one step")
        stock = LlamaForCausalLM(cfg).double()
        stock.load_state_dict(sd)
        assert stock.lm_head.weight is stock.model.embed_tokens.weight
        with torch.no_grad():
            _close(stock(input_ids=ids).logits, single(input_ids=ids).logits,
                   f"{what}: its full state dict in a stock model")


def _orig_name(k):
    """A parameter name inside FSDP1's wrappers, as the unwrapped model names it."""
    return k.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")


def check_bf16_and_empty(rank, group):
    """bf16: the vocabulary-parallel loss and gradients are as close to the fp64 truth as the
    single-device bf16 op is (dh is summed across ranks in fp32). N == 0: loss 0, empty dh."""
    import tiedkernels
    from tiedkernels import reference
    from tiedkernels.distributed import vocab_parallel_linear_cross_entropy

    g = torch.Generator().manual_seed(71)
    v, n = 203, 64
    w = torch.randn(v, 32, dtype=torch.float64, generator=g) * 0.3
    h = torch.randn(n, 32, dtype=torch.float64, generator=g)
    y = _labels((n,), v, gen=g)
    opts = dict(label_smoothing=0.1, z_loss=1e-3)
    wr, hr = w.clone().requires_grad_(), h.clone().requires_grad_()
    ref = reference.linear_cross_entropy(hr, wr, y, **opts)
    ref.backward()

    wb, hb = w.bfloat16().requires_grad_(), h.bfloat16().requires_grad_()
    single = tiedkernels.linear_cross_entropy(hb, wb, y, chunk_size=16, **opts)
    single.backward()
    ws, start, stop = _padded_shard(w.bfloat16(), rank, 8)
    ws.requires_grad_()
    hv = h.bfloat16().requires_grad_()
    loss = vocab_parallel_linear_cross_entropy(hv, ws, y, vocab_start=start, vocab_size=v, process_group=group,
                                               chunk_size=16, **opts)
    assert loss.dtype == torch.float32 and hv.grad is None
    loss.backward()
    assert hv.grad.dtype == torch.bfloat16 and ws.grad.dtype == torch.bfloat16

    def err(a, b):
        return ((a.double() - b).abs().max() / b.abs().max()).item()

    for what, mine, theirs, truth in (("loss", loss.detach(), single.detach(), ref.detach()),
                                      ("dh", hv.grad, hb.grad, hr.grad),
                                      ("dW", ws.grad[: stop - start], wb.grad[start:stop], wr.grad[start:stop])):
        e_mine, e_single = err(mine, truth), err(theirs, truth)
        assert e_mine <= 2 * e_single + 1e-6, f"bf16 {what}: error {e_mine:.2e} vs single-device {e_single:.2e}"
        assert e_mine < 2e-2, f"bf16 {what}: error {e_mine:.2e}"

    he = torch.zeros(0, 32, dtype=torch.float64, requires_grad=True)
    wse, start, _ = _padded_shard(w, rank)
    wse.requires_grad_()
    for reduction in ("mean", "sum", "none"):
        out = vocab_parallel_linear_cross_entropy(he, wse, torch.zeros(0, dtype=torch.long), vocab_start=start,
                                                  vocab_size=v, process_group=group, reduction=reduction)
        assert out.shape == ((0,) if reduction == "none" else ()), out.shape
        out.sum().backward()
        assert he.grad.shape == (0, 32) and torch.count_nonzero(wse.grad) == 0
        if reduction != "none":
            assert out.item() == 0


def check_fsdp2_vocab_parallel(rank, group):
    """The vocabulary-parallel head inside FSDP2 on a (dp, tp) mesh, both ways round on 2 ranks:
    dp=2 x tp=1 (FSDP2 shards the head's rows over 2 ranks) and dp=1 x tp=2 (each rank's shard of a
    2-way vocabulary-parallel head in its own FSDP2 group): the single-process gradients."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from tiedkernels import TiedEmbeddingHead
    from tiedkernels.distributed import fully_shard_tied

    g = torch.Generator().manual_seed(81)
    w = torch.randn(V, D, dtype=torch.float64, generator=g)
    ids = torch.randint(0, V, (4, 6), generator=g)
    y = torch.randint(0, V, (4, 6), generator=g)
    torch.manual_seed(9)
    body = _Body(D, torch.float64)
    ref_loss, ref_dw, ref_body = _reference_step(w, body, ids, y, label_smoothing=0.1)
    for shape in ((2, 1), (1, 2)):
        what = f"FSDP2 x vocabulary parallel, (dp, tp)={shape}"
        mesh = init_device_mesh("cpu", shape, mesh_dim_names=("dp", "tp"))
        head = TiedEmbeddingHead(V, D, device_mesh=mesh["tp"], _weight=w, dtype=torch.float64, pad_to_multiple_of=2)
        model = _Tiny(head, D)
        model.body.load_state_dict(body.state_dict())
        fully_shard_tied(model.head, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
        dp = mesh["dp"].get_local_rank()
        mine = slice(dp * 4 // shape[0], (dp + 1) * 4 // shape[0])
        loss = model(ids[mine], y[mine])
        loss.backward()
        total = loss.detach().clone()
        dist.all_reduce(total, group=mesh["dp"].get_group())
        _close(total / shape[0], ref_loss, f"{what}: loss")
        dw = model.head.weight.grad.full_tensor()  # this tp rank's padded shard, gathered over dp
        start, stop = head.vocab_start, head.vocab_stop
        _close(dw[: stop - start], ref_dw[start:stop], f"{what}: dW shard")
        assert torch.count_nonzero(dw[stop - start:]) == 0, f"{what}: padding rows got a gradient"
        for p, r in zip(model.body.parameters(), ref_body):
            _close(p.grad.full_tensor(), r, f"{what}: body grad")
        sd = model.state_dict()  # the full [V, D] weight, from FSDP2's and our sharding both
        _close(sd["head.weight"], w, f"{what}: state dict")
        with torch.no_grad():
            model.head.weight.zero_()
        model.load_state_dict(sd)
        _close(model.head.full_tensor(), w, f"{what}: loaded back")


def _raises(exc, fn, *words):
    try:
        fn()
    except exc as e:
        for w in words:
            assert w in str(e), f"{exc.__name__} without {w!r}: {e}"
        return
    raise AssertionError(f"expected {exc.__name__}")


def check_errors(rank, group):
    """Mistakes raise the same clear error on every rank, before any collective (no hang)."""
    from tiedkernels import TiedEmbeddingHead
    from tiedkernels.distributed import vocab_parallel_linear_cross_entropy as vp_lce

    assert type(TiedEmbeddingHead(V, D)) is TiedEmbeddingHead  # no group: the single-device module
    ws, start, _ = _padded_shard(torch.randn(V, D), rank)
    h, y = torch.randn(4, 2, D), torch.randint(0, V, (4, 2))
    _raises(ValueError, lambda: vp_lce(h, ws, y, vocab_size=V, process_group=group), "vocab_start")
    _raises(ValueError, lambda: vp_lce(h, ws, y, vocab_start=start, process_group=group), "vocab_size")
    _raises(ValueError, lambda: vp_lce(h.chunk(2, 1)[rank], ws, y, vocab_start=start, vocab_size=V,
                                       process_group=group, sequence_parallel=True, reduce_grad_input=False),
            "reduce_grad_input")
    bad = y.clone()
    bad[2, 1] = V + 3
    _raises(IndexError, lambda: vp_lce(h, ws, bad, vocab_start=start, vocab_size=V, process_group=group), str(V + 3))
    # sequence parallel given the full hidden states instead of this rank's slice
    _raises(ValueError, lambda: vp_lce(h, ws, y, vocab_start=start, vocab_size=V, process_group=group,
                                       sequence_parallel=True), "labels", "gathering")
    head = TiedEmbeddingHead(V, D, process_group=group)
    _raises(IndexError, lambda: head(torch.tensor([1, -1])), "-1")


CHECKS = [
    check_loss,
    check_loss_no_group_and_partial_dh,
    check_bf16_and_empty,
    check_embedding,
    check_module,
    check_state_dict,
    check_dtensor,
    check_fsdp2,
    check_fsdp2_vocab_parallel,
    check_pipeline_tie,
    check_errors,
    check_hf_fsdp2,
    check_hf_fsdp1,
]


def _worker(rank, port, outdir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=TIMEOUT_S))
    group = dist.group.WORLD
    results = {}
    path = os.path.join(outdir, f"rank{rank}.json")
    try:
        for check in CHECKS:
            torch.manual_seed(0)
            try:
                results[check.__name__] = check(rank, group)  # None, or "SKIP: why"
            except Exception:
                results[check.__name__] = traceback.format_exc()
            with open(path, "w") as f:  # written as we go: a crash still leaves what ran
                json.dump(results, f)
            dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    outdir = tmp_path_factory.mktemp("dist")
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        ctx = mp.start_processes(_worker, args=(_free_port(), str(outdir)), nprocs=WORLD, join=False,
                                 start_method="spawn")
        deadline = TIMEOUT_S * 4

        t0 = time.monotonic()
        crashed = None
        while True:
            try:
                if ctx.join(timeout=5):
                    break
            except Exception as e:  # a process died: report what every rank recorded so far
                crashed = e
                break
            if time.monotonic() - t0 > deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                crashed = f"the {WORLD} processes did not finish in {deadline} s"
                break
    finally:
        if old is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = old
    out = []
    for r in range(WORLD):
        path = outdir / f"rank{r}.json"
        out.append(json.loads(path.read_text()) if path.exists() else {})
    return out, crashed


@pytest.mark.parametrize("name", [c.__name__ for c in CHECKS])
def test_distributed(results, name):
    per_rank, crashed = results
    for rank, res in enumerate(per_rank):
        assert name in res, f"rank {rank} never finished {name} ({crashed})"
        if res[name] is not None and res[name].startswith("SKIP: "):
            pytest.skip(res[name][len("SKIP: "):])
        assert res[name] is None, f"rank {rank}:\n{res[name]}"


# ---------------------------------------------------------------------------------------
# one process, no group (no spawn)

LSE_GRAD_CASES = [
    dict(reduction="mean", z_loss=1e-2, label_smoothing=0.1, chunk_size=4),
    dict(reduction="sum", ignore_index=3, softcap=2.5, logit_scale=0.8, bias=True),
    dict(reduction="none", shift=True, z_loss=1e-3, pad=3, chunk_size=5),
    dict(reduction="mean", num_items_in_batch=5, class_weight=True, label_smoothing=0.2, bias=True, pad=2),
    dict(reduction="mean", all_ignored=True, z_loss=1e-2),
]


@pytest.mark.parametrize("case", range(len(LSE_GRAD_CASES)))
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_lse_gradient_without_group(backend, case):
    """The returned lse carries its gradient (loss + z(lse), Cut Cross-Entropy's vocab-parallel
    z-loss): random incoming gradients for the loss and the lse, against the single-device op
    (return_lse=True) and the fp64 reference; padding rows (``pad``) are masked, and the lse of an
    ignored token gets its gradient as on one device."""
    import tiedkernels
    from tiedkernels import backends, reference
    from tiedkernels.distributed import vocab_parallel_linear_cross_entropy

    if backends.why_not(backend, "cpu") is not None:
        pytest.skip(backends.why_not(backend, "cpu"))
    opts = dict(LSE_GRAD_CASES[case])
    use_bias, pad, chunk = opts.pop("bias", False), opts.pop("pad", 0), opts.pop("chunk_size", None)
    ii = opts.get("ignore_index", -100)
    g = torch.Generator().manual_seed(40 + case)
    B, T = 2, 5
    w = torch.randn(V, D, dtype=torch.float64, generator=g)
    b = torch.randn(V, dtype=torch.float64, generator=g) if use_bias else None
    h = torch.randn(B, T, D, dtype=torch.float64, generator=g)
    y = _labels((B, T), V, ii, frac=0.3, gen=g)
    if opts.pop("all_ignored", False):
        y = torch.full_like(y, ii)
    if opts.pop("class_weight", False):
        opts["class_weight"] = torch.rand(V, dtype=torch.float64, generator=g) + 0.25
    t_out = T - 1 if opts.get("shift") else T
    g_loss = torch.randn((B, t_out) if opts["reduction"] == "none" else (), dtype=torch.float64, generator=g)
    g_lse = torch.randn(B, t_out, dtype=torch.float64, generator=g)

    def run(fn, weight, bias):
        hx = h.clone().requires_grad_()
        wx = weight.clone().requires_grad_()
        bx = bias.clone().requires_grad_() if bias is not None else None
        loss, lse = fn(hx, wx, bx)
        ((loss * g_loss).sum() + (lse * g_lse).sum()).backward()
        return loss.detach(), lse.detach(), hx.grad, wx.grad, bx.grad if bx is not None else None

    want = run(lambda hx, wx, bx: tiedkernels.linear_cross_entropy(hx, wx, y, bias=bx, return_lse=True,
                                                                   chunk_size=chunk, backend=backend, **opts), w, b)
    truth = run(lambda hx, wx, bx: reference.linear_cross_entropy(hx, wx, y, bias=bx, return_lse=True, **opts), w, b)
    wp = torch.cat([w, torch.randn(pad, D, dtype=torch.float64, generator=g) * 3])  # garbage padding rows
    bp = torch.cat([b, torch.randn(pad, dtype=torch.float64, generator=g)]) if use_bias else None
    got = run(lambda hx, wx, bx: vocab_parallel_linear_cross_entropy(
        hx, wx, y, bias=bx, vocab_size=V, return_lse=True, chunk_size=chunk, backend=backend, **opts), wp, bp)
    for name, mine, single, ref in zip(("loss", "lse", "dh", "dW", "db"), got, want, truth):
        if ref is None:
            continue
        if name in ("dW", "db"):
            assert torch.count_nonzero(mine[V:]) == 0, f"{name}: padding rows got a gradient"
            mine = mine[:V]
        _close(mine, single, f"{name} against the single-device op")
        _close(mine, ref, f"{name} against the fp64 reference")
