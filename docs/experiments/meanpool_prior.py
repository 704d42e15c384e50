"""Issue 17 screen: the gate's scores with the mean-pooled q.k prior (``seer_meanpool_prior``).

At density <= 0.1 the training-free mean-pooled baseline (MoBA-like, top-k of mean-pooled
post-RoPE q . k) was ahead of every rule on the gate's scores (gate_quality.md sections 12 and
15). The prior mixes the two rows' distributions geometrically (selection.with_meanpool_prior:
``(1 - a)`` times the gate's log-softmax plus ``a`` times the mean-pooled one), so a block both
rank high comes first; every selection method then reads the mixture. Each SETTING runs on the
same windows::

    gate:nz_ratio=0.05:prior=0.5  the gate's scores with prior share 0.5, top-k (nz_ratio 0.05)
    gate:gain@0.1:prior=0.5       the gain rule solved to density 0.1 on these windows (one exact
                                  pass per prior share, gate_params_for), then measured
    meanpool:nz_ratio=0.05        the baseline itself

    python docs/experiments/meanpool_prior.py GATES gate:gain@0.1:prior=0.5 gate:gain@0.1 \\
        --out results/quality/cpu_meanpool_prior_8k.json

Keep rules and windows are knob_matched.py's (4 windows of 8192 tokens of eval.jsonl, float32).
``--gpu``: on CUDA in bf16, every window (``--windows 0``: the issue's protocol, 25 windows); GPU step
``prior-topk`` of gpu_session_next.sh.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import knob_matched  # noqa: E402
from seer_attn.eval.calibration import exact_gate_scores, gate_params_for  # noqa: E402
from seer_attn.eval.perplexity import evaluate_perplexity, load_documents, make_windows  # noqa: E402
from seer_attn.eval.settings import Setting, apply_setting  # noqa: E402
from seer_attn.modeling_seer.conversion import default_model_path, load_seer_model, load_tokenizer  # noqa: E402
from seer_attn.training.results import write_envelope  # noqa: E402

KEEP = knob_matched.KEEP


def parse(spec):
    """``SELECTOR:METHOD=PARAM[:prior=A]`` or ``gate:METHOD@DENSITY[:prior=A]`` -> dict."""
    head, _, tail = spec.partition(":prior=")
    try:
        prior = float(tail) if tail else 0.0
        sel, rest = head.split(":")
        if "@" in rest:
            method, density = rest.split("@")
            return dict(spec=spec, selector=sel, method=method, param=None, density=float(density), prior=prior)
        method, param = rest.split("=")
        return dict(spec=spec, selector=sel, method=method, param=float(param), density=None, prior=prior)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid setting {spec!r}: expected SELECTOR:METHOD=PARAM or "
                                         f"gate:METHOD@DENSITY, optionally followed by :prior=A") from None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("gates")
    ap.add_argument("settings", nargs="+", type=parse)
    ap.add_argument("--eval", default=None, help="jsonl corpus (default: the bundled eval corpus)")
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--windows", type=int, default=4, help="first N windows (2 per document; 0: all)")
    ap.add_argument("--gpu", action="store_true", help="CUDA, bf16 (default: CPU, float32, 2 threads)")
    ap.add_argument("--model", default=None, help="GGUF / HF folder (default: the embedded SmolLM2 GGUF)")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu: no CUDA device")
    if not args.gpu:
        torch.set_num_threads(2)
    path = args.model or default_model_path()
    device, dtype = ("cuda", torch.bfloat16) if args.gpu else ("cpu", torch.float32)
    model = load_seer_model(path, dtype=dtype, device=device, gates=args.gates)
    wins = make_windows(load_documents(args.eval), load_tokenizer(path), args.length, 2)
    wins = wins[:args.windows] if args.windows else wins
    rows, solved = [], {}
    for s in args.settings:
        if s["density"] is not None and (s["method"], s["prior"]) not in solved:
            asks = [x["density"] for x in args.settings if (x["method"], x["prior"], x["density"] is not None)
                    == (s["method"], s["prior"], True)]
            model.set_seer_mode("sparse", **KEEP, seer_meanpool_prior=s["prior"])
            t0 = time.time()
            params = gate_params_for(model, wins, asks, method=s["method"], scores=exact_gate_scores(model, wins))
            solved[(s["method"], s["prior"])] = dict(zip(asks, params))
            print(f"{s['method']} prior {s['prior']:g}: {dict(zip(asks, params))} ({time.time() - t0:.0f} s)",
                  flush=True)
        param = s["param"] if s["density"] is None else solved[(s["method"], s["prior"])][s["density"]]
        t0 = time.time()
        setting = Setting(s["selector"], s["method"], param=param)
        apply_setting(model, setting)
        model.set_seer_mode("sparse", **KEEP, seer_meanpool_prior=s["prior"])
        r = evaluate_perplexity(model, windows=wins, progress=False)
        rows.append({**s, "setting": str(setting), "param": param, "ppl": r["ppl"], "density": r["density"],
                     "windows": r["windows"]})
        print(f"{s['spec']}: ppl {r['ppl']:.3f} at density {r['density']:.4f} ({time.time() - t0:.0f} s)", flush=True)
        if args.out:
            write_envelope(args.out, "meanpool_prior_screen", rows, config=vars(args), model=path,
                           complete=len(rows) == len(args.settings), device=device, keep=KEEP,
                           dtype=str(dtype).removeprefix("torch."))


if __name__ == "__main__":
    main()
