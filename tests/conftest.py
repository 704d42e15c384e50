"""Shared test setup for every test folder (kernels, modeling_seer, training, eval).

- Without CUDA, Triton kernels run in Triton's CPU interpreter: ``TRITON_INTERPRET=1`` is
  set here, before anything imports Triton (``@triton.jit`` picks interpreter mode when a
  kernel is decorated, i.e. when ``seer_attn.kernels`` is imported).
- Kernel launchers fill their outputs with NaN before the kernels run
  (``kernel_utils.POISON_OUTPUTS``), so an element a kernel forgets to write is NaN.
- Fixtures: ``device`` ("cuda" when available, else "cpu"), ``gen`` (a torch.Generator
  seeded from the test's id: fresh and reproducible per test), ``error_budget`` (the
  style guide's low-precision tolerance rule), ``windowed_mistral`` (a one-layer
  sliding-window model).
- Marker ``requires_cuda``: the test is skipped, with a reason, when no CUDA GPU is there
  (or when Triton is being interpreted).
"""
import os
import zlib

import pytest
import torch  # importing torch does not import triton

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Must happen before triton / seer_attn.kernels are imported anywhere.
    os.environ["TRITON_INTERPRET"] = "1"

from seer_attn.kernels import kernel_utils  # noqa: E402  (after the environment is set)

kernel_utils.POISON_OUTPUTS = True

DEVICE = "cuda" if HAS_CUDA else "cpu"
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "requires_cuda: needs a CUDA GPU running compiled Triton kernels; skipped otherwise")


def pytest_runtest_setup(item):
    if item.get_closest_marker("requires_cuda") is not None:
        if not HAS_CUDA:
            pytest.skip("requires a CUDA GPU (torch.cuda.is_available() is False)")
        if INTERPRETING:
            pytest.skip("requires compiled Triton kernels (TRITON_INTERPRET=1 is set)")


@pytest.fixture(autouse=True)
def _poison_kernel_outputs(monkeypatch):
    """Every test runs with NaN-poisoned kernel outputs, even if an earlier test reset the flag."""
    monkeypatch.setattr(kernel_utils, "POISON_OUTPUTS", True)


@pytest.fixture(scope="session")
def device():
    """Where tests put tensors: "cuda" when available, else "cpu" (Triton interpreter)."""
    return DEVICE


@pytest.fixture
def gen(request):
    """A CPU torch.Generator seeded from the test's node id: fresh per test, reproducible.

    Draw on the CPU with it and move to ``device`` afterwards, so a test sees the same
    numbers on every machine.
    """
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


def _max_err(a, b, rel):
    a, b = a.detach().float(), b.detach().float()
    err = (a - b).abs().max().item() if a.numel() else 0.0
    if rel and b.numel():
        err /= max(1.0, b.abs().max().item())
    return err


def check_error_budget(actual, ref32, ref_lowp, *, cap, slack, rel=False, what="output"):
    """The style guide's rule: err(actual) <= 2 * err(ref_lowp) + slack and err(actual) <= cap.

    ``ref32`` is the fp32 reference computed on the same (upcast) inputs, ``ref_lowp`` the
    reference run in the inputs' own low precision. Errors are max-abs differences to
    ``ref32``; with ``rel`` they are divided by ``max(1, max|ref32|)`` (for gradients, whose
    scale grows with the sequence length). NaN anywhere fails. Returns (err, ref_err).
    """
    assert actual.shape == ref32.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(ref32.shape)}"
    n_bad = (~torch.isfinite(actual)).sum().item()
    assert n_bad == 0, f"{what}: {n_bad} non-finite elements (NaN-poisoned output not written?)"
    err = _max_err(actual, ref32, rel)
    ref_err = _max_err(ref_lowp, ref32, rel)
    budget = 2.0 * ref_err + slack
    assert err <= budget and err <= cap, (
        f"{what}: error {err:.3e} vs fp32 reference; low-precision reference error {ref_err:.3e}; "
        f"budget 2*{ref_err:.3e}+{slack:.1e}={budget:.3e}, hard cap {cap:.1e}")
    return err, ref_err


@pytest.fixture(scope="session")
def error_budget():
    """:func:`check_error_budget` as a fixture (conftest modules are not imported by tests)."""
    return check_error_budget


@pytest.fixture(scope="session")
def windowed_mistral():
    """``build(window, **seer)``: a one-layer SeerMistral (vocabulary 512, 4 query / 2 KV
    heads, sliding window ``window`` tokens) converted from a stock model seeded with 0; the
    ``seer`` options go to the conversion."""
    def build(window, **seer):
        from transformers import MistralConfig, MistralForCausalLM

        from seer_attn.modeling_seer.conversion import from_stock
        torch.manual_seed(0)
        stock = MistralForCausalLM(MistralConfig(vocab_size=512, hidden_size=64, intermediate_size=128,
                                                 num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                                 sliding_window=window, max_position_embeddings=4096))
        return from_stock(stock, seer_gate_hidden_size=32, **seer)
    return build
