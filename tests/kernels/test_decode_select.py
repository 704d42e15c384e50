"""kernels/decode_select.py: top_blocks, gate_scores and gate_top_blocks, the Triton kernels (the interpreter on
CPU, compiled on a GPU) against their torch references, and the top_blocks reference against
torch.topk's kept sets; ties, forced (+inf) and masked (-inf) blocks, counts 0 .. k; the gate
scores with and without RoPE, on keys that are a slice of a larger buffer."""
import pytest
import torch

from seer_attn.kernels import decode_select
from seer_attn.kernels.decode_select import gate_scores, gate_top_blocks, prior_mix, top_blocks
from seer_attn.kernels.reference import gate_scores_ref, prior_mix_ref, top_blocks_ref

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
@pytest.mark.parametrize("early", [False, True], ids=["bisect", "bisect-early-stop"])
def test_kernel_equals_the_reference(monkeypatch, B, H, N, k, seed, dtype, early):
    monkeypatch.setattr(decode_select, "TOP_BLOCKS_EARLY_STOP", early)
    scores, bias, n = _case(B, H, N, seed, dtype)
    counts = torch.minimum(n, torch.tensor(k)).to(torch.int32)
    counts[0, 0] = 0
    counts[-1, -1] = min(k, int(n[-1, -1]), 2)
    got = top_blocks(scores.to(DEV), bias.to(DEV), counts.to(DEV), k, backend="triton")
    assert got.dtype == torch.int32 and got.shape == (B, H, k)
    assert torch.equal(got.cpu(), top_blocks_ref(scores, bias, counts, k))


@pytest.mark.parametrize("early", [False, True], ids=["bisect", "bisect-early-stop"])
def test_kernel_with_ties_and_negative_scores(monkeypatch, early):
    monkeypatch.setattr(decode_select, "TOP_BLOCKS_EARLY_STOP", early)
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

def _gate_case(B, H, N, G, seed, dtype, rope=True, partner=True):
    """``rope`` with ``partner``: y ``[B, H, 2G]``, the partner columns given; without: ``[B, H, G]``."""
    gen = torch.Generator().manual_seed(seed)
    width = 2 * G if rope and partner else G
    y = torch.randn(H, B, width, generator=gen).to(dtype).transpose(0, 1)  # [B, H, .] a view
    keys = torch.randn(B, H, N + 7, G, generator=gen).to(dtype)[:, :, :N]  # a slice of the cache's buffer
    e = torch.rand(B, G, generator=gen) * 6.0
    return y, keys, ((e.cos().to(dtype), e.sin().to(dtype)) if rope else None)


ROPES = [(True, True), (True, False), (False, True)]
ROPE_IDS = ["rope-partner-columns", "rope-rotated", "no-rope"]


@pytest.mark.parametrize("B, H, N, G", [(2, 3, 1, 16), (1, 2, 63, 32), (3, 2, 64, 16), (2, 1, 130, 64)])
@pytest.mark.parametrize("rope, partner", ROPES, ids=ROPE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gate_scores_kernel_equals_the_reference(B, H, N, G, rope, partner, dtype):
    y, keys, r = _gate_case(B, H, N, G, N + G, dtype, rope, partner)
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


def test_gate_scores_reference_makes_the_partner_columns_as_rotate_half():
    """A query of width G with rope scores as the same query with its partner columns
    ``[-y[G/2:], y[:G/2]]`` (the gate's ``_rotate_half``) given after it."""
    from seer_attn.modeling_seer.gate import _rotate_half
    y, keys, r = _gate_case(2, 3, 9, 16, 1, torch.float32, partner=False)
    want = gate_scores_ref(torch.cat([y, _rotate_half(y)], -1), keys, r)
    torch.testing.assert_close(gate_scores_ref(y, keys, r), want)
    torch.testing.assert_close(gate_scores(y.to(DEV), keys.to(DEV), tuple(t.to(DEV) for t in r),
                                           backend="triton").cpu(), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("fmt", ["i8", "f8"])
def test_eight_bit_keys_round_trip_and_score(fmt):
    """eight_bit_keys: the keys' dtype, one scale per row, the round trip within the format's
    rounding (int8: half a step of the row's scale; float8 e4m3: 2^-4 relative to the row's largest
    magnitude), a zero row kept finite; gate_scores' torch path on 8-bit keys and scales equals the
    reference on the rounded-back keys."""
    from seer_attn.kernels.decode_select import eight_bit_keys
    y, keys, r = _gate_case(2, 3, 40, 32, 4, torch.float32)
    keys[1, 2, 7] = 0.0
    k8, sc = eight_bit_keys(keys, fmt)
    assert k8.dtype == {"i8": torch.int8, "f8": torch.float8_e4m3fn}[fmt] and sc.shape == (2, 3, 40)
    back = k8.float() * sc[..., None]
    step = {"i8": 0.5 / 127, "f8": 2.0 ** -4}[fmt] * keys.abs().amax(-1, keepdim=True)
    assert ((back - keys).abs() <= step + 1e-7).all()
    assert torch.isfinite(sc).all() and (back[1, 2, 7] == 0).all()
    torch.testing.assert_close(gate_scores(y, k8, r, backend="torch", key_scales=sc), gate_scores_ref(y, back, r))


@pytest.mark.parametrize("rope, partner", ROPES, ids=ROPE_IDS)
def test_gate_scores_kernel_on_int8_keys(rope, partner):
    """The Triton kernel on int8 keys with their scales (the interpreter has no float8: that runs
    on the GPU, tests/kernels/test_gpu_decode.py) equals the reference on the rounded-back keys,
    with a partial chunk of blocks and keys sliced from a larger buffer."""
    from seer_attn.kernels.decode_select import eight_bit_keys
    y, keys, r = _gate_case(2, 2, 70, 16, 9, torch.float32, rope, partner)
    k8, sc = eight_bit_keys(keys, "i8")
    big = torch.zeros(2, 2, 80, 16, dtype=torch.int8)
    big[:, :, :70] = k8
    got = gate_scores(y.to(DEV), big[:, :, :70].to(DEV), tuple(t.to(DEV) for t in r) if rope else None,
                      backend="triton", key_scales=sc.to(DEV))
    want = gate_scores_ref(y, k8.float() * sc[..., None], r)
    torch.testing.assert_close(got.cpu(), want, atol=1e-4 * 16 ** 0.5, rtol=1e-4)


def test_gate_scores_bad_arguments():
    y, keys, r = _gate_case(2, 3, 5, 16, 0, torch.float32)
    with pytest.raises(ValueError, match=r"y must have shape \[B, H, G\] = \(2, 3, 16\) or \[B, H, 2G\] = "
                                         r"\(2, 3, 32\) with rope, got \(2, 3, 24\)"):
        gate_scores(y[..., :24], keys, r)
    with pytest.raises(ValueError, match=r"y must have shape \[B, H, G\] = \(2, 3, 16\) without rope, "
                                         r"got \(2, 3, 32\)"):
        gate_scores(y, keys)
    with pytest.raises(ValueError, match=r"rope must be \(cos, sin\) of shape \[B, G\]"):
        gate_scores(y, keys, (r[0][:1], r[1]))
    with pytest.raises(ValueError, match=r"keys must be \[B, H, N, G\], got shape \(3, 5, 16\)"):
        gate_scores(y, keys[0], r)
    from seer_attn.kernels.decode_select import eight_bit_keys
    k8, sc = eight_bit_keys(keys, "i8")
    with pytest.raises(ValueError, match=r"key_scales goes with 8-bit keys and only with them; keys are "
                                         r"torch.int8, key_scales is None"):
        gate_scores(y, k8, r)
    with pytest.raises(ValueError, match=r"keys are torch.float32, key_scales is given"):
        gate_scores(y, keys, r, key_scales=sc)
    with pytest.raises(ValueError, match=r"key_scales must be float \[B, H, N\] = \(2, 3, 5\), got torch.float32 "
                                         r"\(2, 3, 4\)"):
        gate_scores(y, k8, r, key_scales=sc[..., :4])
    with pytest.raises(ValueError, match=r"8-bit keys must be float8_e4m3fn or int8, got torch.uint8"):
        gate_scores(y, k8.view(torch.uint8), r, key_scales=sc)
    with pytest.raises(ValueError, match=r"8-bit key format must be one of \['f8', 'i8'\], got 'u8'"):
        eight_bit_keys(keys, "u8")
    with pytest.raises(ValueError, match=r"gate_top_blocks takes 16 or 32-bit keys, got torch.int8"):
        gate_top_blocks(y, k8, r, torch.zeros(2, 1, 5), torch.ones(2, 3, dtype=torch.int32), 2)
    with pytest.raises(ValueError, match="backend must be 'auto', 'triton' or 'torch', got 'cuda'"):
        gate_scores(y, keys, r, backend="cuda")
    y24, keys24, r24 = _gate_case(1, 1, 4, 24, 0, torch.float32)
    with pytest.raises(ValueError, match="needs G a power of two >= 16, got 24"):
        gate_scores(y24, keys24, r24, backend="triton")
    torch.testing.assert_close(gate_scores(y24, keys24, r24), gate_scores_ref(y24, keys24, r24))  # auto: torch


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_top_blocks_passes_of_several_bits_equal_the_reference(monkeypatch, bits):
    """The selection settling 2, 4 or 8 key bits per pass (16 / 8 passes of counts, 4 of a
    histogram) keeps the bisection's blocks: ties, forced and masked blocks, counts 0 .. k."""
    monkeypatch.setattr(decode_select, "TOP_BLOCKS_BITS", bits)
    for B, H, N, k, seed in [(2, 3, 10, 4, 0), (3, 2, 300, 40, 2)]:
        scores, bias, n = _case(B, H, N, seed, torch.float16)
        counts = torch.minimum(n, torch.tensor(k)).to(torch.int32)
        counts[0, 0] = 0
        got = top_blocks(scores.to(DEV), bias.to(DEV), counts.to(DEV), k, backend="triton")
        assert torch.equal(got.cpu(), top_blocks_ref(scores, bias, counts, k))


@pytest.mark.parametrize("spread", ["near", "negative", "mixed"])
def test_top_blocks_radix_select_settles_every_key_byte(monkeypatch, spread):
    """The radix select (TOP_BLOCKS_BITS = 8) on float32 scores whose keys share their high bytes
    (1 + 1e-6 noise: the choice falls in the low bytes), all negative, or of both signs with
    repeats: the reference's blocks, counts 0 .. k and every valid block."""
    monkeypatch.setattr(decode_select, "TOP_BLOCKS_BITS", 8)
    B, H, N, k = 2, 3, 200, 60
    scores, bias, n = _case(B, H, N, 7)
    gen = torch.Generator().manual_seed(8)
    if spread == "near":
        scores = 1.0 + 1e-6 * torch.randint(0, 50, scores.shape, generator=gen).float()
    elif spread == "negative":
        scores = -scores.abs() - 1e-3
    else:
        scores = torch.randint(-4, 5, scores.shape, generator=gen).float() * 0.5
    counts = torch.minimum(n, torch.tensor(k)).to(torch.int32)
    counts[0, 0], counts[1, 2] = 0, 1
    counts[1, 1] = min(int(n[1, 1]), k)
    got = top_blocks(scores.to(DEV), bias.to(DEV), counts.to(DEV), k, backend="triton")
    assert torch.equal(got.cpu(), top_blocks_ref(scores, bias, counts, k))


# ----------------------------------------------------------------------------- gate_top_blocks

@pytest.mark.parametrize("B, H, N, G, k", [(2, 3, 1, 16, 1), (1, 2, 63, 32, 9), (2, 2, 130, 16, 20)])
@pytest.mark.parametrize("rope, partner", ROPES, ids=ROPE_IDS)
@pytest.mark.parametrize("bits, split", [(1, 1), (0, 1), (2, 3), (8, 1)],
                         ids=["bisect", "bisect-early-stop", "bits2-split3", "radix"])
def test_gate_top_blocks_equals_scores_then_selection(monkeypatch, B, H, N, G, k, rope, partner, bits, split):
    """The one-launch gate + selection keeps what the references keep: the torch scores (float32
    keys, so no near-ties move) then top_blocks' reference, with forced and masked blocks and
    counts from 0 to k; chunks of 32 keys, so rows of several chunks and a partial one; one
    program per row, or three scoring a part each (the last selects). Bits 0: bisection with the
    early stop."""
    monkeypatch.setattr(decode_select, "TOP_BLOCKS_BITS", max(bits, 1))
    monkeypatch.setattr(decode_select, "TOP_BLOCKS_EARLY_STOP", bits == 0)
    monkeypatch.setattr(decode_select, "FUSED_SPLIT", split)
    monkeypatch.setattr(decode_select, "FUSED_CHUNK", 32)
    y, keys, r = _gate_case(B, H, N, G, N + G, torch.float32, rope, partner)
    _, bias, n = _case(B, H, N, N) if N > 1 else (None, torch.zeros(B, 1, 1), torch.ones(B, H, dtype=torch.long))
    counts = torch.minimum(n, torch.tensor(k)).to(torch.int32)
    counts[0, 0] = 0
    got = gate_top_blocks(y.to(DEV), keys.to(DEV), tuple(t.to(DEV) for t in r) if rope else None, bias.to(DEV),
                          counts.to(DEV), k, backend="triton")
    assert got.dtype == torch.int32 and got.shape == (B, H, k)
    assert torch.equal(got.cpu(), top_blocks_ref(gate_scores_ref(y, keys, r), bias, counts, k))


def test_gate_top_blocks_bad_arguments_and_torch_path():
    y, keys, r = _gate_case(2, 3, 5, 16, 0, torch.float32)
    bias, counts = torch.zeros(2, 1, 5), torch.full((2, 3), 2, dtype=torch.int32)
    want = top_blocks_ref(gate_scores_ref(y, keys, r), bias, counts, 3)
    assert torch.equal(gate_top_blocks(y, keys, r, bias, counts, 3, backend="torch"), want)
    with pytest.raises(ValueError, match=r"y must have shape \[B, H, G\] = \(2, 3, 16\) or \[B, H, 2G\]"):
        gate_top_blocks(y[..., :20], keys, r, bias, counts, 3, backend="triton")
    with pytest.raises(ValueError, match=r"bias must have shape \[B, 1, N\] = \(2, 1, 5\), got \(2, 3, 5\)"):
        gate_top_blocks(y, keys, r, torch.zeros(2, 3, 5), counts, 3, backend="triton")
    with pytest.raises(ValueError, match=r"counts must have shape \[B, H\] = \(2, 3\), got \(3, 2\)"):
        gate_top_blocks(y, keys, r, bias, counts.T, 3, backend="triton")
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, N=5\], got 0"):
        gate_top_blocks(y, keys, r, bias, counts, 0, backend="triton")
    with pytest.raises(ValueError, match=r"keys must be \[B, H, N, G\], got shape \(3, 5, 16\)"):
        gate_top_blocks(y, keys[0], r, bias, counts, 3)


def _prior_case(B, HQ, H, N, D, dtype, seed=0):
    """Logits, queries, means (a slice of a larger buffer) and full masks: sequences with their first
    full block past 0 (left padding), one with none, one whose every block is full."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, H, N, generator=gen) * 3
    q = torch.randn(B, HQ, 1, D, generator=gen).to(dtype)
    means = torch.randn(B, H, N + 5, D, generator=gen).to(dtype)[:, :, :N]
    j = torch.arange(N)
    first = torch.randint(0, max(1, N // 2), (B,), generator=gen)
    cur = torch.randint(0, N + 1, (B,), generator=gen)
    cur[0], first[-1], cur[-1] = 0, 0, N  # row 0: no full block; the last: all of them
    full = ((j[None] >= first[:, None]) & (j[None] < cur[:, None]))[:, None]
    return logits, q, means, full


@pytest.mark.parametrize("B, HQ, H, N, D", [(3, 6, 2, 7, 16), (2, 9, 3, 130, 32), (4, 4, 4, 64, 64),
                                            (2, 8, 2, 300, 16)])
@pytest.mark.parametrize("weight", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_prior_mix_kernel_equals_the_reference(B, HQ, H, N, D, weight, dtype):
    """Groups of 1 to 4 heads (3: padded), rows of 1 to 5 chunks, the mixture's ends included."""
    logits, q, means, full = _prior_case(B, HQ, H, N, D, dtype)
    got = prior_mix(logits.to(DEV), q.to(DEV), means.to(DEV), full.to(DEV), D ** -0.5, weight, backend="triton")
    assert got.dtype == torch.float32 and got.shape == (B, H, N)
    want = prior_mix_ref(logits, q, means, full, D ** -0.5, weight)
    assert (got.cpu()[~full.expand(B, H, N)] == 0).all()
    # float16: the reference's matmul rounds each score to float16 (the kernel keeps float32), ~5e-4 of |s| <= 4
    tol = 2e-4 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(got.cpu(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("dot, chunk", [(False, 64), (True, 128), (False, 256)])
def test_prior_mix_kernel_variants_equal_the_reference(monkeypatch, dot, chunk):
    """The launch variants a benchmark may pick (decode_select.PRIOR_DOT, PRIOR_CHUNK): the broadcast
    product instead of tl.dot for 16-bit means, and programs of 2 or 4 sub-tiles of blocks."""
    from seer_attn.kernels import decode_select
    monkeypatch.setattr(decode_select, "PRIOR_DOT", dot)
    monkeypatch.setattr(decode_select, "PRIOR_CHUNK", chunk)
    B, HQ, H, N, D = 2, 9, 3, 300, 32
    logits, q, means, full = _prior_case(B, HQ, H, N, D, torch.float16, seed=chunk)
    got = prior_mix(logits.to(DEV), q.to(DEV), means.to(DEV), full.to(DEV), D ** -0.5, 0.5, backend="triton")
    torch.testing.assert_close(got.cpu(), prior_mix_ref(logits, q, means, full, D ** -0.5, 0.5), atol=2e-3, rtol=2e-3)


def test_prior_mix_reference_by_hand():
    """The reference written out per KV head: log of the gate's softmax and of the group's mean of
    each head's softmax over the full blocks, mixed; 0 elsewhere."""
    logits, q, means, full = _prior_case(2, 6, 2, 9, 16, torch.float32, seed=4)
    got = prior_mix_ref(logits, q, means, full, 0.3, 0.25)
    b = 1
    blocks = full[b, 0].nonzero().flatten()
    for h in range(2):
        pg = torch.softmax(logits[b, h, blocks], -1)
        pm = torch.stack([torch.softmax(0.3 * means[b, h, blocks] @ q[b, h * 3 + r, 0], -1) for r in range(3)]).mean(0)
        torch.testing.assert_close(got[b, h, blocks], 0.75 * pg.log() + 0.25 * pm.log())
    assert (got[0] == 0).all()  # row 0 has no full block


def test_prior_mix_bad_arguments():
    logits, q, means, full = _prior_case(2, 6, 2, 9, 16, torch.float32)
    with pytest.raises(ValueError,
                       match=r"means must have shape \[B, H, N, D\] = \(2, 2, 9, 16\), got \(2, 2, 8, 16\)"):
        prior_mix(logits, q, means[:, :, :8], full, 0.25, 0.5)
    with pytest.raises(ValueError, match=r"q must be \[B, HQ, 1, D\] with B = 2 and HQ a multiple of H = 2"):
        prior_mix(logits, q[:, :5], means, full, 0.25, 0.5)
    with pytest.raises(ValueError, match="full must be bool of shape"):
        prior_mix(logits, q, means, full.float(), 0.25, 0.5)
    with pytest.raises(ValueError, match=r"weight must be in \[0, 1\], got 1.5"):
        prior_mix(logits, q, means, full, 0.25, 1.5)
    with pytest.raises(ValueError, match="backend must be 'auto', 'triton' or 'torch', got 'gpu'"):
        prior_mix(logits, q, means, full, 0.25, 0.5, backend="gpu")
    l24, q24, m24, f24 = _prior_case(1, 2, 1, 4, 24, torch.float32)
    with pytest.raises(ValueError, match="needs D a power of two >= 16, got 24"):
        prior_mix(l24, q24, m24, f24, 0.2, 0.5, backend="triton")
    torch.testing.assert_close(prior_mix(l24, q24, m24, f24, 0.2, 0.5), prior_mix_ref(l24, q24, m24, f24, 0.2, 0.5))


@pytest.mark.parametrize("NB, cur, local, heads", [(10, 7, 0, 1), (300, 250, 1, 3), (64, 0, 0, 8), (5000, 4999, 2, 20),
                                                   (200, 150, 0, 17)])
@pytest.mark.parametrize("share", [None, 0.1, 0.3])
def test_decode_window_equals_the_reference(NB, cur, local, heads, share):
    """A graph step's top-k bias and counts in one launch: exactly the torch reference, with sequences
    whose sink is block 0, later, the current block itself; rows longer than one program's chunk
    (5000 blocks) and more heads than one store (17, 20)."""
    from seer_attn.kernels.decode_select import decode_window
    from seer_attn.kernels.reference import decode_window_ref
    first = torch.tensor([0, 3, min(cur, 9), cur], device=DEV)
    c = torch.tensor(cur, device=DEV)
    k = min(NB, max(2 + local, 32 if share is None else -(-int(share * NB * 1000) // 1000)))
    got = decode_window(first, c, NB, local, heads, k, share, backend="triton")
    want = decode_window_ref(first, c, NB, local, heads, k, share)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert got[0].shape == (4, 1, NB) and got[1].shape == (4, heads) and got[1].dtype == torch.int32
    if cur >= 3:
        assert got[0][1, 0, 3] == float("inf") and got[0][1, 0, 2] == float("-inf")  # the sink kept, padding out
    if cur + 1 < NB:
        assert got[0][0, 0, cur + 1] == float("-inf")  # after the current block
