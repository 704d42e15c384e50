"""Compiled block_sparse_decode on a CUDA GPU at real shapes (Llama-3.1-8B attention: 32 query /
8 KV heads, head_dim 128; caches of 32k and 128k slots), bf16 (which the CPU interpreter cannot
check) and fp16, against the fp32 torch reference, the reference in low precision and SDPA.
Skipped without CUDA.

Tolerance (style guide): error against the fp32 reference on the same (upcast) inputs <= 2x
the error of a low-precision baseline plus a small slack, and <= a hard cap.
"""
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from kernel_inputs import nb as _nb, randn, up as _up

from seer_attn.kernels import block_sparse_decode, block_sparse_decode_ref

pytestmark = pytest.mark.requires_cuda
_randn = partial(randn, device="cuda")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
OUT_BUDGET = {torch.bfloat16: dict(slack=4e-3, cap=5e-2), torch.float16: dict(slack=1e-3, cap=2e-2)}
HQ, H, D = 32, 8, 128


@pytest.fixture(autouse=True)
def _exact_fp32_matmul():
    """The fp32 reference must be fp32: no TF32 in torch's matmuls while these tests run."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old
    torch.cuda.empty_cache()


@pytest.fixture(params=[False, True], ids=["ptr", "tma"])
def loads(request, monkeypatch):
    """The kernel's K/V loads: pointers (the default) or tensor descriptors
    (``DECODE_OPTIONS["tma"]``); with descriptors, checks after the test that they were built."""
    mod = __import__("seer_attn.kernels.block_sparse_decode", fromlist=["DECODE_OPTIONS"])
    built = []
    if request.param:
        monkeypatch.setitem(mod.DECODE_OPTIONS, "tma", True)
        monkeypatch.setattr(mod, "TensorDescriptor", lambda *a, _td=mod.TensorDescriptor: built.append(a) or _td(*a))
    yield request.param
    assert bool(built) == request.param


def _cache(gen, B, S, dt):
    q = _randn(gen, (B, HQ, 1, D), dt)
    k = _randn(gen, (B, H, S, D), dt)
    v = _randn(gen, (B, H, S, D), dt)
    return q, k, v


def _topk_selection(gen, B, S, share):
    """Int block indices [B, H, K] as the model makes them: ``share`` of the blocks by random
    scores, plus the first and the last (current) block."""
    NB = _nb(S)
    K = max(2, int(share * NB))
    scores = torch.rand(B, H, NB, generator=gen)
    scores[..., 0] = 2.0
    scores[..., -1] = 3.0
    return torch.topk(scores, K, dim=-1).indices.cuda()


CASES = [pytest.param(B, S, dtype, id=f"B{B}-S{S}-gqa4-d128-{dtype}")
         for B, S in ((1, 131072), (4, 32768 + 37)) for dtype in ("bf16", "fp16")]


@pytest.mark.parametrize("B, S, dtype", CASES)
def test_sparse_vs_reference(B, S, dtype, gen, error_budget, loads):
    dt = DTYPES[dtype]
    q, k, v = _cache(gen, B, S, dt)
    idx = _topk_selection(gen, B, S, 0.1)
    lens = torch.full((B,), S, device="cuda")
    out = block_sparse_decode(q, k, v, idx, lens, backend="triton")
    ref32 = block_sparse_decode_ref(*_up(q, k, v), idx, lens)
    ref_lp = block_sparse_decode_ref(q, k, v, idx, lens, upcast=False)
    error_budget(out, ref32, ref_lp, **OUT_BUDGET[dt])


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_all_blocks_vs_sdpa(dtype, gen, error_budget, loads):
    """Every block selected is dense decode: within the budget of SDPA's own error."""
    dt = DTYPES[dtype]
    B, S = 2, 32768
    q, k, v = _cache(gen, B, S, dt)
    full = torch.ones(B, H, _nb(S), dtype=torch.bool, device="cuda")
    lens = torch.full((B,), S, device="cuda")
    out = block_sparse_decode(q, k, v, full, lens, backend="triton")
    ref32 = block_sparse_decode_ref(*_up(q, k, v), full, lens)
    sdpa = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    error_budget(out, ref32, sdpa, what="vs SDPA", **OUT_BUDGET[dt])


def test_batch16_static_cache_left_padding(gen, error_budget, loads):
    """B=16 (the benchmark's batch) in a static-cache shape: unequal lengths and left padding;
    slots outside [seq_starts, seq_lens) hold garbage that must not count."""
    dt, B, S = torch.bfloat16, 16, 32768
    q, k, v = _cache(gen, B, S, dt)
    lens = torch.randint(S // 2, S + 1, (B,), generator=gen).cuda()
    starts = (torch.rand(B, generator=gen) * 3000).long().cuda()
    slot = torch.arange(S, device="cuda")
    outside = ((slot[None, :] < starts[:, None]) | (slot[None, :] >= lens[:, None]))[:, None, :, None]
    k = k.masked_fill(outside, 300.0)
    v = v.masked_fill(outside, float("nan"))  # NaN at ignored slots: any leak shows
    idx = _topk_selection(gen, B, S, 0.1)
    out = block_sparse_decode(q, k, v, idx, lens, seq_starts=starts, backend="triton")
    kk, vv = k.masked_fill(outside, 0.0), v.masked_fill(outside, 0.0)
    ref32 = block_sparse_decode_ref(*_up(q, kk, vv), idx, lens, seq_starts=starts)
    ref_lp = block_sparse_decode_ref(q, kk, vv, idx, lens, seq_starts=starts, upcast=False)
    error_budget(out, ref32, ref_lp, **OUT_BUDGET[dt])


@pytest.mark.parametrize("splits", [1, 7, 64], ids=lambda s: f"splits{s}")
def test_split_counts_at_real_shape(splits, gen, error_budget, loads):
    dt, B, S = torch.bfloat16, 1, 65536
    q, k, v = _cache(gen, B, S, dt)
    idx = _topk_selection(gen, B, S, 0.1)
    lens = torch.full((B,), S - 5, device="cuda")
    out = block_sparse_decode(q, k, v, idx, lens, num_splits=splits, backend="triton")
    ref32 = block_sparse_decode_ref(*_up(q, k, v), idx, lens)
    ref_lp = block_sparse_decode_ref(q, k, v, idx, lens, upcast=False)
    error_budget(out, ref32, ref_lp, **OUT_BUDGET[dt])


@pytest.mark.parametrize("B, N, k", [(16, 2048, 205), (4, 2049, 205), (1, 16384, 1639), (2, 513, 2)])
@pytest.mark.parametrize("bits", [1, 0, 8], ids=["bisect", "bisect-early-stop", "radix"])
def test_top_blocks_at_real_shapes(monkeypatch, B, N, k, bits):
    """The decode selection kernel at 32k-1M-token caches (8 KV heads), by bisection (with and
    without the early stop) and by the radix select: the reference's kept blocks, with bf16
    scores (ties) and the sink / current block forced."""
    from seer_attn.kernels import decode_select
    from seer_attn.kernels.decode_select import top_blocks
    monkeypatch.setattr(decode_select, "TOP_BLOCKS_BITS", max(bits, 1))
    monkeypatch.setattr(decode_select, "TOP_BLOCKS_EARLY_STOP", bits == 0)
    from seer_attn.kernels.reference import top_blocks_ref
    gen = torch.Generator(device="cuda").manual_seed(N)
    scores = torch.randn(B, 8, N, device="cuda", generator=gen).to(torch.bfloat16)
    bias = torch.zeros(B, 1, N, device="cuda")
    bias[..., 0] = bias[..., N - 1] = float("inf")
    counts = torch.randint(0, k + 1, (B, 8), device="cuda", generator=gen, dtype=torch.int32)
    counts[0] = k
    got = top_blocks(scores, bias, counts, k, backend="triton")
    assert torch.equal(got, top_blocks_ref(scores, bias, counts, k))


@pytest.mark.parametrize("B, N", [(16, 2048), (4, 2049), (1, 16384), (16, 512)])
@pytest.mark.parametrize("width", [256, 128], ids=["partner-columns", "rotated"])
def test_gate_scores_at_real_shapes(B, N, width):
    """The decode gate's logits kernel at 32k-1M-token caches (8 KV heads, G 128, bf16 inputs,
    keys a slice of a larger buffer as the pooled-K cache's; the query with its RoPE partner
    columns or without): the float32 reference."""
    from seer_attn.kernels.decode_select import gate_scores
    from seer_attn.kernels.reference import gate_scores_ref
    gen = torch.Generator(device="cuda").manual_seed(N)
    y = torch.randn(8, B, width, device="cuda", generator=gen).to(torch.bfloat16).transpose(0, 1)
    keys = torch.randn(B, 8, N + 64, 128, device="cuda", generator=gen).to(torch.bfloat16)[:, :, :N]
    e = torch.rand(B, 128, device="cuda", generator=gen) * 6.0
    rope = (e.cos().to(torch.bfloat16), e.sin().to(torch.bfloat16))
    got = gate_scores(y, keys, rope, backend="triton")
    torch.testing.assert_close(got, gate_scores_ref(y, keys, rope), atol=2e-3, rtol=1e-4)


@pytest.mark.parametrize("B, N", [(16, 512), (1, 16384)])
@pytest.mark.parametrize("fmt", ["f8", "i8"])
def test_gate_scores_on_eight_bit_keys_at_real_shapes(B, N, fmt):
    """gate_scores on 8-bit keys (float8 e4m3, which the interpreter cannot run, and int8) with
    one scale per block: the float32 reference on the same keys and scales."""
    from seer_attn.kernels.decode_select import eight_bit_keys, gate_scores
    from seer_attn.kernels.reference import gate_scores_ref
    gen = torch.Generator(device="cuda").manual_seed(N + len(fmt))
    y = torch.randn(B, 8, 128, device="cuda", generator=gen).to(torch.bfloat16)
    k8, sc = eight_bit_keys(torch.randn(B, 8, N, 128, device="cuda", generator=gen), fmt)
    e = torch.rand(B, 128, device="cuda", generator=gen) * 6.0
    rope = (e.cos().to(torch.bfloat16), e.sin().to(torch.bfloat16))
    got = gate_scores(y, k8, rope, backend="triton", key_scales=sc)
    torch.testing.assert_close(got, gate_scores_ref(y, k8, rope, sc), atol=2e-3, rtol=1e-4)


@pytest.mark.parametrize("B, N, k", [(16, 2048, 205), (1, 2048, 205), (4, 2049, 32), (1, 16384, 1639)])
@pytest.mark.parametrize("bits, split, width", [(1, 1, 256), (1, 1, 128), (2, 1, 256), (4, 1, 256), (8, 1, 256),
                                                (2, 8, 128)])
def test_gate_top_blocks_at_real_shapes(monkeypatch, B, N, k, bits, split, width):
    """The decode gate's scoring and selection in one launch at 128k-1M-token caches (8 KV heads,
    G 128, bf16 inputs, keys a slice of a larger buffer; one program per row or eight; the query with
    its RoPE partner columns or without): each row keeps ``counts`` blocks in increasing order, the
    forced ones among them, and no left-out block scores more than a kept one by the float32
    reference's scores beyond float32 summation noise (a near-tie may go either way)."""
    from seer_attn.kernels import decode_select
    from seer_attn.kernels.reference import gate_scores_ref
    monkeypatch.setattr(decode_select, "TOP_BLOCKS_BITS", bits)
    monkeypatch.setattr(decode_select, "FUSED_SPLIT", split)
    gen = torch.Generator(device="cuda").manual_seed(N + bits)
    y = torch.randn(8, B, width, device="cuda", generator=gen).to(torch.bfloat16).transpose(0, 1)
    keys = torch.randn(B, 8, N + 64, 128, device="cuda", generator=gen).to(torch.bfloat16)[:, :, :N]
    e = torch.rand(B, 128, device="cuda", generator=gen) * 6.0
    rope = (e.cos().to(torch.bfloat16), e.sin().to(torch.bfloat16))
    bias = torch.zeros(B, 1, N, device="cuda")
    bias[..., 0] = bias[..., N - 2] = float("inf")
    bias[..., N - 1] = float("-inf")
    counts = torch.randint(2, k + 1, (B, 8), device="cuda", generator=gen, dtype=torch.int32)
    counts[0] = k
    got = decode_select.gate_top_blocks(y, keys, rope, bias, counts, k, backend="triton")
    s = gate_scores_ref(y, keys, rope) + bias
    for b in range(B):
        for h in range(8):
            c = int(counts[b, h])
            row = got[b, h]
            assert (row[c:] == -1).all() and (row[:c] >= 0).all()
            kept = row[:c].long()
            assert (kept[1:] > kept[:-1]).all()
            assert {0, N - 2} <= set(kept.tolist())
            out = torch.ones(N, dtype=torch.bool, device="cuda")
            out[kept] = False
            assert s[b, h, kept].min() >= s[b, h, out].max() - 1e-3


@pytest.mark.parametrize("B, N", [(4, 2048), (1, 16384), (16, 513)])
def test_prior_mix_at_real_shapes(B, N):
    """The decode prior's mixture at 32k-1M-token caches (32 query / 8 KV heads, D 128, bf16 queries and
    means, the means a slice of a larger buffer as the pooled-K cache's, some rows left-padded): the
    float32 reference on the same inputs, within the kernel's rounding of the scaled query to bf16."""
    from seer_attn.kernels.decode_select import prior_mix
    from seer_attn.kernels.reference import prior_mix_ref
    gen = torch.Generator(device="cuda").manual_seed(N)
    logits = torch.randn(B, H, N, device="cuda", generator=gen) * 4
    q = torch.randn(B, HQ, 1, D, device="cuda", generator=gen).to(torch.bfloat16)
    means = torch.randn(B, H, N + 64, D, device="cuda", generator=gen).to(torch.bfloat16)[:, :, :N]
    j = torch.arange(N, device="cuda")
    first = torch.randint(0, 3, (B,), device="cuda", generator=gen)
    full = ((j[None] >= first[:, None]) & (j[None] < N - 1))[:, None]
    for w in (0.5, 0.7):
        got = prior_mix(logits, q, means, full, D ** -0.5, w, backend="triton")
        want = prior_mix_ref(logits, q.float(), means.float(), full, D ** -0.5, w)
        torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-3)


@pytest.mark.parametrize("B, S, slot", [(4, 131072 + 64, 131072), (16, 32768 + 64, 32831)])
def test_decode_append_at_real_shapes(B, S, slot):
    """One decode token's cache writes (kernels/decode_append.py) into 8 KV heads x 128 caches of
    32k-128k slots, bf16, the key from a transposed projection view: the torch ops' caches,
    buffer and length, and nothing else written."""
    from seer_attn.kernels.decode_append import decode_append, decode_append_ref
    gen = torch.Generator(device="cuda").manual_seed(S)
    keys, values = (torch.randn(B, H, S, D, device="cuda", generator=gen).to(torch.bfloat16) for _ in range(2))
    buf = torch.randn(B, H, 64, D, device="cuda", generator=gen).to(torch.bfloat16)
    k, v, kp = (torch.randn(B, 1, H, D, device="cuda", generator=gen).to(torch.bfloat16).transpose(1, 2)
                for _ in range(3))
    s = torch.tensor([slot], device="cuda")
    ln, ln_ref = torch.tensor(slot, device="cuda"), torch.tensor(slot, device="cuda")
    want = [t.clone() for t in (keys, values, buf)]
    decode_append_ref(*want[:2], k, v, s, ln_ref, want[2], kp)
    decode_append(keys, values, k, v, s, ln, buf, kp, backend="triton")
    for got, ref in zip((keys, values, buf), want):
        assert torch.equal(got, ref)
    assert int(ln) == int(ln_ref) == slot + 1


@pytest.mark.parametrize("B, NB, share", [(4, 2049, 0.1), (16, 512, None), (1, 16384, 0.1)])
def test_decode_window_at_real_shapes(B, NB, share):
    """The graph step's top-k bias and counts (kernels/decode_select.py, decode_window) at 32k-1M-token
    capacities, 8 KV heads, left-padded sequences: the torch reference exactly."""
    from seer_attn.kernels.decode_select import decode_window
    from seer_attn.kernels.reference import decode_window_ref
    first = torch.arange(B, device="cuda") * 3
    cur = torch.tensor(NB - 2, device="cuda")
    k = 32 if share is None else -(-int(share * NB * 1000) // 1000)
    got = decode_window(first, cur, NB, 1, 8, k, share, backend="triton")
    want = decode_window_ref(first, cur, NB, 1, 8, k, share)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
