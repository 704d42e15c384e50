"""kernels/decode_select.py: top_blocks and gate_scores, the Triton kernels (the interpreter on
CPU, compiled on a GPU) against their torch references, and the top_blocks reference against
torch.topk's kept sets; ties, forced (+inf) and masked (-inf) blocks, counts 0 .. k; the gate
scores with and without RoPE, on keys that are a slice of a larger buffer."""
import pytest
import torch

from seer_attn.kernels.decode_select import gate_scores, top_blocks
from seer_attn.kernels.reference import gate_scores_ref, top_blocks_ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _case(B, H, N, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(B, H, N, generator=gen).to(dtype)
    bias = torch.zeros(B, 1, N)
    first = torch.randint(0, max(1, N // 3), (B,), generator=gen)
    cur = torch.randint(N // 2, N, (B,), generator=gen)
    j = torch.arange(N)
    bias.masked_fill_(((j < first[:, None]) | (j > cur[:, None]))[:, None], float("-inf"))
    bias.masked_fill_(((j == first[:, None]) | (j == cur[:, None]))[:, None], float("inf"))
    n = (cur + 1 - first)[:, None].expand(B, H)
    return scores, bias, n


def test_reference_keeps_the_top_k_set_in_block_order():
    scores, bias, n = _case(3, 4, 50, 0)
    k = 9
    counts = torch.minimum(n, torch.tensor(k)).to(torch.int32)
    counts[0, 1] = 3
    counts[1, 2] = 0
    idx = top_blocks_ref(scores, bias, counts, k)
    top = torch.topk(scores + bias, k, dim=-1, sorted=True).indices
    for b in range(3):
        for h in range(4):
            c = int(counts[b, h])
            assert sorted(idx[b, h, :c].tolist()) == idx[b, h, :c].tolist()
            assert set(idx[b, h, :c].tolist()) == set(top[b, h, :c].tolist())
            assert (idx[b, h, c:] == -1).all()


def test_reference_breaks_ties_by_the_lower_index():
    scores = torch.zeros(1, 1, 8)
    bias = torch.zeros(1, 1, 8)
    bias[..., 5] = float("inf")
    idx = top_blocks_ref(scores, bias, torch.tensor([[3]]), 4)
    assert idx.tolist() == [[[0, 1, 5, -1]]]


@pytest.mark.parametrize("B, H, N, k, seed", [(2, 3, 10, 4, 0), (1, 8, 70, 13, 1), (3, 2, 300, 40, 2),
                                            (2, 2, 64, 64, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_equals_the_reference(B, H, N, k, seed, dtype):
    scores, bias, n = _case(B, H, N, seed, dtype)
    counts = torch.minimum(n, torch.tensor(k)).to(torch.int32)
    counts[0, 0] = 0
    counts[-1, -1] = min(k, int(n[-1, -1]), 2)
    got = top_blocks(scores.to(DEV), bias.to(DEV), counts.to(DEV), k, backend="triton")
    assert got.dtype == torch.int32 and got.shape == (B, H, k)
    assert torch.equal(got.cpu(), top_blocks_ref(scores, bias, counts, k))


def test_kernel_with_ties_and_negative_scores():
    scores = torch.tensor([[[-1.0, -0.5, -0.5, -0.5, 2.0, -3.0, -0.5, 0.0]]])
    bias = torch.zeros(1, 1, 8)
    bias[..., 7] = float("-inf")
    for c in range(0, 8):
        counts = torch.tensor([[c]], dtype=torch.int32)
        got = top_blocks(scores.to(DEV), bias.to(DEV), counts.to(DEV), 8, backend="triton")
        assert torch.equal(got.cpu(), top_blocks_ref(scores, bias, counts, 8)), c


def test_bad_arguments():
    s, b = torch.zeros(1, 2, 5), torch.zeros(1, 1, 5)
    c = torch.ones(1, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, N=5\], got 6"):
        top_blocks(s, b, c, 6)
    with pytest.raises(ValueError, match=r"bias must have shape \[B, 1, N\] = \(1, 1, 5\), got \(1, 2, 5\)"):
        top_blocks(s, torch.zeros(1, 2, 5), c, 2)
    with pytest.raises(ValueError, match=r"counts must have shape \[B, H\] = \(1, 2\)"):
        top_blocks(s, b, torch.ones(2, 1), 2)


# ----------------------------------------------------------------------------- gate_scores

def _gate_case(B, H, N, G, seed, dtype, rope=True):
    gen = torch.Generator().manual_seed(seed)
    y = torch.randn(H, B, 2 * G if rope else G, generator=gen).to(dtype).transpose(0, 1)  # [B, H, .] a view
    keys = torch.randn(B, H, N + 7, G, generator=gen).to(dtype)[:, :, :N]  # a slice of the cache's buffer
    e = torch.rand(B, G, generator=gen) * 6.0
    return y, keys, ((e.cos().to(dtype), e.sin().to(dtype)) if rope else None)


@pytest.mark.parametrize("B, H, N, G", [(2, 3, 1, 16), (1, 2, 63, 32), (3, 2, 64, 16), (2, 1, 130, 64)])
@pytest.mark.parametrize("rope", [True, False], ids=["rope", "no-rope"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gate_scores_kernel_equals_the_reference(B, H, N, G, rope, dtype):
    y, keys, r = _gate_case(B, H, N, G, N + G, dtype, rope)
    got = gate_scores(y.to(DEV), keys.to(DEV), tuple(t.to(DEV) for t in r) if rope else None, backend="triton")
    assert got.dtype == torch.float32 and got.shape == (B, H, N)
    want = gate_scores_ref(y, keys, r)
    torch.testing.assert_close(got.cpu(), want, atol=1e-4 * G ** 0.5, rtol=1e-4)


def test_gate_scores_reference_rotates_then_scores():
    """The reference by hand: the partner columns times sin added to the map's times cos."""
    y, keys, (cos, sin) = _gate_case(2, 2, 5, 16, 0, torch.float32)
    q = y[..., :16] * cos[:, None] + y[..., 16:] * sin[:, None]
    want = torch.stack([torch.stack([keys[b, h] @ q[b, h] for h in range(2)]) for b in range(2)])
    torch.testing.assert_close(gate_scores_ref(y, keys, (cos, sin)), want)
    torch.testing.assert_close(gate_scores(y, keys, (cos, sin), backend="torch"), want)


def test_gate_scores_bad_arguments():
    y, keys, r = _gate_case(2, 3, 5, 16, 0, torch.float32)
    with pytest.raises(ValueError, match=r"y must have shape \[B, H, 2G\] = \(2, 3, 32\), got \(2, 3, 16\)"):
        gate_scores(y[..., :16], keys, r)
    with pytest.raises(ValueError, match=r"y must have shape \[B, H, G\] = \(2, 3, 16\), got \(2, 3, 32\)"):
        gate_scores(y, keys)
    with pytest.raises(ValueError, match=r"rope must be \(cos, sin\) of shape \[B, G\]"):
        gate_scores(y, keys, (r[0][:1], r[1]))
    with pytest.raises(ValueError, match=r"keys must be \[B, H, N, G\], got shape \(3, 5, 16\)"):
        gate_scores(y, keys[0], r)
    with pytest.raises(ValueError, match="backend must be 'auto', 'triton' or 'torch', got 'cuda'"):
        gate_scores(y, keys, r, backend="cuda")
    y24, keys24, r24 = _gate_case(1, 1, 4, 24, 0, torch.float32)
    with pytest.raises(ValueError, match="needs G a power of two >= 16, got 24"):
        gate_scores(y24, keys24, r24, backend="triton")
    torch.testing.assert_close(gate_scores(y24, keys24, r24), gate_scores_ref(y24, keys24, r24))  # auto: torch
