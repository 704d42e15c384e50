"""Rerun, on one GPU, the committed runs that can be reproduced on an H200, through the Python
API (run configs, no argparse), and compare them with what results/ holds.

    SEER_SMOLLM2_GGUF=path/to/smollm2.gguf python docs/experiments/regression_check.py --out seer_outputs/check

1. the kernel benchmark of ``results/kernels/h200.json`` (8k and 32k, backward at 32k):
   every median against the committed one;
2. the GPU demo of ``results/demo/h200.json`` (same seed, same bundled corpus): every
   perplexity against the committed one;
3. smoke runs of the paths only a GPU takes: the TTFT benchmark at 32k and a short quality
   run (distill, ppl, baselines, passkey), each checked to write a complete envelope whose
   ``config`` rebuilds its run config.

Each step writes its own results under ``--out``; ``--out/regression_check.json`` is an
envelope of the comparison rows and the table printed last. About 5-6 minutes on one H200.
A step that fails is a row with its error; the others still run.
"""
import argparse
import json
import os
import time
import traceback

from seer_attn.eval.bench_kernels import KernelBenchConfig, run_kernel_bench
from seer_attn.eval.bench_ttft import TTFTBenchConfig, run_ttft_bench
from seer_attn.eval.demo import DemoConfig, run_demo
from seer_attn.eval.quality_run import QualityRunConfig, run_quality
from seer_attn.training.results import write_envelope

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KERNEL_COLUMNS = ("sdpa_flash", "sdpa_cudnn", "ours_dense", "ours_d0.5", "ours_d0.3", "ours_d0.1", "flex64_d0.1",
                  "attn_with_pooling", "bwd_sdpa_flash", "bwd_ours_dense", "bwd_ours_d0.1")


def committed(path):
    with open(os.path.join(REPO, path)) as f:
        return json.load(f)


def check_kernels(out):
    config = KernelBenchConfig(lengths=(8192, 32768), bwd_lengths=(32768,), out=os.path.join(out, "kernels"))
    new = {r["T"]: r for r in run_kernel_bench(config)["rows"]}
    rows = []
    for old in committed("results/kernels/h200.json")["rows"]:
        for col in KERNEL_COLUMNS:
            if col in old and col in new.get(old["T"], {}):
                got = new[old["T"]][col]
                rows.append({"check": f"kernels {old['T'] // 1024}k {col} (ms)", "committed": old[col],
                             "measured": got, "ratio": got / old[col]})
    return rows


def check_demo(out):
    res = run_demo(DemoConfig(output=os.path.join(out, "demo")))
    new = {(r["setting"], r.get("label")): r for r in res["rows"]}
    rows = []
    for old in committed("results/demo/h200.json")["rows"]:
        key = (old["setting"], old.get("label"))
        label = f"{old.get('label') or old['selector']} @{old['target_density'] or 1:.2f}"
        if key not in new:  # a solved threshold may differ in its last digits: match by label and target
            cands = [r for r in res["rows"] if r.get("label") == old.get("label") and r["selector"] == old["selector"]
                     and r.get("target_density") == old.get("target_density")]
            if not cands:
                rows.append({"check": f"demo {label} PPL", "committed": old["ppl"], "measured": None, "ratio": None})
                continue
            new[key] = cands[0]
        got = new[key]["ppl"]
        rows.append({"check": f"demo {label} PPL", "committed": old["ppl"], "measured": got,
                     "ratio": got / old["ppl"]})
    return rows


def _rebuilds(env, cls):
    """The envelope is complete and its config rebuilds the run config (raises otherwise)."""
    cls(**env["config"])
    return env["complete"]


def check_ttft(out):
    env = run_ttft_bench(TTFTBenchConfig(lengths=(32768,), out=os.path.join(out, "ttft")))
    r = env["rows"][0]
    return [{"check": "ttft 32k seer nz 0.1 / flash", "committed": None, "measured": r["seer_nz0.1"] / r["sdpa_flash"],
             "ratio": None, "ok": _rebuilds(env, TTFTBenchConfig)}]


def check_quality(out, model, train, eval_):
    config = QualityRunConfig(model=model, train=(train,) if train else None, eval=eval_, seq_len=4096,
                              eval_length=4096, steps=50, thresholds=(1e-2, 2e-2), nz_ratios=(0.1,),
                              baseline_densities=(0.2,), passkey_lengths=(2048,), passkey_threshold=(0.02,),
                              passkey_dense_last_rows=(2,), no_progress=True, out=os.path.join(out, "quality"))
    env = run_quality(config)
    dense = next(r for r in env["rows"] if r["selector"] == "dense")
    return [{"check": "quality smoke: dense PPL at 4096", "committed": None, "measured": dense["ppl"], "ratio": None,
             "ok": _rebuilds(env, QualityRunConfig) and len(env["rows"]) >= 8 and "dense" in env["passkey"]}]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default=None, help="for the quality smoke run (default: the embedded GGUF)")
    ap.add_argument("--train", default=None, help="training jsonl of the quality smoke run (default: bundled)")
    ap.add_argument("--eval", default=None, help="eval jsonl of the quality smoke run (default: bundled)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    steps = [("kernels", lambda: check_kernels(args.out)), ("demo", lambda: check_demo(args.out)),
             ("ttft", lambda: check_ttft(args.out)),
             ("quality", lambda: check_quality(args.out, args.model, args.train, args.eval))]
    rows, times = [], {}
    for name, step in steps:
        t0 = time.time()
        try:
            rows += step()
        except Exception as err:  # noqa: BLE001 - every step runs; a failure is a row of the table
            traceback.print_exc()
            rows.append({"check": f"{name}: FAILED", "committed": None, "measured": None, "ratio": None,
                         "error": f"{type(err).__name__}: {err}"})
        times[name] = time.time() - t0
    write_envelope(os.path.join(args.out, "regression_check.json"), "regression_check", rows,
                   config=vars(args),
                   model="SmolLM2-135M and random-weight shapes", times=times)
    print("\n| check | committed | measured | ratio |\n|---|---|---|---|")
    for r in rows:
        fmt = lambda x: "—" if x is None else f"{x:.4g}"  # noqa: E731
        extra = r.get("error") or ("" if r.get("ok", True) else " NOT OK")
        print(f"| {r['check']} | {fmt(r['committed'])} | {fmt(r['measured'])} | {fmt(r['ratio'])}{extra} |")
    print("seconds per step: " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))


if __name__ == "__main__":
    main()
