"""top_blocks (kernels/decode_select.py): the Triton kernel (the interpreter on CPU, compiled on a
GPU) against the torch reference, and the reference against torch.topk's kept sets; ties,
forced (+inf) and masked (-inf) blocks, counts 0 .. k."""
import pytest
import torch

from seer_attn.kernels.decode_select import top_blocks
from seer_attn.kernels.reference import top_blocks_ref

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
