"""``seer-attn finetune``: YaRN context extension with SeerAttention from the command line.

A run is configured by a :class:`FineTuneConfig` (the Python API: build one and call
:func:`run_finetune`); the CLI entry point (``eval/cli.py``) registers :func:`add_finetune_args`
on its ``finetune`` sub-parser, builds the config from the options
(:func:`~seer_attn.training.run_config.config_from_args`), calls :func:`run_finetune` and
prints its closing evaluation table. Flow:

1. check what the user named before any model loads: the config's values (on creation: factor
   < 1, density outside (0, 1], ...), the model's pretraining context (read from its config
   only) against ``--seq-len`` (at most ``factor x original`` positions), the checkpoint to
   resume, the data (files, text and source columns); the data is tokenised and packed into
   ``--seq-len`` sequences, by default each source's documents joined with EOS
   (:func:`seer_attn.training.data.pack_documents` ``by_source``), in a seeded order;
2. seed with ``--seed``, then load (or convert) the model with float32 weights, optionally
   load initial gates (``--gates``);
3. :class:`~seer_attn.training.finetune_trainer.SeerFineTuneTrainer` for ``--steps``
   optimizer steps: YaRN by ``--yarn-factor``, sparse attention at ``--density`` (nz_ratio;
   1 = dense) or ``--threshold``, the gates learning (``--gate-loss-*``) or frozen
   (``--freeze-gates``), full fine-tuning or LoRA (``--lora-r``).

Output folder ``--output OUT``::

    OUT/model/                  the fine-tuned model (full fine-tuning: a remote-code folder,
                                seer_mode="sparse" at the trained density; LoRA: the adapter with
                                the trained gates, loadable with AutoPeftModelForCausalLM)
    OUT/base/                   LoRA only: the frozen base the adapter names (YaRN config)
    OUT/checkpoints/checkpoint-N/  for --resume (full weights or adapter, optimizer, RNG, ...)
    OUT/finetune_summary.json   a results envelope of kind "finetune": provenance, the run
                                config (``dataclasses.asdict``), the log history as rows, and the
                                summary returned

:func:`load_finetuned` loads ``OUT/model`` either way.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import asdict, dataclass

from . import cli_args as ca
from .run_config import ConfigError, RunConfig, default, flag, option, text

DEFAULT_OUTPUT = "seer_outputs/finetune"
SUMMARY_FILE = "finetune_summary.json"
MODEL_DIR, BASE_DIR, CHECKPOINTS_DIR = "model", "base", "checkpoints"
PACKINGS = ("per-source", "joined")
#: shortest --seq-len: 4 blocks of 64 tokens (see seer_attn.training.distill.MIN_SEQ_LEN)
MIN_SEQ_LEN = 256
#: LoRA targets (every linear map of attention and MLP of the Llama / Qwen2 families)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

_yarn_factor = ca.float_in(1, None, low_open=False)
_dropout = ca.float_in(0, 1, low_open=False, high_open=True)


@dataclass(frozen=True, kw_only=True)
class FineTuneConfig(RunConfig):
    """One fine-tuning run (``seer-attn finetune``; each field is the option of the same name,
    see :func:`add_finetune_args` for what it means). Checked on creation: a bad value is one
    ValueError naming the field; the sequence length against the model's context is checked
    by :func:`run_finetune` (it needs the model's config)."""

    model: str | None = option(None, text)
    data: tuple | None = option(None, text, many="+")
    text_column: str = option("text", text)
    source_column: str = option("source", text)
    packing: str = option("per-source", choices=PACKINGS)
    seq_len: int = option(32768, ca.int_at_least(MIN_SEQ_LEN))
    yarn_factor: float | None = option(None, _yarn_factor)
    original_context: int | None = option(None, ca.positive_int)
    density: float | None = option(None, ca.unit_interval)
    threshold: float | None = option(None, ca.open_unit_interval)
    freeze_gates: bool = option(False, flag)
    gate_loss_weight: float = option(1.0, ca.positive_float)
    gate_loss_stride: int = option(4, ca.positive_int)
    gate_lr: float = option(1e-3, ca.positive_float)
    gates: str | None = option(None, text)
    lora_r: int | None = option(None, ca.positive_int)
    lora_alpha: int | None = option(None, ca.positive_int)
    lora_dropout: float = option(0.0, _dropout)
    lora_targets: tuple = option(LORA_TARGETS, text, many="+")
    steps: int = option(200, ca.positive_int)
    batch_size: int = option(1, ca.positive_int)
    grad_accum: int = option(1, ca.positive_int)
    lr: float = option(5e-5, ca.positive_float)
    warmup_steps: int = option(20, ca.nonneg_int)
    max_grad_norm: float = option(1.0, ca.positive_float)
    bf16: bool = option(False, flag)
    gradient_checkpointing: bool = option(False, flag)
    compile_pointwise: bool = option(False, flag)
    seed: int = option(42, ca.nonneg_int)
    output: str = option(DEFAULT_OUTPUT, text)
    resume: str | None = option(None, text)
    logging_steps: int = option(10, ca.positive_int)
    save_steps: int = option(50, ca.positive_int)
    save_total_limit: int = option(1, ca.positive_int)
    num_proc: int | None = option(None, ca.positive_int)
    cpu: bool = option(False, flag)
    no_progress: bool = option(False, flag)

    def check(self):
        if self.density is not None and self.threshold is not None:
            raise ConfigError("{density}=%g and {threshold}=%g: give one, not both" % (self.density, self.threshold),
                              "density", "threshold")

    @property
    def selection(self) -> str:
        """``"dense"``, ``"nz_ratio=0.1"`` or ``"threshold=0.002"``."""
        if self.threshold is not None:
            return f"threshold={self.threshold:g}"
        return "dense" if self.density in (None, 1, 1.0) else f"nz_ratio={self.density:g}"


def _default(name):
    return default(FineTuneConfig, name)


def add_finetune_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``finetune`` options to ``parser`` (returned for chaining); their defaults are
    :class:`FineTuneConfig`'s, and :func:`~seer_attn.training.run_config.config_from_args`
    builds the config from them."""
    ca.add_data_args(parser, _default)
    parser.add_argument("--source-column", default=_default("source_column"),
                        help="column naming each document's source, for per-source packing (default: %(default)s)")
    parser.add_argument("--packing", choices=PACKINGS, default=_default("packing"),
                        help="per-source: each source's documents joined with EOS and cut on their own (long "
                             "sequences of one kind of text); joined: all documents in one stream "
                             "(default: %(default)s)")
    parser.add_argument("--seq-len", type=ca.int_at_least(MIN_SEQ_LEN), default=_default("seq_len"),
                        help="tokens per training sequence, at most yarn factor x the model's original context "
                             "(default: %(default)s)")
    parser.add_argument("--yarn-factor", type=_yarn_factor, default=_default("yarn_factor"),
                        help="YaRN context multiplier, >= 1 (default: none, the model's RoPE as is)")
    parser.add_argument("--original-context", type=ca.positive_int, default=_default("original_context"),
                        help="the pretraining context YaRN stretches (default: the model config's)")
    parser.add_argument("--density", type=ca.unit_interval, default=_default("density"),
                        help="kept share of causal blocks while training (nz_ratio), 0 < d <= 1; 1 = dense "
                             "(default: 1 unless --threshold)")
    parser.add_argument("--threshold", type=ca.open_unit_interval, default=_default("threshold"),
                        help="train with the gate threshold selection instead of a fixed density")
    parser.add_argument("--freeze-gates", action="store_true", help="the gates do not learn while fine-tuning")
    parser.add_argument("--gate-loss-weight", type=ca.positive_float, default=_default("gate_loss_weight"),
                        help="weight of the gates' KL loss in the total loss (default: %(default)g)")
    parser.add_argument("--gate-loss-stride", type=ca.positive_int, default=_default("gate_loss_stride"),
                        help="each step 1 layer in N computes the gate loss (an exact attention pass), rotating "
                             "(default: %(default)s; 1: every layer every step)")
    parser.add_argument("--gate-lr", type=ca.positive_float, default=_default("gate_lr"),
                        help="learning rate of the gates (default: %(default)g)")
    parser.add_argument("--gates", default=_default("gates"),
                        help="initial gates (a seer_gates.safetensors file or folder)")
    parser.add_argument("--lora-r", type=ca.positive_int, default=_default("lora_r"),
                        help="LoRA rank: train LoRA adapters (and the gates in full) instead of every weight")
    parser.add_argument("--lora-alpha", type=ca.positive_int, default=_default("lora_alpha"),
                        help="LoRA alpha (default: 2 x rank)")
    parser.add_argument("--lora-dropout", type=_dropout, default=_default("lora_dropout"),
                        help="LoRA dropout (default: %(default)g)")
    parser.add_argument("--lora-targets", nargs="+", default=_default("lora_targets"), metavar="MODULE",
                        help=f"modules with LoRA adapters (default: {' '.join(LORA_TARGETS)})")
    ca.add_loop_args(parser, _default)
    parser.add_argument("--lr", type=ca.positive_float, default=_default("lr"),
                        help="peak learning rate (default: %(default)g)")
    parser.add_argument("--warmup-steps", type=ca.nonneg_int, default=_default("warmup_steps"),
                        help="linear warm-up steps, then cosine (default: %(default)s)")
    parser.add_argument("--max-grad-norm", type=ca.positive_float, default=_default("max_grad_norm"),
                        help="gradient-norm clip, the gates and the other weights each (default: %(default)g)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast over float32 weights")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="non-reentrant activation checkpointing of the decoder layers")
    parser.add_argument("--compile-pointwise", action="store_true",
                        help="torch.compile the work around the attention kernels (each layer as two graphs, "
                             "the block selection, the loss): a faster step at 32k on a GPU")
    parser.add_argument("--seed", type=ca.nonneg_int, default=_default("seed"),
                        help="seed of new gates, the data order and training (default: %(default)s)")
    parser.add_argument("--output", default=_default("output"),
                        help=f"output folder: {MODEL_DIR}/, {CHECKPOINTS_DIR}/, {SUMMARY_FILE} "
                             "(default: %(default)s)")
    ca.add_checkpoint_args(parser, _default, CHECKPOINTS_DIR)
    ca.add_runtime_args(parser, _default)
    return parser


def source_config(source):
    """The transformers config of a model source (GGUF file, folder, Hub id) without its weights."""
    from transformers import AutoConfig

    import seer_attn.modeling_seer  # noqa: F401  (registers the Seer configs with AutoConfig)
    from seer_attn.modeling_seer.hub_utils import hub_call, resolve_source

    path, local = resolve_source(source)
    if path.endswith(".gguf"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return AutoConfig.from_pretrained(os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path))
    return AutoConfig.from_pretrained(path) if local else hub_call(path, AutoConfig.from_pretrained, path)


def check_context(cfg: FineTuneConfig, model_config) -> int:
    """ValueError unless ``--seq-len`` fits ``factor x original`` positions; returns the original context."""
    from .yarn import check_yarn, native_context

    original = cfg.original_context or native_context(model_config)
    check_yarn(cfg.yarn_factor if cfg.yarn_factor is not None else 1, cfg.seq_len, original)
    return original


def training_arguments(cfg: FineTuneConfig, checkpoints_dir: str, model_dir: str, base_dir: str, original: int,
                       **overrides):
    """The :class:`~seer_attn.training.finetune_trainer.FineTuneArguments` of ``cfg``
    (``overrides``: further arguments, e.g. ``save_strategy="no"``)."""
    from .finetune_trainer import FineTuneArguments
    from .trainer import CHECKPOINTING_ARG

    return FineTuneArguments(
        output_dir=checkpoints_dir, final_model_dir=model_dir, lora_base_dir=base_dir, max_steps=cfg.steps,
        per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr, gate_lr=cfg.gate_lr, warmup_steps=cfg.warmup_steps, max_grad_norm=cfg.max_grad_norm,
        seed=cfg.seed, data_seed=cfg.seed, bf16=cfg.bf16, logging_steps=cfg.logging_steps, save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit, use_cpu=cfg.cpu, report_to="none", disable_tqdm=cfg.no_progress,
        yarn_factor=cfg.yarn_factor, yarn_original_max_position_embeddings=original if cfg.yarn_factor else None,
        density=cfg.density, threshold=cfg.threshold, train_gates=not cfg.freeze_gates,
        gate_loss_weight=cfg.gate_loss_weight, gate_loss_stride=cfg.gate_loss_stride, lora_r=cfg.lora_r,
        compile_pointwise=cfg.compile_pointwise,
        lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, lora_target_modules=list(cfg.lora_targets),
        dataloader_num_workers=0, **{CHECKPOINTING_ARG: cfg.gradient_checkpointing, **overrides})


def load_train_data(cfg: FineTuneConfig, tokenizer):
    """The packed training sequences of ``cfg`` (per-source or joined, seeded order)."""
    from .data import load_documents, pack_documents

    per_source = cfg.packing == "per-source"
    docs = load_documents(cfg.data, text_column=cfg.text_column,
                          source_column=cfg.source_column if per_source else None)
    return pack_documents(docs, tokenizer, cfg.seq_len, seed=cfg.seed, num_proc=cfg.num_proc, by_source=per_source)


def run_finetune(cfg: FineTuneConfig, callbacks=None) -> dict:
    """Fine-tune as configured (layout of ``cfg.output``: module docstring). Errors in what the
    user named (options, model context, data, checkpoint) come before any model loads,
    marked for the CLI (:func:`seer_attn.training.cli_args.user_input`); bad values were
    refused when the config was made. ``callbacks``:
    extra ``TrainerCallback`` objects (e.g. a step timer).

    Returns:
        dict with ``output_dir``, ``model_dir``, ``base_dir`` (LoRA; else None),
        ``checkpoints_dir``, ``lora`` (bool), ``final_loss`` / ``final_lm_loss`` /
        ``final_gate_loss`` / ``block_density`` (the last log), ``train_loss`` (mean over this
        run's steps), ``global_step``, ``seq_len``, ``yarn_factor``, ``original_context``,
        ``selection`` (``dense`` / ``nz_ratio=...`` / ``threshold=...``), ``sequences`` (in
        the training set), ``resumed_from``, ``model``, ``data``, ``summary_path``,
        ``log_history``, ``provenance`` and ``commit``.
    """
    import torch
    from transformers import set_seed

    from seer_attn.modeling_seer.conversion import default_model_path, load_seer_model, load_tokenizer

    from .cli_args import user_input
    from .data import default_corpus_path
    from .finetune_trainer import SeerFineTuneTrainer
    from .results import envelope, write_json
    from .trainer import resolve_resume

    if not isinstance(cfg, FineTuneConfig):
        raise TypeError(f"run_finetune takes a FineTuneConfig, got {type(cfg).__name__}")
    out_dir = os.path.abspath(cfg.output)
    model_dir, base_dir = os.path.join(out_dir, MODEL_DIR), os.path.join(out_dir, BASE_DIR)
    checkpoints_dir = os.path.join(out_dir, CHECKPOINTS_DIR)
    with user_input():
        source = cfg.model if cfg.model is not None else default_model_path()
        original = check_context(cfg, source_config(source))
        resume = resolve_resume(cfg.resume, checkpoints_dir, "finetune")
        if cfg.gates is not None and not os.path.exists(cfg.gates):
            raise FileNotFoundError(f"--gates file not found: {cfg.gates!r}")
        tokenizer = load_tokenizer(source)
        train_dataset = load_train_data(cfg, tokenizer)
        targs = training_arguments(cfg, checkpoints_dir, model_dir, base_dir, original)
        set_seed(cfg.seed)  # before the model: a conversion draws the new gates from the RNG
        model = load_seer_model(source, dtype=torch.float32, gates=cfg.gates)
        trainer = SeerFineTuneTrainer(model=model, args=targs, train_dataset=train_dataset,
                                      processing_class=tokenizer, callbacks=callbacks)
    result = trainer.train(resume_from_checkpoint=resume)

    logged = [e for e in trainer.state.log_history if "loss" in e]
    last = logged[-1] if logged else {}
    summary = {
        "output_dir": out_dir, "model_dir": model_dir, "base_dir": base_dir if cfg.lora_r else None,
        "checkpoints_dir": checkpoints_dir, "lora": cfg.lora_r is not None,
        "final_loss": last.get("loss"), "final_lm_loss": last.get("lm_loss"),
        "final_gate_loss": last.get("gate_loss"), "block_density": last.get("block_density"),
        "train_loss": result.training_loss, "global_step": trainer.state.global_step, "seq_len": cfg.seq_len,
        "yarn_factor": cfg.yarn_factor, "original_context": original, "selection": cfg.selection,
        "sequences": len(train_dataset), "resumed_from": resume, "model": str(source),
        "data": [str(d) for d in cfg.data] if cfg.data else [default_corpus_path("train")],
    }
    summary_path = os.path.join(out_dir, SUMMARY_FILE)
    extra = {k: v for k, v in summary.items() if k != "model"}
    env = envelope("finetune", trainer.state.log_history, config=asdict(cfg), model=summary["model"],
                   device=trainer.args.device, **extra)
    if trainer.args.should_save:
        write_json(summary_path, env)
    return {**summary, "summary_path": summary_path, "log_history": trainer.state.log_history,
            "provenance": env["provenance"], "commit": env["provenance"]["commit"]}


def is_adapter_folder(folder) -> bool:
    """True for a PEFT adapter folder (``adapter_config.json``)."""
    return os.path.isfile(os.path.join(str(folder), "adapter_config.json"))


def load_finetuned(model_dir, *, dtype=None, device=None, merge=True):
    """Load what :func:`run_finetune` saved in ``OUT/model``: a Seer model folder, or a LoRA
    adapter (through ``AutoPeftModelForCausalLM`` with ``trust_remote_code=True``; its base
    folder is named in the adapter's config), merged into the base by default.

    Returns:
        the Seer causal LM (``merge=False``: the PEFT model), in eval mode, in the saved
        ``seer_mode`` (sparse at the trained setting).
    """
    import torch

    if is_adapter_folder(model_dir):
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(str(model_dir), trust_remote_code=True,
                                                         dtype=dtype or torch.float32)
        if merge:
            model = model.merge_and_unload()
    else:
        from seer_attn.modeling_seer.conversion import load_seer_model

        model = load_seer_model(str(model_dir), dtype=dtype)
    if device is not None:
        model.to(device)
    return model.eval()
