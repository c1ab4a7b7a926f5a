"""Memory bounds, each measured in a fresh process (peak RSS above the inputs)."""

import pytest

from _memory import extra_peak_bytes

MiB = 1 << 20


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_fused_loss_extra_peak_is_under_a_quarter_of_plain(backend):
    # The case: N=2048, D=256, V=65536, fp32, forward + backward.
    common = """
    import torch.nn.functional as F
    import tiedkernels as tk
    torch.manual_seed(0)
    N, D, V = 2048, 256, 65536
    h = torch.randn(N, D, requires_grad=True)
    w = torch.randn(V, D).mul_(0.02).requires_grad_(True)
    y = torch.randint(0, V, (N,))
    """
    plain = extra_peak_bytes(common + """
    def step(h=h, w=w, y=y):
        F.cross_entropy(F.linear(h, w), y).backward()
    def warmup():
        step(h[:8].detach().requires_grad_(True), w[:64].detach().requires_grad_(True), y[:8] % 64)
    """)
    fused = extra_peak_bytes(common + f"""
    def step(h=h, w=w, y=y):
        tk.linear_cross_entropy(h, w, y, backend={backend!r}).backward()
    def warmup():
        step(h[:8].detach().requires_grad_(True), w[:64].detach().requires_grad_(True), y[:8] % 64)
    """)
    unavoidable = (65536 * 256 + 2048 * 256) * 4  # dW + dh
    assert plain > 3 * 512 * MiB / 2, plain  # sanity: plain holds the logits and their gradient
    assert fused < 0.25 * plain, (fused / MiB, plain / MiB)
    if backend == "cpu":
        # the compiled path: dW + dh + one chunk of logits (32 MiB budget) and little else
        assert fused < unavoidable + 48 * MiB, (fused / MiB, unavoidable / MiB)


def test_one_gradient_buffer_for_the_tied_weight():
    """embed -> body -> loss holds one [V, D] gradient at the peak; plain PyTorch holds two."""
    common = """
    import torch.nn.functional as F
    import tiedkernels as tk
    torch.manual_seed(0)
    V, D, B, T = 65536, 512, 4, 32
    head = tk.TiedEmbeddingHead(V, D, backend="cpu")
    body = torch.nn.Linear(D, D)
    ids = torch.randint(0, V, (B, T))
    y = torch.randint(0, V, (B, T))
    """
    plain = extra_peak_bytes(common + """
    def step(head=head, ids=ids, y=y):
        w = head.weight
        z = F.linear(body(F.embedding(ids, w)), w)
        F.cross_entropy(z.reshape(-1, w.shape[0]), y.reshape(-1)).backward()
        head.weight.grad = None
    def warmup():
        step(tk.TiedEmbeddingHead(64, D, backend="cpu"), ids % 64, y % 64)
    """)
    ours = extra_peak_bytes(common + """
    def step(head=head, ids=ids, y=y):
        head.loss(body(head(ids)), y).backward()
        head.weight.grad = None
    def warmup():
        step(tk.TiedEmbeddingHead(64, D, backend="cpu"), ids % 64, y % 64)
    """)
    buf = 65536 * 512 * 4  # one [V, D] fp32 gradient: 128 MiB
    chunk = 128 * 65536 * 4  # the fused loss's one chunk of logits (all 128 tokens here): 32 MiB
    assert plain > 2 * buf, plain / MiB
    assert ours < buf + chunk + 16 * MiB, ours / MiB
    assert plain - ours > 0.8 * buf, (plain / MiB, ours / MiB)
