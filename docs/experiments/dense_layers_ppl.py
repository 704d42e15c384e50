"""Perplexity of the density knob with and without the first layers dense, at near-equal overall density.

``seer_dense_layers`` brings back the 4k passkey prompts the knob loses (gate_quality.md
section 7); this measures what it costs in perplexity when the other layers pay for it. Run
from a clone (after ``bash .ci/install.sh``; the embedded SmolLM2)::

    python docs/experiments/dense_layers_ppl.py GATES --eval eval.jsonl --length 4096 --windows 4 \\
        --settings density=0.2 dense=0-3,density=0.1

Settings are passkey_cells.py's (``dense=A-B``, ``early=A-B:R``, ``density=R``, ``oracle`` ...)
under the perplexity protocol's keep rules: diagonal, sink, 1 local block, no dense last rows.
``--device cuda`` runs bf16 over every window (``--windows 0``) as gate_quality's PPL phase.
Prints dense PPL, then PPL and achieved density of each setting, with the last window's density per layer.
"""
import argparse
import time

import torch

from passkey_cells import applied, model_dtype, profile_sample
from seer_attn.eval.perplexity import evaluate_perplexity, load_documents, make_windows
from seer_attn.modeling_seer.conversion import default_model_path, load_seer_model, load_tokenizer
from seer_attn.training.results import write_envelope


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("gates", help="gates file (gates_*_bf16.safetensors of a gate_quality run)")
    ap.add_argument("--eval", help="jsonl corpus (default: the bundled eval corpus)")
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--windows", type=int, default=4, help="first N windows (2 per document); 0: all")
    ap.add_argument("--settings", nargs="+", default=["density=0.2", "dense=0-3,density=0.1",
                                                      "dense=0-3,density=0.08", "density=0.12"])
    ap.add_argument("--profile-from", help="jsonl corpus of profile=C's sample (default: the bundled train corpus)")
    ap.add_argument("--profile-length", type=int, help="tokens per window of that sample (default: --length)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["bf16", "fp32"],
                    help="default: bf16 on cuda (as gate_quality's PPL phase), fp32 on cpu")
    ap.add_argument("--out", help="also write the results as a JSON envelope here")
    args = ap.parse_args()
    args.profile_length = args.profile_length or args.length
    torch.set_num_threads(2)
    path = default_model_path()
    dtype = model_dtype(args)
    model = load_seer_model(path, dtype=dtype, gates=args.gates).to(args.device)
    tok = load_tokenizer(path)
    wins = make_windows(load_documents(args.eval), tok, args.length, 2)
    wins = wins[:args.windows] if args.windows else wins
    model.set_seer_mode("dense")
    r = evaluate_perplexity(model, windows=wins, progress=False)
    rows = [{"setting": "dense", "ppl": r["ppl"], "density": None, "windows": r["windows"]}]
    print(f"dense: ppl {r['ppl']:.3f} over {r['windows']} windows of {args.length}", flush=True)

    def save(complete):
        if args.out:
            write_envelope(args.out, "dense_layers_ppl", rows, config=vars(args), model=path, complete=complete,
                           device=args.device)
    for spec in args.settings:
        t0 = time.time()
        with applied(model, spec, profile_sample(args, tok, spec), seer_dense_last_rows=0):
            r = evaluate_perplexity(model, windows=wins, progress=False)
        per_layer = model.seer_density().float().mean(dim=(1, 2))  # the last window's, per layer
        rows.append({"setting": spec, "ppl": r["ppl"], "density": r["density"], "windows": r["windows"],
                     "layer_density_last_window": [round(x, 4) for x in per_layer.tolist()]})
        save(False)
        print(f"{spec}: ppl {r['ppl']:.3f} at density {r['density']:.3f} ({time.time() - t0:.0f} s); layers "
              + " ".join(f"{x:.2f}" for x in per_layer.tolist()), flush=True)
    save(True)


if __name__ == "__main__":
    main()
