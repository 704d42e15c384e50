"""Diagnose the GPU decode mismatch of tests/modeling_seer/test_decode_gpu.py: the Triton
decode kernel against its fp32 reference on the model test's shapes (group 3, head_dim 64,
left pads 0 / 640 / 1000 of 4096 slots, every block selected). Prints one line per check.

Run on the H200 (commit 01be535): max error 5e-4 everywhere, so the kernel was not the cause.
The cause was the model's block lists: the current block came after the entries counted by
``block_counts`` whenever a row dropped entries (a left pad of a block or more), on CPU too;
tests/modeling_seer/test_decode.py::test_every_block_selected_equals_dense_decode_with_unaligned_left_padding
reproduces it on CPU and guards the fix (modeling_seer/selection.py lists the current block first)."""
import torch

from seer_attn.kernels import block_sparse_decode, block_sparse_decode_ref

torch.manual_seed(0)
dev = "cuda"
for group, D, S in ((3, 64, 4096 + 24), (4, 128, 4096 + 24), (3, 64, 4096 + 5)):
    B, H = 3, 3
    HQ = H * group
    q = torch.randn(B, HQ, 1, D, device=dev, dtype=torch.bfloat16)
    k = torch.randn(B, H, S, D, device=dev, dtype=torch.bfloat16)
    v = torch.randn(B, H, S, D, device=dev, dtype=torch.bfloat16)
    NB = (S + 63) // 64
    mask = torch.ones(B, H, NB, dtype=torch.bool, device=dev)
    lens = torch.full((B,), S, dtype=torch.int32, device=dev)
    for starts in (None, torch.tensor([0, 640, 1000], dtype=torch.int32, device=dev)):
        for splits in (None, 1, 4):
            got = block_sparse_decode(q, k, v, mask, lens, seq_starts=starts, num_splits=splits)
            ref = block_sparse_decode_ref(q, k, v, mask, lens, seq_starts=starts)
            err = (got.float() - ref.float()).abs().max().item()
            print(f"group {group} D {D} S {S} starts {None if starts is None else starts.tolist()} splits {splits}: "
                  f"max|err| {err:.4f}", flush=True)
