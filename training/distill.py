"""``seer-attn distill``: gate distillation from the command line.

A run is configured by a :class:`DistillConfig` (the Python API: build one and call
:func:`run_distill`); the CLI entry point (``eval/cli.py``) registers :func:`add_distill_args`
on its ``distill`` sub-parser and builds the config from the options
(:func:`~seer_attn.training.run_config.config_from_args`). Flow:

1. check what the user named before any model loads: the config's values (on creation), the checkpoint
   to resume, the data (files exist, are not empty, hold the text column, as strings); the
   data is tokenised and packed into ``--seq-len`` sequences (too little data fails here);
2. seed with ``--seed``, then load (or convert: the new gates are drawn from the seed)
   the model in ``seer_mode="distill"``;
3. :class:`GateDistillationTrainer` for ``--steps`` optimizer steps (Trainer's progress bar,
   loss and block density every ``--logging-steps``).

Output folder ``--output OUT``::

    OUT/model/                     the model to load or share: config (seer_mode="sparse"),
                                   safetensors weights, tokenizer, remote-code modules and
                                   seer_gates.safetensors (the gates only); no pickle
    OUT/checkpoints/checkpoint-N/  for --resume: the gates (full weights with
                                   --full-checkpoints) and Trainer's optimizer, scheduler,
                                   RNG state, trainer state and arguments
    OUT/distill_summary.json       a results envelope (training/results.py) of kind
                                   "distill": provenance (the model there), the run's
                                   options, the log history as rows, and the summary
                                   run_distill returns

Evaluation is left to the caller: the returned dict names the model folder and the gates file.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import asdict, dataclass

from . import cli_args as ca
from .retrieval_data import RETRIEVAL_KINDS
from .run_config import ConfigError, RunConfig, default, flag, option, text

DEFAULT_OUTPUT = "seer_outputs/distill"
#: what the gate learns (``seer_distill_target``): None keeps the model's
DISTILL_TARGETS = ("max", "mass")
SUMMARY_FILE = "distill_summary.json"
#: options passed on as the model's ``seer_*`` config when given (None: the model's own); the
#: gate width and poolings build new gates (a conversion), a Seer model refuses other values
SEER_OPTIONS = {"threshold": "seer_threshold", "distill_target": "seer_distill_target",
                "peak_weight": "seer_distill_peak_weight", "gate_hidden_size": "seer_gate_hidden_size",
                "q_pooling": "seer_q_pooling", "k_pooling": "seer_k_pooling"}
#: query rows per sequence a decode gate learns from (``seer_decode_distill_rows``) when ``--decode-gate``
#: gives none: ``decode-quality``'s protocol, where 256 rows (with a quarter of retrieval sequences) kept
#: passkey retrieval at a share of 0.1 and 64 rows of plain text lost it (docs/experiments/decode_quality.md)
DECODE_ROWS = 256
#: sub-folders of ``--output``: the shareable model and the checkpoints
MODEL_DIR, CHECKPOINTS_DIR = "model", "checkpoints"
#: shortest ``--seq-len``: 4 blocks of 64 tokens. With 3 blocks or fewer a sparse prefill
#: under the default keep rules (the diagonal block and the 2 last block rows dense) keeps
#: every block, so nothing the gates learn at that length is ever used (and the loss leaves
#: out the first quarter of the block rows).
MIN_SEQ_LEN = 256


_at_least_min = ca.int_at_least(MIN_SEQ_LEN)
#: checks of the retrieval mix (a share, 0 allowed) and of the peak weight (>= 0)
_share = ca.float_in(0, 1, low_open=False)
_nonneg_float = ca.float_in(0, None, low_open=False)


def _gate_width(text):
    """Check of ``gate_hidden_size``: a positive even integer (the gate's RoPE rotates pairs)."""
    width = ca.positive_int(text)
    if width % 2:
        raise ca.ArgValueError("expected a positive even integer (the gate's RoPE rotates pairs)", text)
    return width


def _pooling(text):
    """Check of one pooling of ``q_pooling`` / ``k_pooling`` (the config's POOLING_TYPES, imported
    here so that the CLI's parsing stays free of torch)."""
    from seer_attn.modeling_seer.configuration_seer import POOLING_TYPES
    if text not in POOLING_TYPES:
        raise ca.ArgValueError(f"expected one of {POOLING_TYPES}", text)
    return text


def _seq_len(text):
    """Check of ``seq_len``: an integer >= :data:`MIN_SEQ_LEN`, with the reason."""
    try:
        return _at_least_min(text)
    except ca.ArgValueError as err:
        raise ca.ArgValueError(f"{err.reason} (with fewer than 4 blocks of 64 tokens a sparse prefill keeps every "
                               "block: the diagonal and the 2 dense last rows; the gates would learn nothing used)",
                               text) from None


@dataclass(frozen=True, kw_only=True)
class DistillConfig(RunConfig):
    """One gate distillation (``seer-attn distill``; each field is the option of the same
    name, see :func:`add_distill_args` for what it means)."""

    model: str | None = option(None, text)
    data: tuple | None = option(None, text, many="+")
    text_column: str = option("text", text)
    streaming: bool = option(False, flag)
    seq_len: int = option(4096, _seq_len)
    steps: int = option(100, ca.positive_int)
    batch_size: int = option(1, ca.positive_int)
    grad_accum: int = option(1, ca.positive_int)
    lr: float = option(1e-3, ca.positive_float)
    warmup_steps: int = option(20, ca.nonneg_int)
    threshold: float | None = option(None, ca.open_unit_interval)
    distill_target: str | None = option(None, choices=DISTILL_TARGETS)
    retrieval_mix: float = option(0.0, _share)
    retrieval_kinds: tuple = option(RETRIEVAL_KINDS, many="+", choices=RETRIEVAL_KINDS)
    peak_weight: float | None = option(None, _nonneg_float)
    distill_prior: float | None = option(None, ca.open_unit_interval)
    decode_gate: bool = option(False, flag)
    decode_rows: int | None = option(None, ca.positive_int)
    gate_hidden_size: int | None = option(None, _gate_width)
    q_pooling: tuple | None = option(None, _pooling, many="+")
    k_pooling: tuple | None = option(None, _pooling, many="+")
    output: str = option(DEFAULT_OUTPUT, text)
    seed: int = option(42, ca.nonneg_int)
    bf16: bool = option(False, flag)
    gradient_checkpointing: bool = option(False, flag)
    resume: str | None = option(None, text)
    logging_steps: int = option(10, ca.positive_int)
    save_steps: int = option(50, ca.positive_int)
    save_total_limit: int = option(2, ca.positive_int)
    full_checkpoints: bool = option(False, flag)
    num_proc: int | None = option(None, ca.positive_int)
    cpu: bool = option(False, flag)
    no_progress: bool = option(False, flag)

    def check(self):
        if self.retrieval_mix and self.streaming:
            raise ConfigError("{retrieval_mix} rewrites packed sequences, which a stream does not hold: drop "
                              "{streaming} or {retrieval_mix}", "retrieval_mix", "streaming")
        if self.decode_rows is not None and not self.decode_gate:
            raise ConfigError("{decode_rows} sets what the decode gates learn from, and without {decode_gate} "
                              "there are none: add {decode_gate} or drop {decode_rows}", "decode_rows", "decode_gate")


def _default(name):
    return default(DistillConfig, name)


def add_distill_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``distill`` options to ``parser`` (returned for chaining); their defaults are
    :class:`DistillConfig`'s, and :func:`config_from_args` builds the config from them."""
    ca.add_data_args(parser, _default)
    parser.add_argument("--streaming", action="store_true",
                        help="stream the data (for large sets: nothing is tokenised up front)")
    parser.add_argument("--seq-len", type=_seq_len, default=_default("seq_len"),
                        help=f"tokens per packed sequence, at least {MIN_SEQ_LEN} (default: %(default)s)")
    ca.add_loop_args(parser, _default)
    parser.add_argument("--lr", type=ca.positive_float, default=_default("lr"),
                        help="peak learning rate of the gates (paper: 1e-3)")
    parser.add_argument("--warmup-steps", type=ca.nonneg_int, default=_default("warmup_steps"),
                        help="linear warm-up steps (paper: 20)")
    parser.add_argument("--threshold", type=ca.open_unit_interval, default=_default("threshold"),
                        help="seer_threshold for the logged block density and the saved config "
                             "(default: the model's, 2e-3 for a new conversion)")
    parser.add_argument("--distill-target", choices=DISTILL_TARGETS, default=_default("distill_target"),
                        help="what the gate learns: max (paper: row-normalised max-pooled attention) or mass "
                             "(block attention mass); default: the model's, max for a new conversion")
    parser.add_argument("--retrieval-mix", type=_share, default=_default("retrieval_mix"), metavar="SHARE",
                        help="share of the packed sequences rewritten with retrieval structure built from the data "
                             "itself: repeated passages, key-value records queried later (training/retrieval_data.py; "
                             "default: %(default)s, none)")
    parser.add_argument("--retrieval-kinds", nargs="+", choices=RETRIEVAL_KINDS, default=_default("retrieval_kinds"),
                        help="kinds of retrieval sequences drawn from (default: all)")
    parser.add_argument("--peak-weight", type=_nonneg_float, default=_default("peak_weight"),
                        help="seer_distill_peak_weight: each block row's KL weighs 1 + W * its target's largest entry "
                             "(rows with a peaked true map count more); default: the model's, 0 for a new conversion")
    parser.add_argument("--distill-prior", type=ca.open_unit_interval, default=_default("distill_prior"), metavar="A",
                        help="distil through the mean-pooled prior of share A: the loss reads (1 - A) log p_gate + "
                             "A log p_meanpool, so the gates learn what the prior misses, and the saved model serves "
                             "with seer_meanpool_prior=A (docs/experiments/gate_quality.md section 16; default: the "
                             "gate alone)")
    parser.add_argument("--decode-gate", action="store_true",
                        help="also distil a decode gate per layer (seer_decode_gate): it picks the KV-cache blocks "
                             "each generated token reads, saved with the prefill gates; the saved model still decodes "
                             "densely until seer_decode_sparsity is set (measure it first with seer-attn "
                             "decode-quality --gates OUTPUT/model/seer_gates.safetensors; its protocol also passes "
                             "--retrieval-mix 0.25)")
    parser.add_argument("--decode-rows", type=ca.positive_int, default=_default("decode_rows"),
                        help="with --decode-gate: query rows per sequence the decode gates learn from "
                             f"(seer_decode_distill_rows; default: {DECODE_ROWS}, decode-quality's)")
    parser.add_argument("--gate-hidden-size", type=_gate_width, default=_default("gate_hidden_size"),
                        help="seer_gate_hidden_size of new gates: width of each head's projections of pooled Q and K "
                             "(paper and default: 128); a Seer model keeps its own")
    parser.add_argument("--q-pooling", nargs="+", type=_pooling, default=_default("q_pooling"), metavar="POOL",
                        help="seer_q_pooling of new gates: poolings of Q over each block (avg, max, min), "
                             "concatenated (default: avg)")
    parser.add_argument("--k-pooling", nargs="+", type=_pooling, default=_default("k_pooling"), metavar="POOL",
                        help="seer_k_pooling of new gates (default: max min avg)")
    parser.add_argument("--output", default=_default("output"),
                        help=f"output folder: {MODEL_DIR}/ (the model to load or share), {CHECKPOINTS_DIR}/, "
                             f"{SUMMARY_FILE} (default: %(default)s)")
    parser.add_argument("--seed", type=ca.nonneg_int, default=_default("seed"),
                        help="seed of the new gates, the data order and training (default: %(default)s)")
    parser.add_argument("--bf16", action="store_true",
                        help="load the base weights in bfloat16 and train with bf16 autocast (gates stay float32)")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="non-reentrant activation checkpointing of the decoder layers (same gates; slower, "
                             "and no memory gain here: the frozen base keeps no activations for backward)")
    ca.add_checkpoint_args(parser, _default, CHECKPOINTS_DIR)
    parser.add_argument("--full-checkpoints", action="store_true",
                        help="write full model weights into checkpoints (default: gates only)")
    ca.add_runtime_args(parser, _default)
    return parser


def _resume_checkpoint(resume, checkpoints_dir):
    """The checkpoint folder to resume from (None: a fresh run); see :func:`.trainer.resolve_resume`."""
    from .trainer import resolve_resume
    return resolve_resume(resume, checkpoints_dir, "distill")


def run_distill(config: DistillConfig) -> dict:
    """Distil the gates as ``config`` says (layout of its ``output`` folder: module
    docstring). Errors in what the user named (data, model, checkpoint) come before
    training, marked for the CLI (:func:`seer_attn.training.cli_args.user_input`); bad values
    were refused when the config was made.

    Returns:
        dict with ``output_dir`` (``--output``), ``model_dir`` (the shareable model folder,
        loadable with ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``
        or ``load_seer_model(dir)``; its config is in ``seer_mode="sparse"``; its tokenizer
        loads with ``AutoTokenizer.from_pretrained(dir)``), ``checkpoints_dir``,
        ``gates_path`` (gates-only safetensors in ``model_dir``, for
        ``load_seer_model(base, gates=...)``), ``final_loss`` (the loss logged at the last
        step: mean over the last logging window), ``train_loss`` (mean over this run's
        steps), ``block_density`` (at the last log), ``global_step``, ``model`` (the
        source), ``data``, ``seq_len``, ``threshold``, ``resumed_from`` (a checkpoint or
        None), ``summary_path`` (the envelope file), ``log_history``, ``provenance`` (the
        envelope's) and ``commit`` (its commit).
    """
    import torch
    from transformers import set_seed

    from seer_attn.modeling_seer.conversion import default_model_path, load_seer_model, load_tokenizer
    from seer_attn.modeling_seer.modeling_seer_llama import GATES_FILE

    from .data import default_corpus_path, load_documents, pack_documents
    from .retrieval_data import mix_retrieval
    from .results import envelope, write_json
    from .trainer import CHECKPOINTING_ARG, GateDistillationTrainer, SeerTrainingArguments

    if not isinstance(config, DistillConfig):
        raise TypeError(f"run_distill takes a DistillConfig, got {type(config).__name__}")
    out_dir = os.path.abspath(config.output)
    model_dir, checkpoints_dir = os.path.join(out_dir, MODEL_DIR), os.path.join(out_dir, CHECKPOINTS_DIR)
    with ca.user_input():
        resume = _resume_checkpoint(config.resume, checkpoints_dir)
        docs = load_documents(config.data, text_column=config.text_column, streaming=config.streaming)
        source = config.model if config.model is not None else default_model_path()
        tokenizer = load_tokenizer(source)
        train_dataset = pack_documents(docs, tokenizer, config.seq_len, seed=config.seed, num_proc=config.num_proc)
        if config.retrieval_mix:
            train_dataset = mix_retrieval(train_dataset, config.retrieval_mix, seed=config.seed, tokenizer=tokenizer,
                                          kinds=config.retrieval_kinds)
        seer_kwargs = {"seer_mode": "distill", **{key: getattr(config, name) for name, key in SEER_OPTIONS.items()
                                                   if getattr(config, name) is not None}}
        if config.distill_prior is not None:  # the loss reads the mixture, and the model serves it
            seer_kwargs.update(seer_meanpool_prior=config.distill_prior, seer_distill_prior=True)
        if config.decode_gate:  # a second loss per layer beside the prefill gate's; saved with the gates
            seer_kwargs.update(seer_decode_gate=True, seer_decode_distill_rows=config.decode_rows or DECODE_ROWS)
        set_seed(config.seed)  # before the model: a conversion draws the new gates from the RNG
        model = load_seer_model(source, dtype=torch.bfloat16 if config.bf16 else None, **seer_kwargs)
        targs = SeerTrainingArguments(
            output_dir=checkpoints_dir, final_model_dir=model_dir, max_steps=config.steps,
            per_device_train_batch_size=config.batch_size, gradient_accumulation_steps=config.grad_accum,
            learning_rate=config.lr, warmup_steps=config.warmup_steps, seed=config.seed, bf16=config.bf16,
            logging_steps=config.logging_steps, save_steps=config.save_steps, save_total_limit=config.save_total_limit,
            save_gates_only=not config.full_checkpoints, use_cpu=config.cpu, report_to="none",
            disable_tqdm=config.no_progress, **{CHECKPOINTING_ARG: config.gradient_checkpointing})
        trainer = GateDistillationTrainer(model=model, args=targs, train_dataset=train_dataset,
                                          processing_class=tokenizer)
    result = trainer.train(resume_from_checkpoint=resume)

    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    last = logged[-1] if logged else {}
    summary = {
        "output_dir": out_dir,
        "model_dir": model_dir,
        "checkpoints_dir": checkpoints_dir,
        "gates_path": os.path.join(model_dir, GATES_FILE),
        "final_loss": last.get("loss"),
        "train_loss": result.training_loss,
        "block_density": last.get("block_density"),
        "global_step": trainer.state.global_step,
        "model": str(source),
        "data": [str(d) for d in config.data] if config.data else [default_corpus_path("train")],
        "seq_len": config.seq_len,
        "threshold": model.config.seer_threshold,
        "decode_gate": bool(model.config.seer_decode_gate),
        "resumed_from": resume,
    }
    summary_path = os.path.join(out_dir, SUMMARY_FILE)
    extra = {k: v for k, v in summary.items() if k != "model"}  # the envelope has it as provenance.model
    env = envelope("distill", trainer.state.log_history, config=asdict(config), model=summary["model"],
                   device=trainer.args.device, **extra)
    if trainer.args.should_save:
        write_json(summary_path, env)
    return {**summary, "summary_path": summary_path, "log_history": trainer.state.log_history,
            "provenance": env["provenance"], "commit": env["provenance"]["commit"]}
