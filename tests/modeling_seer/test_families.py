"""One suite for every family of the registry (docs/design.md §3): on a tiny random config,
dense logits equal the stock class with the same weights, sparse at density 1 equals dense,
distillation gives a finite gate loss that falls, the saved folder loads through
trust_remote_code in a process that cannot import this package, and conversion from the
stock model keeps its weights.

Every family runs with its stock defaults, and the families with sliding windows run again
with a 100-token window, shorter than the test sequences (``<family>-window`` ids): Qwen2 and
Qwen3 with their second layer sliding (``max_window_layers=1``), Mistral with every layer.
"""

import pytest
import torch

from seer_attn.hub_cards.push import run_without_package
from seer_attn.modeling_seer.conversion import from_stock
from seer_attn.modeling_seer.families import FAMILIES

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False)


#: config overrides of the window variants: a window shorter than every test sequence
WINDOW = 100
WINDOWED = {"qwen2": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
            "qwen3": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
            "mistral": dict(sliding_window=WINDOW)}
CASES = sorted(FAMILIES) + [f"{name}-window" for name in sorted(WINDOWED)]


def _stock(case, seed=0):
    name, _, variant = case.partition("-")
    torch.manual_seed(seed)
    fam = FAMILIES[name]
    stock = fam.stock_model_class(fam.stock_config_class(**TINY, **(WINDOWED[name] if variant else {}))).eval()
    if variant:  # the window reaches the attention layers (a layer type, or every layer for Mistral)
        assert any(getattr(layer.self_attn, "sliding_window", None) == WINDOW for layer in stock.model.layers) \
            or stock.config.model_type == "mistral" and stock.config.sliding_window == WINDOW
    return stock


def _x(T=200, B=2):
    return torch.randint(0, TINY["vocab_size"], (B, T), generator=torch.Generator().manual_seed(3))


@pytest.fixture(params=CASES)
def family(request):
    """A registry row, or ``<row>-window`` for its sliding-window variant."""
    return request.param


def _name(case):
    return case.partition("-")[0]


def test_dense_equals_stock_and_conversion_keeps_weights(family):
    stock = _stock(family)
    seer = from_stock(stock, seer_gate_hidden_size=32)
    assert type(seer).__name__ == FAMILIES[_name(family)].seer_model
    assert seer.config.model_type == f"seer_{_name(family)}"
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(seer(x).logits, stock(x).logits, atol=1e-5, rtol=0)
    own = seer.state_dict()
    assert all(torch.equal(own[k], v) for k, v in stock.state_dict().items())


def test_sparse_at_density_one_equals_dense(family):
    seer = from_stock(_stock(family, 1), seer_gate_hidden_size=32)
    x = _x()
    with torch.no_grad():
        dense = seer(x).logits
        seer.set_seer_mode("sparse", seer_sparsity_method="nz_ratio", seer_nz_ratio=1.0)
        sparse = seer(x).logits
    assert seer.seer_density().min().item() == 1.0
    torch.testing.assert_close(sparse, dense, atol=1e-4, rtol=0)


def test_distill_loss_finite_and_falling(family):
    seer = from_stock(_stock(family, 2), seer_gate_hidden_size=32, seer_mode="distill")
    for n, p in seer.named_parameters():
        p.requires_grad_(".attn_gate." in n)
    # the paper's learning rate; 1e-2 overshoots where q/k reach the gate RMS-normed (Qwen3)
    opt = torch.optim.AdamW([p for p in seer.parameters() if p.requires_grad], lr=1e-3)
    x = _x(T=320, B=1)
    losses = []
    for _ in range(10):
        loss = seer(x, logits_to_keep=1).gate_loss
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses


FRESH = """
import torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
x, ref = torch.load(sys.argv[2])
with torch.no_grad():
    print("MAXDIFF", (m(x).logits - ref).abs().max().item(), type(m).__name__)
"""


# one windowed variant is enough here: the bundle is the same files, the window travels in the config
@pytest.mark.parametrize("family", sorted(FAMILIES) + ["mistral-window"])
def test_saved_folder_loads_without_the_package(family, tmp_path):
    seer = from_stock(_stock(family, 4), seer_gate_hidden_size=32, seer_mode="sparse", seer_sparsity_method="nz_ratio",
                      seer_nz_ratio=0.3, seer_dense_last_rows=0)
    x = _x(T=300, B=1)
    with torch.no_grad():
        ref = seer(x).logits
    seer.save_pretrained(tmp_path / "model")
    torch.save((x, ref), tmp_path / "ref.pt")
    r = run_without_package(FRESH, [tmp_path / "model", tmp_path / "ref.pt"], tmp_path, 300, HF_HUB_OFFLINE="1",
                            HF_MODULES_CACHE=str(tmp_path / "modules"))
    assert r.returncode == 0, r.stdout + r.stderr
    line = next(l for l in r.stdout.splitlines() if l.startswith("MAXDIFF")).split()
    assert float(line[1]) == 0.0 and line[2] == FAMILIES[_name(family)].seer_model


def test_load_seer_model_converts_a_stock_folder(family, tmp_path):
    from seer_attn.modeling_seer.conversion import load_seer_model
    stock = _stock(family, 5)
    stock.save_pretrained(tmp_path / "stock")
    seer = load_seer_model(str(tmp_path / "stock"), seer_gate_hidden_size=32).eval()
    assert type(seer).__name__ == FAMILIES[_name(family)].seer_model
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(seer(x).logits, stock(x).logits, atol=1e-5, rtol=0)


def test_compile_pointwise_fuses_the_layer_and_matches_eager(family):
    """compile_pointwise (aot_eager backend) runs a sparse training forward as two graphs per layer
    around the attention, bypassing the attention module's own forward; loss and gradients equal the
    eager model's. A forward with a KV cache still runs the stock layer."""
    seer = from_stock(_stock(family, 6), seer_gate_hidden_size=32, seer_mode="sparse",
                      seer_sparsity_method="nz_ratio", seer_nz_ratio=0.5).train()
    x = _x(T=256, B=1)
    calls = []
    for layer in seer.model.layers:
        layer.self_attn.register_forward_hook(lambda *a: calls.append(1))

    def loss_and_grads():
        seer.zero_grad()
        loss = seer(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in seer.named_parameters() if p.grad is not None}

    ref_loss, ref_grads = loss_and_grads()
    assert len(calls) == TINY["num_hidden_layers"]
    seer.seer_compile_pointwise(backend="aot_eager")
    calls.clear()
    loss, grads = loss_and_grads()
    assert calls == []  # the fused path: the layer's graphs call the attention's pieces, not its forward
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():
        seer.eval()(input_ids=x, use_cache=True)
    assert len(calls) == TINY["num_hidden_layers"]  # with a cache: the stock layer and attention forward
