"""Gate distillation (post-training) with the Hugging Face ``Trainer``, and the base all Seer
trainers share.

:class:`SeerTrainer` holds what every Seer trainer needs beside its loss (the fine-tuning
trainer of :mod:`.finetune_trainer` is the other one): the final-model save (a shareable
remote-code folder, no pickle), resuming from the newest *complete* checkpoint, the gates'
own learning rate and gradient clipping, and extra logged values (block density, loss
parts) averaged over each logging window.

:class:`GateDistillationTrainer` trains only the AttnGate parameters
(``*.attn_gate.q_weight`` / ``*.attn_gate.k_weight``) of a Seer causal LM of any family
(:mod:`seer_attn.modeling_seer.families`, e.g. :class:`SeerLlamaForCausalLM`) in
``seer_mode="distill"``: each layer's attention also emits the frozen model's
max-pooled attention map and the model returns ``outputs.gate_loss`` (the per-layer KL
losses summed and scaled, DESIGN §2). That is the training loss; the LM loss is not used
and no labels are passed. Base weights are frozen and stay bit-identical.

Its extra knobs live in :class:`SeerTrainingArguments`, which also carries the paper's
defaults (learning rate 1e-3, cosine schedule, 20 warm-up steps, no weight decay).

Memory: the frozen base needs no activation gradients, so autograd keeps only the small
block-pooled gate inputs (``[B, H, T/64, D]`` per layer); the attention and MLP
activations are not saved for backward even without gradient checkpointing. Activation
(gradient) checkpointing is supported (non-reentrant only, the default here): the trainer
removes the input-embedding ``requires_grad`` hook that ``activation_checkpointing_enable``
installs, so that backward stays inside the gates instead of running through the frozen network.
It gives identical gates but, for that reason, no memory saving: on one H100 with a
SmolLM2-135M-shaped model, bf16, batch 2 x 4096 tokens, peak memory was 0.70 GiB with
checkpointing and 0.56 GiB without, at 0.26 vs 0.15 s per step.

Folders: checkpoints go to ``output_dir/checkpoint-N/`` (Trainer's layout, with its
optimizer, scheduler, RNG and arguments pickles, for an exact resume); the final model to
``final_model_dir`` (default ``output_dir/model/``), beside them and never holding them:
config, safetensors weights, tokenizer, remote code and gates, no pickle.
:func:`last_complete_checkpoint` finds the newest checkpoint a killed run did not leave
half-written.
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator
from transformers.trainer import TRAINER_STATE_NAME, TRAINING_ARGS_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import (ADAPTER_SAFE_WEIGHTS_NAME, ADAPTER_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME,
                                SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME)

from seer_attn.modeling_seer import SeerForwardContext, selection_density
from seer_attn.modeling_seer.configuration_seer import SEER_MODES
from seer_attn.modeling_seer.seer_layer import GATES_FILE

logger = logging.getLogger(__name__)

#: parameter names of the gates: ``...attn_gate.q_weight`` and ``...attn_gate.k_weight``, and of
#: the decode gates inside them (``...attn_gate.decode_gate.q_weight`` / ``k_weight``)
GATE_MODULE = "attn_gate"
GATE_PARAMS = ("q_weight", "k_weight")
#: batch keys forwarded to the model (anything else, ``labels`` included, is dropped)
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "inputs_embeds")
#: TrainingArguments' name of activation checkpointing (``gradient_checkpointing`` is its
#: deprecated alias in transformers 5.x, removed in v6; older 5.x releases know only that one)
CHECKPOINTING_ARG = ("activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
                     else "gradient_checkpointing")


# ----------------------------------------------------------------------------- arguments

@dataclass
class SeerTrainingArguments(TrainingArguments):
    """``TrainingArguments`` with SeerAttention's defaults and knobs.

    Changed defaults (paper, §4): ``learning_rate=1e-3``, ``lr_scheduler_type="cosine"``,
    ``warmup_steps=20``, ``weight_decay=0.0``; ``logging_steps=10``;
    ``activation_checkpointing_kwargs={"use_reentrant": False}`` (reentrant checkpointing,
    under either name, is refused: it would need the inputs to require grad, i.e. a
    backward pass through the whole frozen model). Turn checkpointing on with
    ``activation_checkpointing=True`` (:data:`CHECKPOINTING_ARG`; ``gradient_checkpointing``
    is the deprecated alias).

    Extra fields:
        gate_lr: learning rate of the gate parameters; None means ``learning_rate``.
        save_gates_only: intermediate checkpoints (``checkpoint-N/``) hold only the gate
            tensors (``seer_gates.safetensors``, a few MB) next to the optimizer, scheduler,
            RNG and trainer state; resuming loads them onto the frozen base the trainer was
            built with. False: full model weights as in a plain ``Trainer``.
        save_final_model: at the end of ``train()`` save to ``final_model_dir`` the full
            ``trust_remote_code`` model folder (``save_pretrained`` + tokenizer) and the
            gates-only file.
        final_model_dir: the shareable model folder (default: ``output_dir/model``, beside
            the checkpoints); it holds no pickle (Trainer's ``training_args.bin`` stays in
            the checkpoints).
        export_seer_mode: ``seer_mode`` written into saved configs, so that loading the
            folder gives the inference model ("sparse" by default).
        log_block_density: log ``block_density``, the kept share of causal blocks that the
            current gates and the model's sparsity settings (``seer_sparsity_method``,
            ``seer_threshold``, keep-options) would give, averaged over the steps since
            the last log.
    """

    learning_rate: float = field(default=1e-3, metadata={"help": "Initial learning rate (SeerAttention: 1e-3)."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule (paper: cosine)."})
    warmup_steps: float = field(default=20, metadata={"help": "Linear warm-up steps (paper: 20)."})
    weight_decay: float = field(default=0.0, metadata={"help": "Weight decay (paper: none)."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N optimizer steps."})
    gate_lr: float | None = field(default=None, metadata={"help": "Learning rate of the gate parameters "
                                                                  "(default: learning_rate)."})
    save_gates_only: bool = field(default=True, metadata={"help": "Checkpoints hold the gate tensors only."})
    save_final_model: bool = field(default=True, metadata={"help": "After train(), save the full remote-code "
                                                                   "folder and the gates-only file to "
                                                                   "final_model_dir."})
    final_model_dir: str | None = field(default=None, metadata={"help": "Folder of the final model (default: "
                                                                        "output_dir/model)."})
    export_seer_mode: str = field(default="sparse", metadata={"help": "seer_mode written into saved configs."})
    log_block_density: bool = field(default=True, metadata={"help": "Log the block density of the gates."})

    def __post_init__(self):
        kwargs_name = f"{CHECKPOINTING_ARG}_kwargs"
        if getattr(self, kwargs_name) is None and self.gradient_checkpointing_kwargs is None:
            setattr(self, kwargs_name, {"use_reentrant": False})  # the current name: no deprecation warning
        super().__post_init__()
        if self.final_model_dir is None:
            self.final_model_dir = os.path.join(self.output_dir, "model")
        gc_kwargs = getattr(self, kwargs_name) or {}
        if gc_kwargs.get("use_reentrant", False):
            raise ValueError(f"{kwargs_name}={gc_kwargs!r}: the Seer trainers need non-reentrant "
                             "checkpointing (use_reentrant=False); reentrant checkpointing would make gradients "
                             "flow through the whole frozen model (distillation) and drop the gates' own loss "
                             "(fine-tuning)")
        if self.gate_lr is not None and not self.gate_lr > 0:
            raise ValueError(f"gate_lr={self.gate_lr!r} is invalid: expected a positive learning rate or None")
        if self.export_seer_mode not in SEER_MODES:
            raise ValueError(f"export_seer_mode={self.export_seer_mode!r} is invalid: expected one of {SEER_MODES}")
        if self.save_gates_only and self.load_best_model_at_end:
            raise ValueError("load_best_model_at_end=True needs full checkpoints; set save_gates_only=False")


# ----------------------------------------------------------------------------- freezing

def is_gate_parameter(name: str) -> bool:
    """True for ``...attn_gate.q_weight`` / ``...attn_gate.k_weight`` parameter names, those of
    the decode gates inside (``...attn_gate.decode_gate.q_weight``) and those inside a PEFT
    ``modules_to_save`` copy (``...attn_gate.modules_to_save.default.q_weight``)."""
    parts = name.split(".")
    return len(parts) >= 2 and GATE_MODULE in parts[:-1] and parts[-1] in GATE_PARAMS


def freeze_non_gate_parameters(model: torch.nn.Module) -> int:
    """Set ``requires_grad`` True on gate parameters and False on all others.

    Returns:
        the number of gate parameter tensors (0 means the model has no gates).
    """
    n_gates = 0
    for name, p in model.named_parameters():
        gate = is_gate_parameter(name)
        p.requires_grad_(gate)
        n_gates += gate
    return n_gates


def check_only_gates_trainable(model: torch.nn.Module) -> None:
    """Raise ValueError if a non-gate parameter requires grad or no gate parameter does."""
    gates = [n for n, p in model.named_parameters() if is_gate_parameter(n)]
    if not gates:
        raise ValueError(f"{type(model).__name__} has no '*.{GATE_MODULE}.q_weight/k_weight' parameters; "
                         "gate distillation needs a Seer model (e.g. SeerLlamaForCausalLM)")
    bad = [n for n, p in model.named_parameters() if p.requires_grad and not is_gate_parameter(n)]
    if bad:
        raise ValueError(f"gate distillation trains the gates only, but {len(bad)} non-gate parameters require "
                         f"grad: {bad[:5]}{' ...' if len(bad) > 5 else ''}")
    if not any(p.requires_grad for n, p in model.named_parameters() if is_gate_parameter(n)):
        raise ValueError(f"no gate parameter requires grad (of {len(gates)}: {gates[:2]} ...); nothing would train")


def _check_low_precision_base(model, flag):
    """Mixed precision needs the base weights already in half precision.

    Under autocast over float32 weights, the Seer distill attention receives q/k in
    float32 (RoPE tables follow the float32 hidden states) and v in half precision, which
    the attention kernels refuse. Loading the base in bf16 (the gates stay float32) runs
    the same math without that mismatch.
    """
    fp32 = [n for n, p in model.named_parameters() if not is_gate_parameter(n) and p.dtype == torch.float32]
    if fp32:
        want = "torch.bfloat16" if flag == "bf16" else "torch.float16"
        raise ValueError(f"{flag}=True needs the base weights in half precision, but {len(fp32)} non-gate "
                         f"parameters are float32 (e.g. {fp32[0]}); load the model with dtype={want} "
                         "(the gates stay float32)")


def _has_full_weights(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, n))
               for n in (SAFE_WEIGHTS_NAME, WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_INDEX_NAME))


def _has_adapter(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, n)) for n in (ADAPTER_SAFE_WEIGHTS_NAME, ADAPTER_WEIGHTS_NAME))


def checkpoint_problem(folder: str) -> str | None:
    """What makes ``folder`` an incomplete checkpoint (a save a kill interrupted), or None
    when it is complete: Trainer writes ``trainer_state.json`` last, after the gates (or
    model weights, or a PEFT adapter), optimizer, scheduler and RNG state."""
    if not os.path.isfile(os.path.join(folder, TRAINER_STATE_NAME)):
        return f"no {TRAINER_STATE_NAME}"
    if not (os.path.isfile(os.path.join(folder, GATES_FILE)) or _has_full_weights(folder) or _has_adapter(folder)):
        return f"no {GATES_FILE}, no model weights and no adapter"
    return None


def last_complete_checkpoint(folder: str) -> tuple[str | None, list[tuple[str, str]]]:
    """The newest complete ``checkpoint-N`` folder in ``folder`` (None: there is none) and
    the newer incomplete ones passed over, as ``(path, what is missing)`` pairs."""
    steps = {}
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            prefix, _, step = name.partition("-")
            if prefix == PREFIX_CHECKPOINT_DIR and step.isdigit() and os.path.isdir(os.path.join(folder, name)):
                steps[os.path.join(folder, name)] = int(step)
    skipped = []
    for path in sorted(steps, key=steps.get, reverse=True):
        problem = checkpoint_problem(path)
        if problem is None:
            return path, skipped
        skipped.append((path, problem))
    return None, skipped


def resolve_resume(resume, checkpoints_dir, command="seer-attn"):
    """The checkpoint folder a command's ``--resume`` names (None: a fresh run). ``"last"``:
    the newest complete one in ``checkpoints_dir``; newer ones a kill left half-written are
    skipped, and said so (printed with the ``[command]`` prefix). A named folder must exist
    and be complete (FileNotFoundError / ValueError otherwise)."""
    if resume is None:
        return None
    if resume != "last":
        if not os.path.isdir(resume):
            raise FileNotFoundError(f"--resume checkpoint folder not found: {resume!r}")
        problem = checkpoint_problem(resume)
        if problem:
            raise ValueError(f"--resume {resume!r} is an incomplete checkpoint ({problem}): its save was "
                             "interrupted; name an earlier one, or give --resume alone for the newest complete one")
        return resume
    path, skipped = last_complete_checkpoint(checkpoints_dir)
    for folder, problem in skipped:
        print(f"[{command}] --resume: skipping {folder}: incomplete ({problem}; its save was interrupted)", flush=True)
    if path is None:
        raise FileNotFoundError(f"--resume: no complete checkpoint in {checkpoints_dir!r}")
    print(f"[{command}] resuming from {path}", flush=True)
    return path


class _LogLastStep(TrainerCallback):
    """Log at the final step too, so the last loss/density window always reaches the logs."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.max_steps > 0 and state.global_step >= state.max_steps:
            control.should_log = True
        return control


# ----------------------------------------------------------------------------- shared base

class SeerTrainer(Trainer):
    """The base of the Seer trainers: what they share beside their loss.

    - ``train(resume_from_checkpoint=True)`` takes the newest *complete* checkpoint in
      ``output_dir`` (:func:`last_complete_checkpoint`; the incomplete ones passed over are
      logged); after training, with ``save_final_model``, :meth:`save_model` writes
      ``final_model_dir``: the model in ``export_seer_mode`` (remote code included), the
      tokenizer and, for a plain Seer model, the gates-only file; no pickle.
    - Intermediate checkpoints hold the gates only when ``save_gates_only`` (resumed onto the
      model the trainer was built with), else what a plain ``Trainer`` saves (full weights,
      or a PEFT adapter).
    - The gate parameters (:func:`is_gate_parameter`) get their own optimizer group with
      ``gate_lr``, and their gradients are clipped to ``max_grad_norm`` apart from the other
      trainable parameters' (a gate loss must not shrink the language model's step);
      ``grad_norm`` in the logs is then the non-gate parameters' norm.
    - :meth:`_log_value` accumulates extra logged values (``block_density``, loss parts);
      each is logged with the loss as its mean over the steps since the last log.

    Subclasses prepare the model (mode, trainable parameters) before calling this
    ``__init__`` and override :meth:`compute_loss`.

    Args:
        model: the model handed to the ``Trainer`` (a Seer causal LM, or a PEFT model around one).
        args: :class:`SeerTrainingArguments` (or a subclass).
        seer_model: the Seer causal LM inside ``model`` (default: ``model``): its modes,
            density and gate I/O.
        **kwargs: passed to :class:`~transformers.Trainer`. ``processing_class`` (the
            tokenizer) is saved with full models only and kept away from the ``Trainer``, whose
            ``train()`` would otherwise copy its special-token ids into the model config.
            ``data_collator`` defaults to ``default_data_collator`` (packed sequences need no padding).
    """

    def __init__(self, model, args: SeerTrainingArguments, seer_model=None, **kwargs):
        kwargs.setdefault("data_collator", default_data_collator)
        self.tokenizer = kwargs.pop("processing_class", None)
        super().__init__(model=model, args=args, **kwargs)
        self._seer = seer_model if seer_model is not None else model
        # The losses are means (over gate logits, or over the tokens of a packed sequence without
        # padding): no token-count normalisation from the Trainer.
        self.model_accepts_loss_kwargs = False
        # The model's forward is (*args, **kwargs); tell the Trainer which columns it consumes.
        self._signature_columns = list(MODEL_INPUTS)
        self._in_checkpoint = False
        self._log_sums = {}
        self.add_callback(_LogLastStep())

    # -- logging --------------------------------------------------------------------------

    def _log_value(self, name, value):
        """Add ``value`` (a number or 0-d tensor; no device sync here) to the mean logged as ``name``."""
        total, n = self._log_sums.get(name, (0.0, 0))
        self._log_sums[name] = (total + value.detach() if torch.is_tensor(value) else total + value, n + 1)

    def log(self, logs, start_time=None):
        if "loss" in logs:
            for name, (total, n) in self._log_sums.items():
                logs[name] = float(total / n)
            self._log_sums = {}
        super().log(logs, start_time)

    # -- optimizer ------------------------------------------------------------------------

    def _gate_parameters(self):
        """The trainable gate parameters."""
        return [p for n, p in self.model.named_parameters() if is_gate_parameter(n) and p.requires_grad]

    def create_optimizer(self, model=None):
        """Trainer's optimizer, the gate parameters in groups of their own with ``gate_lr``."""
        created = self.optimizer is None
        optimizer = super().create_optimizer(model)
        if created and self.args.gate_lr is not None:
            gate_ids = {id(p) for p in self._gate_parameters()}
            for group in list(optimizer.param_groups):
                gates = [p for p in group["params"] if id(p) in gate_ids]
                rest = [p for p in group["params"] if id(p) not in gate_ids]
                if not rest:  # gates only (or an empty group): all of it at the gates' rate
                    group["lr"] = self.args.gate_lr
                elif gates:  # the gates move to a new group (no optimizer state exists yet)
                    group["params"] = rest
                    optimizer.add_param_group({**{k: v for k, v in group.items() if k != "params"},
                                               "params": gates, "lr": self.args.gate_lr})
        return optimizer

    def _clip_grad_norm(self, model):
        """Clip the gate gradients and the others each to ``max_grad_norm``; returns the
        non-gate norm (Trainer's ``grad_norm``), or the gates' when nothing else trains."""
        gate_ids = {id(p) for p in self._gate_parameters()}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in gate_ids]
        if not gate_ids or not rest:
            return super()._clip_grad_norm(model)
        gates = [p for p in model.parameters() if id(p) in gate_ids and p.grad is not None]
        if gates:  # none on a step whose layers computed no gate loss
            self._log_value("gate_grad_norm", self.accelerator.clip_grad_norm_(gates, self.args.max_grad_norm))
        return self.accelerator.clip_grad_norm_(rest, self.args.max_grad_norm)

    # -- saving and resuming --------------------------------------------------------------

    def train(self, resume_from_checkpoint=None, **kwargs):
        """``Trainer.train``; then, with ``save_final_model``, :meth:`save_model` to
        ``final_model_dir``. ``resume_from_checkpoint=True``: the newest complete checkpoint."""
        if resume_from_checkpoint is True:
            path, skipped = last_complete_checkpoint(self.args.output_dir)
            for folder, problem in skipped:
                logger.warning(f"not resuming from {folder}: incomplete checkpoint ({problem})")
            if path is None:
                raise ValueError(f"no complete checkpoint to resume from in {self.args.output_dir!r}")
            resume_from_checkpoint = path
        output = super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        if self.args.save_final_model:
            self.save_model(self.args.final_model_dir)
        return output

    def _save_checkpoint(self, model, trial):
        self._in_checkpoint = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._in_checkpoint = False

    def _save(self, output_dir=None, state_dict=None):
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        if self._in_checkpoint and self.args.save_gates_only:
            self._seer.save_gates(output_dir)
            torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
            return
        mode = self._seer.config.seer_mode
        self._seer.set_seer_mode(self.args.export_seer_mode)
        try:
            super()._save(output_dir, state_dict=state_dict)
        finally:
            self._seer.set_seer_mode(mode)
        if not self._in_checkpoint:  # a folder to share: no pickle (Trainer writes its arguments as one)
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(output_dir, TRAINING_ARGS_NAME))
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(output_dir)
        if self._seer is self.model:  # a PEFT adapter holds the trained gates itself
            self._seer.save_gates(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        gates = os.path.join(resume_from_checkpoint, GATES_FILE)
        if os.path.isfile(gates) and not _has_full_weights(resume_from_checkpoint) \
                and not _has_adapter(resume_from_checkpoint):
            logger.info(f"Resuming gates from {gates} (gates-only checkpoint; other weights as the trainer got them)")
            self._seer.load_gates(gates)
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)


def check_seer_model(model, who):
    """TypeError unless ``model`` is a Seer causal LM (modes and gate I/O)."""
    for method in ("set_seer_mode", "save_gates", "load_gates"):
        if not hasattr(model, method):
            raise TypeError(f"expected a SeerLlamaForCausalLM, got {type(model).__name__} (no {method}()); {who} "
                            "trains Seer models (seer_attn.modeling_seer.conversion.load_seer_model converts one)")


def gate_modules(model):
    """The ``attn_gate`` modules of ``model`` (a PEFT ``modules_to_save`` wrapper counts once)."""
    return [m for name, m in model.named_modules() if name.split(".")[-1] == GATE_MODULE]


# ----------------------------------------------------------------------------- distillation

class GateDistillationTrainer(SeerTrainer):
    """Distil the AttnGates of a Seer model against its own attention (base frozen).

    On init the model is switched to ``seer_mode="distill"``, the gates are cast to float32,
    every non-gate parameter is frozen and the result is checked (ValueError otherwise;
    checked again when the optimizer is built). The loss is ``outputs.gate_loss``, with
    last-token logits only and no KV cache. ``block_density`` is logged
    next to the loss: each layer hands the forward context's ``on_gate_scores`` its gate
    logits ``[B, HQ, NB, NB]`` of the distillation forward itself (no extra forward) and its
    sliding window, and :func:`~seer_attn.modeling_seer.selection_density` with the model's
    sparsity settings measures the block mask a sparse prefill would use; the logged value
    is the kept share of causal blocks, averaged over layers, heads, batch rows and the steps
    since the last log. It is
    measured on the dense forward: from the second layer on, the gates of a real sparse
    prefill see inputs computed with sparse attention, which can shift it slightly.

    Args:
        model: a Seer causal LM of any family, e.g. :class:`SeerLlamaForCausalLM` (or its
            remote-code equivalent).
        args: :class:`SeerTrainingArguments` (default: ``output_dir="seer_outputs/distill"``).
        **kwargs: passed to :class:`SeerTrainer` / :class:`~transformers.Trainer`
            (``train_dataset`` of ``{"input_ids": [T]}`` rows, ``processing_class`` = the
            tokenizer, ``callbacks``, ...).

    Checkpoints, saving and resuming: :class:`SeerTrainer` and :class:`SeerTrainingArguments`
    (``save_gates_only``, ``save_final_model``, ``final_model_dir``, ``export_seer_mode``).
    """

    def __init__(self, model=None, args: SeerTrainingArguments | None = None, **kwargs):
        if model is None or kwargs.get("model_init") is not None:
            raise ValueError("GateDistillationTrainer needs a model instance (model_init is not supported)")
        check_seer_model(model, "GateDistillationTrainer")
        if args is None:
            args = SeerTrainingArguments(output_dir="seer_outputs/distill")
        if not isinstance(args, SeerTrainingArguments):
            raise TypeError(f"args must be SeerTrainingArguments, got {type(args).__name__}")
        if args.bf16 or args.fp16:
            _check_low_precision_base(model, "bf16" if args.bf16 else "fp16")
        model.set_seer_mode("distill")
        gates = gate_modules(model)
        for m in gates:
            m.float()  # gates train in float32 whatever the base dtype (a no-op for converted models)
        freeze_non_gate_parameters(model)
        check_only_gates_trainable(model)
        super().__init__(model, args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """``outputs.gate_loss`` of a distill-mode forward (no labels, last-token logits only)."""
        inputs = {k: v for k, v in inputs.items() if k in MODEL_INPUTS}
        if getattr(self._seer, "_require_grads_hooks", None):
            # Installed by activation_checkpointing_enable() for adapter training; here it would
            # only make backward run through the frozen network (the gates get the same grads).
            self._seer.disable_input_require_grads()
        record = self.args.log_block_density and model.training
        ctx = SeerForwardContext(on_gate_scores=self._log_gate_density if record else None)
        outputs = model(**inputs, use_cache=False, logits_to_keep=1, seer_ctx=ctx)
        loss = outputs.get("gate_loss") if isinstance(outputs, dict) else None
        if loss is None:
            raise RuntimeError(f"the model returned no gate_loss (seer_mode={self._seer.config.seer_mode!r}; "
                               "distillation needs seer_mode='distill' and a prefill forward)")
        return (loss, outputs) if return_outputs else loss

    @torch.no_grad()
    def _log_gate_density(self, layer_idx, scores, window):
        """The kept share of causal blocks (of the blocks the window reaches) of the selection
        the gate's scores make under the model's config: what a sparse prefill would keep."""
        self._log_value("block_density", selection_density(scores, self._seer.config, window, layer_idx).mean())

    def create_optimizer(self, model=None):
        check_only_gates_trainable(self._seer)
        return super().create_optimizer(model)
