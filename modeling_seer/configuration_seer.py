"""The ``seer_*`` configuration fields of SeerAttention, for any model family.

:class:`SeerConfigMixin` declares the fields, their validation and the runtime overrides;
a family's config is ``class SeerXConfig(SeerConfigMixin, XConfig)`` with its own
``model_type``. Copied flat into saved model folders (remote code): imports only
torch/transformers.
"""
import dataclasses
import difflib
import math

from .selection import (DECODE_KEY_FORMATS, DECODE_METHODS, DECODE_SELECTORS, DEFAULT_DECODE_KEY_FORMAT, SELECTORS,
                        SPARSITY_METHODS)

SEER_MODES = ("dense", "distill", "sparse")
POOLING_TYPES = ("avg", "max", "min")
DISTILL_TARGETS = ("max", "mass")
BOOL_FIELDS = ("seer_gate_rope", "seer_keep_diagonal", "seer_keep_sink", "seer_decode_gate", "seer_decode_sparsity",
               "seer_distill_prior", "seer_decode_distill_forced")
INT_FIELDS = ("seer_block_size", "seer_gate_hidden_size", "seer_keep_local", "seer_dense_last_rows",
              "seer_dense_layers", "seer_decode_budget", "seer_decode_distill_rows", "seer_decode_keep_local")
FLOAT_FIELDS = ("seer_threshold", "seer_nz_ratio", "seer_coverage", "seer_gain", "seer_distill_loss_scale",
                "seer_decode_share", "seer_decode_threshold", "seer_decode_mass", "seer_density",
                "seer_distill_peak_weight", "seer_meanpool_prior", "seer_decode_meanpool_prior")
#: Options the gates are built from (their shapes and RoPE): fixed once a model exists.
STRUCTURAL_FIELDS = ("seer_block_size", "seer_gate_hidden_size", "seer_q_pooling", "seer_k_pooling",
                     "seer_gate_rope", "seer_decode_gate")
#: Fields of a gates-only checkpoint: the base model whose weights its gates apply to.
BASE_FIELDS = ("seer_base_model", "seer_base_revision", "seer_base_gguf_file")
#: None or a list of numbers (checked by value)
OPTIONAL_LIST_FIELDS = ("seer_density_profile",)


@dataclasses.dataclass(repr=False, eq=False, kw_only=True)
class SeerConfigMixin:
    r"""The ``seer_*`` fields, mixed into a transformers config (placed before it in the bases).

    Args:
        seer_mode: ``"dense"`` (the family's stock attention), ``"distill"`` (exact attention that
            also emits the max-pooled map; the gate KL loss is returned as ``gate_loss``) or
            ``"sparse"`` (gate -> block mask -> block-sparse attention at prefill).
        seer_block_size: attention block size; only 64 is implemented by the kernels.
        seer_gate_hidden_size: width of the gate's per-head projections (paper: 128).
        seer_q_pooling / seer_k_pooling: pooling types over each 64-token block, from
            {"avg", "max", "min"}, concatenated on the channel axis
            (paper default: Q ``["avg"]``, K ``["max", "min", "avg"]``).
        seer_gate_rope: apply RoPE to pooled q/k at each block's first-token position.
        seer_sparsity_method: ``"threshold"`` (keep blocks whose softmaxed gate score is
            >= ``seer_threshold``; adaptive per head and row) or ``"nz_ratio"`` (the same
            top-k for every row, k = (1 - sqrt(1 - nz_ratio)) * NB, so that about
            ``nz_ratio`` of the causal blocks are kept).
            ``"coverage"`` keeps per row the fewest best blocks whose softmaxed scores sum
            to >= ``seer_coverage`` (adaptive budget).
            ``"gain"`` keeps per row the best blocks beyond the keep rules' while each would hold
            >= ``seer_gain`` of the row's kept mass once added: the most log-mass for the
            blocks kept (between the threshold and the coverage; selection.select_gain).
            ``"density"`` keeps ``seer_density`` of the causal blocks in every layer: the keep
            rules' blocks plus the most probable other blocks over all heads and rows of the
            layer (a threshold solved per layer and sequence, so the budget stays adaptive
            across heads and rows as with ``"threshold"``).
        seer_threshold: threshold tau, in (0, 1).
        seer_nz_ratio: target kept share of causal blocks, in (0, 1].
        seer_coverage: probability mass kept per row by ``"coverage"``, in (0, 1].
        seer_gain: the least share of a row's kept mass a block added by ``"gain"`` holds, in (0, 1).
        seer_density: kept share of causal blocks asked of ``"density"``, in (0, 1] (the keep
            rules set a floor, which grows as prompts get shorter; a sparse prefill asked for
            less than it logs a warning once per length: it then keeps the forced blocks only).
        seer_selector: what scores the blocks in sparse mode: ``"gate"`` (the learned
            AttnGate) or a training-free baseline of :data:`.selection.SELECTORS`: ``"streaming"`` (sink + recent blocks),
            ``"meanpool"`` (MoBA-like mean-pooled q.k), ``"oracle_max"`` / ``"oracle_mass"``
            (the true max-pooled / mass-pooled attention map, which costs a dense pass).
        seer_meanpool_prior: share a in [0, 1] of a training-free prior in the gate's scores:
            the gate selector scores blocks by (1 - a) * log_softmax(gate) + a * log_softmax(mean-pooled
            q.k) per row (selection.with_meanpool_prior), every method then reading its softmax.
            0 (default): the gate alone, as the paper; 1: the mean-pooled baseline's ranking. Helps
            most at density <= 0.1, where the gate's own picks trail the mean-pooled ones
            (docs/experiments/gate_quality.md section 15).
        seer_keep_diagonal: always keep each row's diagonal block.
        seer_keep_sink: always keep the first (sink) key block.
        seer_keep_local: always keep this many key blocks just before the diagonal (a
            local window, so tokens near a block start see their preceding text; 0: off).
        seer_dense_last_rows: number of last block rows kept dense (reference: 2).
        seer_dense_layers: the first N layers attend densely at sparse prefill (no scores, no
            selection); the sparsity options apply to the others. Retrieval at high sparsity
            depends on the first layers (docs/experiments/gate_quality.md section 7). 0: off.
        seer_density_profile: None, or one positive multiplier per layer of the density knob:
            layer i keeps ``min(1, seer_density * profile[i] * s)`` under ``"density"``, s solved
            per block count so that the sparse layers still keep ``seer_density`` on average
            where the keep rules' floor or the cap at 1 clip a layer (e.g. the
            per-layer densities the coverage rule reaches on a sample, divided by their mean:
            :func:`seer_attn.eval.calibration.density_profile`), so the budget goes where the
            gate is unsure while every sequence still keeps the asked share.
        seer_distill_loss_scale: multiplier of the summed per-layer KL loss (paper: 10).
        seer_distill_target: ``"max"`` (paper: row-normalised max-pooled probabilities)
            or ``"mass"`` (row-normalised probability mass per block, a variant).
        seer_distill_peak_weight: w >= 0: each block row's KL term weighs 1 + w * (the largest
            entry of its target row), so rows whose true map is peaked count more (0: the
            paper's plain mean).
        seer_distill_prior: the distillation loss (and fine-tuning's gate loss) reads the gate's
            scores mixed with the mean-pooled prior at ``seer_meanpool_prior``, so the gate learns
            what the prior misses; such gates are meant to be served with the same share (alone
            they are a residual). Needs 0 < ``seer_meanpool_prior`` < 1. False (default): the paper's
            loss on the gate alone.
        seer_decode_gate: build a decode gate per layer (``attn_gate.decode_gate``; structural:
            fixed once the model is built). Distillation then trains it too, and its tensors are
            saved with the prefill gates.
        seer_decode_sparsity: decode steps (one new token per sequence against a KV cache)
            read only the KV blocks the decode gate selects, in any mode but ``"distill"``
            (needs ``seer_decode_gate``); off: dense decode.
        seer_decode_method: ``"budget"`` (``seer_decode_budget`` tokens), ``"share"``
            (``seer_decode_share`` of the sequence's blocks), ``"threshold"`` (blocks whose
            softmaxed decode-gate score is >= ``seer_decode_threshold``) or ``"mass"`` (the
            best-scoring blocks until their softmaxed scores, the predicted attention mass, sum
            to ``seer_decode_mass``: few blocks where attention is concentrated, many where it
            is flat); the first (sink) and the current block are always read.
        seer_decode_budget: tokens read per decode step and KV head, >= 2 blocks (default 2048).
        seer_decode_share: share of the blocks read per decode step, in (0, 1].
        seer_decode_threshold: decode threshold, in (0, 1).
        seer_decode_mass: predicted attention mass a decode step reads, in (0, 1] (default 0.9).
        seer_decode_distill_rows: query rows per sequence the decode gate is distilled on.
        seer_decode_keep_local: the N full blocks before the current one are always read too
            (they count in the budget and the share; default 0).
        seer_decode_distill_forced: the decode gate's distillation loss spans the blocks every
            step reads anyway (the sink and the ``seer_decode_keep_local`` ones) with the others
            (True, the loss up to session 37); False (default) leaves them out, the target
            renormalised over the blocks the gate decides: lower decode perplexity at every
            setting measured (docs/experiments/decode_quality.md, sessions 37-38).
        seer_decode_selector: what scores the cache's blocks at a decode step: ``"gate"`` (the
            decode gate), or for comparison ``"oracle"`` (the step's true attention mass per
            block, summed over the query group: an exact pass over the cache, no speed-up) or
            ``"streaming"`` (the most recent blocks).
        seer_decode_meanpool_prior: share a in [0, 1] of a training-free prior in the decode gate's
            scores: ``(1 - a) log p_gate + a log p_meanpool`` over the full blocks, p_meanpool the
            new query's softmax over each block's mean post-RoPE key (kept by the pooled-K cache),
            averaged over the KV head's group; 1 ranks by the prior alone. 0 (default): the gate.
            One more small matmul per layer and step (docs/experiments/decode_quality.md, session 36).
        seer_decode_key_format: how the pooled-K cache stores the decode gate's block keys: ``"i8"``
            (default since session 47: int8, any device), ``"f8"`` (float8 e4m3, a GPU with float8
            loads) or ``"model"`` (the model's dtype); each 8-bit block key row with one float32
            scale: the gate's scoring reads half the bytes per step, decode perplexity within 0.04%
            of the model's dtype at issue 15's protocol (docs/experiments/decode_quality.md). Fixed
            for a cache once its prefill ran (a changed value is refused at the next step).
        seer_base_model: set in a *gates-only* checkpoint (config, ``seer_gates.safetensors`` and
            the remote code, no base weights): the Hub id or local path (folder or ``.gguf``
            file) of the base model whose weights ``from_pretrained`` loads before applying
            the gates (:mod:`.gates_only`). None: the checkpoint holds its own weights.
        seer_base_revision: the base's Hub revision (a commit hash pins it), or None.
        seer_base_gguf_file: a ``.gguf`` file inside the base repo or folder to take the
            weights from (dequantised), or None.
    """

    seer_mode: str = "dense"
    seer_block_size: int = 64
    seer_gate_hidden_size: int = 128
    seer_q_pooling: list | tuple = ("avg",)
    seer_k_pooling: list | tuple = ("max", "min", "avg")
    seer_gate_rope: bool = True
    seer_sparsity_method: str = "threshold"
    seer_threshold: float = 2e-3
    seer_nz_ratio: float = 0.3
    seer_coverage: float = 0.9
    seer_gain: float = 0.05
    seer_density: float = 0.2
    seer_selector: str = "gate"
    seer_meanpool_prior: float = 0.0
    seer_keep_diagonal: bool = True
    seer_keep_sink: bool = False
    seer_keep_local: int = 0
    seer_dense_last_rows: int = 2
    seer_dense_layers: int = 0
    seer_density_profile: list | None = None
    seer_distill_loss_scale: float = 10.0
    seer_distill_target: str = "max"
    seer_distill_peak_weight: float = 0.0
    seer_distill_prior: bool = False
    seer_decode_gate: bool = False
    seer_decode_sparsity: bool = False
    seer_decode_method: str = "budget"
    seer_decode_budget: int = 2048
    seer_decode_share: float = 0.1
    seer_decode_threshold: float = 1e-3
    seer_decode_mass: float = 0.9
    seer_decode_distill_rows: int = 64
    seer_decode_keep_local: int = 0
    seer_decode_distill_forced: bool = False
    seer_decode_selector: str = "gate"
    seer_decode_meanpool_prior: float = 0.0
    seer_decode_key_format: str = DEFAULT_DECODE_KEY_FORMAT
    seer_base_model: str | None = None
    seer_base_revision: str | None = None
    seer_base_gguf_file: str | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        for name in ("seer_q_pooling", "seer_k_pooling"):
            if isinstance(getattr(self, name), tuple):
                setattr(self, name, list(getattr(self, name)))
        self.validate_seer()

    def validate_seer(self):
        """Check every ``seer_*`` field (and refuse undeclared ``seer_*`` attributes, e.g. a
        typo); raises ValueError naming the bad field and value."""
        def bad(name, why):
            raise ValueError(f"{name}={getattr(self, name)!r} is invalid: {why}")

        declared = [f.name for f in dataclasses.fields(self) if f.name.startswith("seer_")]
        for name in vars(self):
            if name.startswith("seer_") and name not in declared:
                close = difflib.get_close_matches(name, declared, 1)
                bad(name, "no such seer option" + (f" (did you mean {close[0]}?)" if close else ""))
        self._validate_seer_base(bad)
        for name in BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                bad(name, "expected True or False")
        for name in INT_FIELDS:
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, int):
                bad(name, "expected an integer")
        for name in FLOAT_FIELDS:
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, (int, float)) or not math.isfinite(val):
                bad(name, "expected a finite real number (int or float)")
        if self.seer_mode not in SEER_MODES:
            bad("seer_mode", f"expected one of {SEER_MODES}")
        if self.seer_block_size != 64:
            bad("seer_block_size", "the kernels implement 64 only")
        if self.seer_gate_hidden_size <= 0 or self.seer_gate_hidden_size % 2:
            bad("seer_gate_hidden_size", "expected a positive even integer (RoPE rotates pairs)")
        for name in ("seer_q_pooling", "seer_k_pooling"):
            val = getattr(self, name)
            if not isinstance(val, (list, tuple)) or not val or any(p not in POOLING_TYPES for p in val) \
                    or len(set(val)) != len(val):
                bad(name, f"expected a non-empty list of distinct types from {POOLING_TYPES}")
        if self.seer_sparsity_method not in SPARSITY_METHODS:
            bad("seer_sparsity_method", f"expected one of {SPARSITY_METHODS}")
        if not 0.0 < self.seer_threshold < 1.0:
            bad("seer_threshold", "expected 0 < threshold < 1")
        if not 0.0 < self.seer_nz_ratio <= 1.0:
            bad("seer_nz_ratio", "expected 0 < nz_ratio <= 1")
        if not 0.0 < self.seer_coverage <= 1.0:
            bad("seer_coverage", "expected 0 < coverage <= 1")
        if not 0.0 < self.seer_gain < 1.0:
            bad("seer_gain", "expected 0 < gain < 1")
        if not 0.0 < self.seer_density <= 1.0:
            bad("seer_density", "expected 0 < density <= 1")
        if not 0.0 <= self.seer_meanpool_prior <= 1.0:
            bad("seer_meanpool_prior", "expected a share 0 <= a <= 1")
        if self.seer_selector not in SELECTORS:
            bad("seer_selector", f"expected one of the registered selectors {tuple(SELECTORS)}")
        if self.seer_keep_local < 0:
            bad("seer_keep_local", "expected an integer >= 0")
        if self.seer_dense_last_rows < 0:
            bad("seer_dense_last_rows", "expected an integer >= 0")
        if self.seer_dense_layers < 0:
            bad("seer_dense_layers", "expected an integer >= 0")
        self._validate_density_profile(bad)
        if self.seer_distill_loss_scale <= 0:
            bad("seer_distill_loss_scale", "expected > 0")
        if self.seer_distill_target not in DISTILL_TARGETS:
            bad("seer_distill_target", f"expected one of {DISTILL_TARGETS}")
        if self.seer_distill_peak_weight < 0:
            bad("seer_distill_peak_weight", "expected >= 0")
        if self.seer_distill_prior and not 0 < self.seer_meanpool_prior < 1:
            bad("seer_distill_prior", f"needs 0 < seer_meanpool_prior < 1 (the prior's share in the loss; 0: no prior, "
                f"1: the loss ignores the gate), got {self.seer_meanpool_prior!r}")
        self.validate_seer_decode(bad)

    def _validate_density_profile(self, bad):
        prof = self.seer_density_profile
        if prof is None:
            return
        if isinstance(prof, tuple):
            self.seer_density_profile = prof = list(prof)
        n = getattr(self, "num_hidden_layers", None)
        if not isinstance(prof, list) or not prof or any(
                isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x <= 0
                for x in prof):
            bad("seer_density_profile", "expected None or a list of positive numbers, one per layer")
        if n is not None and len(prof) != n:
            bad("seer_density_profile", f"expected one entry per layer ({n}), got {len(prof)}")

    def validate_seer_decode(self, bad):
        """The value checks of the decode fields, after :meth:`validate_seer`'s type checks
        (``bad(name, why)`` raises)."""
        if self.seer_decode_method not in DECODE_METHODS:
            bad("seer_decode_method", f"expected one of {DECODE_METHODS}")
        if self.seer_decode_budget < 2 * self.seer_block_size:
            bad("seer_decode_budget", f"expected >= {2 * self.seer_block_size} tokens (the sink and the current block)")
        if not 0.0 < self.seer_decode_share <= 1.0:
            bad("seer_decode_share", "expected 0 < share <= 1")
        if not 0.0 < self.seer_decode_threshold < 1.0:
            bad("seer_decode_threshold", "expected 0 < threshold < 1")
        if not 0.0 < self.seer_decode_mass <= 1.0:
            bad("seer_decode_mass", "expected 0 < mass <= 1")
        if self.seer_decode_distill_rows < 1:
            bad("seer_decode_distill_rows", "expected an integer >= 1")
        if self.seer_decode_keep_local < 0:
            bad("seer_decode_keep_local", "expected an integer >= 0")
        if self.seer_decode_selector not in DECODE_SELECTORS:
            bad("seer_decode_selector", f"expected one of {DECODE_SELECTORS}")
        if not 0.0 <= self.seer_decode_meanpool_prior <= 1.0:
            bad("seer_decode_meanpool_prior", "expected a share 0 <= a <= 1")
        if self.seer_decode_key_format not in DECODE_KEY_FORMATS:
            bad("seer_decode_key_format", f"expected one of {DECODE_KEY_FORMATS}")
        if self.seer_decode_sparsity and not self.seer_decode_gate:
            bad("seer_decode_sparsity", "decode sparsity needs decode gates: build the model with "
                                        "seer_decode_gate=True (load_seer_model(base, seer_decode_gate=True))")

    def runtime_overrides(self, overrides):
        """``overrides`` less the structural options (:data:`STRUCTURAL_FIELDS`) equal to this
        config's; raises ValueError for one that differs: the built gates would ignore it."""
        out = dict(overrides)
        for name in STRUCTURAL_FIELDS:
            if name not in overrides:
                continue
            val, cur = overrides[name], getattr(self, name)
            if (list(val) if isinstance(val, tuple) else val) != cur:
                grow = name == "seer_decode_gate" and val is True  # a saved model takes them when it loads
                raise ValueError(f"{name}={val!r} cannot be changed on a built model (its gates were built with "
                                 f"{name}={cur!r}); " + (
                                     "load the saved model with them: load_seer_model(folder, seer_decode_gate=True) "
                                     "adds decode gates beside its gates" if grow else
                                     f"convert the base model again to get new gates: load_seer_model(base, "
                                     f"{name}={val!r})"))
            if type(val) is type(cur) or isinstance(val, tuple):
                del out[name]  # unchanged (an equal value of another type is left to validate_seer)
        return out

    def _validate_seer_base(self, bad):
        """The gates-only fields: None or a non-empty string each; a revision or GGUF file
        only with ``seer_base_model``; the GGUF file a relative ``.gguf`` name."""
        for name in BASE_FIELDS:
            val = getattr(self, name)
            if val is not None and (not isinstance(val, str) or not val.strip()):
                bad(name, "expected None or a non-empty string")
        for name in BASE_FIELDS[1:]:
            if getattr(self, name) is not None and self.seer_base_model is None:
                bad(name, "needs seer_base_model (the base model it belongs to)")
        gguf = self.seer_base_gguf_file
        if gguf is not None and (not gguf.lower().endswith(".gguf") or gguf.startswith(("/", "~"))):
            bad("seer_base_gguf_file", "expected a relative file name ending in .gguf")
