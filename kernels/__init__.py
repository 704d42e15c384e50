"""Attention kernels of seer-attn: Triton on CUDA, torch references on CPU.

Public API (tensors in the transformers layout ``[B, H, T, D]``):

- :func:`attn_with_pooling` -- exact attention + max-pooled block attention map;
- :func:`block_sparse_attn` -- attention over the blocks kept by a bool block mask;
- :func:`dense_attn` -- the same kernels with every block kept;
- :func:`block_sparse_decode` -- one new token per sequence over the selected KV-cache blocks
  (split-KV, one selection per KV head);
- :func:`gate_scores` -- a decode step's gate logits (RoPE and the block keys' dot, one launch);
- :func:`top_blocks` -- a decode step's kept KV blocks: each row's ``cnt`` best scores, no sort;
- :func:`gate_top_blocks` -- ``top_blocks(gate_scores(...))`` in one launch;
- :func:`prior_mix` -- a decode step's gate logits mixed with the mean-pooled prior (two launches);
- :func:`block_mask_to_indices`, :func:`causal_block_density`, :func:`random_block_mask`,
  :func:`window_block_mask` (the blocks a sliding window reaches);
- ``*_ref`` torch references with the same signatures.
"""
if __name__ == "kernels":
    # This folder was imported by its folder name, not as ``seer_attn.kernels``: the repository
    # root is on sys.path (``python -m ...`` or ``python -c`` run from it) and something asked
    # for the top-level package ``kernels``, which is Hugging Face's kernel-hub client
    # (transformers >= 5.25 depends on it and imports it). Hand the name over to that installed
    # package; seer-attn's kernels are only ever imported as ``seer_attn.kernels``.
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _spec = _machinery.PathFinder.find_spec(
        "kernels", [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != _root])
    if _spec is None:  # none installed: an empty module without a file (what a stray namespace
        # package looks like; transformers' availability check then reports the package missing)
        import types as _types
        _sys.modules["kernels"] = _types.ModuleType("kernels", "Not installed: seer-attn's kernels/ folder is "
                                                                "seer_attn.kernels, not a top-level package.")
    else:
        _module = _util.module_from_spec(_spec)
        _sys.modules["kernels"] = _module  # the import statement returns what sys.modules holds
        _spec.loader.exec_module(_module)
else:
    from .block_mask import block_mask_to_indices, causal_block_density, random_block_mask, window_block_mask
    from .block_sparse_attn import attn_with_pooling, block_sparse_attn, dense_attn
    from .block_sparse_decode import block_sparse_decode
    from .decode_select import gate_scores, gate_top_blocks, prior_mix, top_blocks
    from .kernel_utils import HAS_TRITON
    from .reference import (attn_with_pooling_ref, block_sparse_attn_ref, block_sparse_decode_ref, gate_scores_ref,
                            prior_mix_ref, top_blocks_ref)

    __all__ = [
        "attn_with_pooling", "block_sparse_attn", "dense_attn", "block_sparse_decode", "block_mask_to_indices",
        "causal_block_density", "random_block_mask", "window_block_mask", "attn_with_pooling_ref",
        "block_sparse_attn_ref", "block_sparse_decode_ref", "top_blocks", "top_blocks_ref", "gate_scores",
        "gate_top_blocks", "gate_scores_ref", "prior_mix", "prior_mix_ref", "HAS_TRITON",
    ]
