"""How many PyTorch operations (aten calls, and those that launch a kernel) one layer of the
fine-tuning step issues, at SmolLM2-135M's layer shape (hidden 576, 9 query / 3 KV heads,
head_dim 64, MLP 1536): a dense-mode layer (the stock attention, one SDPA call) forward and
backward, against the block selection a sparse layer adds (gate pooling and scoring, top-k and
keep rules, density). CPU only; counts do not depend on the sequence length. Used by
docs/experiments/finetune_step_time.md.

    python docs/experiments/finetune_op_counts.py
"""
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import seer_attn.modeling_seer.seer_layer as layer
from seer_attn.modeling_seer import SeerForwardContext, SeerLlamaConfig, SeerLlamaForCausalLM

#: aten calls that only make a view or read metadata (no kernel on a GPU)
VIEWS = {"view", "unsqueeze", "permute", "expand", "split", "transpose", "_unsafe_view", "slice", "lift_fresh", "t",
         "alias", "squeeze", "detach", "select", "as_strided", "reshape", "_reshape_alias", "unbind", "chunk"}


class Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = self.kernels = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        self.kernels += func.__name__.split(".")[0] not in VIEWS
        return func(*args, **(kwargs or {}))


def model(layers, **seer):
    cfg = SeerLlamaConfig(vocab_size=512, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                          num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                          **seer)
    torch.manual_seed(0)
    m = SeerLlamaForCausalLM(cfg).train()
    for name, p in m.named_parameters():
        p.requires_grad_("attn_gate" not in name)  # gates frozen
    return m


def dense_layer():
    """(forward, backward) Count of one dense-mode layer under bf16 autocast: 2 layers minus 1."""
    out = []
    for layers in (1, 2):
        m, x = model(layers), torch.randint(0, 512, (1, 1024))
        fwd, bwd = Count(), Count()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with fwd:
                loss = m(input_ids=x, labels=x, use_cache=False).loss
        with bwd:
            loss.backward()
        out.append((fwd, bwd))
    return [(b.calls - a.calls, b.kernels - a.kernels) for a, b in zip(*out)]


def selection():
    """Count of one layer's block selection in a sparse forward at nz_ratio 0.1 (frozen gates)."""
    m = model(1, seer_mode="sparse", seer_sparsity_method="nz_ratio", seer_nz_ratio=0.1)
    x = torch.randint(0, 512, (1, 1024))
    count = Count()
    wrapped = {}
    for name in ("select_blocks_for", "causal_density"):
        real = getattr(layer, name)

        def counted(*a, _real=real, **k):
            with count:
                return _real(*a, **k)
        wrapped[name] = real
        setattr(layer, name, counted)
    real_scores = layer.SeerAttentionMixin.block_scores

    def scores(self, *a, **k):
        with count:
            return real_scores(self, *a, **k)
    layer.SeerAttentionMixin.block_scores = scores
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            m(input_ids=x, labels=x, use_cache=False, seer_ctx=SeerForwardContext())
    finally:
        layer.SeerAttentionMixin.block_scores = real_scores
        for name, real in wrapped.items():
            setattr(layer, name, real)
    return count.calls, count.kernels


if __name__ == "__main__":
    (fc, fk), (bc, bk) = dense_layer()
    sc, sk = selection()
    print("| per layer | aten calls | of them launching a kernel |\n|---|---|---|")
    print(f"| dense-mode layer forward (SDPA: one call) | {fc} | {fk} |")
    print(f"| dense-mode layer backward | {bc} | {bk} |")
    print(f"| block selection of a sparse layer (gate scores, top-k, keep rules, density) | {sc} | {sk} |")
