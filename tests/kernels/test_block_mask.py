"""The block-mask helpers: block_mask_to_indices (Triton path -- the interpreter on CPU -- and
the torch path, both against a brute-force loop), causal_block_density, random_block_mask,
window_block_mask."""
import pytest
import torch

from seer_attn.kernels import (block_mask_to_indices, causal_block_density, kernel_utils, random_block_mask,
                               window_block_mask)


def _brute_force_lists(mask, causal, transpose):
    """Per row, the ascending list of selected indices, by plain python loops."""
    B, HQ, NB, _ = mask.shape
    m = mask.cpu().tolist()
    lists = {}
    for b in range(B):
        for h in range(HQ):
            for r in range(NB):
                sel = []
                for c in range(NB):
                    i, j = (c, r) if transpose else (r, c)  # (query block, key block)
                    if m[b][h][i][j] and (not causal or j <= i):
                        sel.append(c)
                lists[b, h, r] = sel
    return lists


def _check_indices(idx, cnt, mask, causal, transpose):
    B, HQ, NB, _ = mask.shape
    assert idx.dtype == torch.int32 and cnt.dtype == torch.int32
    assert idx.shape == (B, HQ, NB, NB) and cnt.shape == (B, HQ, NB)
    expected = _brute_force_lists(mask, causal, transpose)
    idx, cnt = idx.cpu().tolist(), cnt.cpu().tolist()
    for (b, h, r), sel in expected.items():
        n = cnt[b][h][r]
        assert n == len(sel), f"count of row (b{b}, h{h}, {r}): {n} != {len(sel)}"
        assert idx[b][h][r][:n] == sel, f"indices of row (b{b}, h{h}, {r}): {idx[b][h][r][:n]} != {sel}"


def _random_mask(gen, B, HQ, NB, p):
    return torch.rand(B, HQ, NB, NB, generator=gen) < p


MASK_CASES = [
    pytest.param(1, 1, 1, 0.5, id="NB1"),
    pytest.param(2, 3, 2, 0.5, id="NB2"),
    pytest.param(1, 2, 5, 0.0, id="NB5-empty"),
    pytest.param(1, 2, 5, 1.0, id="NB5-full"),
    pytest.param(2, 2, 17, 0.3, id="NB17"),
    pytest.param(1, 2, 64, 0.5, id="NB64"),
    pytest.param(1, 1, 100, 0.1, id="NB100"),
]
FLAGS = [pytest.param(c, t, id=f"{'causal' if c else 'full'}{'-T' if t else ''}")
         for c in (True, False) for t in (False, True)]


@pytest.mark.parametrize("causal, transpose", FLAGS)
@pytest.mark.parametrize("B, HQ, NB, p", MASK_CASES)
def test_indices_triton_path(B, HQ, NB, p, causal, transpose, gen, device):
    """On CUDA or in the interpreter the conversion runs the Triton kernel."""
    assert kernel_utils.HAS_TRITON and (device == "cuda" or kernel_utils.interpreting())
    mask = _random_mask(gen, B, HQ, NB, p).to(device)
    idx, cnt = block_mask_to_indices(mask, causal=causal, transpose=transpose)
    assert idx.device == mask.device
    _check_indices(idx, cnt, mask, causal, transpose)


@pytest.mark.parametrize("causal, transpose", FLAGS)
@pytest.mark.parametrize("B, HQ, NB, p", MASK_CASES)
def test_indices_torch_path(B, HQ, NB, p, causal, transpose, gen, monkeypatch):
    """CPU tensors without the interpreter take the torch path."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    mask = _random_mask(gen, B, HQ, NB, p)
    idx, cnt = block_mask_to_indices(mask, causal=causal, transpose=transpose)
    _check_indices(idx, cnt, mask, causal, transpose)


@pytest.mark.parametrize("causal, transpose", [(True, False), (True, True), (False, False)],
                         ids=["causal", "causal-T", "full"])
def test_indices_more_than_one_kernel_tile(causal, transpose, gen, device):
    """NB > 1024 (over 64k tokens): the kernel walks a row in several 1024-wide chunks."""
    NB = 1030
    mask = _random_mask(gen, 1, 1, NB, 0.5)
    mask[0, 0, NB - 1, :] = True  # a row with more than 1024 entries in the causal triangle
    idx, cnt = block_mask_to_indices(mask.to(device), causal=causal, transpose=transpose)
    _check_indices(idx, cnt, mask, causal, transpose)


def test_indices_non_contiguous_mask(gen, device):
    """An expanded (stride-0) or transposed mask view converts like its contiguous copy."""
    base = _random_mask(gen, 2, 1, 9, 0.5).to(device)
    expanded = base.expand(2, 3, 9, 9)
    transposed = _random_mask(gen, 2, 3, 9, 0.5).to(device).transpose(-1, -2)
    for m in (expanded, transposed):
        assert not m.is_contiguous()
        for causal in (True, False):
            for transpose in (False, True):
                got = block_mask_to_indices(m, causal=causal, transpose=transpose)
                _check_indices(*got, m, causal, transpose)


def _brute_force_pairs(mask, causal):
    """Per pair of query blocks (2i, 2i + 1): the ascending codes 4 * j + flags of the key blocks
    either keeps (bit 0: row 2i, bit 1: row 2i + 1), by plain python loops."""
    B, HQ, NB, _ = mask.shape
    m = mask.cpu().tolist()
    lists = {}
    for b in range(B):
        for h in range(HQ):
            for r in range((NB + 1) // 2):
                codes = []
                for j in range(NB):
                    flags = 0
                    for bit, i in ((1, 2 * r), (2, 2 * r + 1)):
                        if i < NB and m[b][h][i][j] and (not causal or j <= i):
                            flags |= bit
                    if flags:
                        codes.append(4 * j + flags)
                lists[b, h, r] = codes
    return lists


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("B, HQ, NB, p", MASK_CASES)
@pytest.mark.parametrize("path", ["triton", "torch"])
def test_pair_lists(path, B, HQ, NB, p, causal, gen, device, monkeypatch):
    """pairs=True: the union of each pair of rows with its membership flags, odd NB included
    (the last pair has one row), on the Triton kernel (interpreter / CUDA) and the torch path."""
    if path == "torch":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        device = "cpu"
    mask = _random_mask(gen, B, HQ, NB, p).to(device)
    idx, cnt = block_mask_to_indices(mask, causal=causal, pairs=True)
    R = (NB + 1) // 2
    assert idx.shape == (B, HQ, R, NB) and cnt.shape == (B, HQ, R) and idx.dtype == cnt.dtype == torch.int32
    idx, cnt = idx.cpu().tolist(), cnt.cpu().tolist()
    for (b, h, r), codes in _brute_force_pairs(mask, causal).items():
        n = cnt[b][h][r]
        assert idx[b][h][r][:n] == codes, f"pair (b{b}, h{h}, {r}): {idx[b][h][r][:n]} != {codes}"


def test_pair_lists_have_no_transpose():
    with pytest.raises(ValueError, match="pairs=True lists query-block pairs; it has no transpose"):
        block_mask_to_indices(torch.ones(1, 1, 4, 4, dtype=torch.bool), pairs=True, transpose=True)


# ----------------------------------------------------------------------------- density

def test_causal_block_density_known_masks():
    NB = 8
    tril = torch.ones(NB, NB, dtype=torch.bool).tril()
    full = torch.ones(2, 3, NB, NB, dtype=torch.bool)
    assert causal_block_density(full) == 1.0  # the upper triangle does not count
    assert causal_block_density(tril.expand(2, 3, NB, NB)) == 1.0
    diag = torch.eye(NB, dtype=torch.bool).expand(2, 3, NB, NB)
    assert causal_block_density(diag) == pytest.approx(NB / (NB * (NB + 1) / 2))
    assert causal_block_density(torch.zeros(2, 3, NB, NB, dtype=torch.bool)) == 0.0
    upper_only = torch.ones(NB, NB, dtype=torch.bool).triu(1).expand(1, 1, NB, NB)
    assert causal_block_density(upper_only) == 0.0
    assert causal_block_density(torch.ones(1, 1, 1, 1, dtype=torch.bool)) == 1.0


def test_causal_block_density_matches_count(gen):
    m = _random_mask(gen, 2, 3, 11, 0.4)
    kept = sum(bool(m[b, h, i, j]) for b in range(2) for h in range(3) for i in range(11) for j in range(i + 1))
    assert causal_block_density(m) == pytest.approx(kept / (2 * 3 * 11 * 12 / 2))


@pytest.mark.parametrize("window", [1, 63, 64, 65, 100, 128, 129, 4096], ids=lambda w: f"w{w}")
def test_window_block_mask_matches_token_visibility(window):
    """A block is reached iff some (query, key) pair in it is visible: j <= i and i - j < window."""
    NB, T = 9, 9 * 64 - 17  # a partial last block
    pos = torch.arange(T)
    vis = (pos[None, :] <= pos[:, None]) & (pos[:, None] - pos[None, :] < window)
    vis = torch.nn.functional.pad(vis, (0, NB * 64 - T, 0, NB * 64 - T)).view(NB, 64, NB, 64).any(3).any(1)
    assert torch.equal(window_block_mask(NB, window), vis)
    assert torch.equal(window_block_mask(NB, None), torch.ones(NB, NB, dtype=torch.bool).tril())


def test_causal_block_density_with_window():
    """With a window the density counts only the blocks the window reaches: keeping all of
    them is 1 whatever else is kept; the diagonal alone is NB / reached."""
    NB, window = 8, 100  # reaches the diagonal and 2 blocks back (distances 1 and 65)
    reached = window_block_mask(NB, window)
    assert int(reached.sum()) == NB + (NB - 1) + (NB - 2)
    full = torch.ones(1, 2, NB, NB, dtype=torch.bool)
    assert causal_block_density(full, window=window) == 1.0
    assert causal_block_density(reached.expand(1, 2, NB, NB), window=window) == 1.0
    diag = torch.eye(NB, dtype=torch.bool).expand(1, 2, NB, NB)
    assert causal_block_density(diag, window=window) == pytest.approx(NB / int(reached.sum()))
    outside = (~reached & torch.ones(NB, NB, dtype=torch.bool).tril()).expand(1, 2, NB, NB)
    assert causal_block_density(outside, window=window) == 0.0
    assert causal_block_density(outside) == pytest.approx((36 - 21) / 36)  # the unreached causal blocks


# ----------------------------------------------------------------------------- random masks

@pytest.mark.parametrize("density", [0.1, 0.3, 0.5, 0.9])
def test_random_block_mask_hits_density(density, gen):
    B, HQ, NB = 2, 4, 64
    m = random_block_mask(B, HQ, NB, density, generator=gen)
    assert m.dtype == torch.bool and m.shape == (B, HQ, NB, NB)
    diag = torch.eye(NB, dtype=torch.bool)
    assert m[..., diag].all(), "the diagonal must always be kept"
    assert not m[..., torch.ones(NB, NB, dtype=torch.bool).triu(1)].any(), "nothing above the diagonal"
    # 8 * 2080 causal blocks: the binomial standard deviation is < 0.004
    assert causal_block_density(m) == pytest.approx(density, abs=0.02)


def test_random_block_mask_extremes(gen):
    NB = 7
    tril = torch.ones(NB, NB, dtype=torch.bool).tril()
    diag = torch.eye(NB, dtype=torch.bool)
    assert torch.equal(random_block_mask(2, 3, NB, 0.0, generator=gen), diag.expand(2, 3, NB, NB))
    assert torch.equal(random_block_mask(2, 3, NB, 1.0, generator=gen), tril.expand(2, 3, NB, NB))
    assert not random_block_mask(2, 3, NB, 0.0, generator=gen, keep_diagonal=False).any()
    assert torch.equal(random_block_mask(1, 1, 1, 0.0, generator=gen), torch.ones(1, 1, 1, 1, dtype=torch.bool))
    # below the diagonal's own share the mask is the diagonal alone
    assert torch.equal(random_block_mask(1, 2, NB, 0.05, generator=gen), diag.expand(1, 2, NB, NB))


def test_random_block_mask_without_diagonal_hits_density(gen):
    m = random_block_mask(2, 4, 64, 0.3, generator=gen, keep_diagonal=False)
    assert causal_block_density(m) == pytest.approx(0.3, abs=0.02)


def test_random_block_mask_reproducible():
    a = random_block_mask(1, 2, 16, 0.5, generator=torch.Generator().manual_seed(3))
    b = random_block_mask(1, 2, 16, 0.5, generator=torch.Generator().manual_seed(3))
    c = random_block_mask(1, 2, 16, 0.5, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("density", [-0.1, 1.5, float("nan")])
def test_random_block_mask_rejects_bad_density(density):
    with pytest.raises(ValueError, match=rf"density must be in \[0, 1\], got {density}"):
        random_block_mask(1, 1, 4, density)
