"""Fine-tuning a Seer model with sparse attention and YaRN context extension (Hugging Face ``Trainer``).

:class:`SeerFineTuneTrainer` trains the language model *through* the block-sparse attention:
``seer_mode="sparse"``, every layer's gate picks the blocks (``nz_ratio``: a fixed density, or
``threshold``), and the LM loss flows through :func:`block_sparse_attn`'s backward, which
skips the unselected blocks too. At density 1 every causal block is kept: dense YaRN
fine-tuning is the same trainer, the same mode and the same code path (the kernels' dense
variant, no gate decides anything).

The gates either stay frozen (``train_gates=False``) or keep learning from the model's own
attention as it changes: in the layers chosen for a step the layer also runs the exact
attention pass that emits the max-pooled map (:func:`attn_with_pooling`, no gradient) and
adds the gate's KL loss against it (the distillation loss of docs/design.md §2; the gate's
inputs are detached, so it trains the gates only; a model with decode gates adds their KL loss
too, on ``seer_decode_distill_rows`` sampled rows, as distillation does). The loss is then
``lm_loss + gate_loss_weight * gate_loss``, ``gate_loss`` being the chosen layers' KL summed,
scaled by ``seer_distill_loss_scale`` and by ``layers / chosen layers`` (an estimate of the
all-layer loss, so its size does not depend on the stride).

The exact pass costs about one dense attention forward per chosen layer. ``gate_loss_stride``
= S chooses the layers ``l`` with ``l % S == step % S``: each step pays for 1/S of the
layers, every layer's gate gets a target every S steps (on the other steps it has no gradient
and AdamW leaves it alone). docs/finetune.md gives the measured cost.

YaRN (``yarn_factor``) is set by the trainer on the model's config and both rotary tables
(:func:`seer_attn.training.yarn.apply_yarn`). Full fine-tuning trains every weight (the
gates with ``gate_lr``); with ``lora_r`` the model is wrapped by PEFT with LoRA adapters on
``lora_target_modules`` and, when the gates train, the gates in ``modules_to_save`` (trained
in full, saved with the adapter). The frozen base (YaRN config, initial gates, export mode)
is written once to ``lora_base_dir``, which the adapter's config names, so
``AutoPeftModelForCausalLM.from_pretrained(final_model_dir, trust_remote_code=True)``
rebuilds the trained model.

Precision: float32 weights with ``bf16=True`` is bf16 autocast over float32 master weights
(the recipe of docs/finetune.md); ``fp16`` is refused (its gradient scaler cannot unscale the
two clipping groups separately). Activation checkpointing is non-reentrant (the recompute of
a layer skips its exact pass: what the gate loss saves is kept outside the checkpoint).

Logged with the loss: ``lm_loss``, ``gate_loss`` (mean over the steps that computed it),
``block_density`` (of the sparse forwards themselves), ``gate_grad_norm``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from seer_attn.modeling_seer.seer_layer import SeerForwardContext

from .finetune import LORA_TARGETS as DEFAULT_LORA_TARGETS  # every linear map of attention and MLP
from .trainer import (GATE_MODULE, MODEL_INPUTS, SeerTrainer, SeerTrainingArguments, check_seer_model, gate_modules,
                      is_gate_parameter)
from .yarn import apply_yarn, check_yarn


@dataclass
class FineTuneArguments(SeerTrainingArguments):
    """:class:`SeerTrainingArguments` with the fine-tuning recipe's defaults and its knobs.

    Changed defaults (docs/finetune.md): ``learning_rate=5e-5``, ``adam_beta2=0.95``,
    ``gate_lr=1e-3`` (the gates' distillation rate), ``save_gates_only=False`` (checkpoints
    hold the trained weights); cosine schedule, 20 warm-up steps, no weight decay and
    ``max_grad_norm=1.0`` as before.

    Extra fields:
        yarn_factor: YaRN context multiplier set by the trainer (None: the model's RoPE as is).
        yarn_original_max_position_embeddings: the pretraining context YaRN stretches
            (default: the model's, see :func:`seer_attn.training.yarn.native_context`).
        density: the kept share of causal blocks (``nz_ratio``) in (0, 1]; 1 is dense. The
            default when ``threshold`` is not given.
        threshold: train with ``seer_sparsity_method="threshold"`` at this gate threshold instead.
        train_gates: the gates learn during fine-tuning (False: frozen).
        gate_loss_weight: weight of the gate loss in the total loss (> 0).
        gate_loss_stride: each step, 1 layer in this many computes the gate loss (rotating).
        lora_r: LoRA rank (None: full fine-tuning).
        lora_alpha: LoRA scale numerator (default: 2 * lora_r).
        lora_dropout: dropout on the LoRA branch.
        lora_target_modules: module names that get LoRA adapters (explicit; the default is
            every linear map of attention and MLP).
        lora_base_dir: where the frozen base is written for the adapter to name (default:
            ``base`` beside ``final_model_dir``).
        compile_pointwise: ``torch.compile`` the work around the attention kernels (each
            decoder layer as two graphs around its attention, the gate's block selection, LM loss;
            :meth:`~seer_attn.modeling_seer.seer_layer.SeerCausalLMMixin.seer_compile_pointwise`)
            with ``compile_pointwise_backend``. transformers' own ``torch_compile`` (and its
            backend / mode fields) compiles the whole model, which breaks at the sparse
            attention inside each checkpointed layer: refused here.
    """

    learning_rate: float = field(default=5e-5, metadata={"help": "Peak learning rate of the model weights."})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2."})
    gate_lr: float | None = field(default=1e-3, metadata={"help": "Learning rate of the gates."})
    save_gates_only: bool = field(default=False, metadata={"help": "Checkpoints hold the gate tensors only "
                                                                    "(wrong for fine-tuning; kept False)."})
    yarn_factor: float | None = field(default=None, metadata={"help": "YaRN factor (None: RoPE unchanged)."})
    yarn_original_max_position_embeddings: int | None = field(default=None, metadata={
        "help": "Pretraining context YaRN stretches (default: the model's)."})
    density: float | None = field(default=None, metadata={"help": "Kept share of causal blocks (nz_ratio); "
                                                                   "1 = dense."})
    threshold: float | None = field(default=None, metadata={"help": "Gate threshold (threshold selection)."})
    train_gates: bool = field(default=True, metadata={"help": "Gates learn from the model's pooled attention."})
    gate_loss_weight: float = field(default=1.0, metadata={"help": "Weight of the gate loss."})
    gate_loss_stride: int = field(default=1, metadata={"help": "1 layer in this many computes the gate loss."})
    lora_r: int | None = field(default=None, metadata={"help": "LoRA rank (None: full fine-tuning)."})
    lora_alpha: int | None = field(default=None, metadata={"help": "LoRA alpha (default: 2 * lora_r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS),
                                           metadata={"help": "Modules with LoRA adapters."})
    lora_base_dir: str | None = field(default=None, metadata={"help": "Folder of the frozen base (LoRA)."})
    compile_pointwise: bool = field(default=False, metadata={
        "help": "torch.compile the layers' work around the attention kernels, block selection and loss."})
    compile_pointwise_backend: str = field(default="inductor", metadata={"help": "torch.compile backend of "
                                                                                 "compile_pointwise."})

    def __post_init__(self):
        if self.yarn_factor is not None:
            check_yarn(self.yarn_factor, original=self.yarn_original_max_position_embeddings)
        if self.density is not None and self.threshold is not None:
            raise ValueError(f"density={self.density!r} and threshold={self.threshold!r}: give one selection, not both")
        if self.density is None and self.threshold is None:
            self.density = 1.0
        if self.density is not None and not (isinstance(self.density, (int, float)) and 0 < self.density <= 1):
            raise ValueError(f"density={self.density!r} is invalid: expected 0 < density <= 1 (1: dense)")
        if self.threshold is not None and not (isinstance(self.threshold, (int, float)) and 0 < self.threshold < 1):
            raise ValueError(f"threshold={self.threshold!r} is invalid: expected 0 < threshold < 1")
        if not (isinstance(self.gate_loss_weight, (int, float)) and self.gate_loss_weight > 0):
            raise ValueError(f"gate_loss_weight={self.gate_loss_weight!r} is invalid: expected a number > 0")
        if isinstance(self.gate_loss_stride, bool) or not isinstance(self.gate_loss_stride, int) \
                or self.gate_loss_stride < 1:
            raise ValueError(f"gate_loss_stride={self.gate_loss_stride!r} is invalid: expected an integer >= 1")
        if self.lora_r is not None and (isinstance(self.lora_r, bool) or not isinstance(self.lora_r, int)
                                        or self.lora_r < 1):
            raise ValueError(f"lora_r={self.lora_r!r} is invalid: expected a positive integer or None")
        if self.lora_r is not None and not self.lora_target_modules:
            raise ValueError("lora_target_modules is empty: name the modules that get LoRA adapters")
        if self.fp16:
            raise ValueError("fp16=True is not supported by SeerFineTuneTrainer: use bf16=True (bf16 autocast over "
                             "float32 weights)")
        if self.save_gates_only:
            raise ValueError("save_gates_only=True would checkpoint the gates without the fine-tuned weights")
        whole = {k: getattr(self, k) for k in ("torch_compile", "torch_compile_backend", "torch_compile_mode")}
        if any(whole.values()):
            given = ", ".join(f"{k}={v!r}" for k, v in whole.items() if v)
            raise ValueError(f"{given}: transformers would compile the whole model, whose sparse attention breaks "
                             "the graph inside every checkpointed layer; use compile_pointwise=True")
        if self.train_gates and self.gate_loss_stride > 1 and self.ddp_find_unused_parameters is None:
            # a layer's gate gets no gradient on the steps it computes no loss: DDP must not wait for it
            self.ddp_find_unused_parameters = True
        super().__post_init__()
        if self.lora_base_dir is None:
            self.lora_base_dir = os.path.join(os.path.dirname(os.path.abspath(self.final_model_dir)), "base")

    @property
    def sparsity(self) -> dict:
        """The ``seer_*`` settings of the training forward (method and its parameter)."""
        if self.threshold is not None:
            return {"seer_sparsity_method": "threshold", "seer_threshold": float(self.threshold)}
        return {"seer_sparsity_method": "nz_ratio", "seer_nz_ratio": float(self.density)}


def lora_config(args: FineTuneArguments):
    """The PEFT ``LoraConfig`` of ``args`` (the gates in ``modules_to_save`` when they train)."""
    from peft import LoraConfig

    return LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha if args.lora_alpha is not None else 2 * args.lora_r,
                      lora_dropout=args.lora_dropout, target_modules=list(args.lora_target_modules),
                      modules_to_save=[GATE_MODULE] if args.train_gates else None, bias="none",
                      task_type="CAUSAL_LM")


class SeerFineTuneTrainer(SeerTrainer):
    """Fine-tune a Seer causal LM with block-sparse attention (and YaRN, and LoRA), see the
    module docstring.

    On init: YaRN is applied (``yarn_factor``), the model is switched to ``seer_mode="sparse"``
    with the arguments' selection (``density`` / ``threshold``; ``seer_selector="gate"``),
    the gates are cast to float32 and set trainable or frozen, every other weight is trainable
    (full fine-tuning) or the model is wrapped with LoRA (``lora_r``; the frozen base is then
    written to ``lora_base_dir`` first).

    Args:
        model: a Seer causal LM of any family (not yet PEFT-wrapped), float32 weights for
            full fine-tuning with ``bf16=True`` (autocast).
        args: :class:`FineTuneArguments`.
        **kwargs: passed to :class:`SeerTrainer` / :class:`~transformers.Trainer`
            (``train_dataset`` of ``{"input_ids": [T]}`` rows, ``processing_class``, ...).

    The trained model: ``self.model`` (the PEFT model with LoRA), ``self.seer_model`` (the
    Seer causal LM inside it). Saving and resuming: :class:`SeerTrainer`.
    """

    def __init__(self, model=None, args: FineTuneArguments | None = None, **kwargs):
        if model is None or kwargs.get("model_init") is not None:
            raise ValueError("SeerFineTuneTrainer needs a model instance (model_init is not supported)")
        if hasattr(model, "peft_config"):
            raise TypeError("pass the Seer model itself; SeerFineTuneTrainer adds LoRA when args.lora_r is set")
        check_seer_model(model, "SeerFineTuneTrainer")
        if args is None:
            args = FineTuneArguments(output_dir="seer_outputs/finetune")
        if not isinstance(args, FineTuneArguments):
            raise TypeError(f"args must be FineTuneArguments, got {type(args).__name__}")
        if args.yarn_factor is not None:
            apply_yarn(model, args.yarn_factor, args.yarn_original_max_position_embeddings)
        model.set_seer_mode("sparse", seer_selector="gate", **args.sparsity)
        for m in gate_modules(model):
            m.float()
        for name, p in model.named_parameters():
            p.requires_grad_(args.train_gates if is_gate_parameter(name) else args.lora_r is None)
        seer = model
        if args.lora_r is not None:
            from peft import get_peft_model

            if args.should_save:  # the adapter's base: YaRN config, initial gates, the export mode
                self._save_base(model, args, kwargs.get("processing_class"))
            model = get_peft_model(model, lora_config(args))
            model.peft_config["default"].base_model_name_or_path = os.path.abspath(args.lora_base_dir)
        if args.compile_pointwise:  # after PEFT: the compiled MLPs trace the LoRA layers too
            seer.seer_compile_pointwise(backend=args.compile_pointwise_backend)
        self.seer_model = seer
        super().__init__(model, args, seer_model=seer, **kwargs)
        self.num_layers = seer.config.num_hidden_layers

    @staticmethod
    def _save_base(model, args, tokenizer):
        mode = model.config.seer_mode
        model.set_seer_mode(args.export_seer_mode)
        try:
            model.save_pretrained(args.lora_base_dir)
        finally:
            model.set_seer_mode(mode)
        if tokenizer is not None:
            tokenizer.save_pretrained(args.lora_base_dir)

    # -- loss -----------------------------------------------------------------------------

    def gate_loss_layers(self, step: int) -> frozenset:
        """The layers that compute the gate loss at optimizer step ``step`` (empty when the gates are frozen)."""
        if not self.args.train_gates:
            return frozenset()
        s = self.args.gate_loss_stride
        return frozenset(i for i in range(self.num_layers) if i % s == step % s)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """``lm_loss + gate_loss_weight * gate_loss`` of a sparse forward (module docstring)."""
        inputs = {k: v for k, v in inputs.items() if k in MODEL_INPUTS or k == "labels"}
        labels = inputs.pop("labels", None)
        if labels is None:
            labels = inputs["input_ids"]
            if inputs.get("attention_mask") is not None:
                labels = labels.masked_fill(inputs["attention_mask"] == 0, -100)
        layers = self.gate_loss_layers(self.state.global_step) if model.training else frozenset()
        ctx = SeerForwardContext(gate_loss_layers=layers or None)
        outputs = model(**inputs, labels=labels, use_cache=False, seer_ctx=ctx)
        lm_loss = outputs["loss"]
        loss = lm_loss
        gate_loss = outputs.get("gate_loss") if layers else None
        if layers and gate_loss is None:
            raise RuntimeError("the gate-loss layers returned no gate_loss (a sparse prefill forward is needed)")
        if model.training:
            self._log_value("lm_loss", lm_loss)
            density = self.seer_model.seer_density()
            if density is not None:
                self._log_value("block_density", density.float().mean())
        if gate_loss is not None:
            gate_loss = gate_loss * (self.num_layers / len(layers))
            loss = lm_loss + self.args.gate_loss_weight * gate_loss
            self._log_value("gate_loss", gate_loss)
        return (loss, outputs) if return_outputs else loss
