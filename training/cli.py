"""The ``seer-attn`` command line.

    seer-attn demo                      distill SmolLM2 on the bundled corpus, evaluate, plot
    seer-attn distill --model ... --data ... --seq-len ... --steps ... --output ...
    seer-attn eval --model ... --tasks ... --max-length ...
    seer-attn compare --model ...       PPL of the gate and every baseline at equal density
    seer-attn bench-kernels / bench-ttft   GPU benchmarks (CSV + PNG)

Each subcommand's module is imported only when it runs, so ``seer-attn --help`` is fast.
"""
import argparse
import sys


def _distill(sub):
    from .distill import add_distill_args
    p = sub.add_parser("distill", help="train the gates of a model (base weights frozen), then print the "
                                       "perplexity table of dense vs gate vs streaming")
    add_distill_args(p)
    p.add_argument("--no-eval", action="store_true", help="skip the closing evaluation table")
    p.add_argument("--eval-length", type=int, default=None,
                   help="evaluation window of the closing table (default: 8192 on GPU, 1024 on CPU)")
    p.add_argument("--eval-thresholds", type=float, nargs="+", default=None,
                   help="gate thresholds of the closing table (default: as in seer-attn demo)")
    p.set_defaults(func=_run_distill)


def _run_distill(args):
    import torch

    from .demo import CPU_DEFAULTS, GPU_DEFAULTS, evaluate_gates
    from .distill import run_distill
    res = run_distill(args)
    if not args.no_eval:
        on_gpu = torch.cuda.is_available() and not args.cpu
        d = GPU_DEFAULTS if on_gpu else CPU_DEFAULTS
        _, table, plot = evaluate_gates(res["model_dir"], on_gpu, args.eval_length or d["eval_length"],
                                        d["windows_per_doc"], args.eval_thresholds or d["thresholds"], args.output)
        print(table)
        print(f"plot: {plot}")
    return res


def _demo(sub):
    from .demo import add_demo_args, run_demo
    p = sub.add_parser("demo", help="distill the embedded SmolLM2 and evaluate dense vs sparse (the main job)")
    add_demo_args(p)
    p.set_defaults(func=run_demo)


def _eval(sub):
    from seer_attn.eval.harness import add_eval_args, run_eval
    p = sub.add_parser("eval", help="lm-eval-harness tasks (perplexity, passkey, LongBench) with a SeerLlama model")
    add_eval_args(p)
    p.set_defaults(func=run_eval)


def _forward(name, module, help_):
    def add(sub):
        p = sub.add_parser(name, help=help_, add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=lambda args: __import__(module, fromlist=["main"]).main(args.rest))
    return add


COMMANDS = {
    "demo": _demo,
    "distill": _distill,
    "eval": _eval,
    "compare": _forward("compare", "seer_attn.eval.baselines", "PPL of the gate and baselines at equal density"),
    "bench-kernels": _forward("bench-kernels", "seer_attn.eval.bench_kernels", "GPU kernel benchmark"),
    "bench-ttft": _forward("bench-ttft", "seer_attn.eval.bench_ttft", "GPU time-to-first-token benchmark"),
}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="seer-attn", description="SeerAttention for Hugging Face models")
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")
    wanted = argv[0] if argv and argv[0] in COMMANDS else None
    for name, add in COMMANDS.items():
        if wanted is None or name == wanted:
            add(sub)
        else:
            sub.add_parser(name, help=f"see: seer-attn {name} --help")
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    result = args.func(args)
    return 0 if result is None or not isinstance(result, int) else result


if __name__ == "__main__":
    sys.exit(main())
