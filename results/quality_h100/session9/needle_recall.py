"""Needle-block recall of the gate vs the oracle top-k on one passkey prompt (CPU, fp32).

    python results/quality_h100/session9/needle_recall.py LENGTH DEPTH SAMPLE GATES

SmolLM2 (the embedded GGUF), nz_ratio 0.1 + sink + local block + 2 dense last rows, each
selector on its own sparse prefill; prints per layer and query head the share of block rows
after the needle that keep its block (see seer_attn.eval.passkey.needle_block_recall).
"""
import sys, torch
from seer_attn.eval.passkey import PasskeyGenerator, needle_block_recall
from seer_attn.modeling_seer.conversion import load_seer_model, load_tokenizer, default_model_path
torch.set_num_threads(2)
L, D, S, gates = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
model = load_seer_model(default_model_path(), dtype=torch.float32, gates=gates)
tok = load_tokenizer(default_model_path())
s = PasskeyGenerator(tok).sample(L, D, S)
res = {}
for sel in ("oracle_max", "gate"):
    model.set_seer_mode("sparse", seer_selector=sel, seer_sparsity_method="nz_ratio", seer_nz_ratio=0.1,
                        seer_keep_sink=True, seer_keep_local=1, seer_dense_last_rows=2)
    res[sel] = r = needle_block_recall(model, tok, s)
    print(sel, "needle block", r["needle_block"], "of", r["num_blocks"], "rows", r["rows"], flush=True)
O, G = res["oracle_max"]["recall"], res["gate"]["recall"]
print("layer | oracle per head | gate per head")
for l in range(O.shape[0]):
    print(f"{l:2d} | " + " ".join(f"{x:.2f}" for x in O[l]) + " | " + " ".join(f"{x:.2f}" for x in G[l]))
for name, sl in (("layers 0-14", slice(0, 15)), ("layers 15-29", slice(15, 30))):
    o, g = O[sl], G[sl]
    print(f"{name}: mean recall oracle {o.mean():.3f} gate {g.mean():.3f}; heads with oracle > 0.5: {int((o > .5).sum())}, "
          f"gate also > 0.5 there: {int(((o > .5) & (g > .5)).sum())}")
