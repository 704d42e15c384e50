"""The YaRN + SeerAttention fine-tuning experiment (docs/finetune.md): SmolLM2-135M (native 8k)
extended to 32k by YaRN factor 4, fine-tuned dense and with block-sparse attention, on one GPU,
in phases that can be resumed across separate runs.

    python -m seer_attn.eval.finetune_run --model /tmp/seer/smollm2.gguf \\
        --train /tmp/seer/corpora/train.jsonl --eval /tmp/seer/corpora/eval.jsonl \\
        --work /tmp/seer/ft --out OUT --time-budget 520

or from Python, ``run_experiment(FineTuneRunConfig(work=..., out=..., ...))``.

Phases (``--phases``, default all, in this order; a finished phase is skipped unless named in
``--redo``):

- ``anchors``: training-free rows, dense: native RoPE on 8192-token windows (the same text as
  the 32k windows, cut in four) and on 32768-token windows, YaRN factor 4 untrained;
- ``gates0``: the gates every sparse run starts from: the shipped SmolLM2 gates (distilled at
  2048 tokens, native RoPE), distilled ``--gates0-steps`` more steps at 32k on the untrained
  YaRN model (base frozen);
- ``timing``: seconds per training step at 32k of the variants ``--timing-variants`` names
  (:data:`TIMING_VARIANTS`: density 1 through the Seer layer and through plain SDPA, the lowest
  density with the gates frozen / the gate loss on 1 layer in ``--gate-loss-stride`` / on
  every layer, with and without activation checkpointing), ``--timing-steps`` steps each (the
  first 3 not timed), and a profile of each variant's last step: GPU kernel time by kind
  (our attention kernels, SDPA's, GEMMs, the rest) and the busiest kernels
  (docs/experiments/finetune_step_time.md). Uses gates0 when it is done, else the initial
  gates (the cost of a step does not depend on how good the gates are);
- ``a``: YaRN fine-tuned dense (density 1 through the same trainer), gates frozen;
- ``b``: gates distilled post-training on (a) (from gates0, ``--distill-steps``), evaluated at
  each ``--densities`` value;
- ``c<d>``: YaRN fine-tuned with Seer at density d (nz_ratio), the gates learning (gate loss
  on 1 layer in ``--gate-loss-stride`` per step), for each ``--densities`` value;
- ``d<d>``: (c) with LoRA (``--lora-r``, every linear map of attention and MLP, lr ``--lora-lr``)
  instead of full fine-tuning, at ``--lora-density``;
- ``passkey``: (a) dense and (c) at the lowest density, at ``--passkey-lengths``, 5 depths x
  ``--passkey-samples`` prompts, paired prompt by prompt. The sparse run keeps the blocks
  of the project's passkey protocol (``--passkey-keep protocol``, :data:`PASSKEY_KEEP`: the
  last 2 block rows dense, the sink block and the block before the diagonal kept, as
  ``quality_run --keep-sink --keep-local 1 --passkey-dense-last-rows 2``); ``trained``
  keeps the fine-tuned model's own rules instead (what commit 6c501bf ran: no sink, no
  local block, 2 dense last rows). The result records the rules it ran with.

Every training row uses the recipe: AdamW (0.9, 0.95), no weight decay, lr 5e-5, 20 warm-up
steps then cosine, grad-norm clip 1.0 (gates apart, lr 1e-3), bf16 autocast over float32
weights, activation checkpointing, batch 1 x 32768, the source-joined 32k sequences of
``--train`` in a seeded order, ``--steps`` steps; each trains through ``seer-attn finetune``'s
own function (:func:`seer_attn.training.finetune.run_finetune`). Evaluation: PPL on the
source-joined 32k windows of ``--eval`` (up to 4 per source; :mod:`.finetune_eval`), bf16.

State lives in ``--work`` (keep it on the GPU machine's /tmp between calls): the converted
model, each phase's model folder (checkpoints deleted when the phase ends) and its result,
``phases/<name>.json``. After every phase ``--out`` gets the results envelope
``finetune_run.json`` (its ``config``: the :class:`FineTuneRunConfig`, ``dataclasses.asdict``),
``finetune_run.md`` (tables and target checks) and ``loss_curves.png``, rebuilt from every
finished phase, ``complete: false`` until all are done. ``--time-budget S`` stops before a
phase whose expected time (H200) would pass S seconds: run the same command again to
continue (a phase killed mid-way resumes from its newest complete checkpoint).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import statistics
import time
from dataclasses import asdict, dataclass

import torch
from transformers import TrainerCallback

from seer_attn.training import cli_args as ca
from seer_attn.training.run_config import ConfigError, RunConfig, config_from_args, default, flag, option, text

SHORT_ANCHOR = 8192
PHASE_ORDER = ("anchors", "gates0", "timing", "a", "b", "c", "d", "passkey")
#: the issue's targets (docs/finetune.md)
TARGET_A_PPL, TARGET_A_STEP = 11.54, 0.64
TARGET_C01_STEP = 0.30
#: ``--passkey-keep``: the keep rules of the sparse passkey run (None: the fine-tuned model's own).
#: ``protocol`` is the project's passkey protocol (README, docs/experiments/smollm2_quality_h100.md).
PASSKEY_KEEP = {"protocol": {"seer_keep_sink": True, "seer_keep_local": 1, "seer_dense_last_rows": 2},
                "trained": None}
#: ``--timing-variants``: name -> (label, FineTuneConfig changes, train through SDPA). ``{lo}``
#: is the lowest of ``--densities``, ``{S}`` the ``--gate-loss-stride``. SDPA: the model in
#: seer_mode "dense" (the family's attention interface, as plain transformers), same trainer.
#: At density 1 the Seer layer itself runs SDPA where no row is padded and no window applies
#: (our dense kernel before fd0399f: results/finetune/h200_timing.json), so "dense" and
#: "dense-sdpa" differ only by the layer's own code around the attention.
TIMING_VARIANTS = {
    "dense": ("density 1, Seer layer (row a)", dict(density=1.0, freeze_gates=True), False),
    "dense-sdpa": ("density 1, SDPA (plain transformers' attention)", dict(density=1.0, freeze_gates=True), True),
    "dense-no-ckpt": ("density 1, Seer layer, no checkpointing",
                      dict(density=1.0, freeze_gates=True, gradient_checkpointing=False), False),
    "frozen": ("density {lo}, gates frozen (no gate loss)", dict(freeze_gates=True), False),
    "stride": ("density {lo}, gate loss 1 layer in {S} (row c)", {}, False),
    "every-layer": ("density {lo}, gate loss every layer", dict(gate_loss_stride=1), False),
    "stride-no-ckpt": ("density {lo}, gate loss 1 layer in {S}, no checkpointing",
                       dict(gradient_checkpointing=False), False),
    "frozen-no-ckpt": ("density {lo}, gates frozen, no checkpointing",
                       dict(freeze_gates=True, gradient_checkpointing=False), False),
    "dense-compile": ("density 1, Seer layer, compile_pointwise (row a)",
                      dict(density=1.0, freeze_gates=True, compile_pointwise=True), False),
    "dense-sdpa-compile": ("density 1, SDPA, compile_pointwise",
                           dict(density=1.0, freeze_gates=True, compile_pointwise=True), True),
    "frozen-compile": ("density {lo}, gates frozen, compile_pointwise",
                       dict(freeze_gates=True, compile_pointwise=True), False),
    "stride-compile": ("density {lo}, gate loss 1 layer in {S}, compile_pointwise (row c)",
                       dict(compile_pointwise=True), False),
    "stride-no-ckpt-compile": ("density {lo}, gate loss 1 layer in {S}, no checkpointing, compile_pointwise",
                               dict(gradient_checkpointing=False, compile_pointwise=True), False),
}
DEFAULT_OUT = "seer_outputs/finetune_run"
#: the selection settings a sparse passkey run records (``keep_rules`` of the passkey result)
KEEP_FIELDS = ("seer_sparsity_method", "seer_nz_ratio", "seer_keep_diagonal", "seer_keep_sink", "seer_keep_local",
               "seer_dense_last_rows")


@dataclass(frozen=True, kw_only=True)
class FineTuneRunConfig(RunConfig):
    """One run of the experiment (each field is the option of the same name, see
    :func:`build_parser`). ``phases``: phase names (:func:`phase_names`) or ``("all",)``."""

    model: str | None = option(None, text)  # None: the embedded SmolLM2 GGUF
    train: tuple | None = option(None, text, many="+")  # None: the bundled training corpus
    eval: str | None = option(None, text)  # None: the bundled eval corpus
    work: str = option(check=text)
    out: str = option(DEFAULT_OUT, text)
    phases: tuple = option(("all",), text, many="+")
    redo: tuple = option((), text, many="*")
    time_budget: float | None = option(None, ca.positive_float)
    seq_len: int = option(32768, ca.int_at_least(256))
    yarn_factor: float = option(4.0, ca.float_in(1, None, low_open=False))
    steps: int = option(200, ca.positive_int)
    densities: tuple = option((0.5, 0.3, 0.1), ca.unit_interval, many="+")
    lora_density: float = option(0.1, ca.unit_interval)
    lora_r: int = option(16, ca.positive_int)
    lora_lr: float = option(2e-4, ca.positive_float)
    gate_loss_stride: int = option(4, ca.positive_int)
    gates0_steps: int = option(40, ca.positive_int)
    distill_steps: int = option(100, ca.positive_int)
    init_gates: str = option("shipped", text)
    short_anchor: int = option(SHORT_ANCHOR, ca.int_at_least(2))
    windows_per_source: int = option(4, ca.positive_int)
    passkey_lengths: tuple = option((16384, 32768), ca.positive_int, many="*")
    passkey_samples: int = option(5, ca.positive_int)
    passkey_keep: str = option("protocol", choices=tuple(PASSKEY_KEEP))
    timing_steps: int = option(10, ca.int_at_least(5))
    timing_variants: tuple = option(tuple(TIMING_VARIANTS), many="+", choices=tuple(TIMING_VARIANTS))
    save_steps: int = option(120, ca.positive_int)
    no_checkpointing: bool = option(False, flag)
    compile_pointwise: bool = option(False, flag)
    seed: int = option(42, ca.nonneg_int)
    cpu: bool = option(False, flag)
    no_progress: bool = option(False, flag)

    def check(self):
        every = phase_names(self)
        if self.phases != ("all",):
            bad = [p for p in self.phases if p not in every]
            if bad:
                raise ConfigError("{phases}: unknown phases %s: expected some of %s or all" % (bad, every), "phases")
        bad = [p for p in self.redo if p not in every]
        if bad:
            raise ConfigError("{redo}: unknown phases %s: expected some of %s" % (bad, every), "redo")

    @property
    def todo(self) -> list:
        """The phases to run, in run order."""
        every = phase_names(self)
        return every if self.phases == ("all",) else [p for p in every if p in self.phases]


def _kind(phase):
    """``c0.1`` -> ``c``, ``d0.1`` -> ``d``; other phase names are their own kind."""
    return phase[0] if phase[:1] in ("c", "d") and phase[1:].replace(".", "", 1).isdigit() else phase


def _expected_s(config, phase):
    """Expected wall time of ``phase`` on one H200 at the defaults (seconds; setup included):
    estimates from the measured s/step of commit 6c501bf's run (results/finetune/h200.json)."""
    kind = _kind(phase)
    setup = 15  # model load, data packing (cached), Triton compilation the first time
    if kind == "anchors":
        return 40
    if kind == "gates0":
        return setup + 0.3 * config.gates0_steps
    if kind == "timing":
        return setup + len(config.timing_variants) * (8 + 0.6 * config.timing_steps)
    if kind == "a":
        return setup + 0.8 * config.steps
    if kind == "b":
        return setup + 0.3 * config.distill_steps + 10 * len(config.densities)
    if kind in ("c", "d"):
        d = float(phase[1:])
        return setup + (0.4 + 0.4 * d) * config.steps
    if kind == "passkey":
        return 40 + 2 * len(config.passkey_lengths) * 5 * config.passkey_samples * 0.5
    raise ValueError(phase)


def phase_names(config) -> list:
    """Every phase of this configuration, in run order."""
    names = {"anchors": ["anchors"], "gates0": ["gates0"], "timing": ["timing"], "a": ["a"], "b": ["b"],
             "c": [f"c{d:g}" for d in config.densities], "d": [f"d{config.lora_density:g}"], "passkey": ["passkey"]}
    return [n for k in PHASE_ORDER for n in names[k]]


def _needs(config, phase):
    kind = _kind(phase)
    lo = f"c{min(config.densities):g}"
    return {"a": ["gates0"], "b": ["a", "gates0"], "c": ["gates0"], "d": ["gates0"],
            "passkey": ["a", lo]}.get(kind, [])


# ----------------------------------------------------------------------------- command line

def _default(name):
    return default(FineTuneRunConfig, name)


def build_parser():
    """The command line (defaults: :class:`FineTuneRunConfig`'s)."""
    ap = argparse.ArgumentParser(prog="python -m seer_attn.eval.finetune_run", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="SmolLM2 GGUF or HF folder (default: the embedded SmolLM2 GGUF)")
    ap.add_argument("--train", nargs="+", default=None, help="training jsonl (id, source, text); default: bundled")
    ap.add_argument("--eval", default=None, help="evaluation jsonl (default: the bundled eval corpus)")
    ap.add_argument("--work", required=True, help="state folder kept between runs (models, phase results)")
    ap.add_argument("--out", default=_default("out"), help="results folder: envelope, markdown, PNG "
                    "(default: %(default)s)")
    ap.add_argument("--phases", nargs="+", default=_default("phases"), help="phases to run (default: all); names: "
                    + ", ".join(PHASE_ORDER) + " (c and d with their density, e.g. c0.1)")
    ap.add_argument("--redo", nargs="*", default=_default("redo"), help="finished phases to run again")
    ap.add_argument("--time-budget", type=ca.positive_float, default=None,
                    help="stop before a phase that would end later than this many seconds after the start")
    ap.add_argument("--seq-len", type=ca.int_at_least(256), default=_default("seq_len"))
    ap.add_argument("--yarn-factor", type=ca.float_in(1, None, low_open=False), default=_default("yarn_factor"))
    ap.add_argument("--steps", type=ca.positive_int, default=_default("steps"))
    ap.add_argument("--densities", type=ca.unit_interval, nargs="+", default=_default("densities"))
    ap.add_argument("--lora-density", type=ca.unit_interval, default=_default("lora_density"))
    ap.add_argument("--lora-r", type=ca.positive_int, default=_default("lora_r"))
    ap.add_argument("--lora-lr", type=ca.positive_float, default=_default("lora_lr"),
                    help="learning rate of the LoRA row (LoRA adapters start at zero and take a larger rate than "
                         "full fine-tuning's 5e-5; default: %(default)g)")
    ap.add_argument("--gate-loss-stride", type=ca.positive_int, default=_default("gate_loss_stride"))
    ap.add_argument("--gates0-steps", type=ca.positive_int, default=_default("gates0_steps"))
    ap.add_argument("--distill-steps", type=ca.positive_int, default=_default("distill_steps"))
    ap.add_argument("--init-gates", default=_default("init_gates"),
                    help="gates distilled further in phase gates0: 'shipped' (the SmolLM2 gates of the package), "
                         "a gates file, or 'none' (new gates)")
    ap.add_argument("--short-anchor", type=ca.int_at_least(2), default=_default("short_anchor"),
                    help="window of the native-RoPE short anchor (default: %(default)s, the native context)")
    ap.add_argument("--windows-per-source", type=ca.positive_int, default=_default("windows_per_source"))
    ap.add_argument("--passkey-lengths", type=ca.positive_int, nargs="*", default=_default("passkey_lengths"))
    ap.add_argument("--passkey-samples", type=ca.positive_int, default=_default("passkey_samples"),
                    help="prompts per (length, depth)")
    ap.add_argument("--passkey-keep", choices=tuple(PASSKEY_KEEP), default=_default("passkey_keep"),
                    help="keep rules of the sparse passkey run: protocol (the project's: last 2 block rows dense, "
                         "sink and local block kept) or trained (the fine-tuned model's own); default: %(default)s")
    ap.add_argument("--timing-steps", type=ca.int_at_least(5), default=_default("timing_steps"),
                    help="steps per timing variant, the first 3 not timed, the last profiled (default: %(default)s)")
    ap.add_argument("--timing-variants", nargs="+", choices=tuple(TIMING_VARIANTS),
                    default=_default("timing_variants"), help="variants of the timing phase (default: all)")
    ap.add_argument("--save-steps", type=ca.positive_int, default=_default("save_steps"),
                    help="checkpoint every N steps (one mid-run checkpoint for 200 steps)")
    ap.add_argument("--no-checkpointing", action="store_true", help="train without activation checkpointing")
    ap.add_argument("--compile-pointwise", action="store_true",
                    help="train every row with compile_pointwise (each layer's work around the attention as two "
                         "graphs, the selection and the loss compiled); "
                         "the timing variants set it themselves")
    ap.add_argument("--seed", type=ca.nonneg_int, default=_default("seed"))
    ap.add_argument("--cpu", action="store_true", help="smoke test on the CPU (tiny model and sizes only)")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def _check_inputs(config):
    """What the config cannot check on creation (files): ValueError naming the value."""
    if config.init_gates not in ("shipped", "none") and not os.path.isfile(config.init_gates):
        raise ValueError(f"init_gates={config.init_gates!r}: no such file (or 'shipped', 'none')")


def main(argv=None):
    ap = build_parser()
    config = config_from_args(FineTuneRunConfig, ap.parse_args(argv), parser=ap)
    try:
        _check_inputs(config)
    except ValueError as err:
        ap.error(str(err))
    if not config.cpu:
        ca.require_cuda(ap.prog, " (or pass --cpu for a smoke test)")
    return run_experiment(config)


def run_experiment(config: FineTuneRunConfig) -> int:
    """Run the phases ``config`` names (module docstring); needs a CUDA GPU unless ``config.cpu``.
    Returns 0 (a phase that would pass ``time_budget`` is left for the next call: it says so)."""
    if not isinstance(config, FineTuneRunConfig):
        raise TypeError(f"run_experiment takes a FineTuneRunConfig, got {type(config).__name__}")
    _check_inputs(config)
    if not config.cpu and not torch.cuda.is_available():
        raise ValueError("cpu=False needs a CUDA GPU, and torch sees none (cpu=True runs a smoke test)")
    if config.no_progress:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    return Experiment(config).run()


# ----------------------------------------------------------------------------- the experiment

class StepTimer(TrainerCallback):
    """Wall time of every optimizer step (the device synchronised at each step's end)."""

    def __init__(self):
        self.times = []

    def on_step_begin(self, args, state, control, **kwargs):
        if not self.times:
            self._sync()
            self.times.append(time.perf_counter())

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        self.times.append(time.perf_counter())

    @staticmethod
    def _sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def seconds_per_step(self, skip=3, drop_last=0) -> dict:
        """Median and mean over the steps after the first ``skip`` (compilation, warm-up),
        leaving out the last ``drop_last`` (e.g. a profiled step)."""
        d = [b - a for a, b in zip(self.times, self.times[1:])]
        d = d[:len(d) - drop_last] if drop_last else d
        use = d[skip:] if len(d) > skip else d
        return {"s_per_step": statistics.median(use) if use else None,
                "s_per_step_mean": sum(use) / len(use) if use else None, "timed_steps": len(use)}


#: kernel kinds of a step profile: (kind, name fragments), first match wins; the rest is "other"
KERNEL_KINDS = (
    ("attention, ours", ("_attn_fwd_kernel", "_attn_bwd", "_bwd_preprocess_kernel", "_mask_to_indices")),
    ("attention, SDPA", ("flash", "fmha", "cudnn", "sdpa", "attention")),
    ("GEMM", ("gemm", "cutlass", "nvjet", "xmma", "cublas", "matmul", "sm90_", "sm80_")),
)


def kernel_summary(events, top=12) -> dict:
    """GPU time of a profiled step from ``torch.profiler`` events: ``busy_ms`` (sum over the
    device's kernels, copies and sets; one stream, so no overlap), ``kinds`` (ms per
    :data:`KERNEL_KINDS` kind and "other") and ``top`` (the ``top`` busiest names: ``name``,
    ``ms``, ``calls``)."""
    from torch.autograd import DeviceType
    per = {}
    for e in events:
        if e.device_type != DeviceType.CPU:
            ms, n = per.get(e.name, (0.0, 0))
            per[e.name] = (ms + e.device_time_total / 1e3, n + 1)
    kinds = {kind: 0.0 for kind, _ in KERNEL_KINDS}
    kinds["other"] = 0.0
    for name, (ms, _) in per.items():
        low = name.lower()
        kind = next((k for k, frags in KERNEL_KINDS if any(f.lower() in low for f in frags)), "other")
        kinds[kind] += ms
    busiest = sorted(per.items(), key=lambda kv: -kv[1][0])[:top]
    return {"busy_ms": sum(ms for ms, _ in per.values()), "kinds": kinds,
            "top": [{"name": name[:100], "ms": ms, "calls": n} for name, (ms, n) in busiest]}


class StepProfiler(TrainerCallback):
    """``torch.profiler`` over optimizer step ``at`` (1-based; the device synchronised around
    it); :attr:`summary` is its :func:`kernel_summary` (None until that step has run)."""

    def __init__(self, at):
        self.at, self.summary, self._prof = at, None, None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.at and self._prof is None and self.summary is None:
            from torch.profiler import ProfilerActivity, profile
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            StepTimer._sync()
            self._prof = profile(activities=activities)
            self._prof.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        if self._prof is not None:
            StepTimer._sync()
            self._prof.__exit__(None, None, None)
            self.summary = kernel_summary(self._prof.events())
            self._prof = None


class Experiment:
    def __init__(self, config: FineTuneRunConfig):
        self.cfg, self.every, self.todo = config, phase_names(config), config.todo
        self.work, self.out = os.path.abspath(config.work), os.path.abspath(config.out)
        self.device = "cpu" if config.cpu else "cuda"
        self.eval_dtype = torch.float32 if config.cpu else torch.bfloat16
        self.t0 = time.time()
        os.makedirs(os.path.join(self.work, "phases"), exist_ok=True)
        os.makedirs(self.out, exist_ok=True)
        self._tok = self._windows = None

    # -- bookkeeping ------------------------------------------------------------------------

    def _phase_file(self, name):
        return os.path.join(self.work, "phases", f"{name}.json")

    def done(self, name):
        return os.path.isfile(self._phase_file(name))

    def result(self, name):
        with open(self._phase_file(name), encoding="utf-8") as f:
            return json.load(f)

    def _dir(self, name):
        return os.path.join(self.work, name)

    def run(self):
        stopped = None
        for name in self.todo:
            if self.done(name) and name not in self.cfg.redo:
                print(f"[finetune_run] {name}: done before, skipped", flush=True)
                continue
            missing = [n for n in _needs(self.cfg, name) if not self.done(n)]
            if missing:
                raise SystemExit(f"[finetune_run] phase {name} needs {missing} first (a returned GPU machine loses "
                                 f"--work: run them again)")
            expected = _expected_s(self.cfg, name)
            left = None if self.cfg.time_budget is None else self.cfg.time_budget - (time.time() - self.t0)
            if left is not None and expected > left:
                stopped = name
                print(f"[finetune_run] stopping before {name}: expected {expected:.0f} s, {left:.0f} s of the "
                      "budget left; run the same command again to continue", flush=True)
                break
            print(f"[finetune_run] phase {name} (expected ~{expected:.0f} s on an H200)", flush=True)
            t = time.time()
            res = getattr(self, "_phase_" + _kind(name))(name)
            res["phase_seconds"] = time.time() - t
            from seer_attn.training.results import write_json
            write_json(self._phase_file(name), res)
            self.report()
        text = self.report()
        print("\n" + text, flush=True)
        if stopped:
            print(f"\n[finetune_run] not finished: {stopped} and later phases remain", flush=True)
        return 0

    # -- shared pieces ----------------------------------------------------------------------

    def base_folder(self):
        """The model converted once to a float32 Seer folder (native RoPE, gates as drawn), so
        that phases load safetensors instead of dequantising the GGUF each time."""
        from seer_attn.modeling_seer.conversion import default_model_path, load_seer_model, load_tokenizer
        folder = os.path.join(self.work, "base_native")
        if not os.path.isfile(os.path.join(folder, "config.json")):
            from transformers import set_seed
            source = self.cfg.model or default_model_path()
            set_seed(self.cfg.seed)
            model = load_seer_model(source, dtype=torch.float32)
            model.save_pretrained(folder + ".tmp")
            load_tokenizer(source).save_pretrained(folder + ".tmp")
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(folder + ".tmp", folder)
        return folder

    def tokenizer(self):
        if self._tok is None:
            from seer_attn.modeling_seer.conversion import load_tokenizer
            self._tok = load_tokenizer(self.base_folder())
        return self._tok

    def windows(self):
        if self._windows is None:
            from .finetune_eval import source_windows
            self._windows = source_windows(self.tokenizer(), self.cfg.seq_len, self.cfg.eval,
                                           self.cfg.windows_per_source)
        return self._windows

    def ppl(self, model, label, windows=None):
        from .finetune_eval import ppl_row
        row = ppl_row(model, windows or self.windows(), label, progress=not self.cfg.no_progress)
        print(f"[finetune_run] {label}: PPL {row['ppl']:.3f} "
              + " ".join(f"{s}: {p:.2f}" for s, p in row["per_source"].items())
              + (f" (density {row['density']:.3f})" if row["density"] is not None else ""), flush=True)
        return row

    def load(self, folder, gates=None, **seer):
        from seer_attn.modeling_seer.conversion import load_seer_model
        from seer_attn.training.finetune import load_finetuned
        if gates is None:
            model = load_finetuned(folder, dtype=self.eval_dtype, device=self.device)
        else:
            model = load_seer_model(folder, dtype=self.eval_dtype, device=self.device, gates=gates)
        if seer:
            model.set_seer_mode(seer.pop("seer_mode", model.config.seer_mode), **seer)
        return model.eval()

    def _reset_peak(self):
        gc.collect()  # the last phase's trainer (reference cycles) and its GPU tensors
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def _peak_gib(self):
        return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None

    def init_gates(self):
        if self.cfg.init_gates == "none":
            return None
        if self.cfg.init_gates == "shipped":
            import seer_attn.training
            return os.path.join(os.path.dirname(seer_attn.training.__file__), "gates",
                                "smollm2-135m-instruct.seer_gates.safetensors")
        return self.cfg.init_gates

    def train_data(self):
        from seer_attn.training.finetune import FineTuneConfig, load_train_data
        cfg = FineTuneConfig(data=self.cfg.train, seq_len=self.cfg.seq_len, seed=self.cfg.seed)
        return load_train_data(cfg, self.tokenizer())

    # -- phases -----------------------------------------------------------------------------

    def _phase_anchors(self, name):
        from seer_attn.training.yarn import apply_yarn
        model = self.load(self.base_folder(), seer_mode="dense")
        short = [w for w in split_windows(self.windows(), self.cfg.short_anchor)]
        rows = [self.ppl(model, f"native RoPE, {self.cfg.short_anchor}-token windows", short),
                self.ppl(model, f"native RoPE, {self.cfg.seq_len}-token windows")]
        apply_yarn(model, self.cfg.yarn_factor)
        rows.append(self.ppl(model, f"YaRN factor {self.cfg.yarn_factor:g}, no training, "
                                    f"{self.cfg.seq_len}-token windows"))
        for r, key in zip(rows, ("native_short", "native_long", "yarn_untrained")):
            r["row"] = key
        return {"rows": rows}

    def _distill(self, model, steps, out_dir):
        """Distil ``model``'s gates (bf16 base, frozen) on the training sequences; returns the
        trainer and the step timer."""
        from seer_attn.training.trainer import GateDistillationTrainer, SeerTrainingArguments
        timer = StepTimer()
        targs = SeerTrainingArguments(
            output_dir=out_dir, max_steps=steps, per_device_train_batch_size=1, warmup_steps=min(20, steps // 5),
            logging_steps=max(1, steps // 10), save_strategy="no", save_final_model=False, use_cpu=self.cfg.cpu,
            bf16=not self.cfg.cpu, seed=self.cfg.seed, data_seed=self.cfg.seed, report_to="none",
            disable_tqdm=self.cfg.no_progress, dataloader_num_workers=0)  # no checkpointing: the frozen base
        # keeps no activations for backward (training/trainer.py), checkpointing would only recompute
        trainer = GateDistillationTrainer(model=model, args=targs, train_dataset=self.train_data(), callbacks=[timer])
        trainer.train()
        return trainer, timer

    def _phase_gates0(self, name):
        from seer_attn.modeling_seer.conversion import load_seer_model
        from seer_attn.training.yarn import apply_yarn
        dtype = torch.float32 if self.cfg.cpu else torch.bfloat16
        model = load_seer_model(self.base_folder(), dtype=dtype, gates=self.init_gates())
        apply_yarn(model, self.cfg.yarn_factor)
        self._reset_peak()
        trainer, timer = self._distill(model, self.cfg.gates0_steps, self._dir("gates0_run"))
        path = model.save_gates(os.path.join(self.work, "gates0.safetensors"))
        logs = [e for e in trainer.state.log_history if "loss" in e]
        return {"gates": path, "steps": self.cfg.gates0_steps, "init": self.cfg.init_gates,
                "final_loss": logs[-1]["loss"] if logs else None, "peak_gib": self._peak_gib(),
                **timer.seconds_per_step()}

    def _finetune_config(self, out, **kw):
        """The recipe's :class:`FineTuneConfig` (module docstring), ``kw`` overriding."""
        from seer_attn.training.finetune import FineTuneConfig
        recipe = dict(model=self.base_folder(), data=self.cfg.train, seq_len=self.cfg.seq_len,
                      yarn_factor=self.cfg.yarn_factor, gates=os.path.join(self.work, "gates0.safetensors"),
                      gate_loss_stride=self.cfg.gate_loss_stride, steps=self.cfg.steps, lr=5e-5, warmup_steps=20,
                      max_grad_norm=1.0, gate_lr=1e-3, batch_size=1, bf16=not self.cfg.cpu,
                      gradient_checkpointing=not self.cfg.no_checkpointing,
                      compile_pointwise=self.cfg.compile_pointwise, seed=self.cfg.seed, output=out,
                      logging_steps=1, save_steps=self.cfg.save_steps, cpu=self.cfg.cpu,
                      no_progress=self.cfg.no_progress)
        return FineTuneConfig(**{**recipe, **kw})

    def _train(self, name, **kw):
        """One training row through run_finetune: resumes a killed run, then evaluates."""
        from seer_attn.training.finetune import run_finetune
        from seer_attn.training.trainer import last_complete_checkpoint
        out = self._dir(name)
        resume = "last" if last_complete_checkpoint(os.path.join(out, "checkpoints"))[0] else None
        cfg = self._finetune_config(out, resume=resume, **kw)
        timer = StepTimer()
        self._reset_peak()
        t = time.time()
        res = run_finetune(cfg, callbacks=[timer])
        train_s = time.time() - t
        peak = self._peak_gib()
        shutil.rmtree(res["checkpoints_dir"], ignore_errors=True)  # the phase is done: keep /tmp small
        curve = [{"step": e["step"], "lm_loss": e.get("lm_loss"), "gate_loss": e.get("gate_loss"),
                  "block_density": e.get("block_density")} for e in res["log_history"] if "loss" in e]
        return res, {"train_seconds": train_s, "peak_gib": peak, "steps": res["global_step"],
                     "resumed_from": res["resumed_from"], "curve": curve, "selection": res["selection"],
                     "model_dir": res["model_dir"], **timer.seconds_per_step()}

    def _phase_timing(self, name):
        """s/step of each ``timing_variants`` entry (:data:`TIMING_VARIANTS`; a fresh model each,
        ``timing_steps`` steps, no checkpoint saved) and a profile of its last step."""
        from seer_attn.modeling_seer.conversion import load_seer_model
        from seer_attn.training.finetune import load_train_data, training_arguments
        from seer_attn.training.finetune_trainer import SeerFineTuneTrainer
        lo = min(self.cfg.densities)
        gates = os.path.join(self.work, "gates0.safetensors") if self.done("gates0") else self.init_gates()
        steps, out, data = self.cfg.timing_steps, {}, None
        run_dir = self._dir("timing_run")
        for key in self.cfg.timing_variants:
            label, kw, sdpa = TIMING_VARIANTS[key]
            label = label.format(lo=f"{lo:g}", S=self.cfg.gate_loss_stride)
            cfg = self._finetune_config(run_dir, gates=gates, steps=steps, logging_steps=steps,
                                        **{"density": lo, **kw})
            data = data if data is not None else load_train_data(cfg, self.tokenizer())
            targs = training_arguments(cfg, run_dir, os.path.join(run_dir, "model"), os.path.join(run_dir, "base"),
                                       None, save_strategy="no", save_final_model=False)
            model = load_seer_model(self.base_folder(), dtype=torch.float32, gates=cfg.gates)
            timer, prof = StepTimer(), StepProfiler(at=steps)
            self._reset_peak()
            trainer = SeerFineTuneTrainer(model=model, args=targs, train_dataset=data, callbacks=[timer, prof])
            if sdpa:  # the family's attention interface, as plain transformers (same trainer, same recipe)
                model.set_seer_mode("dense")
            trainer.train()
            res = {"label": label, **timer.seconds_per_step(drop_last=1), "peak_gib": self._peak_gib(),
                   "attn_implementation": model.config._attn_implementation if sdpa else "seer kernels",
                   "checkpointing": cfg.gradient_checkpointing, "selection": "dense (SDPA)" if sdpa else cfg.selection,
                   "gate_loss_stride": None if cfg.freeze_gates else cfg.gate_loss_stride, "profile": prof.summary}
            if res["s_per_step"] and prof.summary:
                res["gpu_busy_share"] = prof.summary["busy_ms"] / 1e3 / res["s_per_step"]
            out[key] = res
            print(f"[finetune_run] timing, {label}: {_fmt(res['s_per_step'], '.3f')} s/step, peak "
                  f"{_fmt(res['peak_gib'], '.1f')} GiB", flush=True)
            del model, trainer
        return {"density": lo, "steps": steps, "gates": gates, "variants": out}

    def _phase_a(self, name):
        res, row = self._train(name, density=1.0, freeze_gates=True)
        model = self.load(res["model_dir"], seer_mode="dense")
        row.update(self.ppl(model, "(a) YaRN, dense fine-tuned"))
        return {"rows": [{**row, "row": "a"}]}

    def _phase_b(self, name):
        from seer_attn.modeling_seer.conversion import load_seer_model
        dtype = torch.float32 if self.cfg.cpu else torch.bfloat16
        model = load_seer_model(self.result("a")["rows"][0]["model_dir"], dtype=dtype,
                                gates=os.path.join(self.work, "gates0.safetensors"))
        self._reset_peak()
        trainer, timer = self._distill(model, self.cfg.distill_steps, self._dir("b_run"))
        cost = {"peak_gib": self._peak_gib(), **timer.seconds_per_step(), "steps": self.cfg.distill_steps}
        gates = model.save_gates(os.path.join(self.work, "b_gates.safetensors"))
        model = self.load(self.result("a")["rows"][0]["model_dir"], gates=gates)
        rows = []
        for d in self.cfg.densities:
            model.set_seer_mode("sparse", seer_sparsity_method="nz_ratio", seer_nz_ratio=d)
            rows.append({**cost, **self.ppl(model, f"(b) (a) + gates distilled post-training, nz_ratio={d:g}"),
                         "row": f"b{d:g}", "nz_ratio": d})
        return {"rows": rows, "gates": gates}

    def _phase_c(self, name):
        d = float(name[1:])
        res, row = self._train(name, density=d)
        model = self.load(res["model_dir"])
        row.update(self.ppl(model, f"(c) YaRN fine-tuned with Seer, nz_ratio={d:g}"))
        return {"rows": [{**row, "row": name, "nz_ratio": d}]}

    def _phase_d(self, name):
        d = float(name[1:])
        res, row = self._train(name, density=d, lora_r=self.cfg.lora_r, lr=self.cfg.lora_lr)
        model = self.load(res["model_dir"])
        row.update(self.ppl(model, f"(d) (c) with LoRA r={self.cfg.lora_r}, nz_ratio={d:g}"))
        return {"rows": [{**row, "row": name, "nz_ratio": d, "lora_r": self.cfg.lora_r}]}

    def _phase_passkey(self, name):
        from .passkey import generate_passkey_samples, paired_passkey, run_passkey
        lo = f"c{min(self.cfg.densities):g}"
        samples = generate_passkey_samples(self.tokenizer(), self.cfg.passkey_lengths, samples_per_cell=
                                           self.cfg.passkey_samples, seed=self.cfg.seed)
        keep = PASSKEY_KEEP[self.cfg.passkey_keep]  # None: the fine-tuned model's own rules
        out = {}
        for key, folder, seer in (("a", self.result("a")["rows"][0]["model_dir"], {"seer_mode": "dense"}),
                                  (lo, self.result(lo)["rows"][0]["model_dir"], keep or {})):
            model = self.load(folder, **seer)
            if key == lo:
                out["keep_rules"] = {k: getattr(model.config, k) for k in KEEP_FIELDS}
            res = run_passkey(model, self.tokenizer(), samples=samples, seed=self.cfg.seed,
                              progress=not self.cfg.no_progress)
            res["samples"] = [{k: v for k, v in r.items() if k != "prompt"} for r in res["samples"]]
            out[key] = res
            del model
        out["paired"] = {"reference": "a", "other": lo, **paired_passkey(out["a"], out[lo])}
        out["passkey_keep"] = self.cfg.passkey_keep
        return out

    # -- report -----------------------------------------------------------------------------

    def rows(self):
        rows = []
        for name in self.every:
            if self.done(name) and name not in ("gates0", "timing", "passkey"):
                rows += self.result(name)["rows"]
        return rows

    def report(self) -> str:
        from seer_attn.training.results import write_envelope
        rows = self.rows()
        done = {n: self.done(n) for n in self.every}
        extra = {n: self.result(n) for n in ("gates0", "timing", "passkey") if done.get(n)}
        targets = check_targets(rows, self.cfg)
        text = format_report(rows, extra, targets, self.cfg, {n: self._phase_seconds(n) for n in self.every})
        plot = plot_loss_curves(rows, os.path.join(self.out, "loss_curves.png"))
        write_envelope(os.path.join(self.out, "finetune_run.json"), "finetune_run",
                       [{k: v for k, v in r.items()} for r in rows], config=asdict(self.cfg),
                       model=self.cfg.model or ca.DEFAULT_MODEL_LABEL, device=self.device,
                       complete=all(done.values()), phases_done=done, targets=targets, plot=plot,
                       **{k: v for k, v in extra.items()})
        with open(os.path.join(self.out, "finetune_run.md"), "w", encoding="utf-8") as f:
            f.write(("" if all(done.values()) else "**partial run: not every phase finished**\n\n") + text + "\n")
        return text

    def _phase_seconds(self, name):
        return self.result(name).get("phase_seconds") if self.done(name) else None


def split_windows(windows, length):
    """Each window cut into consecutive pieces of ``length`` tokens (the same text, shorter context)."""
    from .perplexity import Window
    out = []
    for w in windows:
        n = w.input_ids.numel() // length
        out += [Window(w.doc_id, w.source, w.index * n + i, w.input_ids[i * length:(i + 1) * length])
                for i in range(n)]
    return out


def check_targets(rows, config) -> list:
    """The issue's targets, each ``{target, value, ok}`` (ok None when a row is missing)."""
    by = {r["row"]: r for r in rows}
    lo = f"c{min(config.densities):g}"
    a, c05, clo, blo = by.get("a"), by.get("c0.5"), by.get(lo), by.get(f"b{min(config.densities):g}")

    def rel(x, ref):
        return x["ppl"] / ref["ppl"] - 1 if x and ref else None

    out = [
        {"target": f"(a) PPL <= {TARGET_A_PPL} (plain transformers + SDPA)", "value": a and a["ppl"],
         "ok": None if not a else a["ppl"] <= TARGET_A_PPL},
        {"target": f"(a) s/step <= {TARGET_A_STEP}", "value": a and a.get("s_per_step"),
         "ok": None if not a or a.get("s_per_step") is None else a["s_per_step"] <= TARGET_A_STEP},
        {"target": "(c) at 0.5 within 0.5% of (a)", "value": rel(c05, a),
         "ok": None if rel(c05, a) is None else rel(c05, a) <= 0.005},
        {"target": f"(c) at {min(config.densities):g} within 3% of (a)", "value": rel(clo, a),
         "ok": None if rel(clo, a) is None else rel(clo, a) <= 0.03},
        {"target": f"(c) better than (b) at {min(config.densities):g}",
         "value": clo and blo and f"(c) {clo['ppl']:.3f} vs (b) {blo['ppl']:.3f}",
         "ok": None if not (clo and blo) else clo["ppl"] < blo["ppl"]},
        {"target": f"(c) at {min(config.densities):g}: s/step <= {TARGET_C01_STEP}",
         "value": clo and clo.get("s_per_step"),
         "ok": None if not clo or clo.get("s_per_step") is None else clo["s_per_step"] <= TARGET_C01_STEP},
    ]
    return out


def _fmt(x, spec=".2f"):
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def format_report(rows, extra, targets, config, phase_seconds) -> str:
    sources = []
    for r in rows:
        sources += [s for s in r.get("per_source", {}) if s not in sources]
    lines = [f"{config.model or ca.DEFAULT_MODEL_LABEL}, YaRN factor {config.yarn_factor:g}: PPL on {config.seq_len}-"
             f"token source-joined windows of {config.eval or 'the bundled eval corpus'} (up to "
             f"{config.windows_per_source} per source), {config.steps} training steps per row", "",
             "| row | density | PPL all | " + " | ".join(sources) + " | s/step (training; (b): distillation) | "
             "peak GiB | train s |",
             "|" + "---|" * (6 + len(sources))]
    for r in rows:
        dens = "1" if r.get("density") is None else f"{r['density']:.3f}"
        per = [_fmt(r["per_source"].get(s)) for s in sources]
        lines.append(f"| {r['setting']} | {dens} | {r['ppl']:.2f} | " + " | ".join(per)
                     + f" | {_fmt(r.get('s_per_step'), '.3f')} | {_fmt(r.get('peak_gib'), '.1f')} | "
                       f"{_fmt(r.get('train_seconds'), '.0f')} |")
    lines += ["", "targets:"]
    for t in targets:
        mark = {True: "met", False: "MISSED", None: "not measured"}[t["ok"]]
        val = t["value"]
        if isinstance(val, float):
            val = f"{val:+.2%}" if "within" in t["target"] else f"{val:.3f}"
        lines.append(f"- {t['target']}: {mark} ({val})")
    if "gates0" in extra:
        g = extra["gates0"]
        lines += ["", f"gates0: initial gates {g['init']}, then {g['steps']} distillation steps at {config.seq_len} "
                      f"on the untrained YaRN model; final gate loss {_fmt(g.get('final_loss'), '.3f')}, "
                      f"{_fmt(g.get('s_per_step'), '.3f')} s/step"]
    if "timing" in extra:
        lines += ["", format_timing(extra["timing"], config.seq_len)]
    if "passkey" in extra:
        pk = extra["passkey"]
        lines += ["", "passkey (5 depths x prompts per length; accuracy per length):"]
        for key in (k for k, v in pk.items() if isinstance(v, dict) and "per_length" in v):
            acc = ", ".join(f"{n}: {a:.2f}" for n, a in pk[key]["per_length"].items())
            lines.append(f"- {key}: {pk[key]['accuracy']:.3f} ({acc})")
        p = pk["paired"]
        lines.append(f"- {p['other']} vs {p['reference']}: lost {p['lost']}, gained {p['gained']} of {p['n']} prompts "
                     f"(sign test p={p['p_value']:.3g})")
        keep = pk.get("keep_rules")
        lines.append(f"- keep rules of {p['other']}: " + (", ".join(f"{k}={v}" for k, v in keep.items()) if keep else
                                                          "not recorded (the fine-tuned model's own)"))
    lines += ["", "phase wall time (s; expected on an H200 for phases not run yet):"]
    lines.append(", ".join(f"{n}: {_fmt(s, '.0f') if s is not None else '~' + format(_expected_s(config, n), '.0f')}"
                           for n, s in phase_seconds.items()))
    return "\n".join(lines)


def format_timing(timing, seq_len) -> str:
    """The timing phase as a markdown table: s/step, peak memory and the profiled step's GPU
    time by kernel kind per variant, then each variant's busiest kernels."""
    kinds = [k for k, _ in KERNEL_KINDS] + ["other"]
    lines = [f"seconds per training step at {seq_len} tokens ({timing['steps']} steps per variant, median after 3; "
             "GPU ms of the last step by kernel kind; busy: their sum / s per step):", "",
             "| variant | s/step | peak GiB | GPU busy | " + " | ".join(f"{k} ms" for k in kinds) + " |",
             "|" + "---|" * (4 + len(kinds))]
    for v in timing["variants"].values():
        prof = v.get("profile") or {}
        per = [_fmt(prof.get("kinds", {}).get(k), ".1f") for k in kinds]
        lines.append(f"| {v['label']} | {_fmt(v.get('s_per_step'), '.3f')} | {_fmt(v.get('peak_gib'), '.1f')} | "
                     f"{_fmt(v.get('gpu_busy_share'), '.0%')} | " + " | ".join(per) + " |")
    for v in timing["variants"].values():
        top = (v.get("profile") or {}).get("top") or []
        if top:
            lines += ["", f"busiest kernels, {v['label']}: "
                      + "; ".join(f"{t['name'][:60]} {t['ms']:.1f} ms x{t['calls']}" for t in top[:6])]
    return "\n".join(lines)


def plot_loss_curves(rows, path):
    """LM loss per step of (a) and the (c) rows in one PNG (None without matplotlib or curves)."""
    curves = [(r["setting"], r["curve"]) for r in rows if r.get("curve") and r["row"][0] in "ac"]
    if not curves:
        return None
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, (label, curve) in enumerate(curves):
        pts = [(c["step"], c["lm_loss"]) for c in curve if c.get("lm_loss") is not None]
        steps, loss = [p[0] for p in pts], [p[1] for p in pts]
        smooth = [sum(loss[max(0, j - 9):j + 1]) / len(loss[max(0, j - 9):j + 1]) for j in range(len(loss))]
        color = f"C{i}"
        ax.plot(steps, loss, color=color, lw=0.6, alpha=0.3)
        ax.plot(steps, smooth, color=color, lw=1.5, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("LM loss (faint: per step; line: mean of the last 10)")
    ax.set_title("YaRN fine-tuning: dense vs SeerAttention")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    raise SystemExit(main())
