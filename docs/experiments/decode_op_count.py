"""Host work of one sparse decode step, counted on a CPU (docs/design.md §2, "Decode").

A decode step on the GPU is launch-bound when every layer runs dozens of small torch ops
around the attention kernel. This script counts, for a random SeerLlama at two depths,
the aten operators one decode forward dispatches (views and other metadata-only ops apart
and allocations apart from the ops that launch work) and the Triton launches, with dense decode and with sparse
decode through the Triton kernels (run by the interpreter here; the counts are the GPU's:
the same Python runs there). From the two depths it solves ops = per_step + layers *
per_layer, and prints the sparse decode's extra work per layer over dense decode.

    TRITON_INTERPRET=1 python docs/experiments/decode_op_count.py

Counts are exact and machine-independent; they say nothing about time (bench-decode measures
that on the GPU).
"""
import collections
import functools
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes  # noqa: E402

from seer_attn.modeling_seer import SeerLlamaConfig, SeerLlamaForCausalLM  # noqa: E402

#: ops that only make a new view / read metadata (no kernel on a GPU)
VIEW_OPS = {"view", "_unsafe_view", "reshape", "permute", "transpose", "expand", "slice", "select", "unsqueeze",
            "squeeze", "t", "alias", "as_strided", "detach", "split", "chunk", "unbind", "narrow", "lift_fresh",
            "_reshape_alias", "view_as", "expand_as", "sym_size", "sym_stride", "sym_numel", "dim", "is_same_size",
            "_local_scalar_dense_meta", "sym_storage_offset", "unflatten", "flatten", "contiguous", "diagonal",
            "_to_copy_meta", "is_contiguous", "stride", "size"}
#: ops that only allocate (the caching allocator; no kernel)
ALLOC_OPS = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided"}


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()
        self.triton = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    def launching(self):
        return sum(n for name, n in self.ops.items() if name not in VIEW_OPS and name not in ALLOC_OPS)

    def total(self):
        return sum(self.ops.values())


class _CountedKernel:
    """Wraps a ``@triton.jit`` kernel: counts its launches and runs it outside the counter
    (the interpreter's own tensor copies are not the model's ops)."""

    def __init__(self, kernel, counter_ref):
        self.kernel, self.counter_ref = kernel, counter_ref

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if self.counter_ref[0] is not None:
                self.counter_ref[0].triton += 1
            with _disable_current_modes():
                return self.kernel[grid](*args, **kwargs)
        return launch


def _patch_kernels(counter_ref):
    """Every Triton kernel the decode path launches, counted; the decode call forced to Triton."""
    import importlib
    from seer_attn.modeling_seer import seer_layer
    patched = []
    for modname in ("seer_attn.kernels.block_sparse_decode", "seer_attn.kernels.decode_select"):
        try:
            mod = importlib.import_module(modname)
        except ImportError:
            continue
        for name in dir(mod):
            obj = getattr(mod, name)
            if name.startswith("_") and name.endswith("_kernel") and hasattr(obj, "run"):
                setattr(mod, name, _CountedKernel(obj, counter_ref))
                patched.append(f"{modname}.{name}")
    from seer_attn.kernels.block_sparse_decode import block_sparse_decode
    seer_layer.block_sparse_decode = functools.partial(block_sparse_decode, backend="triton")
    return patched


def _model(layers, dtype):
    cfg = SeerLlamaConfig(vocab_size=96, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                          num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096,
                          seer_gate_hidden_size=32, seer_decode_gate=True, seer_decode_method="share",
                          seer_decode_share=0.3, tie_word_embeddings=False)
    torch.manual_seed(0)
    m = SeerLlamaForCausalLM(cfg).eval().to(dtype)
    for layer in m.model.layers:
        layer.self_attn.attn_gate.float()
    return m


@torch.no_grad()
def count(layers, sparse, counter_ref, steps=3, prompt=300, dtype=torch.float16):
    """Ops of each of ``steps`` decode forwards after a prefill of ``prompt`` tokens (the
    last step's counts; the steps stay inside one block, so no block fills)."""
    from transformers import DynamicCache
    m = _model(layers, dtype)
    m.set_seer_mode("dense", seer_decode_sparsity=sparse)
    cache = DynamicCache(config=m.config)
    ids = torch.randint(1, 96, (2, prompt), generator=torch.Generator().manual_seed(0))
    arg = "cache" if "cache" in m.forward.__code__.co_varnames or _takes_cache(m) else "past_key_values"
    out = m(ids, use_cache=True, **{arg: cache})
    tok = out.logits[:, -1:].argmax(-1)
    last = None
    for i in range(steps):
        c = OpCounter()
        counter_ref[0] = c
        with c:
            out = m(tok, position_ids=torch.full((2, 1), prompt + i), use_cache=True, **{arg: cache})
        counter_ref[0] = None
        tok = out.logits[:, -1:].argmax(-1)
        last = c
    return last


def _takes_cache(m):
    import inspect
    from transformers import LlamaForCausalLM
    return "cache" in inspect.signature(LlamaForCausalLM.forward).parameters


def main():
    counter_ref = [None]
    patched = _patch_kernels(counter_ref)
    print("counted Triton kernels:", ", ".join(patched))
    res = {}
    for sparse in (False, True):
        for L in (2, 4):
            c = count(L, sparse, counter_ref)
            res[sparse, L] = (c.total(), c.launching(), c.triton, c.ops)
    print("| decode | layers | aten ops | of them launching work | Triton launches |")
    print("|---|---|---|---|---|")
    for (sparse, L), (tot, launch, tri, _) in res.items():
        print(f"| {'sparse' if sparse else 'dense'} | {L} | {tot} | {launch} | {tri} |")
    print()
    for what, i in (("aten ops", 0), ("launching ops", 1), ("Triton launches", 2)):
        per = {}
        for sparse in (False, True):
            a, b = res[sparse, 2][i], res[sparse, 4][i]
            per[sparse] = ((b - a) / 2, a - (b - a))  # (per layer, per step)
        print(f"{what}: dense {per[False][0]:g}/layer + {per[False][1]:g}/step; sparse {per[True][0]:g}/layer + "
              f"{per[True][1]:g}/step; sparse decode adds {per[True][0] - per[False][0]:g} per layer and "
              f"{per[True][1] - per[False][1]:g} per step")
    if "-v" in sys.argv:
        d, s = res[False, 4][3], res[True, 4][3]
        print("\nextra ops of a 4-layer sparse step over dense, by name:")
        for name in sorted(set(d) | set(s), key=lambda n: -(s.get(n, 0) - d.get(n, 0))):
            if s.get(name, 0) != d.get(name, 0):
                print(f"  {name}: {s.get(name, 0) - d.get(name, 0):+d}")


if __name__ == "__main__":
    main()
