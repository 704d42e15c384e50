"""Where a sparse decode step's time goes at B=4 / 128k (issue 15: end to end, sparse decode ran
0.44x of dense there, results/decode/h200.json), on the GPU.

The bench's random-weight 8B-shaped SeerLlama (``eval/bench_decode.py``: ``_model``,
``filled_cache``) with a few layers, a pre-filled 128k cache of 4 sequences; dense decode
(SDPA flash) and sparse decode (share 0.1) are each timed (median of 10 steps) and profiled
over 5 steps: GPU kernels by total time, CPU ops by self time.

    python docs/experiments/decode_profile.py [--layers 4] [--batch 4] [--tokens 131072]
"""
import argparse
import contextlib

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

from seer_attn.eval.bench_decode import _model, decode_run, filled_cache
from seer_attn.modeling_seer.decode_graph import cache_arg


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=131072)
    ap.add_argument("--share", type=float, default=0.1)
    args = ap.parse_args(argv)
    B, T = args.batch, args.tokens
    model = _model(args.layers)
    cache, state = filled_cache(model, B, T, 64)
    summary = {}
    for mode in ("dense", "sparse"):
        sparse = mode == "sparse"
        model.set_seer_mode("dense", seer_decode_sparsity=sparse, **({"seer_decode_share": args.share} if sparse
                                                                      else {}))
        state.rewind(T)
        s, _ = decode_run(model, cache, B, T, 10, 3)
        summary[mode] = s
        print(f"{mode}: {1e3 * s:.2f} ms per step, {1e3 * s / args.layers:.3f} ms per layer", flush=True)
        for layer in cache.layers:
            layer.rewind(T)
        state.rewind(T)
        tok = torch.zeros(B, 1, dtype=torch.long, device="cuda")
        ctx = sdpa_kernel(SDPBackend.FLASH_ATTENTION) if not sparse else contextlib.nullcontext()
        with ctx, torch.no_grad(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for i in range(5):
                pos = torch.full((B, 1), T + i, device="cuda")
                model(input_ids=tok, position_ids=pos, use_cache=True, logits_to_keep=1, **{cache_arg(model): cache})
                torch.cuda.synchronize()
        print(f"\n== {mode}: GPU kernels (5 steps)")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=22, max_name_column_width=70))
        print(f"\n== {mode}: CPU ops by self time (5 steps)")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=22, max_name_column_width=70))
    print({k: round(1e3 * v, 3) for k, v in summary.items()}, "ms per step")


if __name__ == "__main__":
    main()
