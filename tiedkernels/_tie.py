"""One gradient buffer for the tied weight.

Plain autograd gives the weight two dense ``[V, D]`` gradients in one backward (the
head's, then the embedding's) and adds them.  Here the head's gradient, on its way to
the weight, is offered to the embedding's backward nodes that the engine will still run
in this same backward pass; the first such node adds its rows into that very buffer in
place (``embedding_bwd_acc_``) and returns no gradient of its own.  The buffer is still
waiting in the weight's input buffer at that point: the weight's AccumulateGrad cannot run
before every node that feeds it, the embedding's included.  So hooks fire once, with the
full gradient, and ``.grad`` accumulation across micro-batches is untouched.

Whenever that cannot be shown (no embedding node pending in this pass, a non-leaf weight,
a different buffer, tracing under ``torch.compile``), both sides fall back to ordinary
autograd, which is always correct.
"""

import weakref

import torch

from . import _composite


def _task_id():
    try:
        return torch._C._current_graph_task_id()
    except Exception:
        return None


def _will_run(node):
    try:
        return torch._C._will_engine_execute_node(node)
    except Exception:
        return False


class TieState:
    """Per-weight bookkeeping shared by the embedding and head sides."""

    MAX_NODES = 64

    def __init__(self):
        self.nodes = []  # weakrefs to embedding backward nodes created since their last backward
        self.stash = None  # (task id, weakref to the head's gradient tensor)
        self.ran = (None, set())  # (task id, ids of embedding nodes that already ran in it)

    def add_node(self, ctx):
        self.nodes = [r for r in self.nodes if r() is not None][-(self.MAX_NODES - 1):]
        self.nodes.append(weakref.ref(ctx))

    def _ran_in(self, task):
        if self.ran[0] != task:
            self.ran = (task, set())
        return self.ran[1]

    def offer(self, grad):
        """Head side: remember grad if an embedding node will still run in this pass."""
        task = _task_id()
        if task is None or task < 0:
            return
        ran = self._ran_in(task)
        for ref in self.nodes:
            node = ref()
            if node is not None and id(node) not in ran and _will_run(node):
                self.stash = (task, weakref.ref(grad))
                return

    def take(self, ctx, weight_shape, dtype):
        """Embedding side: the head's pending gradient buffer of this pass, or None."""
        task = _task_id()
        self._ran_in(task).add(id(ctx))
        if self.stash is None or task is None or self.stash[0] != task:
            return None
        buf = self.stash[1]()
        if buf is None or buf.shape != weight_shape or buf.dtype != dtype or not buf.is_contiguous():
            return None
        return buf


_STATES = {}  # id(weight) -> (weakref to weight, TieState); tensors cannot key a WeakKeyDictionary


def state_for(weight):
    entry = _STATES.get(id(weight))
    if entry is None or entry[0]() is not weight:
        key = id(weight)
        entry = (weakref.ref(weight, lambda _r, key=key: _STATES.pop(key, None)), TieState())
        _STATES[key] = entry
    return entry[1]


def usable(weight):
    """The tie path applies to a leaf weight that needs a gradient, outside tracing."""
    return (torch.is_grad_enabled() and weight.requires_grad and weight.is_leaf
            and not torch.compiler.is_compiling() and _composite.mode(weight) is None)


def _not_a_view(out):
    """``out`` as a tensor of its own (same storage, no copy) when the op returned a view of a buffer it
    made itself: autograd forbids in-place changes to a view made inside a custom Function, and models
    scale their embeddings in place (CTRL's ``inputs_embeds *= sqrt(d_model)``), as ``nn.Embedding``'s
    output allows."""
    if not out._is_view():
        return out
    return torch.empty(0, dtype=out.dtype, device=out.device).set_(
        out.untyped_storage(), out.storage_offset(), out.size(), out.stride())


class _TiedEmbedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, ids, padding_idx, backend, state):
        ctx.save_for_backward(ids)
        ctx.padding_idx = padding_idx
        ctx.backend = backend
        ctx.state = state
        ctx.weight_meta = (weight.shape, weight.dtype)
        state.add_node(ctx)
        return _not_a_view(backend.op("embedding_fwd")(weight, ids, padding_idx))

    @staticmethod
    def backward(ctx, grad):
        (ids,) = ctx.saved_tensors
        shape, dtype = ctx.weight_meta
        if torch.is_grad_enabled():
            # create_graph=True: a gradient that can itself be differentiated, never written in place
            return _composite.embedding_grad(grad, ids, shape[0], ctx.padding_idx), None, None, None, None
        buf = ctx.state.take(ctx, shape, dtype)
        if buf is not None:
            ctx.backend.op("embedding_bwd_acc_")(buf, grad, ids, ctx.padding_idx)
            return None, None, None, None, None
        return ctx.backend.op("embedding_bwd")(grad, ids, shape[0], ctx.padding_idx), None, None, None, None


class _TiedHead(torch.autograd.Function):
    """Identity on the weight whose backward offers the head's gradient to the embedding."""

    @staticmethod
    def forward(ctx, weight, state):
        ctx.state = state
        return weight

    @staticmethod
    def backward(ctx, grad):
        if grad is not None and not torch.is_grad_enabled():  # create_graph=True: nothing in place
            ctx.state.offer(grad)
        return grad, None


def embed(weight, ids, padding_idx, backend):
    return _TiedEmbedding.apply(weight, ids, padding_idx, backend, state_for(weight))


def head_weight(weight):
    """The weight as the head should see it: routed through the tie when that applies."""
    if not usable(weight):
        return weight
    return _TiedHead.apply(weight, state_for(weight))
