"""The ``seer-attn`` command line.

    seer-attn demo                      distill SmolLM2 on the bundled corpus, evaluate, plot
    seer-attn distill --model ... --data ... --seq-len ... --steps ... --output ...
    seer-attn finetune --model ... --data ... --seq-len 32768 --yarn-factor 4 --density 0.1 --output ...
    seer-attn eval --model ... --tasks ... --max-length ...
    seer-attn compare --model ...       PPL of the gate and every baseline at equal density
    seer-attn calibrate --model ... --density 0.1   the gate's setting for that density, for export
    seer-attn bench-kernels / bench-ttft / bench-decode   GPU benchmarks (CSV + PNG)

Only the command that runs is imported, and only when it runs: ``seer-attn --help`` lists
the commands without importing any, ``seer-attn distill --help`` imports no torch.
``compare``, ``bench-kernels``, ``bench-ttft`` and ``bench-decode`` hand every option (``--help`` included)
to their module's own ``main(argv)``.

Bad input (an option value, a data file, a model path, a checkpoint) ends with one line,
``seer-attn <command>: error: <message>``, and exit code 2, as argparse's own errors do:
option values are checked by argparse ``type=`` functions, and errors raised inside
:func:`user_input` (the checking and loading before any training or evaluation starts)
are printed that way instead of as a traceback. Anything else is a bug and keeps its traceback.
"""
import argparse
import importlib
import os
import sys

from seer_attn.training.cli_args import USER_ERRORS, _MARK, user_input

class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line, ``seer-attn <command>: error: <message>``
    (the usage, a screenful for ``distill``, is what ``--help`` is for)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _distill(p):
    from seer_attn.training.cli_args import positive_int, unit_interval

    from seer_attn.training.distill import add_distill_args
    add_distill_args(p)
    p.add_argument("--no-eval", action="store_true", help="skip the closing evaluation table")
    p.add_argument("--eval-length", type=positive_int, default=None,
                   help="evaluation window of the closing table (default: as in seer-attn demo, 8192 on GPU, "
                        "2048 on CPU)")
    p.add_argument("--eval-windows", type=positive_int, default=None,
                   help="evaluation windows, one per document (default: as in seer-attn demo)")
    p.add_argument("--eval-densities", type=unit_interval, nargs="+", default=None,
                   help="block densities at which the closing table compares the gate with streaming "
                        "(default: as in seer-attn demo)")
    cal = p.add_argument_group("calibrate the trained gates to a density (seer-attn calibrate)")
    cal.add_argument("--calibrate-density", type=unit_interval, default=None, metavar="RHO",
                     help="after training, solve the gate's setting that keeps RHO of the causal blocks at --seq-len "
                          "on a sample of --data (a .jsonl with 'text'; else the bundled training corpus), write "
                          "OUTPUT/calibration.json; --push-to-hub then ships that setting")
    cal.add_argument("--calibrate-method", choices=("gain", "coverage", "threshold"), default="gain",
                     help="the selection rule calibrated (default: %(default)s)")
    p.set_defaults(func=_run_distill)


def _calibrate_trained(args, config, res):
    """``--calibrate-density``: :func:`~seer_attn.eval.calibrate_run.run_calibrate` on the trained
    model folder, at the distillation's length, on its data when the calibration can read it."""
    from .calibrate_run import CalibrateConfig, run_calibrate
    corpus, what = _eval_corpus(config)
    if corpus is False:
        print(f"[distill] calibration sample: the bundled training corpus (it reads one .jsonl(.gz) file with a "
              f"'text' field, not {what})", flush=True)
    cal = CalibrateConfig(density=args.calibrate_density, method=args.calibrate_method, model=res["model_dir"],
                          data=corpus or None, max_length=config.seq_len, out=config.output,
                          device="cpu" if config.cpu else None, no_progress=config.no_progress)
    with user_input():  # e.g. no document of the sample as long as --seq-len
        run_calibrate(cal)
    return os.path.join(config.output, "calibration.json")


def _eval_corpus(config):
    """What the closing table evaluates on: ``(corpus for evaluate_gates, description)``;
    the corpus is None for the bundled eval corpus, False when ``--data`` cannot be read there."""
    if not config.data:
        return None, "the bundled held-out eval corpus"
    path = str(config.data[0])
    if len(config.data) == 1 and config.text_column == "text" and path.lower().endswith((".jsonl", ".jsonl.gz")):
        return path, f"your --data {path} (the training text itself: not held out)"
    return False, "your --data"


def _run_distill(args):
    import torch

    from .demo import PROFILES, evaluate_gates
    from seer_attn.training.distill import DistillConfig, run_distill
    from seer_attn.training.run_config import config_from_args
    config = config_from_args(DistillConfig, args)  # the options that configure the distillation itself
    res = run_distill(config)
    print(f"[distill] model folder: {res['model_dir']}  (gates only: {res['gates_path']})", flush=True)
    if res.get("decode_gate"):
        print(f"[distill] decode gates saved with them; the model still decodes densely. Measure sparse decode with: "
              f"seer-attn decode-quality --model {res['model']} --gates {res['gates_path']} --phases ppl passkey; "
              f"then turn it on with seer_decode_sparsity=True (README, 'Sparse decode')", flush=True)
    if args.calibrate_density is not None:
        res = {**res, "calibration_path": _calibrate_trained(args, config, res)}
    if args.no_eval:
        return res
    corpus, what = _eval_corpus(config)
    if corpus is False:
        print(f"[distill] no closing evaluation: it reads one .jsonl(.gz) file with a 'text' field, not {what}; "
              f"evaluate with: seer-attn compare --model {res['model_dir']} --corpus FILE.jsonl", flush=True)
        return res
    on_gpu = torch.cuda.is_available() and not config.cpu
    prof = PROFILES["gpu" if on_gpu else "cpu"]
    pick = lambda val, default: default if val is None else val  # noqa: E731
    eval_len, windows = pick(args.eval_length, prof.eval_length), pick(args.eval_windows, prof.windows)
    densities = tuple(pick(args.eval_densities, prof.densities))
    print(f"[distill] closing evaluation on {what}: {windows} windows of {eval_len} tokens; dense, streaming and "
          f"the gate at densities {', '.join(f'{d:g}' for d in densities)}, "
          f"about {1 + 2 * len(densities)} passes over the windows (--no-eval skips it)", flush=True)
    with user_input():  # e.g. no document of the corpus as long as one window
        ev = evaluate_gates(res["model_dir"], on_gpu, eval_len, windows, densities, config.output, corpus=corpus,
                            calib_windows=min(prof.calib_windows, windows))
    print(ev["table"])
    print(ev["conclusion"])
    print(f"plot: {ev['plot']}")
    return res


def _configured(config_class, run):
    """The command's ``func``: ``run(config)`` with the run config its options build
    (:func:`~seer_attn.training.run_config.config_from_args`; a config the options cannot
    make is one usage line, exit code 2)."""
    def func(args):
        from seer_attn.training.run_config import config_from_args
        return run(config_from_args(config_class, args))
    return func


def _finetune(p):
    from seer_attn.training.cli_args import positive_int
    from seer_attn.training.finetune import add_finetune_args
    add_finetune_args(p)
    p.add_argument("--no-eval", action="store_true", help="skip the closing evaluation table")
    p.add_argument("--eval-data", default=None,
                   help="evaluation jsonl of the closing table: each source's documents joined with EOS, cut into "
                        "--seq-len windows (default: the bundled eval corpus)")
    p.add_argument("--eval-windows", type=positive_int, default=4, help="windows per source (default: 4)")
    p.set_defaults(func=_run_finetune)


def _run_finetune(args):
    from .finetune_eval import closing_evaluation
    from seer_attn.training.finetune import FineTuneConfig, run_finetune
    from seer_attn.training.run_config import config_from_args
    cfg = config_from_args(FineTuneConfig, args)  # the options that configure the fine-tuning itself
    res = run_finetune(cfg)
    print(f"[finetune] model folder: {res['model_dir']}", flush=True)
    if args.no_eval:
        return res
    print(f"[finetune] closing evaluation: PPL at {res['seq_len']} tokens on "
          f"{args.eval_data or 'the bundled eval corpus'}, each source's documents joined (EOS between), up to "
          f"{args.eval_windows} windows per source (--no-eval skips it)", flush=True)
    with user_input():  # e.g. no source of the corpus as long as one window
        ev = closing_evaluation(res, corpus=args.eval_data, windows_per_source=args.eval_windows,
                                device="cpu" if args.cpu else None, progress=not args.no_progress, config=cfg)
    print(ev["table"])
    return {**res, "eval_path": ev["path"]}


def _demo(p):
    from .demo import DemoConfig, add_demo_args, run_demo
    add_demo_args(p)
    p.set_defaults(func=_configured(DemoConfig, run_demo))


def _calibrate(p):
    from .calibrate_run import CalibrateConfig, add_calibrate_args, run_calibrate
    add_calibrate_args(p)
    p.set_defaults(func=_configured(CalibrateConfig, run_calibrate))


def _eval(p):
    from .harness import EvalConfig, add_eval_args, run_eval
    add_eval_args(p)
    p.set_defaults(func=_configured(EvalConfig, run_eval))


#: name: (one-line help, the function adding its options, or the module whose main(argv) parses them)
COMMANDS = {
    "demo": ("distill the embedded SmolLM2 and evaluate dense vs sparse (the main job)", _demo),
    "distill": ("train the gates of a model (base weights frozen), then print the perplexity table of dense vs "
                "gate vs streaming", _distill),
    "finetune": ("fine-tune a model with sparse attention (and YaRN context extension, LoRA), then print its "
                 "long-context perplexity table", _finetune),
    "eval": ("lm-eval-harness tasks (perplexity, passkey, LongBench) with a SeerLlama model", _eval),
    "compare": ("PPL of the gate and baselines at equal density", "seer_attn.eval.baselines"),
    "calibrate": ("solve the gate's setting that keeps a density you ask for on a sample of your text (for export)",
                  _calibrate),
    "bench-kernels": ("GPU kernel benchmark", "seer_attn.eval.bench_kernels"),
    "bench-ttft": ("GPU time-to-first-token benchmark", "seer_attn.eval.bench_ttft"),
    "bench-decode": ("GPU sparse decode benchmark (kernel and time per output token)", "seer_attn.eval.bench_decode"),
    "decode-quality": ("distil decode gates (or take --gates) and measure sparse decode against dense: decode "
                       "perplexity and passkey (GPU; the envelope gives an exported card its sparse-decode section)",
                       "seer_attn.eval.decode_quality"),
}


def _exit_code(result):
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


def _run(prog, func, arg):
    """``func(arg)``; bad user input (:func:`user_input`) ends as one line and exit code 2."""
    try:
        return _exit_code(func(arg))
    except USER_ERRORS as err:
        if not getattr(err, _MARK, False):
            raise
        print(f"{prog}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def _forward(prog, module, argv):
    """``module.main(argv)`` with ``sys.argv[0]`` set to ``prog``, so that the module's own
    argparse usage and error lines name the command (``seer-attn compare: error: ...``)."""
    saved = sys.argv[0] if sys.argv else None
    sys.argv[:1] = [prog]
    try:
        return importlib.import_module(module).main(argv)
    finally:
        sys.argv[:1] = [saved] if saved is not None else []


def main(argv=None, commands=None):
    """Run one command of ``commands`` (default :data:`COMMANDS`; ``seer_attn.hub_cards.cli``
    passes its table, which adds export and push)."""
    commands = COMMANDS if commands is None else commands
    argv = sys.argv[1:] if argv is None else list(argv)
    name = argv[0] if argv and argv[0] in commands else None
    if name is not None and isinstance(commands[name][1], str):  # the module parses its own options
        return _run(f"seer-attn {name}", lambda rest: _forward(f"seer-attn {name}", commands[name][1], rest),
                    argv[1:])
    parser = _Parser(prog="seer-attn", description="SeerAttention for Hugging Face models")
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(commands) + "}", parser_class=_Parser)
    for cmd, (help_, add) in commands.items():
        p = sub.add_parser(cmd, help=help_, description=help_)
        if cmd == name:
            add(p)
            command_parser = p
    args, extra = parser.parse_known_args(argv)
    if extra:
        (command_parser if name else parser).error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:
        parser.print_help()
        return 2
    return _run(f"seer-attn {name}", args.func, args)


if __name__ == "__main__":
    sys.exit(main())
