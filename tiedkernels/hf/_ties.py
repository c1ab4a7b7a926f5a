"""Tie diagnostics: which parameters share storage, which declared ties are broken, what tying saves."""

import dataclasses
import re

import torch


@dataclasses.dataclass
class TieReport:
    """What ``inspect_ties`` found.

    ``groups``: lists of parameter/buffer names that share one storage (two or more names each).
    ``declared``: ``(target, source)`` ties the model declares (``_tied_weights_keys`` with
    ``tie_word_embeddings`` in its config, or ``get_output_embeddings``/``get_input_embeddings``).
    ``broken``: ``(target, source, why)`` for each declared tie whose two names do not share storage.
    ``bytes_saved``: bytes not allocated because names share storage.
    ``checkpoint``: for a saved model, ``{group's first name: names the checkpoint stores}``.
    """

    model: str
    tie_word_embeddings: object
    groups: list
    declared: list
    broken: list
    bytes_saved: int
    checkpoint: dict = dataclasses.field(default_factory=dict)
    notes: list = dataclasses.field(default_factory=list)

    @property
    def ok(self):
        return not self.broken

    def __str__(self):
        lines = [f"{self.model}: tie_word_embeddings={self.tie_word_embeddings}"]
        if self.groups:
            lines.append("shared storage:")
            for g in self.groups:
                lines.append("  " + " = ".join(g))
                if g[0] in self.checkpoint:
                    stored = self.checkpoint[g[0]]
                    what = "not stored" if not stored else (f"stored once as {stored[0]}" if len(stored) == 1 else
                                                             f"stored {len(stored)} times: {', '.join(stored)}")
                    lines.append(f"    checkpoint: {what}")
        else:
            lines.append("shared storage: none")
        lines.append("declared ties:" if self.declared else "declared ties: none")
        for t, s in self.declared:
            lines.append(f"  {t} -> {s}")
        if self.broken:
            lines.append("BROKEN ties:")
            for t, s, why in self.broken:
                lines.append(f"  {t} -> {s}: {why}")
        else:
            lines.append("broken ties: none")
        lines.append(f"bytes saved by tying: {self.bytes_saved:,} ({self.bytes_saved / 2**20:.2f} MiB)")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _named_tensors(model):
    out = list(model.named_parameters(remove_duplicate=False))
    out += [(n, b) for n, b in model.named_buffers(remove_duplicate=False) if b is not None]
    return out


def _storage_key(t):
    if t.device.type == "meta":
        return ("meta", id(t))
    return (t.device.type, t.device.index, t.untyped_storage().data_ptr())


def _storage_nbytes(t):
    if t.device.type == "meta":
        return t.numel() * t.element_size()
    return t.untyped_storage().nbytes()


def _groups(named):
    by = {}
    for n, t in named:
        by.setdefault(_storage_key(t), []).append((n, t))
    groups, saved = [], 0
    for members in by.values():
        if len(members) < 2:
            continue
        groups.append([n for n, _ in members])
        total = sum(t.numel() * t.element_size() for _, t in members)
        saved += max(0, total - _storage_nbytes(members[0][1]))
    return groups, saved


def _module_names(model, target):
    return [n for n, m in model.named_modules(remove_duplicate=False) if m is target]


def _declared(model):
    """(target, source) pairs the model declares."""
    pairs = []
    config = getattr(model, "config", None)
    expand = getattr(model, "get_expanded_tied_weights_keys", None)
    if expand is not None:  # transformers v5
        try:
            return sorted(expand(all_submodels=True).items())
        except Exception:  # an odd model: fall back to the embeddings below
            pass
    wants = True
    if config is not None:
        try:
            text = config.get_text_config(decoder=True)
        except Exception:
            text = config
        wants = getattr(text, "tie_word_embeddings", getattr(config, "tie_word_embeddings", True))
    if not wants or not hasattr(model, "get_output_embeddings"):
        return pairs
    try:
        inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    except Exception:
        return pairs
    if inp is None or out is None:
        return pairs
    src = _module_names(model, inp)
    if not src:
        return pairs
    source = src[0] + ".weight"
    for n in src[1:] + _module_names(model, out):
        pairs.append((n + ".weight", source))
    # v4 list patterns (e.g. BERT's decoder bias): each matching name must share storage with something
    keys = getattr(model, "_tied_weights_keys", None) or []
    if isinstance(keys, (list, tuple)):
        names = [n for n, _ in _named_tensors(model)]
        for pat in keys:
            for n in names:
                if re.search(pat, n) and n.endswith("bias"):
                    pairs.append((n, "(any other name)"))
    return sorted(set(pairs))


def same_values(a, b, chunk=1 << 22):
    """Whether two tensors of one shape and device hold the same values (compared in the promoted
    dtype, as ``torch.equal``), NaN equal to NaN: a copy of memory that ``to_empty`` left uninitialized
    can hold NaNs and is still a copy. Temporaries stay within ``chunk`` elements (weights are large)."""
    a, b = a.detach(), b.detach()
    if a.shape != b.shape or a.device != b.device:
        return False
    if torch.equal(a, b):
        return True
    common = torch.promote_types(a.dtype, b.dtype)
    if not (common.is_floating_point or common.is_complex):
        return False  # no NaN: torch.equal's answer stands
    if a.dim() == 0:
        a, b = a.reshape(1), b.reshape(1)
    rows = max(1, chunk // max(1, a[0].numel()))  # slices of whole rows: no copy of a strided weight
    for i in range(0, a.shape[0], rows):
        x, y = a[i:i + rows].to(common), b[i:i + rows].to(common)
        if not bool(torch.isclose(x, y, rtol=0, atol=0, equal_nan=True).all()):
            return False
    return True


def inspect_ties(model, *, verbose=True):
    """Report the storage shared by ``model``'s parameters and buffers, the ties it declares and
    whether any is broken, and the bytes tying saves. Prints the report when ``verbose``; returns a
    ``TieReport``. Works on real and meta-device models (no data is read)."""
    named = _named_tensors(model)
    groups, saved = _groups(named)
    tensors = dict(named)
    key_of = {n: _storage_key(t) for n, t in named}
    declared = _declared(model)
    broken = []
    for t, s in declared:
        if t not in tensors:
            broken.append((t, s, f"{t} is not a parameter of the model"))
        elif s == "(any other name)":
            if sum(1 for k in key_of.values() if k == key_of[t]) < 2:
                broken.append((t, s, "shares storage with no other name"))
        elif s not in tensors:
            broken.append((t, s, f"{s} is not a parameter of the model"))
        elif key_of[t] != key_of[s]:
            why = "different tensors"
            a, b = tensors[t], tensors[s]
            if a.shape != b.shape:
                why += f" of shapes {tuple(a.shape)} and {tuple(b.shape)}"
            elif a.device.type != "meta" and b.device.type != "meta" and same_values(a, b):
                why += " (equal values, separate copies: e.g. cloned or re-created by to_empty)"
            broken.append((t, s, why))
    config = getattr(model, "config", None)
    tie = getattr(config, "tie_word_embeddings", None) if config is not None else None
    report = TieReport(model=type(model).__name__, tie_word_embeddings=tie, groups=groups, declared=declared,
                       broken=broken, bytes_saved=saved)
    if verbose:
        print(report)
    return report


def inspect_saved(path, *, verbose=True):
    """``inspect_ties`` for a saved model folder (config.json + safetensors): the model is built on the
    meta device from its config and only the safetensors headers are read."""
    import glob
    import os

    import transformers
    from safetensors import safe_open

    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    cls = None
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            break
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    dtypes = {}
    for f in files:
        with safe_open(f, "pt") as fh:
            for k in fh.keys():
                dt = _DTYPES.get(fh.get_slice(k).get_dtype())
                if dt is not None and dt.is_floating_point:
                    dtypes[dt] = dtypes.get(dt, 0) + 1
    with torch.device("meta"):
        if cls is not None:
            model = cls(config)
        else:
            model = transformers.AutoModelForCausalLM.from_config(config)
    if dtypes:  # count bytes in the checkpoint's precision
        model.to(max(dtypes, key=dtypes.get))
    report = inspect_ties(model, verbose=False)
    report.model = f"{type(model).__name__} from {path}"
    if not files:
        report.notes.append("no .safetensors file in the folder: checkpoint contents not checked")
    stored, where = {}, {}
    for f in files:
        with safe_open(f, "pt") as fh:
            for k in fh.keys():
                stored[k] = fh.get_slice(k).get_shape()
                where[k] = f
    for g in report.groups:
        report.checkpoint[g[0]] = [n for n in g if n in stored]
        present = report.checkpoint[g[0]]
        if len(present) > 1 and not _same_on_disk(present, where):
            report.broken.append((present[1], present[0], "the checkpoint stores both with different values: "
                                  "transformers will not tie them when loading"))
    if files:
        missing = [n for n, _ in model.named_parameters() if n not in stored
                   and not any(n in g for g in report.groups if report.checkpoint.get(g[0]))]
        if missing:
            report.notes.append(f"{len(missing)} parameter(s) not in the checkpoint: {', '.join(missing[:5])}"
                                + (" ..." if len(missing) > 5 else ""))
    if verbose:
        print(report)
    return report


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "BOOL": torch.bool}


def _same_on_disk(names, where, rows=4096):
    """Compare tensors stored under several names chunk by chunk (never whole)."""
    from safetensors import safe_open

    handles = [safe_open(where[n], "pt") for n in names]
    slices = [h.get_slice(n) for h, n in zip(handles, names)]
    shapes = [tuple(s.get_shape()) for s in slices]
    if len(set(shapes)) != 1:
        return False
    n = shapes[0][0] if shapes[0] else 1
    for start in range(0, n, rows):
        parts = [s[start:start + rows] if shapes[0] else s[:] for s in slices]
        if not all(same_values(parts[0], p) for p in parts[1:]):
            return False
    return True
