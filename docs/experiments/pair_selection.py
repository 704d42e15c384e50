"""Real gate masks and pair programs (issue 16's 128-row query tiles, ``FWD_OPTIONS["pair_rows"]``),
on the CPU: how much longer the union of two adjacent query blocks' lists is than the two lists
(the work a pair program does, in 64x64 tiles, over the row programs' work), and what a gate
that selects per pair of query blocks costs in perplexity at the same density.

    python docs/experiments/pair_selection.py --length 2048 --windows 8 --densities 0.5 0.3 0.2
    python docs/experiments/pair_selection.py --length 4096 --windows 4 --densities 0.2 0.1

Shipped SmolLM2 gates, windows of the bundled eval corpus, the density knob
(``seer_sparsity_method="density"``) with gate_quality.py's keep rules (diagonal, sink, the
block before the diagonal). Per density two selections:

- ``rows``: the knob as shipped (one selection per 64-row query block). Its masks give the
  pair work ratio: 2 x |union of blocks 2i, 2i+1| / (|row 2i| + |row 2i+1|), causal blocks,
  summed over the layer's heads and pairs (1.0: adjacent rows keep the same blocks; 2.0: they
  share none). A pair program's 128x64 tile did the work of two 64x64 tiles in 0.85 of their
  time at density 1.0 (the dense kernel's 128-row tiles against the sparse kernel's, H200), so
  pairs pay where the ratio is below ~1.15.
- ``pairs``: each pair of query blocks ranks its key blocks by the larger of its two rows'
  gate logits (both rows get that score), then the same knob; its work ratio and perplexity at
  its own achieved density.

Prints the perplexity, achieved density and work ratio (mean over layers, and the range) per
selection, and the dense perplexity.
"""
import argparse
import time

import torch

from seer_attn.eval.perplexity import evaluate_perplexity, load_documents, make_windows
from seer_attn.modeling_seer import seer_layer
from seer_attn.modeling_seer.conversion import load_seer_model, load_tokenizer
from seer_attn.modeling_seer.selection import select_blocks_for
from seer_attn.training.data import default_corpus_path

KEEP = dict(seer_keep_diagonal=True, seer_keep_sink=True, seer_keep_local=1, seer_dense_last_rows=0)
GATES = "training/gates/smollm2-135m-instruct.seer_gates.safetensors"


def pair_work_ratio(mask):
    """2 x |union of rows 2i, 2i+1| / (|row 2i| + |row 2i+1|) over causal blocks, per layer call."""
    NB = mask.shape[-1]
    m = mask & torch.ones(NB, NB, dtype=torch.bool, device=mask.device).tril()
    if NB % 2:
        m = torch.cat([m, torch.zeros_like(m[..., :1, :])], dim=-2)
    union = (m[..., 0::2, :] | m[..., 1::2, :]).sum().item()
    return 2.0 * union / max(1, m.sum().item())


def pair_scores(scores):
    """Both rows of each pair of query blocks get the elementwise max of the pair's logits
    (an odd last block keeps its own)."""
    NB = scores.shape[-2]
    even = NB - NB % 2
    s = scores.clone()
    top = torch.maximum(scores[..., 0:even:2, :], scores[..., 1:even:2, :])
    s[..., 0:even:2, :] = top
    s[..., 1:even:2, :] = top
    return s


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="GGUF / HF folder (default: the embedded SmolLM2 GGUF)")
    ap.add_argument("--gates", default=GATES)
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--densities", type=float, nargs="+", default=[0.5, 0.3, 0.2])
    args = ap.parse_args(argv)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_seer_model(args.model, device=dev, gates=args.gates)
    tok = load_tokenizer(args.model)
    windows = make_windows(load_documents(default_corpus_path("eval")), tok, args.length, 1)[:args.windows]
    t0 = time.time()
    model.set_seer_mode("dense")
    dense = evaluate_perplexity(model, windows=windows, progress=False)["ppl"]
    print(f"dense {dense:.3f} ({time.time() - t0:.0f} s)", flush=True)
    ratios = []

    def recording(scores, cfg, window=None, pairs=False):
        mask = select_blocks_for(pair_scores(scores) if pairs else scores, cfg, window)
        ratios.append(pair_work_ratio(mask))
        return mask

    lines = ["| density asked | selection | PPL | vs dense | density | pair work ratio, mean (min-max over layers) |",
             "|---|---|---|---|---|---|"]
    try:
        for rho in args.densities:
            for pairs in (False, True):
                ratios.clear()
                seer_layer.select_blocks_for = lambda s, c, w=None, p=pairs: recording(s, c, w, p)
                model.set_seer_mode("sparse", seer_sparsity_method="density", seer_density=rho, **KEEP)
                t0 = time.time()
                res = evaluate_perplexity(model, windows=windows, progress=False)
                name = "pairs" if pairs else "rows"
                line = (f"| {rho:g} | {name} | {res['ppl']:.3f} | {res['ppl'] / dense:.4f} | {res['density']:.4f} | "
                        f"{sum(ratios) / len(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f}) |")
                lines.append(line)
                print(line, f"({time.time() - t0:.0f} s)", flush=True)
    finally:
        seer_layer.select_blocks_for = select_blocks_for
    print(f"\n# {args.windows} windows of {args.length} tokens, dense {dense:.3f}\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
