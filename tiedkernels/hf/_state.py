"""What ``patch`` leaves on a patched model, read by ``_patch`` and by the TRL stand-in (``_trl``)."""

_STATE = "_tiedkernels_hf"


class _PatchState:
    def __init__(self, orig_in, orig_out, fused_loss, return_logits, labels_pos):
        self.orig_in = orig_in
        self.orig_out = orig_out
        self.fused_loss = fused_loss
        self.return_logits = return_logits
        self.labels_pos = labels_pos
        self.stack = []


def is_patched(model):
    return _STATE in model.__dict__


def fuses_loss(model):
    """True when ``model`` is patched with ``fused_loss`` on."""
    st = model.__dict__.get(_STATE)
    return st is not None and st.fused_loss
