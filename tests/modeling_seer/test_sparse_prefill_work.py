"""The work of a sparse prefill in training (docs/experiments/finetune_step_time.md): at
nz_ratio 1 no block scores are computed (the mask is every causal block whatever the
scores), the recompute of an activation-checkpointed layer attends with the mask of its
forward instead of scoring and selecting again, and frozen gates build no autograd graph.
Each shortcut is checked against the computation it replaces: same masks, densities,
logits and gradients."""
import pytest
import torch

import seer_attn.modeling_seer.seer_layer as layer
from seer_attn.modeling_seer import SeerForwardContext, select_blocks_for
from seer_attn.modeling_seer.conversion import from_stock
from seer_attn.modeling_seer.families import FAMILIES



class _Count:
    """Counts the calls of ``seer_layer.select_blocks_for`` (every selection of a sparse prefill)."""

    def __init__(self, monkeypatch):
        self.calls = 0

        def counted(*a, **kw):
            self.calls += 1
            return select_blocks_for(*a, **kw)
        monkeypatch.setattr(layer, "select_blocks_for", counted)


VOCAB = 96  # the tiny models' (tests/modeling_seer/conftest.py)


def _ids(T, B=1, seed=0):
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def _windowed_mistral(tiny_kwargs):
    torch.manual_seed(0)
    fam = FAMILIES["mistral"]
    stock = fam.stock_model_class(fam.stock_config_class(**tiny_kwargs, sliding_window=150)).eval()
    return from_stock(stock, seer_gate_hidden_size=32), 150


@pytest.mark.parametrize("case", ["llama", "llama-left-padded", "mistral-window-150"])
@torch.no_grad()
def test_every_block_computes_no_scores(tiny, tiny_kwargs, case, monkeypatch):
    if case.startswith("mistral"):
        model, window = _windowed_mistral(tiny_kwargs)
    else:
        model, window = tiny(seed=1), None
    T, B = 450, 2
    ids = _ids(T, B, seed=2)
    mask = torch.ones(B, T, dtype=torch.long)
    if case.endswith("padded"):
        mask[1, :101] = 0
    dense = model(ids, attention_mask=mask).logits
    model.set_seer_mode("sparse", seer_sparsity_method="nz_ratio", seer_nz_ratio=1.0)

    def no_scores(*a, **kw):
        raise AssertionError("block scores computed at nz_ratio 1")
    monkeypatch.setattr(layer.AttnGate, "forward", no_scores)
    monkeypatch.setattr(layer, "select_blocks_for", no_scores)
    ctx = SeerForwardContext(masks=[])
    sparse = model(ids, attention_mask=mask, seer_ctx=ctx).logits
    real = mask.bool()
    torch.testing.assert_close(sparse[real], dense[real], atol=2e-5, rtol=1e-5)
    assert torch.equal(model.seer_density(), torch.ones(2, B, 4))
    # the recorded masks are what the selection gives at nz_ratio 1 for any scores
    NB = (T + 63) // 64
    want = select_blocks_for(torch.randn(B, 4, NB, NB), model.config, window)
    assert len(ctx.masks) == 2 and all(torch.equal(m, want) for m in ctx.masks)


def _enable_checkpointing(model):
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


@pytest.mark.parametrize("nz_ratio", [0.4, 1.0], ids=["nz_ratio-0.4", "nz_ratio-1"])
def test_checkpoint_recompute_reuses_the_forward_mask(tiny, nz_ratio, monkeypatch):
    count = _Count(monkeypatch)
    x = _ids(400, seed=3)
    runs = {}
    for name in ("plain", "checkpointed"):
        model = tiny(seed=4, seer_mode="sparse", seer_sparsity_method="nz_ratio", seer_nz_ratio=nz_ratio,
                     seer_dense_last_rows=0).train()
        if name == "checkpointed":
            _enable_checkpointing(model)
        count.calls = 0
        ctx = SeerForwardContext()
        model(input_ids=x, labels=x, use_cache=False, seer_ctx=ctx).loss.backward()
        runs[name] = ({n: p.grad for n, p in model.named_parameters() if p.grad is not None}, count.calls,
                      len(ctx.densities), set(ctx.layer_masks), model.seer_density())
    (plain, calls, n_dens, kept, dens), (ckpt, ckpt_calls, ckpt_dens, ckpt_kept, ckpt_density) = runs.values()
    # one selection per layer (none at nz_ratio 1), one density per layer: the recompute adds neither
    assert calls == ckpt_calls == (2 if nz_ratio < 1 else 0)
    assert n_dens == ckpt_dens == 2 and kept == ckpt_kept == {0, 1}
    assert torch.equal(dens, ckpt_density) and (nz_ratio == 1.0) == bool((dens == 1).all())
    # the recompute is the same computation with the same masks: bit-identical gradients
    assert set(plain) == set(ckpt) and all(torch.equal(plain[n], ckpt[n]) for n in plain)


@torch.no_grad()
def test_inference_keeps_no_masks(tiny):
    model = tiny(seer_mode="sparse", seer_sparsity_method="nz_ratio", seer_nz_ratio=0.4)
    ctx = SeerForwardContext()
    model(_ids(300), seer_ctx=ctx)
    assert ctx.layer_masks == {} and len(ctx.densities) == 2  # nothing held past its layer without a graph


@pytest.mark.parametrize("gate_loss_layers", [None, frozenset({0})], ids=["frozen", "gate-loss-layer-0"])
def test_gate_scores_need_autograd_only_in_gate_loss_layers(tiny, gate_loss_layers):
    model = tiny(seer_mode="sparse", seer_sparsity_method="nz_ratio", seer_nz_ratio=0.4).train()
    graph = {}
    hooks = [lyr.self_attn.attn_gate.register_forward_hook(lambda mod, args, out, i=i: graph.__setitem__(
        i, out.requires_grad)) for i, lyr in enumerate(model.model.layers)]
    x = _ids(300, seed=5)
    out = model(input_ids=x, labels=x, use_cache=False, seer_ctx=SeerForwardContext(gate_loss_layers=gate_loss_layers))
    for h in hooks:
        h.remove()
    assert out.loss.requires_grad
    # frozen selection runs under no_grad: the pooled gate inputs and scores record no graph
    assert graph == {0: gate_loss_layers is not None, 1: False}


@torch.no_grad()
def test_density_profile_spreads_the_knob_over_layers(tiny):
    """seer_density_profile: layer i keeps seer_density x profile[i] x s of its causal blocks (to
    one block of the layer), capped at 1, s such that the layers still keep seer_density on
    average where the keep rules' floor or the cap clip one; density_profile() gives the coverage
    rule's per-layer spread, mean 1."""
    from seer_attn.eval.calibration import density_profile
    from seer_attn.eval.perplexity import Window
    model = tiny(seed=2)
    T = 450
    ids = _ids(T, 1, seed=4)
    NB = (T + 63) // 64
    one_block = 1 / (4 * NB * (NB + 1) // 2)
    keep = dict(seer_sparsity_method="density", seer_density=0.5, seer_dense_last_rows=0)
    model.set_seer_mode("sparse", **keep, seer_density_profile=[1.5, 0.5])
    model(ids)
    per_layer = model.seer_density().float().mean(dim=(1, 2))
    assert abs(per_layer[0].item() - 0.75) <= one_block and abs(per_layer[1].item() - 0.25) <= one_block
    model.set_seer_mode("sparse", **keep, seer_density_profile=[3.0, 1.0])  # the spread counts, not the mean
    model(ids)
    per_layer = model.seer_density().float().mean(dim=(1, 2))
    assert abs(per_layer[0].item() - 0.75) <= one_block and abs(per_layer[1].item() - 0.25) <= one_block
    # the cap: 0.7 x 1.6 is more than every block; layer 1 gets what layer 0 cannot take (0.7 x 0.4 x 1.43)
    model.set_seer_mode("sparse", **{**keep, "seer_density": 0.7}, seer_density_profile=[1.6, 0.4])
    model(ids)
    per_layer = model.seer_density().float().mean(dim=(1, 2))
    assert per_layer[0].item() == 1.0 and abs(per_layer[1].item() - 0.4) <= one_block
    # the floor (the diagonal: 8 of 36 blocks): 0.6 x 0.2 is below it; layer 0 gives up what layer 1 must keep
    floor = NB / (NB * (NB + 1) // 2)
    model.set_seer_mode("sparse", **{**keep, "seer_density": 0.6}, seer_density_profile=[1.8, 0.2])
    model(ids)
    per_layer = model.seer_density().float().mean(dim=(1, 2))
    assert per_layer[1].item() == pytest.approx(floor) and abs(per_layer[0].item() - (1.2 - floor)) <= one_block
    assert abs(per_layer.mean().item() - 0.6) <= one_block
    model.set_seer_mode("sparse", seer_sparsity_method="coverage", seer_coverage=0.7, seer_density_profile=None)
    model(ids)
    expect = model.seer_density().float().mean(dim=(1, 2))
    prof = density_profile(model, [Window("doc", "test", 0, ids[0])], coverage=0.7)
    assert prof == pytest.approx((expect / expect.mean()).tolist(), rel=1e-6)
    assert model.config.seer_sparsity_method == "coverage"  # the mode is kept
    with pytest.raises(ValueError, match="coverage=0 is invalid"):
        density_profile(model, [Window("doc", "test", 0, ids[0])], coverage=0)


def test_dense_layer_in_gate_loss_layers_learns_but_attends_densely(tiny):
    """A layer among the first seer_dense_layers that is also a gate-loss layer (fine-tuning
    with the gate loss) adds its gate loss but attends to every block, as at inference."""
    model = tiny(seer_mode="sparse", seer_sparsity_method="nz_ratio", seer_nz_ratio=0.3, seer_dense_layers=1).train()
    x = _ids(450, seed=6)
    ctx = SeerForwardContext(gate_loss_layers=frozenset({0, 1}))
    out = model(input_ids=x, labels=x, use_cache=False, seer_ctx=ctx)
    assert len(ctx.gate_losses) == 2 and all(g.requires_grad for g in ctx.gate_losses)
    density = model.seer_density()
    assert torch.equal(density[0], torch.ones_like(density[0])) and bool((density[1] < 1).all())
    (out.loss + sum(ctx.gate_losses)).backward()
    grad = model.model.layers[0].self_attn.attn_gate.q_weight.grad
    assert grad is not None and bool(grad.abs().sum() > 0)  # the dense layer's gate is trained


@pytest.mark.parametrize("case", ["llama", "llama-left-padded", "mistral-window-150"])
def test_every_block_runs_sdpa_only_without_padding_or_window(tiny, tiny_kwargs, case, monkeypatch):
    """nz_ratio 1 goes through torch's SDPA when no row is padded and no window applies (cuDNN or
    flash on a GPU), else through the dense kernel; logits and gradients equal the dense kernel's."""
    if case.startswith("mistral"):
        model, _ = _windowed_mistral(tiny_kwargs)
    else:
        model = tiny(seed=1)
    T, B = 300, 2
    ids = _ids(T, B, seed=3)
    mask = torch.ones(B, T, dtype=torch.long)
    if case.endswith("padded"):
        mask[1, :77] = 0
    model.set_seer_mode("sparse", seer_sparsity_method="nz_ratio", seer_nz_ratio=1.0)
    calls = {"sdpa": 0, "dense": 0}
    sdpa, dense_attn = layer.causal_sdpa, layer.dense_attn

    def counted(name, fn):
        def f(*a, **kw):
            calls[name] += 1
            return fn(*a, **kw)
        return f
    monkeypatch.setattr(layer, "causal_sdpa", counted("sdpa", sdpa))
    monkeypatch.setattr(layer, "dense_attn", counted("dense", dense_attn))

    def run():
        model.zero_grad()
        out = model(ids, attention_mask=mask).logits
        out[mask.bool()].float().pow(2).mean().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]
    got, got_grads = run()
    expect_sdpa = case == "llama"
    assert calls == ({"sdpa": 2, "dense": 0} if expect_sdpa else {"sdpa": 0, "dense": 2})
    monkeypatch.setattr(layer, "causal_sdpa", lambda q, k, v, scaling: dense_attn(q, k, v, True, scaling, 64))
    want, want_grads = run()
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=2e-5, rtol=1e-5)
    assert len(got_grads) == len(want_grads) > 0
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_dense_layers_attend_densely_and_skip_scores(tiny, monkeypatch):
    """seer_dense_layers=1: layer 0 computes no scores and keeps every block; layer 1 still
    selects; every layer dense gives the dense model's logits."""
    model = tiny(seed=1)
    T = 450
    ids = _ids(T, 1, seed=3)
    dense = model(ids).logits
    model.set_seer_mode("sparse", seer_sparsity_method="nz_ratio", seer_nz_ratio=0.3, seer_dense_layers=1)
    scored = []
    select = layer._selection

    def spy(attn, *a):
        scored.append(attn.layer_idx)
        return select(attn, *a)
    monkeypatch.setattr(layer, "_selection", spy)
    ctx = SeerForwardContext(masks=[])
    sparse = model(ids, seer_ctx=ctx).logits
    assert scored == [1]
    density = model.seer_density()
    assert torch.equal(density[0], torch.ones_like(density[0])) and bool((density[1] < 1).all())
    assert not torch.allclose(sparse, dense, atol=1e-3)  # layer 1 is sparse: the logits move
    NB = (T + 63) // 64
    assert torch.equal(ctx.masks[0], torch.ones(1, 4, NB, NB, dtype=torch.bool).tril())
    model.set_seer_mode("sparse", seer_dense_layers=2)
    torch.testing.assert_close(model(ids).logits, dense, atol=2e-5, rtol=1e-5)
