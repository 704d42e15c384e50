"""Graph-mode decode (modeling_seer/decode_graph.py): ``seer_generate`` runs the decode steps as
device ops only (static KV cache, preallocated pooled-K buffers, selection from a slot
tensor). On CPU the steps run eagerly; they must give ``generate``'s tokens."""
import pytest
import torch
from transformers import DynamicCache

from seer_attn.modeling_seer.decode_cache import pooled_k_cache

from decode_inputs import CACHE, DECODE, greedy as _greedy, ids as _ids, left_pad as _left_pad


@pytest.mark.parametrize("method, options", [
    ("budget", dict(seer_decode_budget=3 * 64)),
    ("share", dict(seer_decode_share=0.3)),
    ("threshold", dict(seer_decode_threshold=0.25)),
    ("mass", dict(seer_decode_mass=0.3)),
    ("mass", dict(seer_decode_mass=0.5, seer_decode_keep_local=1, seer_decode_selector="oracle")),
    ("share", dict(seer_decode_share=0.3, seer_decode_keep_local=2)),
    ("share", dict(seer_decode_share=0.3, seer_decode_selector="oracle")),
    ("budget", dict(seer_decode_budget=4 * 64, seer_decode_selector="streaming", seer_decode_keep_local=1)),
    ("budget", dict(seer_decode_budget=3 * 64, seer_decode_meanpool_prior=0.5)),
    ("threshold", dict(seer_decode_threshold=0.25, seer_decode_meanpool_prior=1.0)),
    ("budget", dict(seer_decode_budget=3 * 64, seer_decode_key_format="f8")),
    ("share", dict(seer_decode_share=0.3, seer_decode_key_format="i8", seer_decode_meanpool_prior=0.5)),
])
@torch.no_grad()
def test_graph_decode_equals_generate_left_padded(tiny, method, options):
    """Sparse prefill, then sparse decode steps that cross block boundaries (70 new tokens),
    batched with left padding: seer_generate's tokens and kept share equal generate's."""
    m = tiny(**DECODE, seer_mode="sparse", seer_sparsity_method="nz_ratio", seer_nz_ratio=0.3,
             seer_decode_sparsity=True, seer_decode_method=method, **options)
    ids, mask = _left_pad([_ids(450, seed=5)[0], _ids(322, seed=6)[0], _ids(100, seed=7)[0]], 450)
    ref = _greedy(m, ids, 70, attention_mask=mask)
    ref_density = m.seer_decode_density()
    assert ref_density[:2].max() < 0.8  # the decode steps of the long rows were sparse
    out = m.seer_generate(ids, attention_mask=mask, max_new_tokens=70)
    assert torch.equal(out, ref)
    torch.testing.assert_close(m.seer_decode_density(), ref_density, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_graph_decode_dense_equals_generate(tiny):
    """Without decode sparsity the graph steps attend densely over the static cache with a
    [B, 1, 1, S] mask: generate's tokens."""
    m = tiny(**DECODE)
    ids, mask = _left_pad([_ids(200, seed=1)[0], _ids(130, seed=2)[0]], 200)
    assert torch.equal(m.seer_generate(ids, attention_mask=mask, max_new_tokens=30),
                       _greedy(m, ids, 30, attention_mask=mask))


@torch.no_grad()
def test_share_one_reads_every_block_without_scoring(tiny, monkeypatch):
    """seer_decode_share=1 keeps every block whatever the scores: the eager and the graph steps read
    the whole cache without calling the decode gate or a selection (dense decode through the
    sparse kernel, the bench's dense row), with generate's dense tokens, left-padded, across block
    boundaries, and a kept share of 1."""
    from seer_attn.modeling_seer import decode_cache, decode_graph
    from seer_attn.modeling_seer.decode_gate import DecodeGate
    m = tiny(**DECODE)
    ids, mask = _left_pad([_ids(300, seed=1)[0], _ids(170, seed=2)[0]], 300)
    dense = _greedy(m, ids, 70, attention_mask=mask)

    def refuse(*a, **k):
        raise AssertionError("scored or selected at seer_decode_share=1")
    for target in (DecodeGate, decode_cache.DecodeStep, decode_graph.GraphDecodeStep):
        for name in ("step_logits", "step_query", "select"):
            if hasattr(target, name):
                monkeypatch.setattr(target, name, refuse)
    m.set_seer_mode("dense", seer_decode_sparsity=True, seer_decode_method="share", seer_decode_share=1.0)
    assert torch.equal(_greedy(m, ids, 70, attention_mask=mask), dense)
    assert torch.equal(m.seer_decode_density(), torch.ones(2))
    assert torch.equal(m.seer_generate(ids, attention_mask=mask, max_new_tokens=70), dense)
    assert torch.equal(m.seer_decode_density(), torch.ones(2))


def test_decode_every_block_lists_each_sequence_from_its_sink():
    from seer_attn.modeling_seer.selection import decode_every_block
    idx, cnt = decode_every_block(torch.tensor([0, 2, 5]), 5, 8, 2)
    assert idx.dtype == cnt.dtype == torch.int32 and idx.shape == (3, 2, 8) and cnt.shape == (3, 2)
    assert cnt[:, 0].tolist() == [6, 4, 1] and torch.equal(cnt[:, 0], cnt[:, 1])
    for b, first in enumerate([0, 2, 5]):
        n = cnt[b, 0].item()
        assert idx[b, 1, :n].tolist() == list(range(first, 6))  # sink .. current block
        assert idx[b].max() <= 7  # never past the width


@pytest.mark.parametrize("key_format", ["model", "f8", "i8"])
@torch.no_grad()
def test_graph_state_keys_equal_the_pooled_k_cache(tiny, key_format):
    """After steps that filled blocks, the graph state's gate keys and mean keys of every full block
    equal those the dynamic pooled-K cache computes for the same tokens; 8-bit keys (two blocks
    filled by decode steps, one by the prefill) in their format with their scales, codes equal up to
    one rounding step where the float32 projections differ in their last bits."""
    m = tiny(**DECODE, seer_decode_sparsity=True, seer_decode_budget=4 * 64, seer_decode_key_format=key_format)
    x = _ids(100)
    seq = m.seer_generate(x, max_new_tokens=100)  # 199 slots hold keys: 3 full blocks
    cache = DynamicCache(config=m.config)
    m(input_ids=seq[:, :199], use_cache=True, **{CACHE: cache})
    dyn = pooled_k_cache(cache)
    graph_state = m._seer_last_graph_state
    for layer in range(m.config.num_hidden_layers):
        g, d = graph_state.keys[layer][:, :, :3], dyn.gate_keys(layer)
        torch.testing.assert_close(graph_state.means[layer][:, :, :3], dyn.block_means(layer), rtol=1e-5, atol=1e-5)
        if key_format == "model":
            assert dyn.key_scales(layer) is None and graph_state.scales[layer] is None
            torch.testing.assert_close(g, d, rtol=1e-5, atol=1e-5)
            continue
        assert g.dtype == d.dtype == {"f8": torch.float8_e4m3fn, "i8": torch.int8}[key_format]
        torch.testing.assert_close(graph_state.scales[layer][:, :, :3], dyn.key_scales(layer), rtol=1e-5, atol=0)
        g, d = g.float(), d.float()
        step = 1.0 if key_format == "i8" else torch.maximum(g.abs(), d.abs()) / 8  # e4m3: 3 mantissa bits
        assert bool(((g - d).abs() <= step).all()) and (g == d).float().mean() > 0.98
        assert g.abs().amax(-1).min() > 100  # each block's largest code near the format's top (scaled)


@torch.no_grad()
def test_decode_key_format_is_fixed_per_cache(tiny):
    """A pooled-K cache keeps the key format of its prefill: a decode step with another
    seer_decode_key_format is refused naming both; an emptied cache may start with the new one."""
    m = tiny(**DECODE, seer_decode_sparsity=True, seer_decode_budget=2 * 64, seer_decode_key_format="f8")
    cache = DynamicCache(config=m.config)
    out = m(input_ids=_ids(150), use_cache=True, **{CACHE: cache})
    assert pooled_k_cache(cache).gate_keys(0).dtype == torch.float8_e4m3fn
    m.set_seer_mode("dense", seer_decode_key_format="model")
    nxt = out.logits[:, -1:].argmax(-1)
    with pytest.raises(ValueError, match="seer_decode_key_format='model'.*'f8'"):
        m(input_ids=nxt, use_cache=True, **{CACHE: cache})
    with pytest.raises(ValueError, match="seer_decode_key_format='q4' is invalid"):
        m.set_seer_mode("dense", seer_decode_key_format="q4")


@torch.no_grad()
def test_graph_decode_short_prompt_and_eos(tiny):
    """A prompt shorter than a block (no full block at the prefill) decodes; tokens after a
    row's EOS are EOS, as generate pads them."""
    m = tiny(**DECODE, seer_decode_sparsity=True, seer_decode_budget=2 * 64)
    x = _ids(20, B=2, seed=3)
    ref = _greedy(m, x, 80)
    out = m.seer_generate(x, max_new_tokens=80)
    assert torch.equal(out, ref)
    eos = int(ref[0, 25])
    ref_eos = m.generate(x, max_new_tokens=80, do_sample=False, pad_token_id=eos, eos_token_id=eos)
    out_eos = m.seer_generate(x, max_new_tokens=80, eos_token_id=eos)
    assert torch.equal(out_eos[:, :ref_eos.shape[1]], ref_eos)
    assert (out_eos[:, ref_eos.shape[1]:] == eos).all()


def test_graph_generate_refuses_bad_arguments(tiny):
    m = tiny(**DECODE, seer_decode_sparsity=True)
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1, got 0"):
        m.seer_generate(_ids(10), max_new_tokens=0)
    with pytest.raises(ValueError, match="input_ids must be a long tensor"):
        m.seer_generate(_ids(10).float())
    with pytest.raises(ValueError, match=r"attention_mask must have the shape of input_ids \(1, 10\)"):
        m.seer_generate(_ids(10), attention_mask=torch.ones(1, 9, dtype=torch.long))


@torch.no_grad()
@pytest.mark.parametrize("append", ["triton", "torch", "off"])
def test_graph_decode_with_compiled_pointwise_layers(tiny, monkeypatch, append):
    """With seer_compile_pointwise a graph-mode decode step runs each layer as the two compiled
    graphs around the cache writes (one decode_append launch: its Triton kernel in the
    interpreter, its torch ops, or with FUSED_APPEND off the static cache's update) and the
    sparse decode, with the eager layers' tokens, crossing block boundaries (the pooled-K
    buffer is written by the append)."""
    from seer_attn.modeling_seer import decode_graph, seer_layer
    m = tiny(**DECODE, seer_decode_sparsity=True, seer_decode_budget=3 * 64)
    ids, mask = _left_pad([_ids(300, seed=1)[0], _ids(200, seed=2)[0]], 300)
    ref = m.seer_generate(ids, attention_mask=mask, max_new_tokens=40)
    ref_density = m.seer_decode_density()
    calls, appends = [], []
    layer_in, decode_append = seer_layer._layer_in, decode_graph.decode_append
    monkeypatch.setattr(seer_layer, "_layer_in", lambda *a: calls.append(1) or layer_in(*a))
    monkeypatch.setattr(decode_graph, "decode_append", lambda *a, **k: appends.append(k) or decode_append(*a, **k))
    monkeypatch.setattr(decode_graph, "FUSED_APPEND", append != "off")
    monkeypatch.setattr(decode_graph, "APPEND_BACKEND", append if append != "off" else "auto")
    m.seer_compile_pointwise(backend="aot_eager")
    try:
        out = m.seer_generate(ids, attention_mask=mask, max_new_tokens=40)
    finally:
        m.seer_compile_pointwise(enable=False)
    assert torch.equal(out, ref)
    torch.testing.assert_close(m.seer_decode_density(), ref_density, rtol=1e-5, atol=1e-6)
    assert len(calls) == 39 * m.config.num_hidden_layers  # every decode step of every layer (not the prefill)
    assert len(appends) == (0 if append == "off" else len(calls))
    assert all(k["backend"] == append for k in appends)


@torch.no_grad()
def test_graph_decoder_refuses_a_cache_length_other_than_the_slot(tiny):
    from seer_attn.modeling_seer.decode_graph import GraphDecoder, graph_prefill
    m = tiny(**DECODE, seer_decode_sparsity=True, seer_decode_budget=3 * 64)
    ids = _ids(100, seed=3)
    _, cache, mask, pos = graph_prefill(m, ids, torch.ones_like(ids), 140)
    with pytest.raises(ValueError, match=r"the static cache holds \[100\] tokens but the next slot is 101"):
        GraphDecoder(m, cache, ids[:, -1:], pos, 101, mask)


@torch.no_grad()
@pytest.mark.parametrize("prior, one_launch", [(0.0, True), (0.7, True), (0.0, False)],
                         ids=["gate", "prior", "gate-two-launches"])
def test_top_k_methods_select_through_one_launch(tiny, monkeypatch, prior, one_launch):
    """The graph step's budget / share selection of the gate alone goes through
    kernels.decode_select.gate_top_blocks (scoring and selection in one launch; the references on
    a CPU), with the prior (or ONE_LAUNCH_GATE off) through top_blocks after the scores; once per
    layer and step, with generate's tokens."""
    from seer_attn.modeling_seer import decode_graph
    monkeypatch.setattr(decode_graph, "ONE_LAUNCH_GATE", one_launch)
    m = tiny(**DECODE, seer_decode_sparsity=True, seer_decode_budget=3 * 64, seer_decode_meanpool_prior=prior,
             seer_decode_key_format="model")  # the one-launch gate scores 16-bit keys only
    ids, mask = _left_pad([_ids(200, seed=3)[0], _ids(40, seed=4)[0]], 200)
    calls = {"gate_top_blocks": [], "top_blocks": []}
    for name, fn in [(n, getattr(decode_graph, n)) for n in calls]:
        monkeypatch.setattr(decode_graph, name, lambda *a, _n=name, _f=fn: calls[_n].append(a[-1]) or _f(*a))
    out = m.seer_generate(ids, attention_mask=mask, max_new_tokens=50)
    assert torch.equal(out, _greedy(m, ids, 50, attention_mask=mask))
    used, unused = ("top_blocks", "gate_top_blocks") if prior or not one_launch else ("gate_top_blocks", "top_blocks")
    assert calls[used] == [3] * (49 * m.config.num_hidden_layers)  # width: the budget's 3 blocks
    assert calls[unused] == []


@torch.no_grad()
def test_sampling_in_graph_mode(tiny):
    """do_sample: top_k=1 is greedy; a seed gives the same tokens again; a hot temperature
    moves away from greedy; only the top_k most likely tokens are ever drawn."""
    from seer_attn.modeling_seer.decode_graph import sampling_pick
    m = tiny(**DECODE, seer_decode_sparsity=True, seer_decode_budget=2 * 64)
    x = _ids(150, B=2, seed=5)
    greedy = m.seer_generate(x, max_new_tokens=20)
    assert torch.equal(m.seer_generate(x, max_new_tokens=20, do_sample=True, top_k=1), greedy)
    torch.manual_seed(0)
    a = m.seer_generate(x, max_new_tokens=20, do_sample=True, temperature=5.0)
    torch.manual_seed(0)
    assert torch.equal(m.seer_generate(x, max_new_tokens=20, do_sample=True, temperature=5.0), a)
    assert not torch.equal(a, greedy)
    logits = torch.randn(4, 96, generator=torch.Generator().manual_seed(1))
    allowed = torch.topk(logits, 3, dim=-1).indices
    pick = sampling_pick(2.0, top_k=3)
    draws = torch.cat([pick(logits) for _ in range(200)], dim=1)
    assert all(set(draws[b].tolist()) <= set(allowed[b].tolist()) for b in range(4))
    assert all(len(set(draws[b].tolist())) > 1 for b in range(4))
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]])
    for top_p, kept in [(0.79, [{0, 1}, {3, 2}]), (0.81, [{0, 1, 2}, {3, 2, 1}]), (0.3, [{0}, {3}])]:
        draws = torch.cat([sampling_pick(1.0, top_p=top_p)(probs.log()) for _ in range(300)], dim=1)
        assert [set(d.tolist()) for d in draws] == kept, top_p  # the nucleus, every member drawn
    tied = torch.tensor([[0.5, 2.0, -1.0, 2.0], [3.0, 3.0, 3.0, 0.0]])  # bf16 logits tie at the top
    assert all(torch.equal(sampling_pick(1.5, top_k=1)(tied), torch.tensor([[1], [0]])) for _ in range(20))
    torch.manual_seed(0)
    c = m.seer_generate(x, max_new_tokens=20, do_sample=True, temperature=5.0, top_p=0.9)
    torch.manual_seed(0)
    assert torch.equal(m.seer_generate(x, max_new_tokens=20, do_sample=True, temperature=5.0, top_p=0.9), c)
    assert torch.equal(m.seer_generate(x, max_new_tokens=20, do_sample=True, top_p=1e-6), greedy)  # the top alone
    with pytest.raises(ValueError, match=r"top_p must be a number in \(0, 1\] or None, got 1.5"):
        m.seer_generate(x, do_sample=True, top_p=1.5)
    with pytest.raises(ValueError, match="temperature must be a number > 0, got 0"):
        m.seer_generate(x, do_sample=True, temperature=0)
    with pytest.raises(ValueError, match="top_k must be an integer >= 1 or None, got 0"):
        m.seer_generate(x, do_sample=True, top_k=0)


@torch.no_grad()
def test_sparse_prefill_into_a_static_cache_with_a_2d_mask(tiny):
    """A forward into an empty static cache with a 2D padding mask (not generate's 4D one)
    attends sparsely over the cache's first T slots: the dynamic cache's logits and blocks."""
    from transformers import StaticCache
    m = tiny(**DECODE, seer_mode="sparse", seer_sparsity_method="nz_ratio", seer_nz_ratio=0.3)
    ids, mask = _left_pad([_ids(450, seed=5)[0], _ids(322, seed=6)[0]], 450)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    dyn = m(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
            **{CACHE: DynamicCache(config=m.config)})
    dyn_density = m.seer_density()
    assert dyn_density.mean() < 0.9
    m._last_density = None  # (so the density compared below is the static forward's)
    static = m(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
               **{CACHE: StaticCache(config=m.config, max_cache_len=500)})
    real = mask.bool()
    torch.testing.assert_close(static.logits[real], dyn.logits[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m.seer_density(), dyn_density, rtol=0, atol=0)


def test_greedy_pick_equals_argmax_with_ties_and_nan():
    """The two-stage argmax: torch.argmax's token, ties to the first index, NaN first, across and
    within chunks, and the one-stage path for a vocabulary that is not a multiple of the chunk."""
    from seer_attn.modeling_seer.decode_graph import ARGMAX_CHUNK, greedy_pick
    gen = torch.Generator().manual_seed(0)
    V = 8 * ARGMAX_CHUNK
    x = torch.randn(6, V, generator=gen).to(torch.bfloat16)
    x[1, 3 * ARGMAX_CHUNK + 5] = x[1, 7 * ARGMAX_CHUNK + 1] = 9.0  # tie across chunks: the first
    x[2, 40] = x[2, 41] = 9.0  # tie within a chunk
    x[3, 2 * ARGMAX_CHUNK + 7] = float("nan")
    x[3, 6 * ARGMAX_CHUNK] = float("nan")
    x[4] = float("-inf")
    x[5, V - 1] = 50.0
    assert torch.equal(greedy_pick(x), x.argmax(-1, keepdim=True))
    assert greedy_pick(x)[:4, 0].tolist() == [x[0].float().argmax().item(), 3 * ARGMAX_CHUNK + 5, 40,
                                              2 * ARGMAX_CHUNK + 7]
    y = torch.randn(3, V + 3, generator=gen)
    assert torch.equal(greedy_pick(y), y.argmax(-1, keepdim=True))


@torch.no_grad()
@pytest.mark.parametrize("method, options", [("share", dict(seer_decode_share=0.3, seer_decode_keep_local=1)),
                                             ("budget", dict(seer_decode_budget=3 * 64))])
def test_graph_steps_take_the_window_from_one_launch(tiny, monkeypatch, method, options):
    """The graph step's top-k bias and counts from decode_window's Triton kernel (the interpreter
    here): generate's tokens and kept share, batched with left padding across block boundaries."""
    from seer_attn.modeling_seer import decode_graph
    m = tiny(**DECODE, seer_mode="sparse", seer_sparsity_method="nz_ratio", seer_nz_ratio=0.3,
             seer_decode_sparsity=True, seer_decode_method=method, **options)
    ids, mask = _left_pad([_ids(450, seed=5)[0], _ids(322, seed=6)[0], _ids(100, seed=7)[0]], 450)
    ref = _greedy(m, ids, 70, attention_mask=mask)
    ref_density = m.seer_decode_density()
    calls = []
    window = decode_graph.decode_window
    monkeypatch.setattr(decode_graph, "decode_window",
                        lambda *a, **k: calls.append(k["backend"]) or window(*a, **{**k, "backend": "triton"}))
    monkeypatch.setattr(decode_graph, "ONE_LAUNCH_WINDOW", True)
    out = m.seer_generate(ids, attention_mask=mask, max_new_tokens=70)
    assert torch.equal(out, ref)
    torch.testing.assert_close(m.seer_decode_density(), ref_density, rtol=1e-5, atol=1e-6)
    assert calls == ["auto"] * 69  # once per decode step, shared by the layers
