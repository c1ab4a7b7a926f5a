"""The chunked pass behind the token-level objectives and distillation (``objectives.py``, ``distill.py``).

Per row chunk of the hidden states it builds that chunk's final logits once,

    z = softcap(row_scale_i · logit_scale · (h_i Wᵀ + b)) · inv_temp_i

(``row_scale`` and ``inv_temp`` are optional per-token factors: a logit scale per token before the
cap, one over a temperature per token after it, as TRL and vLLM divide the final logits), takes from
them each token's statistics

    lse_i = logsumexp(z_i),  logp_i = z_iy - lse_i,  H_i = lse_i - Σ_j p_ij z_ij   (p = softmax(z))

and, given per-token coefficients ``(A, B, C)`` of a loss's derivative with respect to
``(logp, H, lse)``, the gradient of the logits

    dL/dz_ij = A_i ([j = y_i] - p_ij) - B_i p_ij (z_ij - Σ_k p_ik z_ik) + C_i p_ij

chained through the temperature, the cap and the scale, and the chunk's ``dh = dz W``,
``dW += dzᵀ h`` (one fp32 accumulator for low-precision inputs) and ``db += Σ_i dz_i``. Where the
coefficients are known once the chunk's statistics are (a token-local objective), they come from a
callback in the same pass: three GEMMs of the chunk, 6·N·D·V flops for the step. The ``[N, V]``
logits never exist; a chunk's do, in fp32. With the gradient filter on (a threshold ``t > 0``), a
column whose ``|dL/dz_ij|`` (after the chain) is at most ``t · s_i`` in every row of the chunk, with
``s_i = |A_i| + |B_i| + |C_i|``, is left out of the chunk's ``dh`` and ``dW`` GEMMs (``Grads.add``).

Plain PyTorch on every device: the GEMMs go to MKL/oneDNN or cuBLAS (low-precision CPU GEMMs
without native instructions through the fp32 tiles of the torch backend); the row work is a few
elementwise passes over the chunk's logits.
"""

import torch

from . import _torch_backend as _tb


def stat_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


class Logits:
    """How a row chunk's final logits are made from the hidden states (shared by student and teacher)."""

    def __init__(self, hidden, weight, bias=None, logit_scale=1.0, softcap=0.0, row_scale=None, inv_temp=None):
        self.hidden, self.weight, self.bias = hidden, weight, bias
        self.logit_scale, self.softcap = float(logit_scale), float(softcap)
        self.row_scale, self.inv_temp = row_scale, inv_temp  # [N] in the statistics dtype, or None
        self.sdt = stat_dtype(hidden.dtype)

    def chunk(self, start, rows):
        """(z [rows, V] in the statistics dtype, the cap's tanh or None)."""
        hc = self.hidden[start:start + rows]
        z = _tb._mm(hc, self.weight.t(), self.bias).to(self.sdt)
        scale = self.logit_scale
        if self.row_scale is not None:
            z = z.mul_(self.row_scale[start:start + rows, None] * scale)
        elif scale != 1.0:
            z = z.mul_(scale)
        t = None
        if self.softcap > 0:
            t = torch.tanh(z.div_(self.softcap))
            z = t * self.softcap
        if self.inv_temp is not None:
            z = z.mul_(self.inv_temp[start:start + rows, None])
        return z, t

    def chain(self, dz, t, start, rows):
        """dL/d(h Wᵀ + b) from dL/dz of the chunk, in place."""
        if self.inv_temp is not None:
            dz.mul_(self.inv_temp[start:start + rows, None])
        if t is not None:
            dz.mul_(1 - t * t)
        if self.row_scale is not None:
            dz.mul_(self.row_scale[start:start + rows, None] * self.logit_scale)
        elif self.logit_scale != 1.0:
            dz.mul_(self.logit_scale)
        return dz


def softmax_stats(z):
    """(p, lse, S = Σ p z) of each row of ``z``; a probability 0 adds 0 to S even at z = -inf."""
    lse = torch.logsumexp(z, dim=1)
    p = torch.exp(z - lse[:, None])
    pz = torch.where(p == 0, torch.zeros((), dtype=z.dtype, device=z.device), p * z)
    return p, lse, pz.sum(1)


def label_logits(z, y, keep):
    """z[i, y_i] where the token is kept, else 0 (an ignored label is never read)."""
    if z.shape[1] == 0:
        return z.new_zeros((z.shape[0],))
    safe = torch.where(keep, y, torch.zeros_like(y))
    return torch.where(keep, z.gather(1, safe[:, None]).squeeze(1), torch.zeros((), dtype=z.dtype, device=z.device))


class Grads:
    """The chunk GEMMs' outputs: dh [N, D], the fp32 dW accumulator, db."""

    def __init__(self, hidden, weight, bias, want, grad_filter=0.0):
        n, d = hidden.shape
        v = weight.shape[0]
        self.want_dh, self.want_dw, self.want_db = want[0], want[1], want[2] and bias is not None
        sdt = stat_dtype(hidden.dtype)
        self.hidden, self.weight, self.sdt = hidden, weight, sdt
        self.dh = hidden.new_empty((n, d)) if self.want_dh else None
        self.dw = weight.new_zeros((v, d), dtype=sdt) if self.want_dw else None
        self.db = weight.new_zeros((v,), dtype=sdt) if self.want_db else None
        self.grad_filter = float(grad_filter)  # the threshold t (0: exact)
        self.kept = []  # with the filter on: the columns each chunk kept (read by tests and benchmarks)

    def add(self, dz, start, rows, scale=None):
        """The chunk's dz [rows, V] (statistics dtype) into dh, dW and db. With the gradient filter on,
        ``scale`` [rows] is each row's s_i: a column with |dz_ij| <= t·s_i in every row is left out of
        the dh and dW GEMMs (``_torch_backend.filter_keep``, the rule of ``linear_cross_entropy``)."""
        hc = self.hidden[start:start + rows]
        dzl = dz.to(self.hidden.dtype)
        if self.want_db:
            self.db += dzl.sum(0, dtype=self.sdt)  # exact: every column
        if not (self.want_dh or self.want_dw):
            return
        if self.grad_filter > 0 and scale is not None and dzl.shape[1] > 0:
            keep = _tb.filter_keep(dzl, scale * self.grad_filter)
            if torch.compiler.is_compiling():
                # traced (the distillation is): no data-dependent column count in the graph; the
                # skipped columns are zeroed and the GEMMs stay dense (the same gradients, no saving)
                dzl = torch.where(keep[None, :], dzl, torch.zeros((), dtype=dzl.dtype, device=dzl.device))
                keep = None
        else:
            keep = None
        if keep is not None:
            idx = keep.nonzero().squeeze(1)  # a host sync on a GPU, once per chunk
            self.kept.append(int(idx.shape[0]))
            if idx.shape[0] < dzl.shape[1]:
                sdt = self.sdt
                _tb.filtered_gemms(dzl, hc, self.weight, idx, self.dh[start:start + rows] if self.want_dh else None,
                                   self.dw if self.want_dw else None, _tb._mm, lambda a, b: a.to(sdt) @ b.to(sdt))
                return
        if self.want_dh:
            self.dh[start:start + rows] = _tb._mm(dzl, self.weight)
        if self.want_dw:
            if self.sdt == hc.dtype:
                self.dw.addmm_(dzl.t(), hc)
            elif hc.device.type == "cuda":  # cuBLAS: low-precision inputs, fp32 accumulation and output
                torch.addmm(self.dw, dzl.t(), hc, out_dtype=self.sdt, out=self.dw)
            else:  # the rounded dz (as the GEMMs of the other backends see it), summed in fp32
                self.dw.addmm_(dzl.t().to(self.sdt), hc.to(self.sdt))

    def result(self):
        w = self.weight
        dw = self.dw.to(w.dtype) if self.dw is not None else None
        db = self.db.to(w.dtype) if self.db is not None else None
        return self.dh, dw, db


def row_scale(a, b, c):
    """The gradient filter's s_i for the coefficients (a, b, c) of (logp, H, lse): |a_i| + |b_i| + |c_i|
    (None terms left out). For the cross-entropy (a = -g) it is the |g_i| of ``linear_cross_entropy``'s rule."""
    s = None
    for x in (a, b, c):
        if x is not None:
            s = x.abs() if s is None else s + x.abs()
    return s


def logits_grad(z, p, s, y, keep, a, b, c):
    """dL/dz of one chunk for the per-row coefficients (a, b, c) of (logp, H, lse); None skips a term.
    Ignored rows must carry zeros. Entries of probability 0 get 0 (never 0 · inf)."""
    coef = None
    if a is not None:
        coef = -a
    if c is not None:
        coef = c if coef is None else coef + c
    dz = p * coef[:, None] if coef is not None else torch.zeros_like(p)
    if b is not None:
        ent = torch.where(p == 0, torch.zeros((), dtype=p.dtype, device=p.device), p * (z - s[:, None]))
        dz = dz.sub_(ent.mul_(b[:, None]))
    if a is not None and z.shape[1] > 0:
        safe = torch.where(keep, y, torch.zeros_like(y))
        dz.scatter_add_(1, safe[:, None], torch.where(keep, a, torch.zeros_like(a))[:, None])
    return dz


_TILE_BYTES = 4 << 20


def _tiles(rows, v, itemsize):
    """Column ranges of a [rows, V] chunk whose temporaries take about _TILE_BYTES each."""
    cols = max(256, _TILE_BYTES // max(1, rows * itemsize))
    return [(j, min(v, j + cols)) for j in range(0, v, cols)]


def run(lg, y, keep, chunk, coef_fn=None, grads=None, want_pred=False):
    """One pass over the row chunks: per-token (logp, H, lse) [N] each, and argmax [N] when ``want_pred``
    (else None). With ``coef_fn(start, rows, logp, H, lse) -> (a, b, c)`` the chunk's gradients go into
    ``grads`` in the same pass. ``logp`` is 0 at ignored tokens (``keep`` False); a row holding +inf has
    a NaN ``logp`` (PyTorch's log_softmax there), while its ``lse`` is +inf.

    One ``[C, V]`` buffer per chunk (two with a softcap, whose tanh the chain rule needs): the logits,
    overwritten in place by ``dL/dz``; the statistics and the gradient are computed over column tiles
    whose temporaries are a few MiB. A ``-inf`` logit is raised to the dtype's lowest finite value once
    the label's logit is read: its probability is 0 either way, and every product with it is then 0
    rather than 0 · inf."""
    n = y.shape[0]
    sdt = lg.sdt
    dev = lg.hidden.device
    logp = torch.empty((n,), dtype=sdt, device=dev)
    ent = torch.empty((n,), dtype=sdt, device=dev)
    lse = torch.empty((n,), dtype=sdt, device=dev)
    pred = torch.empty((n if want_pred else 0,), dtype=torch.long, device=dev)
    zero = torch.zeros((), dtype=sdt, device=dev)
    lowest = torch.finfo(sdt).min
    for start in range(0, n, chunk):
        rows = min(chunk, n - start)
        yc, kc = y[start:start + rows], keep[start:start + rows]
        z, t = lg.chunk(start, rows)
        v = z.shape[1]
        if want_pred:
            pred[start:start + rows] = torch.argmax(z, dim=1) if v else 0
        zy = label_logits(z, yc, kc)
        tiles = _tiles(rows, v, z.element_size())
        m = z.amax(dim=1) if v else torch.full((rows,), float("-inf"), dtype=sdt, device=dev)
        # a row whose max is -inf (every logit -inf) or NaN keeps it: its statistics are NaN, as PyTorch's
        shift = torch.where(torch.isfinite(m), m, zero)
        z.clamp_(min=lowest)
        se = torch.zeros((rows,), dtype=sdt, device=dev)
        sez = torch.zeros((rows,), dtype=sdt, device=dev)
        keep_e = coef_fn is not None  # the gradient reuses exp(z - max): the logits' buffer then holds it
        for j0, j1 in tiles:
            zt = z[:, j0:j1]
            e = torch.sub(zt, shift[:, None]).exp_()
            se += e.sum(1)
            sez += torch.bmm(e.unsqueeze(1), zt.unsqueeze(2)).view(rows)
            if keep_e:
                zt.copy_(e)
        l = shift + torch.log(se)
        l = torch.where(torch.isfinite(m), l, m)  # lse of an all -inf row is -inf, of a +inf row +inf
        s = sez / se
        lp = torch.where(kc, zy - _tb.cross_entropy_lse(l), zero)
        h = l - s
        logp[start:start + rows], ent[start:start + rows], lse[start:start + rows] = lp, h, l
        if coef_fn is None:
            continue
        a, b, c = coef_fn(start, rows, lp, h, l)
        if a is None and b is None and c is None:
            continue
        dz = _grad_in_place(z, shift, se, s, yc, kc, a, b, c, tiles)
        grads.add(lg.chain(dz, t, start, rows), start, rows, row_scale(a, b, c) if grads.grad_filter > 0 else None)
    return logp, ent, lse, (pred if want_pred else None)


def _grad_in_place(e, shift, se, s, y, keep, a, b, c, tiles):
    """dL/dz of one chunk, written over ``e = exp(z - shift)`` (the chunk's buffer after the statistics):
    dz = p ⊙ (c - a - b (z - S)) + a · onehot(y), with p = e / Σe and z = log(e) + shift."""
    rows = e.shape[0]
    inv = 1.0 / se
    coef = torch.zeros((rows,), dtype=e.dtype, device=e.device)
    if a is not None:
        coef = coef - a
    if c is not None:
        coef = coef + c
    if b is None:
        e.mul_((coef * inv)[:, None])
    else:
        # p (coef - b z + b S) = e/Σe · (coef + b (S - shift) - b log e); an entry with e = 0 gives 0
        const = coef + b * (s - shift)
        for j0, j1 in tiles:
            et = e[:, j0:j1]
            zero = et == 0  # probability 0: gradient 0 (log 0 = -inf times b would give 0 · inf)
            lz = torch.log(et)
            et.mul_(lz.mul_(-b[:, None]).add_(const[:, None])).mul_(inv[:, None])
            et.masked_fill_(zero, 0)
    if a is not None and e.shape[1] > 0:
        safe = torch.where(keep, y, torch.zeros_like(y))
        e.scatter_add_(1, safe[:, None], torch.where(keep, a, torch.zeros_like(a))[:, None])
    return e
