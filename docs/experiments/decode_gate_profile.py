"""Where a graph-mode sparse decode layer's GPU time goes (issue 15), on the 8B attention shape.

bench-decode (commit 7867506, H200) put the decode gate and its selection at 26-68% of one
sparse layer replayed from a CUDA graph (``graph_layer`` minus the kernel alone). This script
replays each piece of a graph-mode step's attention from its own CUDA graph, at B x cache
settings, and prints median microseconds per piece:

- ``logits``: :meth:`DecodeGate.step_logits` (project and rotate the query, score the blocks);
- ``bias``: the scores plus the selection's bias (what :meth:`GraphDecodeStep.select` adds);
- ``topk_sorted`` / ``topk_unsorted``: the top-k of the share's width, sorted or not;
- ``top_blocks``: the bias add and the selection in one kernel (:func:`top_blocks`, what the
  graph-mode step runs since it replaced the two above);
- ``kernel``: :func:`block_sparse_decode` over that selection;
- ``record``: writing the new pre-RoPE key into the partial block (every step);
- ``record_fill``: the step that fills a block (pool, project, write the row);
- ``layer``: logits + bias + top-k (sorted) + kernel in one graph, as the eager step runs them;
- ``layer_top_blocks``: logits + :func:`top_blocks` + kernel, as the graph-mode step runs them.

    python docs/experiments/decode_gate_profile.py [--settings 1x131072 4x131072 16x32768] [--share 0.1]

No results file: a lab measurement for choosing the next change (docs/experiments/README.md).
"""
import argparse
import math

import torch

HQ, H, D, BS, G = 32, 8, 128, 64, 128


def graph_us(fn):
    """Median microseconds of ``fn`` replayed from a CUDA graph (bench-decode's helper)."""
    from seer_attn.eval.bench_decode import _graph_bench
    ms = _graph_bench(fn)
    if isinstance(ms, str):  # the capture's error
        raise RuntimeError(ms)
    return 1e3 * ms


@torch.no_grad()
def layer_inputs(B, S, share, seed=0):
    """One sparse decode layer's inputs at the 8B attention shape, bf16 on the GPU: a decode
    gate (random weights), its block keys (a slice of a larger buffer, as the pooled-K cache
    holds them), pre-RoPE and post-RoPE queries, the KV cache, the query's RoPE, the selection's
    bias (sink and current block forced), width ``K`` and counts, the cache lengths."""
    from seer_attn.modeling_seer.decode_gate import DecodeGate
    dev, dt = "cuda", torch.bfloat16
    torch.manual_seed(seed)
    gate = DecodeGate(HQ, H, D).to(dev)
    NB = -(-S // BS)
    keys = torch.randn(B, H, NB + 64, G, device=dev).to(dt)[:, :, :NB]
    e = torch.rand(B, G, device=dev) * 6.0
    bias = torch.zeros(B, 1, NB, device=dev)
    bias[..., 0] = bias[..., -1] = float("inf")
    K = max(2, math.ceil(share * NB))
    return dict(gate=gate, keys=keys, q_pre=torch.randn(B, HQ, 1, D, device=dev).to(dt),
                q=torch.randn(B, HQ, 1, D, device=dev).to(dt), k=torch.randn(B, H, S, D, device=dev).to(dt),
                v=torch.randn(B, H, S, D, device=dev).to(dt), rope=(e.cos().to(dt), e.sin().to(dt)), bias=bias,
                K=K, cnt=torch.full((B, H), K, dtype=torch.int32, device=dev),
                lens=torch.full((B,), S, dtype=torch.int32, device=dev))


@torch.no_grad()
def profile(B, S, share):
    from seer_attn.kernels import block_sparse_decode, top_blocks
    from seer_attn.modeling_seer.selection import block_pool
    dev, dt = "cuda", torch.bfloat16
    x = layer_inputs(B, S, share)
    gate, keys, q_pre, q, k, v, rope, bias, K, cnt, lens = (x[n] for n in (
        "gate", "keys", "q_pre", "q", "k", "v", "rope", "bias", "K", "cnt", "lens"))
    NB = keys.shape[2]
    scores = gate.step_logits(q_pre, keys, rope).squeeze(2)
    s = scores.float() + bias
    idx = torch.topk(s, K, dim=-1).indices
    buf = torch.randn(B, H, BS, D, device=dev).to(dt)
    k_new = torch.randn(B, H, 1, D, device=dev).to(dt)
    off = torch.tensor([5], device=dev)
    cur = torch.tensor([NB - 1], device=dev)
    block_rope = (rope[0][:, None], rope[1][:, None])

    def record():
        buf.index_copy_(2, off, k_new)

    def record_fill():
        buf.index_copy_(2, off, k_new)
        pooled = block_pool(buf, BS, ("max", "min", "avg"))
        keys.index_copy_(2, cur, gate.block_keys(pooled, rope=block_rope).to(keys.dtype))

    def layer():
        sc = gate.step_logits(q_pre, keys, rope).squeeze(2).float() + bias
        i = torch.topk(sc, K, dim=-1).indices
        return block_sparse_decode(q, k, v, i, lens, block_counts=cnt, check_lengths=False)

    def layer_top_blocks():
        i = top_blocks(gate.step_logits(q_pre, keys, rope).squeeze(2), bias, cnt, K)
        return block_sparse_decode(q, k, v, i, lens, block_counts=cnt, check_lengths=False)

    return {
        "logits": graph_us(lambda: gate.step_logits(q_pre, keys, rope)),
        "bias": graph_us(lambda: scores.float() + bias),
        "topk_sorted": graph_us(lambda: torch.topk(s, K, dim=-1, sorted=True)),
        "topk_unsorted": graph_us(lambda: torch.topk(s, K, dim=-1, sorted=False)),
        "top_blocks": graph_us(lambda: top_blocks(scores, bias, cnt, K)),
        "kernel": graph_us(lambda: block_sparse_decode(q, k, v, idx, lens, block_counts=cnt, check_lengths=False)),
        "record": graph_us(record),
        "record_fill": graph_us(record_fill),
        "layer": graph_us(layer),
        "layer_top_blocks": graph_us(layer_top_blocks),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", nargs="+", default=["1x131072", "4x131072", "16x32768", "16x131072"])
    ap.add_argument("--share", type=float, default=0.1)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("decode_gate_profile.py needs a CUDA GPU")
    rows = []
    for setting in args.settings:
        B, S = (int(x) for x in setting.split("x"))
        rows.append((B, S, profile(B, S, args.share)))
        torch.cuda.empty_cache()
    names = list(rows[0][2])
    print(f"\n# {torch.cuda.get_device_name()}  graph-replayed microseconds per piece, share {args.share}")
    print("B | cache | " + " | ".join(names))
    for B, S, r in rows:
        print(f"{B} | {S // 1024}k | " + " | ".join(f"{r[n]:.1f}" for n in names))


if __name__ == "__main__":
    main()
