"""Decode sparsity on CPU (torch references): the pooled-K cache, block selection per decode
step, sparse decode equal to dense with every block selected, batched left-padded generate
equal to each sequence alone, static caches, refusals, config and gate files.

Left-padded batches use pads that are multiples of 64, so every sequence's blocks are the
same as alone (blocks are 64 cache slots of the padded batch, as in the prefill)."""
import logging

import pytest
import torch
from transformers import DynamicCache, StaticCache

from seer_attn.modeling_seer.decode_cache import pooled_k_cache
from seer_attn.modeling_seer.remote_bundle import bundle_sources
from seer_attn.modeling_seer.decode_gate import decode_block_target
from seer_attn.modeling_seer.selection import (DECODE_METHODS, block_pool, decode_oracle_scores,
                                               decode_recency_scores, select_decode_blocks, with_decode_meanpool_prior)

from decode_inputs import CACHE, DECODE, greedy as _greedy, ids as _ids, left_pad as _left_pad


# ----------------------------------------------------------------------------- pooled-K cache

@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
@torch.no_grad()
def test_pooled_k_cache_equals_pooling_the_full_k_at_every_step(tiny, cache_kind):
    """A left-padded prefill (unaligned pad of 37 slots) then 80 decode steps across block
    boundaries: after every step, each layer's pooled keys equal block_pool over every pre-RoPE
    key seen so far (padding left out), and the gate keys equal the decode gate applied to them (kept
    in the model's dtype here; 8-bit keys, the default, against these: test_decode_graph.py)."""
    m = tiny(**DECODE, seer_decode_sparsity=True, seer_decode_key_format="model")
    k_seen = {i: [] for i in range(m.config.num_hidden_layers)}
    hooks = [layer.self_attn.k_proj.register_forward_hook(
        lambda mod, a, out, i=i: k_seen[i].append(out.view(*out.shape[:2], -1, 16).transpose(1, 2)))
        for i, layer in enumerate(m.model.layers)]
    ids, mask = _left_pad([_ids(150, seed=1)[0], _ids(113, seed=2)[0]], 150)
    cache = DynamicCache(config=m.config) if cache_kind == "dynamic" else StaticCache(config=m.config,
                                                                                       max_cache_len=240)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    out = m(ids, attention_mask=mask, position_ids=pos, **{CACHE: cache}, use_cache=True)
    state = pooled_k_cache(cache)
    assert state is not None and state.starts.tolist() == [0, 37]
    tok = out.logits[:, -1:].argmax(-1)
    for step in range(80):
        T = 150 + step + 1
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
        out = m(tok, attention_mask=mask, position_ids=pos[:, -1:] + step + 1, **{CACHE: cache},
                use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
        valid = mask.bool()
        for layer in range(m.config.num_hidden_layers):
            full_k = torch.cat(k_seen[layer], dim=2)
            assert full_k.shape[2] == T
            n = T // 64
            want = block_pool(full_k, 64, m.config.seer_k_pooling, valid)[:, :, :n]
            got = state.pooled_keys(layer)
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
            gate = m.model.layers[layer].self_attn.attn_gate.decode_gate
            starts = state.starts[:, None]
            first = torch.maximum(torch.arange(n)[None] * 64, starts)
            rope = m.model._gate_rope_at(torch.where((torch.arange(n)[None] + 1) * 64 > starts, first - starts, 0))
            torch.testing.assert_close(state.gate_keys(layer), gate.block_keys(want, rope), atol=1e-5, rtol=1e-5)
            post = cache.layers[layer].keys[:, :, :n * 64]  # the KV cache's post-RoPE keys
            torch.testing.assert_close(state.block_means(layer), block_pool(post, 64, ("avg",), valid[:, :n * 64]),
                                       atol=1e-6, rtol=1e-6)
    for h in hooks:
        h.remove()
    assert m.seer_decode_density() is not None


# ----------------------------------------------------------------------------- decode gate

@pytest.mark.parametrize("partner", [True, False], ids=["partner-columns", "rotated-in-kernel"])
@pytest.mark.parametrize("use_rope", [True, False], ids=["rope", "no-rope"])
@torch.no_grad()
def test_step_logits_equal_the_gate_scores(monkeypatch, use_rope, partner):
    """A decode step's two-matmul logits (RoPE folded into the query weight, the partner columns
    made by the matmul or by the scoring from the map's own) equal the gate's query / scores path,
    on keys that are a slice of a larger buffer (the cache's); the folded weight follows q_weight
    when it changes in place, and the flag."""
    from seer_attn.modeling_seer import decode_gate
    from seer_attn.modeling_seer.decode_gate import DecodeGate
    monkeypatch.setattr(decode_gate, "STEP_PARTNER_COLUMNS", not partner)
    gen = torch.Generator().manual_seed(2)
    gate = DecodeGate(8, 2, 16, hidden_size=32, use_rope=use_rope)
    B = 3
    q = torch.randn(B, 1, 8, 16, generator=gen).transpose(1, 2)  # laid out as a model's q [B, T, HQ, D]
    keys = torch.randn(B, 2, 12, 32, generator=gen)[:, :, :7]
    pos = torch.tensor([[5.0], [9.0], [100.0]])
    e = torch.cat([pos * 10000 ** (-torch.arange(0, 32, 2) / 32)] * 2, -1)  # [B, G]
    gate.step_logits(q, keys, (e.cos(), e.sin()))  # caches the weight under the other setting
    monkeypatch.setattr(decode_gate, "STEP_PARTNER_COLUMNS", partner)
    for _ in range(2):
        want = gate.scores(gate.query(q, rope=(e.cos()[:, None], e.sin()[:, None])), keys)
        y, _ = gate.step_query(q, keys.dtype, (e.cos(), e.sin()))
        assert y.shape == (B, 2, 64 if partner and use_rope else 32)
        torch.testing.assert_close(gate.step_logits(q, keys, (e.cos(), e.sin())), want, atol=2e-6, rtol=1e-5)
        gate.q_weight.mul_(-0.5)


# ----------------------------------------------------------------------------- selection

def test_select_decode_blocks_methods_and_forced_blocks():
    """Each method's kept blocks are the first ``cnt`` entries of a row: distinct, the sink and
    the current block among them, no padding block, the best-scoring full blocks otherwise."""
    gen = torch.Generator().manual_seed(0)
    B, H, NC = 2, 3, 20
    scores = torch.randn(B, H, NC + 1, generator=gen)  # full blocks 0 .. 19, then the current block 20
    first = torch.tensor([0, 5])  # row 1: blocks 0-4 are left padding, its sink is block 5
    scores[1, :, :5] = 50.0  # padding blocks must never be read, whatever their score
    scores[:, :, NC] = -50.0  # the current block's value is ignored: it is always read
    for method, kw, want in [("budget", dict(budget=6 * 64), [6, 6]),
                             ("share", dict(share=0.25), [6, 4]),  # ceil(0.25 * 21), ceil(0.25 * 16)
                             ("budget", dict(budget=64 * 64), [21, 16])]:  # more than there is: everything
        idx, cnt = select_decode_blocks(scores, first, method, **kw)
        assert cnt.tolist() == [[want[0]] * H, [want[1]] * H], (method, kw)
        for b in range(B):
            for h in range(H):
                blocks = idx[b, h, :cnt[b, h]].tolist()
                assert len(set(blocks)) == len(blocks) == want[b]
                assert {NC, int(first[b])} <= set(blocks)  # current and sink
                assert min(blocks) >= first[b] and max(blocks) <= NC
                if want[b] < NC + 1 - first[b]:  # the best-scoring full blocks besides the sink
                    cand = scores[b, h, int(first[b]) + 1:NC]
                    best = set((torch.topk(cand, want[b] - 2).indices + int(first[b]) + 1).tolist())
                    assert set(blocks) - {NC, int(first[b])} == best
    idx, cnt = select_decode_blocks(scores, first, "threshold", threshold=0.05)
    for b in range(B):
        p = torch.softmax(scores[b, :, first[b]:NC], -1)  # over the sequence's full blocks
        for h in range(H):
            want = set((p[h] >= 0.05).nonzero().flatten().add(int(first[b])).tolist()) | {int(first[b]), NC}
            assert sorted(idx[b, h, :cnt[b, h]].tolist()) == sorted(want)
    for method in DECODE_METHODS:  # the first block is the current one: only itself
        idx, cnt = select_decode_blocks(torch.zeros(B, H, 1), torch.tensor([0, 0]), method)
        assert cnt.tolist() == [[1] * H] * B and idx[..., 0].tolist() == [[0] * H] * B


@pytest.mark.parametrize("mass", [0.05, 0.5, 0.8, 0.97, 1.0])
def test_mass_selection_reads_the_best_blocks_until_their_predicted_mass_reaches_the_target(mass):
    """``mass``: the sink and the current block, then the best-scoring full blocks while the
    softmaxed scores (over the sequence's full blocks) of those already kept sum to less than
    the target; written out one block at a time here. A concentrated row keeps fewer blocks
    than a flat one; mass 1 keeps every block but the padding."""
    gen = torch.Generator().manual_seed(2)
    B, H, NC = 2, 3, 20
    scores = torch.randn(B, H, NC + 1, generator=gen) * 2
    scores[0, 0] = torch.linspace(-3.0, 3.0, NC + 1)  # flat
    scores[0, 1, 7] = 30.0  # concentrated on one block
    first = torch.tensor([0, 5])
    scores[1, :, :5] = 50.0
    idx, cnt = select_decode_blocks(scores, first, "mass", mass=mass)
    for b in range(B):
        f = int(first[b])
        p = torch.softmax(scores[b, :, f:NC].double(), -1)
        for h in range(H):
            kept, acc = [f, NC], p[h, 0].item()  # the sink counts in the mass
            for j in torch.argsort(p[h], descending=True).tolist():
                if j != 0 and (acc < mass or mass == 1.0):
                    kept.append(f + j)
                    acc += p[h, j].item()
            assert int(cnt[b, h]) == len(kept) <= NC + 1 - f, (b, h)
            assert sorted(idx[b, h, :cnt[b, h]].tolist()) == sorted(kept), (b, h)
    if 0.5 <= mass < 1.0:
        assert cnt[0, 1] <= 3 and cnt[0, 1] < cnt[0, 0]  # one block holds nearly all the mass


def test_keep_local_blocks_are_always_read_and_count_in_the_budget():
    """keep_local=3: the three full blocks before the current one are read whatever their
    score (never a padding block), within the budget or share, whose floor becomes 5."""
    gen = torch.Generator().manual_seed(1)
    B, H, NC = 2, 2, 12
    scores = torch.randn(B, H, NC + 1, generator=gen)
    scores[:, :, NC - 3:NC] = -50.0  # the local blocks score worst
    first = torch.tensor([0, 10])  # row 1: its only full blocks are 10 and 11
    for method, kw, want in [("budget", dict(budget=6 * 64), [6, 3]), ("share", dict(share=0.1), [5, 3]),
                             ("threshold", dict(threshold=0.5), None), ("mass", dict(mass=0.01), None)]:
        idx, cnt = select_decode_blocks(scores, first, method, keep_local=3, **kw)
        if want is not None:
            assert cnt[:, 0].tolist() == want, method
        for h in range(H):
            assert {0, 9, 10, 11, 12} <= set(idx[0, h, :cnt[0, h]].tolist()), method
            assert sorted(idx[1, h, :cnt[1, h]].tolist()) == [10, 11, 12], method
    idx0, cnt0 = select_decode_blocks(scores, first, "budget", budget=6 * 64)
    assert not {9, 10, 11} <= set(idx0[0, 0, :cnt0[0, 0]].tolist())  # without keep_local they lose


def test_decode_oracle_and_streaming_scores():
    """The oracle's logits are the log of the decode gate's distillation target at the step's
    row (times the group size), left padding and slots past the length ignored; streaming's
    select the sink and the most recent blocks."""
    gen = torch.Generator().manual_seed(2)
    B, HQ, H, D, bs = 2, 6, 2, 8, 16
    S, T = 80, 75  # cache slots, and the new token's slot + 1 (its length)
    q = torch.randn(B, HQ, 1, D, generator=gen)
    k = torch.randn(B, H, S, D, generator=gen)
    starts = torch.tensor([0, 20])
    got = decode_oracle_scores(q, k, torch.tensor([T, T]), 0.3, bs, 5, seq_starts=starts)
    full_q = torch.zeros(B, HQ, T, D)
    full_q[:, :, T - 1] = q[:, :, 0]
    want = decode_block_target(full_q, k[:, :, :T], torch.full((B, 1), T - 1), 0.3, bs,
                               bounds=torch.stack([starts, torch.tensor([T, T])], 1))[:, :, 0]  # [B, H, 5]
    torch.testing.assert_close(got.exp(), want * (HQ // H), atol=1e-6, rtol=1e-5)
    assert got[1, :, 0].max() < -80  # block 0 is left padding in row 1: no mass
    idx, cnt = select_decode_blocks(decode_recency_scores(1, H, 13, "cpu"), torch.tensor([0]), "budget",
                                    budget=5 * 64)
    assert sorted(idx[0, 0, :cnt[0, 0]].tolist()) == [0, 9, 10, 11, 12]


def test_decode_meanpool_prior_mixes_two_distributions_over_the_full_blocks():
    """``with_decode_meanpool_prior`` written out per KV head: the gate's softmax and the group's mean
    of each query head's softmax of q . (block mean key), both over the full blocks only, mixed in
    log space; every other block scores 0, a sequence without a full block scores 0 everywhere."""
    gen = torch.Generator().manual_seed(3)
    B, HQ, H, D, N = 3, 6, 2, 8, 7
    logits = torch.randn(B, H, N, generator=gen)
    q = torch.randn(B, HQ, 1, D, generator=gen)
    means = torch.randn(B, H, N, D, generator=gen)
    first, current = torch.tensor([0, 2, 3]), torch.tensor([5, 5, 3])  # row 2: no full block
    j = torch.arange(N)
    full = ((j[None] >= first[:, None]) & (j[None] < current[:, None]))[:, None]
    for a in (0.3, 1.0):
        got = with_decode_meanpool_prior(logits, q, means, full, 0.4, a)
        for b in range(B):
            blocks = list(range(int(first[b]), int(current[b])))
            other = [i for i in range(N) if i not in blocks]
            assert got[b, :, other].abs().max() == 0
            if not blocks:
                continue
            for h in range(H):
                pg = torch.softmax(logits[b, h, blocks], -1)
                pm = torch.stack([torch.softmax(0.4 * means[b, h, blocks] @ q[b, h * 3 + r, 0], -1)
                                  for r in range(3)]).mean(0)
                torch.testing.assert_close(got[b, h, blocks], (1 - a) * pg.log() + a * pm.log(), atol=1e-5, rtol=1e-5)
    valid = torch.ones(B, 128, dtype=torch.bool)
    valid[1, :70] = False  # block 0 padding only, block 1 six real slots
    k = torch.randn(B, H, 128, D, generator=gen)
    m = block_pool(k, 64, ("avg",), valid)  # the means the pooled-K cache keeps for the prior
    assert m[1, :, 0].abs().max() == 0
    torch.testing.assert_close(m[1, :, 1], k[1, :, 70:128].mean(1))
    torch.testing.assert_close(m[0], k[0].view(H, 2, 64, D).mean(2))


def test_top_k_skips_sorting_only_when_every_row_keeps_k():
    """The model passes the sink blocks as host ints: a top-k whose rows all keep their k
    entries need not sort them (the same kept sets); a row with fewer candidates than k must
    get its kept blocks first, so it sorts."""
    from seer_attn.modeling_seer.selection import prepare_decode_selection
    gen = torch.Generator().manual_seed(1)
    B, H, NC = 2, 3, 20
    scores = torch.randn(B, H, NC + 1, generator=gen)
    for first, method, kw, want_sorted in [([0, 2], "budget", dict(budget=6 * 64), False),
                                           ([0, 17], "budget", dict(budget=6 * 64), True),  # row 1: 4 blocks
                                           ([0, 2], "share", dict(share=0.25), True),  # 6 and 5 of k = 6
                                           ([0, 0], "share", dict(share=0.25), False)]:
        fb = torch.tensor(first)
        prepared = prepare_decode_selection(fb, NC, method, num_heads=H, first_block_host=first, **kw)
        assert prepared["sorted"] == want_sorted, (first, method)
        idx, cnt = select_decode_blocks(scores, fb, method, prepared=prepared)
        ref_idx, ref_cnt = select_decode_blocks(scores, fb, method, **kw)  # sorted
        assert torch.equal(cnt, ref_cnt)
        for b in range(B):
            for h in range(H):
                assert set(idx[b, h, :cnt[b, h]].tolist()) == set(ref_idx[b, h, :cnt[b, h]].tolist())


# ----------------------------------------------------------------------------- generation

@pytest.mark.parametrize("prefill", ["dense", "sparse"])
@torch.no_grad()
def test_every_block_selected_equals_dense_decode_token_for_token(tiny, prefill):
    m = tiny(**DECODE, seer_sparsity_method="nz_ratio", seer_nz_ratio=1.0)
    x = _ids(300, B=2, seed=3)
    dense = m.generate(x, max_new_tokens=24, do_sample=False, pad_token_id=0, output_scores=True,
                       return_dict_in_generate=True)
    for kw in (dict(seer_decode_method="share", seer_decode_share=1.0),
               dict(seer_decode_method="budget", seer_decode_budget=64 * 64)):
        m.set_seer_mode(prefill, seer_decode_sparsity=True, **kw)
        sparse = m.generate(x, max_new_tokens=24, do_sample=False, pad_token_id=0, output_scores=True,
                            return_dict_in_generate=True)
        assert torch.equal(sparse.sequences, dense.sequences)
        torch.testing.assert_close(torch.stack(sparse.scores), torch.stack(dense.scores), atol=2e-5, rtol=1e-5)
        assert torch.equal(m.seer_decode_density(), torch.ones(2))


SHARE_1 = dict(seer_decode_method="share", seer_decode_share=1.0)
KEEP_ALL_THRESHOLD = dict(seer_decode_method="threshold", seer_decode_threshold=1e-9)
KEEP_ALL_MASS = dict(seer_decode_method="mass", seer_decode_mass=1.0)


@pytest.mark.parametrize("method, backend", [
    pytest.param(SHARE_1, "torch", id="share-1-reference"),
    pytest.param(KEEP_ALL_THRESHOLD, "torch", id="threshold-keeps-all-reference"),
    pytest.param(KEEP_ALL_MASS, "torch", id="mass-1-keeps-all-reference"),
    pytest.param(SHARE_1, "triton", id="share-1-triton-kernel"),  # the interpreter is slow: one case
])
@torch.no_grad()
def test_every_block_selected_equals_dense_decode_with_unaligned_left_padding(tiny, monkeypatch, backend, method):
    """The GPU test's structure at CPU size: a batch left-padded by 0 / 40 / 100 slots (the
    last sequence's first block is padding only), prompts of several blocks, decode steps
    across a block boundary, every block selected: each step's logits are dense decode's,
    through the torch reference and through the Triton kernel (interpreter on CPU). Selection
    lists with dropped entries (padding blocks, thresholds) once put the current block after
    the ``block_counts`` prefix the kernel reads."""
    import functools

    from seer_attn.kernels.block_sparse_decode import block_sparse_decode
    from seer_attn.modeling_seer import seer_layer
    monkeypatch.setattr(seer_layer, "block_sparse_decode", functools.partial(block_sparse_decode, backend=backend))
    m = tiny(**DECODE)
    ids, mask = _left_pad([_ids(250 - pad, seed=20 + pad)[0] for pad in (0, 40, 100)], 250)

    def run(**kw):
        out = _greedy(m, ids, 10, attention_mask=mask, output_logits=True, return_dict_in_generate=True, **kw)
        return out.sequences, torch.stack(out.logits, 1)
    seq, dense = run()
    m.set_seer_mode("dense", seer_decode_sparsity=True, **method)
    _, sparse = run(prefix_allowed_tokens_fn=lambda b, prefix: [int(seq[b, prefix.shape[-1]])])
    assert torch.equal(m.seer_decode_density(), torch.ones(3))
    torch.testing.assert_close(sparse, dense, atol=2e-5, rtol=1e-5)


@torch.no_grad()
@torch.no_grad()
def test_decode_meanpool_prior_alone_selects_the_blocks_with_the_most_mean_pooled_mass(tiny, monkeypatch):
    """``seer_decode_meanpool_prior=1`` with a budget of 3 blocks: every sparse decode step of every
    layer reads the sink, the current block and the full block whose mean post-RoPE key draws the
    most of the query group's softmax (recomputed here from the kernel's q and KV cache); with the
    gate alone (0) at least one step of some layer reads another block."""
    from seer_attn.kernels.block_sparse_decode import block_sparse_decode
    from seer_attn.modeling_seer import seer_layer
    seen = []

    def spy(q, k, v, idx, lens, scale, block_size, **kw):
        seen.append((q, k, idx, kw["block_counts"], int(lens[0]), scale))
        return block_sparse_decode(q, k, v, idx, lens, scale, block_size, **kw)
    monkeypatch.setattr(seer_layer, "block_sparse_decode", spy)
    m = tiny(**DECODE)
    x = _ids(330, seed=4)

    def meanpool_best():
        best = []
        for q, k, idx, cnt, T, scale in seen:
            cur = (T - 1) // 64
            H = k.shape[1]
            means = block_pool(k[:, :, 1 * 64:cur * 64], 64, ("avg",))  # the full blocks after the sink
            p = torch.softmax(q.view(1, H, -1, q.shape[-1]) * scale @ means.transpose(-1, -2), -1).mean(2)
            best.append((idx[0, :, :3].sort(-1).values, cnt, 1 + p[0].argmax(-1), cur))
        seen.clear()
        return best
    for prior in (1.0, 0.0):
        m.set_seer_mode("dense", seer_decode_sparsity=True, seer_decode_budget=3 * 64,
                        seer_decode_meanpool_prior=prior)
        _greedy(m, x, 12)
        rows = meanpool_best()
        assert len(rows) == 11 * m.config.num_hidden_layers  # every step after the prefill, every layer
        agree = []
        for kept, cnt, best, cur in rows:
            assert cnt.eq(3).all() and kept[:, 0].eq(0).all() and kept[:, 2].eq(cur).all()
            agree.append(torch.equal(kept[:, 1], best))
        assert all(agree) if prior else not all(agree)


def test_sparse_decode_reads_fewer_blocks_and_changes_the_output(tiny):
    """A budget below the sequence's length drops blocks: the kept share is the budget's and
    the logits move (so the equality tests above are not trivially true)."""
    m = tiny(**DECODE)
    x = _ids(600, seed=4)
    dense = m.generate(x, max_new_tokens=5, do_sample=False, pad_token_id=0, output_scores=True,
                       return_dict_in_generate=True)
    m.set_seer_mode("dense", seer_decode_sparsity=True, seer_decode_budget=3 * 64)
    sparse = m.generate(x, max_new_tokens=5, do_sample=False, pad_token_id=0, output_scores=True,
                        return_dict_in_generate=True)
    assert torch.equal(sparse.scores[0], dense.scores[0])  # the prefill's logits
    assert (sparse.scores[1] - dense.scores[1]).abs().max() > 1e-3
    assert torch.allclose(m.seer_decode_density(), torch.tensor([3 / 10]))  # 600..604 tokens: 10 blocks


@torch.no_grad()
def test_batched_left_padded_generate_equals_each_sequence_alone(tiny):
    """Sparse prefill (threshold) and sparse decode (3 blocks of 7-10) in one generate call,
    batched with left padding, give each sequence the tokens it gets alone."""
    m = tiny(**DECODE, seer_mode="sparse", seer_sparsity_method="threshold", seer_threshold=0.05,
             seer_dense_last_rows=1, seer_decode_sparsity=True, seer_decode_budget=3 * 64)
    seqs = [_ids(n, seed=n)[0] for n in (450, 322, 258)]
    ids, mask = _left_pad(seqs, 450)
    out = _greedy(m, ids, 40, attention_mask=mask)
    assert m.seer_density().mean() < 0.95 and (m.seer_decode_density() < 0.7).all()
    for i, s in enumerate(seqs):
        alone = _greedy(m, s[None], 40)
        assert torch.equal(alone[0, len(s):], out[i, 450:]), f"sequence {i}"


@torch.no_grad()
def test_static_cache_equals_dynamic_cache(tiny):
    """Dense prefill + sparse decode with a static cache (generate's 4D masks, fixed slots)
    gives the dynamic cache's tokens, twice in a row (the cache is reused and reset)."""
    m = tiny(**DECODE, seer_decode_sparsity=True, seer_decode_budget=3 * 64)
    ids, mask = _left_pad([_ids(450, seed=5)[0], _ids(322, seed=6)[0]], 450)
    dyn = _greedy(m, ids, 30, attention_mask=mask)
    for _ in range(2):
        assert torch.equal(_greedy(m, ids, 30, attention_mask=mask, cache_implementation="static"), dyn)


@pytest.mark.parametrize("decode_sparsity", [False, True], ids=["dense-decode", "sparse-decode"])
@torch.no_grad()
def test_sparse_prefill_with_a_static_cache_equals_the_dynamic_cache(tiny, decode_sparsity):
    """seer_mode "sparse" with a static cache (generate passes a 4D mask): the prefill reads the
    padding from the mask's last row and attends sparsely over the cache's first T slots, with
    the dynamic cache's blocks and tokens, left-padded, sparse decode on or off."""
    m = tiny(**DECODE, seer_mode="sparse", seer_sparsity_method="nz_ratio", seer_nz_ratio=0.3,
             seer_decode_sparsity=decode_sparsity, seer_decode_budget=3 * 64)
    ids, mask = _left_pad([_ids(450, seed=5)[0], _ids(322, seed=6)[0]], 450)
    dyn = _greedy(m, ids, 20, attention_mask=mask)
    dyn_density = m.seer_density()
    assert dyn_density is not None and dyn_density.mean() < 0.9  # the prefill was sparse
    static = _greedy(m, ids, 20, attention_mask=mask, cache_implementation="static")
    assert torch.equal(static, dyn)
    torch.testing.assert_close(m.seer_density(), dyn_density, rtol=0, atol=0)  # the same blocks


@pytest.mark.parametrize("family", ["qwen2", "mistral"], ids=["qwen2-sliding-window-layer", "mistral-sliding-window"])
@torch.no_grad()
def test_sparse_prefill_with_a_static_cache_and_sliding_windows(family):
    """With sliding-window layers generate passes a dict of 4D masks (Qwen2) or a sliding one
    (Mistral), whose rows hide early keys: the padding comes from the diagonal, and the static
    cache gives the dynamic cache's tokens and blocks."""
    from seer_attn.modeling_seer.conversion import from_stock
    from seer_attn.modeling_seer.families import FAMILIES
    fam = FAMILIES[family]
    kw = {"qwen2": dict(use_sliding_window=True, sliding_window=128, max_window_layers=1),
          "mistral": dict(sliding_window=128)}[family]
    torch.manual_seed(0)
    stock = fam.stock_model_class(fam.stock_config_class(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False, **kw)).eval()
    m = from_stock(stock, seer_gate_hidden_size=32, seer_mode="sparse", seer_sparsity_method="nz_ratio",
                   seer_nz_ratio=0.3)
    ids, mask = _left_pad([_ids(300, seed=1)[0], _ids(230, seed=2)[0]], 300)
    dyn = _greedy(m, ids, 8, attention_mask=mask)
    dyn_density = m.seer_density()
    assert torch.equal(_greedy(m, ids, 8, attention_mask=mask, cache_implementation="static"), dyn)
    torch.testing.assert_close(m.seer_density(), dyn_density, rtol=0, atol=0)


def test_a_4d_mask_without_a_cache_is_refused_in_sparse_mode(tiny):
    m = tiny(seer_mode="sparse", seer_sparsity_method="nz_ratio", seer_nz_ratio=0.3)
    ids = _ids(130)
    mask = torch.ones(1, 1, 130, 130, dtype=torch.bool).tril()
    with pytest.raises(ValueError, match="takes a 2D padding attention_mask .* got a 4D mask") as err:
        m(input_ids=ids, attention_mask=mask)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("family, sliding", [("qwen2", False), ("qwen2", True), ("mistral", True)],
                         ids=["qwen2", "qwen2-sliding-window-layer", "mistral-sliding-window"])
@torch.no_grad()
def test_other_families_decode_sparsely(family, sliding):
    """The layer tier serves every family: a Qwen2 with decode gates gives dense decode's tokens
    with every block selected, and drops blocks at a small budget; sliding-window layers (Qwen2's
    layer 1; every Mistral layer) decode densely (their window is not a block selection)."""
    from seer_attn.modeling_seer.conversion import from_stock
    from seer_attn.modeling_seer.families import FAMILIES
    fam = FAMILIES[family]
    kw = {"qwen2": dict(use_sliding_window=True, sliding_window=128, max_window_layers=1),
          "mistral": dict(sliding_window=128)}[family] if sliding else {}
    torch.manual_seed(0)
    stock = fam.stock_model_class(fam.stock_config_class(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False, **kw)).eval()
    m = from_stock(stock, seer_gate_hidden_size=32, seer_decode_gate=True)
    x = _ids(300, seed=11)
    dense = _greedy(m, x, 12)
    m.set_seer_mode("dense", seer_decode_sparsity=True, seer_decode_method="share", seer_decode_share=1.0)
    assert torch.equal(_greedy(m, x, 12), dense)
    m.set_seer_mode("dense", seer_decode_sparsity=True, seer_decode_method="budget", seer_decode_budget=128)
    calls = [0, 0]
    for i, layer in enumerate(m.model.layers):
        attn = layer.self_attn
        attn._seer_decode = lambda *a, _f=attn._seer_decode, _i=i: (calls.__setitem__(_i, calls[_i] + 1), _f(*a))[1]
    _greedy(m, x, 12)
    # 11 decode steps after the prefill; the sliding-window layers never reach the sparse step
    assert calls == {False: [11, 11], True: [11, 0] if family == "qwen2" else [0, 0]}[sliding]
    if any(calls):
        assert torch.allclose(m.seer_decode_density(), torch.tensor([2 / 5]))  # over the sparse layers


# ----------------------------------------------------------------------------- torch.compile

def test_generate_never_compiles_the_forward_under_decode_sparsity(tiny, monkeypatch):
    """transformers compiles a static cache's decode steps (CUDA only, unless the compile config
    says every device): never with decode sparsity on, whose pooled-K cache is Python state."""
    from transformers import CompileConfig
    m = tiny(**DECODE, seer_decode_budget=3 * 64)
    compiled = []
    monkeypatch.setattr(m, "get_compiled_call", lambda cfg: (compiled.append(cfg), m.__call__)[1])
    cfg = CompileConfig(backend="eager")
    cfg._compile_all_devices = True
    x = _ids(150, seed=12)
    kw = dict(cache_implementation="static", compile_config=cfg)
    _greedy(m, x, 3, **kw)
    assert compiled  # dense decode: transformers would compile (the spy hands back the plain forward)
    compiled.clear()
    m.set_seer_mode("dense", seer_decode_sparsity=True)
    _greedy(m, x, 3, **kw)
    assert not compiled


@torch.no_grad()
def test_compiled_decode_step_launches_the_triton_kernel_eagerly(tiny, monkeypatch):
    """torch.compile of a sparse decode step (backend "eager": dynamo only) does not trace into
    the Triton launcher: every launch runs outside tracing (dynamo breaks the graph around it)
    and the logits equal the uncompiled step's."""
    import functools
    import importlib

    from seer_attn.modeling_seer import seer_layer
    mod = importlib.import_module("seer_attn.kernels.block_sparse_decode")
    monkeypatch.setattr(seer_layer, "block_sparse_decode", functools.partial(mod.block_sparse_decode, backend="triton"))
    compiling = []

    class Spy:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                compiling.append(torch.compiler.is_compiling())
                return self.kernel[grid](*args, **kwargs)
            return launch
    monkeypatch.setattr(mod, "_decode_split_kernel", Spy(mod._decode_split_kernel))
    m = tiny(**DECODE, seer_decode_sparsity=True, seer_decode_budget=2 * 64)
    x = _ids(150, B=2, seed=13)
    caches = [DynamicCache(config=m.config) for _ in range(2)]
    for cache in caches:
        tok = m(x, **{CACHE: cache}, use_cache=True).logits[:, -1:].argmax(-1)
    eager = m(tok, **{CACHE: caches[0]}, use_cache=True).logits
    torch._dynamo.reset()
    compiling.clear()
    try:
        compiled = torch.compile(m, backend="eager")(tok, **{CACHE: caches[1]}, use_cache=True).logits
    finally:
        torch._dynamo.reset()
    assert compiling == [False] * m.config.num_hidden_layers
    torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------- refusals

@torch.no_grad()
def test_unsupported_cache_handling_is_refused(tiny):
    m = tiny(**DECODE, seer_decode_sparsity=True)
    x = _ids(200)
    with pytest.raises(ValueError, match=r"num_beams=2: seer_decode_sparsity does not support beam search"):
        m.generate(x, max_new_tokens=3, num_beams=2, pad_token_id=0)
    cache = DynamicCache(config=m.config)
    m(x, **{CACHE: cache}, use_cache=True)
    cache.crop(-5)
    with pytest.raises(ValueError, match=r"holds 195 tokens but its pooled-K cache 200"):
        m(x[:, :1], **{CACHE: cache}, use_cache=True)
    m.set_seer_mode("dense", seer_decode_sparsity=False)
    cache = DynamicCache(config=m.config)
    m(x, **{CACHE: cache}, use_cache=True)
    m.set_seer_mode("dense", seer_decode_sparsity=True)
    with pytest.raises(ValueError, match=r"already holds 200 tokens that were not seen with decode sparsity on"):
        m(x[:, :1], **{CACHE: cache}, use_cache=True)
    ids = torch.cat([x, torch.zeros(1, 5, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(1, 200), torch.zeros(1, 5)], 1).long()
    with pytest.raises(ValueError, match=r"needs left padding .* rows \[0\]"):
        m(ids, attention_mask=mask, use_cache=True)


@torch.no_grad()
def test_rewind_inside_the_partial_block(tiny):
    """Cropping the KV cache and rewinding its pooled-K cache by as many slots (rejected draft
    tokens) continues exactly as if the cropped tokens had never been fed; a rewind into a
    full block is refused."""
    m = tiny(**DECODE, seer_decode_sparsity=True, seer_decode_budget=2 * 64)
    x = _ids(215, seed=9)

    def steps(cache, lo, hi):
        return torch.cat([m(x[:, t:t + 1], **{CACHE: cache}, use_cache=True).logits for t in range(lo, hi)], 1)

    c1 = DynamicCache(config=m.config)
    m(x[:, :200], **{CACHE: c1}, use_cache=True)
    ref = steps(c1, 200, 215)
    c2 = DynamicCache(config=m.config)
    m(x[:, :200], **{CACHE: c2}, use_cache=True)
    steps(c2, 200, 205)
    c2.crop(-3)
    pooled_k_cache(c2).rewind(202)
    torch.testing.assert_close(steps(c2, 202, 215), ref[:, 2:], atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match=r"cannot rewind the pooled-K cache of layer 0 to 150 slots: it holds 3 full"):
        pooled_k_cache(c2).rewind(150)


# ----------------------------------------------------------------------------- config and gates

def test_decode_config_validation(tiny):
    with pytest.raises(ValueError, match=r"seer_decode_sparsity=True is invalid: decode sparsity needs decode gates"):
        tiny(seer_decode_sparsity=True)
    m = tiny(**DECODE)
    for kw, pattern in [(dict(seer_decode_method="topk"), r"seer_decode_method='topk' is invalid"),
                        (dict(seer_decode_budget=100), r"seer_decode_budget=100 is invalid: expected >= 128"),
                        (dict(seer_decode_share=0.0), r"seer_decode_share=0.0 is invalid"),
                        (dict(seer_decode_threshold=1.0), r"seer_decode_threshold=1.0 is invalid"),
                        (dict(seer_decode_mass=0.0), r"seer_decode_mass=0.0 is invalid: expected 0 < mass <= 1"),
                        (dict(seer_decode_sparsity=1), r"seer_decode_sparsity=1 is invalid: expected True or False"),
                        (dict(seer_decode_distill_rows=0), r"seer_decode_distill_rows=0 is invalid"),
                        (dict(seer_decode_keep_local=-1), r"seer_decode_keep_local=-1 is invalid"),
                        (dict(seer_decode_meanpool_prior=1.5), r"seer_decode_meanpool_prior=1.5 is invalid: expected "
                                                               r"a share 0 <= a <= 1"),
                        (dict(seer_decode_selector="top"), r"seer_decode_selector='top' is invalid: expected one "
                                                           r"of \('gate', 'oracle', 'streaming'\)")]:
        with pytest.raises(ValueError, match=pattern):
            m.set_seer_mode("dense", **kw)
    assert m.config.seer_decode_method == "budget"  # a refused change leaves the config as it was
    with pytest.raises(ValueError, match=r"seer_decode_gate=False cannot be changed on a built model"):
        m.set_seer_mode("dense", seer_decode_gate=False)


@torch.no_grad()
def test_gate_files_with_and_without_decode_gates(tiny, tmp_path, caplog):
    with_dec = tiny(seed=1, **DECODE)
    for layer in with_dec.model.layers:
        torch.nn.init.normal_(layer.self_attn.attn_gate.decode_gate.q_weight)
    path = with_dec.save_gates(tmp_path / "dec")
    other = tiny(seed=2, **DECODE)
    other.load_gates(path)
    for k, v in with_dec.gate_state_dict().items():
        assert torch.equal(other.gate_state_dict()[k], v), k
    assert any(".decode_gate." in k for k in with_dec.gate_state_dict())

    old = tiny(seed=3).save_gates(tmp_path / "old")  # a gate file of a model without decode gates
    before = {k: v.clone() for k, v in other.gate_state_dict().items() if ".decode_gate." in k}
    with caplog.at_level(logging.WARNING):
        other.load_gates(old)
    assert "holds no decode gates" in caplog.text
    assert all(torch.equal(other.gate_state_dict()[k], v) for k, v in before.items())
    assert torch.equal(other.model.layers[0].self_attn.attn_gate.q_weight,
                       tiny(seed=3).model.layers[0].self_attn.attn_gate.q_weight)
    with pytest.raises(ValueError, match=r"holds decode gates but this model has none; build it with "
                                         r"seer_decode_gate=True"):
        tiny(seed=3).load_gates(path)


@torch.no_grad()
def test_saved_folder_keeps_decode_gates_and_bundles_their_code(tiny, tmp_path):
    from transformers import AutoModelForCausalLM
    m = tiny(seed=4, **DECODE, seer_decode_sparsity=True, seer_decode_budget=3 * 64)
    x = _ids(400, seed=8)
    ref = _greedy(m, x, 6)
    m.save_pretrained(tmp_path)
    m2 = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert m2.config.seer_decode_sparsity and m2.model.layers[0].self_attn.attn_gate.decode_gate.q_weight.dtype \
        == torch.float32
    assert torch.equal(_greedy(m2, x, 6), ref)
    names = set(bundle_sources("seer_llama"))
    assert {"decode_cache.py", "decode_gate.py", "block_sparse_decode.py"} <= names
