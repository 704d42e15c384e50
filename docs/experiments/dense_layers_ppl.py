"""Perplexity of the density knob with and without the first layers dense, at near-equal overall density (CPU).

``seer_dense_layers`` brings back the 4k passkey prompts the knob loses (gate_quality.md
section 7); this measures what it costs in perplexity when the other layers pay for it. Run
from a clone (after ``bash .ci/install.sh``; the embedded SmolLM2)::

    python docs/experiments/dense_layers_ppl.py GATES --eval eval.jsonl --length 4096 --windows 4

Prints dense PPL, then PPL and achieved density of each (dense layers, knob) pair; keep rules:
diagonal, sink, 1 local block, no dense last rows (the perplexity protocol's).
"""
import argparse
import time

import torch

from seer_attn.eval.perplexity import evaluate_perplexity, load_documents, make_windows
from seer_attn.modeling_seer.conversion import default_model_path, load_seer_model, load_tokenizer

KEEP = dict(seer_keep_diagonal=True, seer_keep_sink=True, seer_keep_local=1, seer_dense_last_rows=0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("gates", help="gates file (gates_*_bf16.safetensors of a gate_quality run)")
    ap.add_argument("--eval", help="jsonl corpus (default: the bundled eval corpus)")
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--pairs", nargs="+", default=["0:0.2", "4:0.1", "4:0.08", "0:0.12"],
                    help="DENSE_LAYERS:KNOB pairs")
    args = ap.parse_args()
    torch.set_num_threads(2)
    path = default_model_path()
    model = load_seer_model(path, dtype=torch.float32, gates=args.gates)
    tok = load_tokenizer(path)
    wins = make_windows(load_documents(args.eval), tok, args.length, 1)[:args.windows]
    model.set_seer_mode("dense")
    print(f"dense: ppl {evaluate_perplexity(model, windows=wins, progress=False)['ppl']:.3f}", flush=True)
    for pair in args.pairs:
        layers, _, rho = pair.partition(":")
        t0 = time.time()
        model.set_seer_mode("sparse", seer_sparsity_method="density", seer_density=float(rho),
                            seer_dense_layers=int(layers), **KEEP)
        r = evaluate_perplexity(model, windows=wins, progress=False)
        print(f"dense layers {layers}, knob {rho}: ppl {r['ppl']:.3f} at density {r['density']:.3f} "
              f"({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
