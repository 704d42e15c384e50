"""block_sparse_decode with backend="triton" (the Triton interpreter on CPU, compiled kernels on
CUDA) against the torch reference ``block_sparse_decode_ref``.

Tolerance (style guide): the kernel's error against the fp32 reference (on the same, upcast
inputs) must be <= 2x the error of the reference run in the inputs' own precision
(``upcast=False``) plus a small slack, and <= a hard cap. Outputs are NaN-poisoned before the
kernels write them (tests/conftest.py). bf16 is left to test_gpu_decode.py.

Left padding is given as ``seq_starts`` (first real slot of each sequence) beside
``seq_lens`` (slots in use, the new token's included).
"""
import pytest
import torch
from kernel_inputs import nb as _nb, randn as _randn, up as _up

from seer_attn.kernels import block_sparse_decode, block_sparse_decode_ref

DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
OUT_BUDGET = {torch.float16: dict(slack=1e-3, cap=2e-2), torch.float32: dict(slack=1e-5, cap=1e-4)}
#: (B, HQ, H) per GQA ratio
SHAPES = {1: (2, 2, 2), 3: (2, 6, 2), 4: (1, 8, 2)}


def _inputs(gen, B, HQ, H, S, D, dtype, device):
    q = _randn(gen, (B, HQ, 1, D), dtype, device)
    k = _randn(gen, (B, H, S, D), dtype, device)
    v = _randn(gen, (B, H, S, D), dtype, device)
    return q, k, v


def _selection(gen, B, H, NB, kind, device):
    """bool [B, H, NB]: no block, about half of them (at least one per row) or all."""
    if kind == "none":
        m = torch.zeros(B, H, NB, dtype=torch.bool)
    elif kind == "all":
        m = torch.ones(B, H, NB, dtype=torch.bool)
    else:
        m = torch.rand(B, H, NB, generator=gen) < 0.5
        m[..., -1] = True  # the current block, as the model always keeps it
    return m.to(device)


def _check(out, q, k, v, sel, lens, error_budget, dt, **kw):
    ref32 = block_sparse_decode_ref(*_up(q, k, v), sel, lens, **kw)
    ref_lp = block_sparse_decode_ref(q, k, v, sel, lens, upcast=False, **kw)
    assert out.dtype == dt and out.shape == q.shape
    error_budget(out, ref32, ref_lp, **OUT_BUDGET[dt])


def _cases():
    cases = []
    for S in (1, 63, 64, 65, 1000):
        for gqa in (1, 3, 4):
            for kind in ("none", "some", "all"):
                cases.append((S, gqa, 64, kind, "fp16"))
    for S in (65, 1000):
        for kind in ("some", "all"):
            cases.append((S, 3, 64, kind, "fp32"))
            cases.append((S, 4, 128, kind, "fp16"))
    return [pytest.param(*c, id=f"S{c[0]}-gqa{c[1]}-d{c[2]}-{c[3]}-{c[4]}") for c in cases]


@pytest.mark.parametrize("S, gqa, D, kind, dtype", _cases())
def test_matches_reference(S, gqa, D, kind, dtype, gen, device, error_budget):
    """The new token at the last slot (seq_lens = S): every cache length, GQA ratio and share
    of blocks; with no block selected the output is exactly 0."""
    dt = DTYPES[dtype]
    B, HQ, H = SHAPES[gqa]
    q, k, v = _inputs(gen, B, HQ, H, S, D, dt, device)
    sel = _selection(gen, B, H, _nb(S), kind, device)
    lens = torch.full((B,), S, device=device)
    out = block_sparse_decode(q, k, v, sel, lens, backend="triton")
    _check(out, q, k, v, sel, lens, error_budget, dt)
    if kind == "none":
        assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
def test_left_padded_batch_with_unequal_lengths(dtype, gen, device, error_budget):
    """A batch of a static-cache shape (S slots, fewer in use) with left padding: row 0 starts
    at slot 37 and uses 1000 slots, row 1 starts at 128 (block-aligned) and uses 65, row 2 has a
    single real token. Keys outside [seq_starts, seq_lens) never count: garbage there changes
    nothing, bit for bit."""
    dt = DTYPES[dtype]
    B, HQ, H, S, D = 3, 6, 2, 1030, 64
    q, k, v = _inputs(gen, B, HQ, H, S, D, dt, device)
    lens = torch.tensor([1000, 193, 500], device=device)
    starts = torch.tensor([37, 128, 499], device=device)
    sel = _selection(gen, B, H, _nb(S), "some", device)
    sel[:, :, 0] = True
    sel[2, :, 7] = True  # the block of row 2's only token
    out = block_sparse_decode(q, k, v, sel, lens, seq_starts=starts, backend="triton")
    _check(out, q, k, v, sel, lens, error_budget, dt, seq_starts=starts)

    slot = torch.arange(S, device=device)
    outside = (slot[None, :] < starts[:, None]) | (slot[None, :] >= lens[:, None])  # [B, S]
    garbage = outside[:, None, :, None]
    k2 = torch.where(garbage, _randn(gen, k.shape, dt, device, scale=30.0, shift=9.0), k)
    v2 = torch.where(garbage, _randn(gen, v.shape, dt, device, scale=30.0, shift=9.0), v)
    assert torch.equal(block_sparse_decode(q, k2, v2, sel, lens, seq_starts=starts, backend="triton"), out)


def test_index_lists_equal_the_mask(gen, device):
    """The same selection as a bool mask, as unsorted -1-padded indices, with block_counts
    (entries past the count ignored) and with out-of-range entries: the same outputs (up to
    the summation order of the online softmax)."""
    B, HQ, H, S, D = 2, 6, 2, 700, 64
    NB = _nb(S)
    q, k, v = _inputs(gen, B, HQ, H, S, D, torch.float32, device)
    lens = torch.tensor([700, 650], device=device)
    sel = _selection(gen, B, H, NB, "some", device)
    base = block_sparse_decode(q, k, v, sel, lens, backend="triton", num_splits=1)
    K = NB + 2
    idx = torch.full((B, H, K), -1, dtype=torch.int64)
    cnt = torch.zeros(B, H, dtype=torch.int32)
    for b in range(B):
        for h in range(H):
            cols = sel[b, h].nonzero().flatten().cpu()
            cols = cols[torch.randperm(len(cols), generator=gen)]  # any order
            idx[b, h, :len(cols)] = cols
            cnt[b, h] = len(cols)
    padded = idx.clone()
    padded[..., -1] = NB + 5  # out of range: skipped
    close = dict(atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(block_sparse_decode(q, k, v, padded.to(device), lens, backend="triton", num_splits=1),
                               base, **close)
    junk = idx.clone()
    for b in range(B):
        for h in range(H):
            junk[b, h, cnt[b, h]:] = torch.arange(K - int(cnt[b, h]))  # read only with a wrong count
    torch.testing.assert_close(block_sparse_decode(q, k, v, junk.to(device), lens, block_counts=cnt.to(device),
                                                   backend="triton", num_splits=1), base, **close)
    ref = block_sparse_decode_ref(q, k, v, sel, lens)
    torch.testing.assert_close(block_sparse_decode_ref(q, k, v, junk.to(device), lens, block_counts=cnt.to(device)),
                               ref)


@pytest.mark.parametrize("splits", [1, 2, 5, 64], ids=lambda s: f"splits{s}")
def test_split_count_does_not_change_the_result(splits, gen, device, error_budget):
    """Parts with no block (more splits than blocks) and uneven parts merge correctly."""
    B, HQ, H, S, D = 2, 8, 2, 900, 64
    q, k, v = _inputs(gen, B, HQ, H, S, D, torch.float32, device)
    sel = _selection(gen, B, H, _nb(S), "some", device)
    lens = torch.full((B,), S, device=device)
    out = block_sparse_decode(q, k, v, sel, lens, num_splits=splits, backend="triton")
    _check(out, q, k, v, sel, lens, error_budget, torch.float32)


def test_strided_inputs_and_custom_scale(gen, device, error_budget):
    """q as a transposed [B, 1, HQ, D] view and k/v as [B, S, H, D] views (what attention layers
    hold), with a custom sm_scale: the same result as contiguous copies, within budget."""
    B, HQ, H, S, D = 2, 6, 2, 300, 64
    q = _randn(gen, (B, 1, HQ, D), torch.float32, device).transpose(1, 2)
    k = _randn(gen, (B, S, H, D), torch.float32, device).transpose(1, 2)
    v = _randn(gen, (B, S, H, D), torch.float32, device).transpose(1, 2)
    sel = _selection(gen, B, H, _nb(S), "some", device)
    lens = torch.full((B,), S, device=device)
    out = block_sparse_decode(q, k, v, sel, lens, sm_scale=0.3, backend="triton")
    assert torch.equal(out, block_sparse_decode(q.contiguous(), k.contiguous(), v.contiguous(), sel, lens,
                                                sm_scale=0.3, backend="triton"))
    ref = block_sparse_decode_ref(q, k, v, sel, lens, sm_scale=0.3)
    assert (ref - block_sparse_decode_ref(q, k, v, sel, lens)).abs().max() > 1e-2  # the scale matters here
    error_budget(out, ref, ref, **OUT_BUDGET[torch.float32])


def test_backend_dispatch(gen, device):
    """backend="torch" is the reference; "auto" is Triton on CUDA and the reference elsewhere."""
    B, HQ, H, S, D = 1, 4, 2, 130, 64
    q, k, v = _inputs(gen, B, HQ, H, S, D, torch.float32, device)
    sel = _selection(gen, B, H, _nb(S), "some", device)
    lens = torch.tensor([S], device=device)
    ref = block_sparse_decode_ref(q, k, v, sel, lens)
    assert torch.equal(block_sparse_decode(q, k, v, sel, lens, backend="torch"), ref)
    auto = block_sparse_decode(q, k, v, sel, lens)
    expected = block_sparse_decode(q, k, v, sel, lens, backend="triton") if q.is_cuda else ref
    assert torch.equal(auto, expected)


def test_reference_matches_explicit_definition(gen):
    """The reference itself against a materialised masked softmax per query head (GQA 3,
    left padding, a partial current block, a head with an empty selection)."""
    B, HQ, H, S, D = 2, 6, 2, 200, 16
    q = torch.randn(B, HQ, 1, D, generator=gen, dtype=torch.float64)
    k = torch.randn(B, H, S, D, generator=gen, dtype=torch.float64)
    v = torch.randn(B, H, S, D, generator=gen, dtype=torch.float64)
    sel = torch.rand(B, H, _nb(S), generator=gen) < 0.5
    sel[0, 1] = False
    sel[1, :, 2] = True
    lens, starts = torch.tensor([200, 150]), torch.tensor([0, 30])
    got = block_sparse_decode_ref(q.float(), k.float(), v.float(), sel, lens, seq_starts=starts)
    want = torch.zeros(B, HQ, 1, D, dtype=torch.float64)
    for b in range(B):
        for hq in range(HQ):
            h = hq // 3
            keys = [t for t in range(S) if sel[b, h, t // 64] and starts[b] <= t < lens[b]]
            if not keys:
                continue
            s = (k[b, h, keys] @ q[b, hq, 0]) / D ** 0.5
            want[b, hq, 0] = torch.softmax(s, 0) @ v[b, h, keys]
    assert torch.equal(got[0, 3:6], torch.zeros_like(got[0, 3:6]))
    torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- validation

def _good():
    B, HQ, H, S, D = 2, 4, 2, 130, 64
    return dict(q=torch.randn(B, HQ, 1, D), k=torch.randn(B, H, S, D), v=torch.randn(B, H, S, D),
                sel=torch.ones(B, H, 3, dtype=torch.bool), lens=torch.tensor([130, 100]))


BAD = [
    ("two-query-tokens", dict(q=torch.randn(2, 4, 2, 64)), ValueError, r"one query token per sequence"),
    ("batch-mismatch", dict(q=torch.randn(3, 4, 1, 64)), ValueError, r"does not match q shape"),
    ("gqa", dict(q=torch.randn(2, 3, 1, 64)), ValueError, r"multiple of the number of key/value heads"),
    ("mask-shape", dict(sel=torch.ones(2, 2, 4, dtype=torch.bool)), ValueError, r"\[B, H, NB\] = \(2, 2, 3\)"),
    ("float-indices", dict(sel=torch.zeros(2, 2, 3)), TypeError, r"bool mask or an integer tensor"),
    ("index-shape", dict(sel=torch.zeros(2, 4, 3, dtype=torch.long)), ValueError, r"\[B, H, K\] = \(2, 2, K\)"),
    ("lens-float", dict(lens=torch.tensor([1.0, 2.0])), TypeError, r"seq_lens must be an integer tensor"),
    ("lens-shape", dict(lens=torch.tensor([130])), ValueError, r"seq_lens must have shape \[B\] = \(2,\)"),
    ("lens-too-long", dict(lens=torch.tensor([131, 5])), ValueError, r"seq_lens must lie in \[0, S=130\]"),
    ("lens-zero", dict(lens=torch.tensor([0, 5])), ValueError, r"seq_lens must be >= 1"),
    ("starts-past-lens", dict(seq_starts=torch.tensor([0, 100])), ValueError, r"seq_starts must be < seq_lens"),
    ("counts-with-mask", dict(block_counts=torch.ones(2, 2, dtype=torch.int32)), ValueError,
     r"block_counts goes with block indices"),
    ("splits", dict(num_splits=0), ValueError, r"num_splits must be an integer in \[1, 64\]"),
]


@pytest.mark.parametrize("override, exc, pattern", [pytest.param(o, e, p, id=i) for i, o, e, p in BAD])
def test_bad_inputs_raise_naming_the_value(override, exc, pattern):
    args = _good()
    kw = {n: override[n] for n in ("seq_starts", "block_counts", "num_splits") if n in override}
    args.update({n: val for n, val in override.items() if n not in kw})
    with pytest.raises(exc, match=pattern):
        block_sparse_decode(args["q"], args["k"], args["v"], args["sel"], args["lens"], backend="torch", **kw)


@pytest.mark.parametrize("cfg", [(1, 4, 1), (4, 4, 1)], ids=["one-block-tiles(gpu)", "four-block-tiles"])
def test_other_launch_configs(cfg, gen, device, error_budget, monkeypatch):
    """The kernel is right with the GPU's one-block steps (the interpreter's default gathers two
    blocks per step) and with four-block gathers whose last step runs past the list."""
    if device == "cuda" and cfg[0] == 4:
        pytest.skip("the four-block gather is an interpreter check")
    mod = __import__("seer_attn.kernels.block_sparse_decode", fromlist=["CONFIG_OVERRIDES"])
    monkeypatch.setitem(mod.CONFIG_OVERRIDES, 64, cfg)
    B, HQ, H, S, D = 2, 6, 2, 1000, 64
    q, k, v = _inputs(gen, B, HQ, H, S, D, torch.float32, device)
    sel = _selection(gen, B, H, _nb(S), "some", device)
    lens = torch.tensor([1000, 617], device=device)
    starts = torch.tensor([0, 90], device=device)
    for splits in (1, 3):
        out = block_sparse_decode(q, k, v, sel, lens, seq_starts=starts, num_splits=splits, backend="triton")
        _check(out, q, k, v, sel, lens, error_budget, torch.float32, seq_starts=starts)


def test_one_part_per_list_is_one_launch(gen, device, error_budget, monkeypatch):
    """With one part per block list (num_splits=1) the split kernel writes the output itself:
    the merge kernel is not launched, and the output is the reference's (padding, an empty
    head and a partial current block included)."""
    mod = __import__("seer_attn.kernels.block_sparse_decode", fromlist=["_decode_combine_kernel"])
    launches = []

    class Counted:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            launches.append(grid)
            return self.kernel[grid]
    monkeypatch.setattr(mod, "_decode_combine_kernel", Counted(mod._decode_combine_kernel))
    B, HQ, H, S, D = 2, 6, 2, 300, 64
    q, k, v = _inputs(gen, B, HQ, H, S, D, torch.float16, device)
    sel = _selection(gen, B, H, _nb(S), "some", device)
    sel[1, 0] = False  # a head that reads nothing
    lens = torch.tensor([300, 250], device=device)
    starts = torch.tensor([0, 70], device=device)
    out = block_sparse_decode(q, k, v, sel, lens, seq_starts=starts, num_splits=1, backend="triton")
    assert launches == []
    _check(out, q, k, v, sel, lens, error_budget, torch.float16, seq_starts=starts)
    block_sparse_decode(q, k, v, sel, lens, seq_starts=starts, num_splits=2, backend="triton")
    assert len(launches) == 1


@pytest.mark.parametrize("splits", [1, 3], ids=lambda s: f"splits{s}")
def test_tma_blocks_match_the_reference(splits, gen, device, error_budget, monkeypatch):
    """``DECODE_OPTIONS["tma"]``: each selected block loads through tensor descriptors (built for
    K and V, checked), with left padding, a partial current block, unsorted -1-padded index lists
    with an entry past NB, and NaN / inf in every slot outside [seq_starts, seq_lens): the same
    output as on clean slots, bit for bit, and the reference's within budget."""
    mod = __import__("seer_attn.kernels.block_sparse_decode", fromlist=["DECODE_OPTIONS"])
    monkeypatch.setitem(mod.DECODE_OPTIONS, "tma", True)
    monkeypatch.setitem(mod.CONFIG_OVERRIDES, 64, (1, 4, 1 if device == "cpu" else 3))
    built = []
    monkeypatch.setattr(mod, "TensorDescriptor", lambda *a, _td=mod.TensorDescriptor: built.append(a[3]) or _td(*a))
    dt = torch.float16
    B, HQ, H, S, D = 3, 6, 2, 1030, 64
    NB = _nb(S)
    q, k, v = _inputs(gen, B, HQ, H, S, D, dt, device)
    lens = torch.tensor([1000, 193, 500], device=device)
    starts = torch.tensor([37, 128, 499], device=device)
    sel = _selection(gen, B, H, NB, "some", device)
    sel[:, :, 0] = True
    sel[2, :, 7] = True
    idx = torch.full((B, H, NB + 1), -1, dtype=torch.int64)
    for b in range(B):
        for h in range(H):
            cols = sel[b, h].nonzero().flatten().cpu()
            idx[b, h, :len(cols)] = cols[torch.randperm(len(cols), generator=gen)]
    idx[0, 0, -1] = NB + 5  # past the cache: skipped
    idx = idx.to(device)
    out = block_sparse_decode(q, k, v, idx, lens, seq_starts=starts, num_splits=splits, backend="triton")
    assert built == [[1, 1, 64, D]] * 2
    _check(out, q, k, v, sel, lens, error_budget, dt, seq_starts=starts)
    slot = torch.arange(S, device=device)
    outside = ((slot[None, :] < starts[:, None]) | (slot[None, :] >= lens[:, None]))[:, None, :, None]
    k2 = torch.where(outside, torch.full_like(k, float("inf")), k)
    v2 = torch.where(outside, torch.full_like(v, float("nan")), v)
    assert torch.equal(block_sparse_decode(q, k2, v2, idx, lens, seq_starts=starts, num_splits=splits,
                                           backend="triton"), out)


@pytest.mark.parametrize("bad", ["yes", 1])  # 1 == True, yet not a bool
def test_tma_option_is_checked(gen, device, monkeypatch, bad):
    mod = __import__("seer_attn.kernels.block_sparse_decode", fromlist=["DECODE_OPTIONS"])
    monkeypatch.setitem(mod.DECODE_OPTIONS, "tma", bad)
    q, k, v = _inputs(gen, 1, 2, 2, 64, 64, torch.float16, device)
    with pytest.raises(ValueError, match=rf"DECODE_OPTIONS\['tma'\] must be True or False, got {bad!r}"):
        block_sparse_decode(q, k, v, torch.ones(1, 2, 1, dtype=torch.bool, device=device),
                            torch.tensor([64], device=device), backend="triton")
