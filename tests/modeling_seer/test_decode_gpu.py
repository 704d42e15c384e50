"""GPU: the model's sparse decode through the Triton kernel (the CPU tests run the torch
reference). A SmolLM2-shaped random model (30 layers would be slow to build; 4 layers of its
width: 9 query / 3 KV heads, head_dim 64), bf16, batch 3 left-padded, 4k-token prompts, a
static and a dynamic cache. Skipped without CUDA."""
import pytest
import torch

from seer_attn.modeling_seer import SeerLlamaConfig, SeerLlamaForCausalLM

pytestmark = pytest.mark.requires_cuda


def _model():
    cfg = SeerLlamaConfig(vocab_size=2048, hidden_size=576, intermediate_size=1536, num_hidden_layers=4,
                          num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                          initializer_range=0.1, rope_parameters={"rope_type": "default", "rope_theta": 1e5},
                          seer_decode_gate=True, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device("cuda"):
        m = SeerLlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    for layer in m.model.layers:
        layer.self_attn.attn_gate.float()
    return m


def _batch():
    gen = torch.Generator().manual_seed(0)
    lens, T = (4096, 4096 - 640, 4096 - 1000), 4096
    ids = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, n in enumerate(lens):
        ids[i, T - n:] = torch.randint(1, 2048, (n,), generator=gen)
        mask[i, T - n:] = 1
    return ids.cuda(), mask.cuda()


def _run(m, ids, mask, **kw):
    out = m.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0,
                     output_logits=True, return_dict_in_generate=True, **kw)
    return out.sequences, torch.stack(out.logits, 1).float()


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@torch.no_grad()
def test_every_block_selected_matches_dense_decode(cache):
    """Share 1.0: the Triton decode kernel reads every block; each step's logits match dense
    decode (SDPA) as closely as bf16 allows, with the same prompt (teacher-forced tokens).
    Both runs are eager: transformers compiles a static cache's dense decode steps, and that
    compile alone moves this bf16 model's logits by 0.61 (H200, docs/experiments/
    decode_static_diag.py), while sparse decode never compiles; an eager reference compares
    the attention and nothing else."""
    m = _model()
    ids, mask = _batch()
    kw = {"cache_implementation": "static"} if cache == "static" else {}
    m.generation_config.disable_compile = True
    seq, dense = _run(m, ids, mask, **kw)
    m.set_seer_mode("dense", seer_decode_sparsity=True, seer_decode_method="share", seer_decode_share=1.0)
    forced = seq

    def allowed(b, prefix):
        return [int(forced[b, prefix.shape[-1]])]
    _, sparse = _run(m, ids, mask, prefix_allowed_tokens_fn=allowed, **kw)
    assert torch.equal(m.seer_decode_density(), torch.ones(3, device="cuda"))
    err = (sparse - dense).abs().max().item()
    assert err <= 0.05 * dense.abs().max().item(), err


@torch.no_grad()
def test_sparse_decode_runs_and_reads_the_share():
    m = _model()
    ids, mask = _batch()
    m.set_seer_mode("sparse", seer_sparsity_method="nz_ratio", seer_nz_ratio=0.3, seer_decode_sparsity=True,
                    seer_decode_method="share", seer_decode_share=0.1)
    seq, logits = _run(m, ids, mask)
    assert torch.isfinite(logits).all() and seq.shape == (3, 4096 + 24)
    d = m.seer_decode_density()
    assert ((d > 0.09) & (d < 0.13)).all(), d  # ceil(0.1 * n) of n = 55 .. 65 blocks


@pytest.mark.parametrize("decode_sparsity", [False, True], ids=["compiled-dense-decode", "sparse-decode"])
@torch.no_grad()
def test_sparse_prefill_with_a_static_cache(decode_sparsity):
    """A sparse prefill into a static cache (generate's 4D masks) keeps the dynamic cache's
    blocks, then decodes: densely through transformers' compiled static-cache steps (CUDA
    graphs), or sparsely (never compiled). The first step's logits come from the prefill alone
    and match the dynamic cache's; the runs finish with finite logits."""
    m = _model()
    ids, mask = _batch()
    m.set_seer_mode("sparse", seer_sparsity_method="nz_ratio", seer_nz_ratio=0.3,
                    seer_decode_sparsity=decode_sparsity, seer_decode_method="share", seer_decode_share=0.1)
    _, dyn = _run(m, ids, mask)
    dyn_density = m.seer_density()
    seq, static = _run(m, ids, mask, cache_implementation="static")
    assert torch.equal(m.seer_density(), dyn_density) and dyn_density.mean() < 0.9
    assert torch.isfinite(static).all() and seq.shape == (3, 4096 + 24)
    assert torch.equal(static[:, 0], dyn[:, 0])


@pytest.mark.parametrize("decode_sparsity, prior, keys", [(False, 0.0, "model"), (True, 0.0, "model"),
                                                       (True, 0.5, "model"), (True, 0.0, "f8"), (True, 0.0, "i8")],
                         ids=["dense-decode", "sparse-decode", "sparse-decode-prior", "sparse-decode-f8-keys",
                              "sparse-decode-i8-keys"])
@torch.no_grad()
def test_seer_generate_replays_a_cuda_graph_with_the_eager_tokens(decode_sparsity, prior, keys):
    """seer_generate: sparse prefill into a static cache, then 90 decode steps (crossing a
    block boundary) replayed from one CUDA graph give the tokens of the same steps run
    eagerly, and (sparse decode) the eager run's kept share; sparse decode reads fewer blocks;
    the same with the mean-pooled decode prior (its block means written inside the graph) and with
    8-bit gate keys (``seer_decode_key_format``: quantized inside the graph). (Equality
    with generate's tokens is tested on CPU in fp32: in bf16 generate's static-cache
    steps round differently and a random model's greedy tokens part after a few steps.)"""
    m = _model()
    m.set_seer_mode("sparse", seer_sparsity_method="nz_ratio", seer_nz_ratio=0.3,
                    seer_decode_sparsity=decode_sparsity, seer_decode_budget=8 * 64, seer_decode_meanpool_prior=prior,
                    seer_decode_key_format=keys)
    ids, mask = _batch()
    eager = m.seer_generate(ids, attention_mask=mask, max_new_tokens=90, cuda_graph=False)
    eager_density = m.seer_decode_density()
    graphed = m.seer_generate(ids, attention_mask=mask, max_new_tokens=90)
    assert torch.equal(graphed, eager)
    if decode_sparsity:
        assert (eager_density < 0.25).all()
        torch.testing.assert_close(m.seer_decode_density(), eager_density)


@torch.no_grad()
def test_compiled_graph_steps_write_the_cache_in_one_launch(monkeypatch):
    """With seer_compile_pointwise the graph steps write each layer's key, value, pre-RoPE key
    and length with decode_append (one launch): the tokens and kept share of the same steps with
    the static cache's own update (pure copies either way: equal, not close), across a block
    boundary."""
    from seer_attn.modeling_seer import decode_graph
    m = _model()
    m.set_seer_mode("sparse", seer_sparsity_method="nz_ratio", seer_nz_ratio=0.3, seer_decode_sparsity=True,
                    seer_decode_budget=8 * 64)
    ids, mask = _batch()
    m.seer_compile_pointwise()
    try:
        runs = []
        for fused in (False, True):
            monkeypatch.setattr(decode_graph, "FUSED_APPEND", fused)
            runs.append((m.seer_generate(ids, attention_mask=mask, max_new_tokens=90), m.seer_decode_density()))
    finally:
        m.seer_compile_pointwise(enable=False)
    assert torch.equal(runs[0][0], runs[1][0])
    assert torch.equal(runs[0][1], runs[1][1])
    assert (runs[1][1] < 0.25).all()


@torch.no_grad()
def test_seer_generate_samples_inside_the_cuda_graph():
    """Sampling replayed from the graph draws fresh noise each step (the tokens are not one
    repeated draw) and a seed reproduces them, with and without a top-p cut; top_k=1 is greedy."""
    m = _model()
    m.set_seer_mode("dense", seer_decode_sparsity=True, seer_decode_budget=8 * 64)
    ids, mask = _batch()
    greedy = m.seer_generate(ids, attention_mask=mask, max_new_tokens=40)
    assert torch.equal(m.seer_generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=True, top_k=1), greedy)
    torch.manual_seed(0)
    a = m.seer_generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=True, temperature=3.0)
    torch.manual_seed(0)
    b = m.seer_generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=True, temperature=3.0)
    assert torch.equal(a, b) and not torch.equal(a, greedy)
    assert len(set(a[0, -30:].tolist())) > 5
    torch.manual_seed(1)
    c = m.seer_generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=True, temperature=3.0, top_p=0.5)
    torch.manual_seed(1)
    assert torch.equal(m.seer_generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=True, temperature=3.0,
                                       top_p=0.5), c)
    assert not torch.equal(c, a)
