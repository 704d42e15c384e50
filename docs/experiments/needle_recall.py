"""Needle-block recall of the gate vs the oracle top-k on one passkey prompt (CPU, fp32).

Run from a clone (after ``bash .ci/install.sh``; the model is the embedded SmolLM2 GGUF)::

    python docs/experiments/needle_recall.py LENGTH DEPTH SAMPLE GATES

e.g. ``python docs/experiments/needle_recall.py 4096 0.75 3 seer_outputs/d2400/gates_max_bf16.safetensors``
(gates from a quality run, docs/experiments/smollm2_quality_h100.md). nz_ratio 0.1 + sink +
local block + 2 dense last rows, each selector on its own sparse prefill; prints per layer
and query head the share of block rows after the needle that keep its block
(:func:`seer_attn.eval.passkey.needle_block_recall`), then the summary by half of the model.
"""
import argparse

import torch

from seer_attn.eval.passkey import PasskeyGenerator, needle_block_recall
from seer_attn.modeling_seer.conversion import default_model_path, load_seer_model, load_tokenizer


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("length", type=int, help="prompt length in tokens")
    ap.add_argument("depth", type=float, help="needle depth in [0, 1]")
    ap.add_argument("sample", type=int, help="prompt number of that (length, depth) cell")
    ap.add_argument("gates", help="gates file (seer_gates / gates_*_bf16 safetensors)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    model = load_seer_model(default_model_path(), dtype=torch.float32, gates=args.gates)
    tok = load_tokenizer(default_model_path())
    sample = PasskeyGenerator(tok).sample(args.length, args.depth, args.sample)
    res = {}
    for sel in ("oracle_max", "gate"):
        model.set_seer_mode("sparse", seer_selector=sel, seer_sparsity_method="nz_ratio", seer_nz_ratio=0.1,
                            seer_keep_sink=True, seer_keep_local=1, seer_dense_last_rows=2)
        res[sel] = r = needle_block_recall(model, tok, sample)
        print(sel, "needle block", r["needle_block"], "of", r["num_blocks"], "rows", r["rows"], flush=True)
    oracle, gate = res["oracle_max"]["recall"], res["gate"]["recall"]
    print("layer | oracle per head | gate per head")
    for layer in range(oracle.shape[0]):
        print(f"{layer:2d} | " + " ".join(f"{x:.2f}" for x in oracle[layer]) + " | "
              + " ".join(f"{x:.2f}" for x in gate[layer]))
    half = oracle.shape[0] // 2
    for name, sl in ((f"layers 0-{half - 1}", slice(0, half)), (f"layers {half}-{oracle.shape[0] - 1}",
                                                               slice(half, None))):
        o, g = oracle[sl], gate[sl]
        print(f"{name}: mean recall oracle {o.mean():.3f} gate {g.mean():.3f}; heads with oracle > 0.5: "
              f"{int((o > .5).sum())}, gate also > 0.5 there: {int(((o > .5) & (g > .5)).sum())}")


if __name__ == "__main__":
    main()
