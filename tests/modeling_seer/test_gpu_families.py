"""GPU: every family, with and without a sliding window, through the compiled Triton kernels
(the CPU suite, test_families.py, runs the torch references). A tiny random model in float32 at
2000 tokens (window 300 in the windowed variants): sparse at density 1 equals dense (stock
attention with transformers' mask), the Triton path equals the torch-reference path with the
same masks at density 0.3, and distillation gives a finite gate loss with gate gradients.
Skips without CUDA."""
import importlib

import pytest
import torch

from seer_attn.modeling_seer import SeerForwardContext
from seer_attn.modeling_seer.conversion import from_stock
from seer_attn.modeling_seer.families import FAMILIES

kernel_utils = importlib.import_module("seer_attn.kernels.kernel_utils")
pytestmark = pytest.mark.requires_cuda

TINY = dict(vocab_size=96, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=8192, rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False)
WINDOWED = {"qwen2": dict(use_sliding_window=True, sliding_window=300, max_window_layers=1),
            "qwen3": dict(use_sliding_window=True, sliding_window=300, max_window_layers=1),
            "mistral": dict(sliding_window=300)}
CASES = [pytest.param(n, {}, id=n) for n in sorted(FAMILIES)] + \
    [pytest.param(n, kw, id=f"{n}-window") for n, kw in sorted(WINDOWED.items())]


def _model(name, extra, **seer):
    torch.manual_seed(0)
    fam = FAMILIES[name]
    stock = fam.stock_model_class(fam.stock_config_class(**TINY, **extra)).cuda().eval()
    return stock, from_stock(stock, seer_gate_hidden_size=64, **seer)


@pytest.fixture(autouse=True)
def _exact_fp32_matmul():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.parametrize("name, extra", CASES)
@torch.no_grad()
def test_triton_sparse_paths(name, extra, monkeypatch):
    stock, seer = _model(name, extra)
    x = torch.randint(0, 96, (1, 2000), device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
    dense = stock(x).logits
    seer.set_seer_mode("sparse", seer_sparsity_method="nz_ratio", seer_nz_ratio=1.0)
    torch.testing.assert_close(seer(x).logits, dense, atol=1e-4, rtol=0)
    assert seer.seer_density().min().item() == 1.0
    seer.set_seer_mode("sparse", seer_nz_ratio=0.3)
    ctx = SeerForwardContext(masks=[])
    fast = seer(x, seer_ctx=ctx).logits
    monkeypatch.setattr(kernel_utils, "HAS_TRITON", False)  # the public functions fall back to the references
    slow = seer(x, seer_ctx=SeerForwardContext(forced_masks=ctx.masks)).logits
    torch.testing.assert_close(fast, slow, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name, extra", CASES)
def test_triton_distill_step(name, extra):
    _, seer = _model(name, extra, seer_mode="distill")
    for n, p in seer.named_parameters():
        p.requires_grad_(".attn_gate." in n)
    x = torch.randint(0, 96, (1, 2000), device="cuda", generator=torch.Generator(device="cuda").manual_seed(2))
    loss = seer(x, logits_to_keep=1).gate_loss
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for n, p in seer.named_parameters() if ".attn_gate." in n]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
