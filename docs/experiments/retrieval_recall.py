"""Needle-block recall of several gate files against the oracle top-k, on passkey prompts (CPU, fp32).

Run from a clone (after ``bash .ci/install.sh``; the model is the embedded SmolLM2 GGUF)::

    python docs/experiments/retrieval_recall.py --gates shipped=training/gates/smollm2-135m-instruct.seer_gates.safetensors \\
        plain=seer_outputs/plain/model/seer_gates.safetensors --out seer_outputs/recall.json

For each prompt (``--lengths`` x ``--depths`` x ``--samples``), the oracle (top-k of the true
max-pooled map) and each gate select their blocks with the same per-row top-k (``--topk``
blocks a row beyond the sink, the block before the diagonal and the 2 dense last rows), each
on its own sparse prefill, and :func:`seer_attn.eval.passkey.needle_block_recall` gives per layer
and query head the share of block rows after the needle that keep its block. Printed per gate:
mean recall of the first and second half of the layers, and over the heads where the oracle
keeps the needle in more than half the rows ("look-back heads"), how many the gate keeps it in
too. ``--ppl-density`` adds each gate's perplexity on the bundled eval corpus with the density
knob (``gate:density=RHO``), so that a gate that gains recall by losing everything else shows.
The table is printed last; ``--out`` writes a results envelope.
"""
import argparse
import math

import torch

from seer_attn.eval.calibration import pick_calibration_windows
from seer_attn.eval.passkey import PasskeyGenerator, needle_block_recall
from seer_attn.eval.perplexity import evaluate_perplexity, load_documents, make_windows
from seer_attn.modeling_seer.conversion import default_model_path, load_seer_model, load_tokenizer
from seer_attn.training.results import write_envelope

KEEP = dict(seer_keep_sink=True, seer_keep_local=1, seer_dense_last_rows=2)


def _topk_ratio(k, nb):
    """The nz_ratio whose per-row k (k = int((1 - sqrt(1 - r)) * NB)) is ``k`` at ``nb`` blocks."""
    return 1 - (1 - (k + 0.5) / nb) ** 2


def _recall(model, tok, samples, selector, k):
    out = []
    for s in samples:
        nb = math.ceil(len(tok(s.prompt)["input_ids"]) / 64)
        model.set_seer_mode("sparse", seer_selector=selector, seer_sparsity_method="nz_ratio",
                            seer_nz_ratio=_topk_ratio(k, nb), **KEEP)
        out.append(needle_block_recall(model, tok, s)["recall"])
    return out


def summarize(oracle, gate):
    """Mean recall per half of the layers (oracle, gate) and the look-back heads of the second half."""
    o, g = torch.stack(oracle), torch.stack(gate)  # [prompts, layers, heads]
    half = o.shape[1] // 2
    late_o, late_g = o[:, half:], g[:, half:]
    look = late_o > 0.5
    return {"early_oracle": o[:, :half].mean().item(), "early_gate": g[:, :half].mean().item(),
            "late_oracle": late_o.mean().item(), "late_gate": late_g.mean().item(),
            "lookback_heads": int(look.sum()), "lookback_kept": int((look & (late_g > 0.5)).sum()),
            "lookback_recall": late_g[look].mean().item() if look.any() else None}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gates", nargs="+", required=True, metavar="NAME=PATH", help="gate files to compare")
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--depths", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    ap.add_argument("--samples", type=int, default=2, help="prompts per length and depth")
    ap.add_argument("--topk", type=int, default=3, help="blocks kept per row by the top-k (beyond the keep rules)")
    ap.add_argument("--ppl-density", type=float, default=None, help="also the PPL of each gate at this density")
    ap.add_argument("--ppl-length", type=int, default=2048)
    ap.add_argument("--ppl-windows", type=int, default=4)
    ap.add_argument("--out", default=None, help="results envelope (JSON)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    gates = dict(g.split("=", 1) for g in args.gates)
    path = default_model_path()
    tok = load_tokenizer(path)
    gen = PasskeyGenerator(tok)
    samples = [gen.sample(n, d, i) for n in args.lengths for d in args.depths for i in range(args.samples)]
    model = load_seer_model(path, dtype=torch.float32, gates=next(iter(gates.values())))
    model.eval()
    oracle = _recall(model, tok, samples, "oracle_max", args.topk)
    wins = None
    if args.ppl_density is not None:
        wins = pick_calibration_windows(make_windows(load_documents(), tok, args.ppl_length, 1), args.ppl_windows)
    rows = []
    for name, file in gates.items():
        model.load_gates(file)
        row = {"gates": name, "path": file, **summarize(oracle, _recall(model, tok, samples, "gate", args.topk))}
        if wins is not None:
            model.set_seer_mode("sparse", seer_selector="gate", seer_sparsity_method="density",
                                seer_density=args.ppl_density, seer_keep_sink=True, seer_keep_local=1,
                                seer_dense_last_rows=0)
            res = evaluate_perplexity(model, windows=wins, progress=False)
            row.update(ppl=res["ppl"], ppl_density=res["density"])
        rows.append(row)
        print(row, flush=True)
    if args.out:
        write_envelope(args.out, "retrieval_recall", rows, config=vars(args), model=path, device="cpu",
                       prompts=[{"length": s.length, "depth": s.depth, "sample": s.sample} for s in samples])
    print("\n| gates | recall early: oracle / gate | recall late: oracle / gate | late look-back heads kept by the "
          "gate | their mean recall | PPL (density) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        ppl = f"{r['ppl']:.3f} ({r['ppl_density']:.3f})" if "ppl" in r else "—"
        lr = "—" if r["lookback_recall"] is None else f"{r['lookback_recall']:.3f}"
        print(f"| {r['gates']} | {r['early_oracle']:.3f} / {r['early_gate']:.3f} | {r['late_oracle']:.3f} / "
              f"{r['late_gate']:.3f} | {r['lookback_kept']} of {r['lookback_heads']} | {lr} | {ppl} |")


if __name__ == "__main__":
    main()
