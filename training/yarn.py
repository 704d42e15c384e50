"""YaRN context extension of a Seer model, through transformers' own RoPE utilities.

YaRN (Peng et al., arXiv 2309.00071) stretches RoPE by ``factor``: the low-frequency
dimensions are interpolated, the high-frequency ones kept, and the attention logits scaled
by ``0.1 ln(factor) + 1`` (transformers applies it to cos/sin). The settings live in
``config.rope_parameters`` (transformers 5.x):
``{"rope_type": "yarn", "factor": f, "original_max_position_embeddings": n, "rope_theta": ...}``,
and ``config.max_position_embeddings = f * n``.

:func:`apply_yarn` sets them on a model's config (``standardize_rope_params`` and
``validate_rope`` of transformers' ``RotaryEmbeddingConfigMixin``) and rebuilds its two
rotary tables from it with the family's own rotary class: the model's and the gate's block
RoPE (built from :func:`seer_attn.modeling_seer.seer_layer.gate_rotary_config`, a copy of the
config with the gate width as head size), so the gates see the same positions, scaled the
same way, as the attention they predict. The settings are ordinary config fields: they
survive ``save_pretrained``, reload and the remote-code bundle.
"""
from __future__ import annotations

import math

#: ``rope_parameters`` keys kept from the model's own RoPE when YaRN replaces it
KEPT_ROPE_KEYS = ("rope_theta", "partial_rotary_factor")


def native_context(config) -> int:
    """The context length a model was pretrained for: ``original_max_position_embeddings``
    of a YaRN config, else ``max_position_embeddings``."""
    params = getattr(config, "rope_parameters", None) or {}
    if params.get("rope_type") == "yarn" and params.get("original_max_position_embeddings"):
        return int(params["original_max_position_embeddings"])
    return int(config.max_position_embeddings)


def check_yarn(factor, seq_len=None, original=None) -> None:
    """ValueError (one line, naming the value) unless ``factor`` is a finite number >= 1 and
    ``seq_len`` (when given) fits ``factor * original`` positions."""
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor) or factor < 1:
        raise ValueError(f"yarn factor={factor!r} is invalid: expected a number >= 1 (1: the native RoPE)")
    if original is not None and (isinstance(original, bool) or not isinstance(original, int) or original < 1):
        raise ValueError(f"original_max_position_embeddings={original!r} is invalid: expected a positive integer")
    if seq_len is not None and original is not None and seq_len > factor * original:
        raise ValueError(f"seq-len {seq_len} is above yarn factor x original context = {factor:g} x {original} = "
                         f"{int(factor * original)} positions; raise the factor to at least "
                         f"{math.ceil(seq_len / original * 100) / 100:g} or shorten the sequences")


def yarn_rope_parameters(config, factor, original_max_position_embeddings=None) -> dict:
    """The ``rope_parameters`` dict of YaRN by ``factor`` over ``config``'s RoPE (its
    ``rope_theta`` kept; ``original_max_position_embeddings`` defaults to :func:`native_context`)."""
    original = native_context(config) if original_max_position_embeddings is None else original_max_position_embeddings
    check_yarn(factor, original=original)
    params = {k: v for k, v in (getattr(config, "rope_parameters", None) or {}).items() if k in KEPT_ROPE_KEYS}
    params.update(rope_type="yarn", factor=float(factor), original_max_position_embeddings=int(original))
    return params


def set_yarn_config(config, factor, original_max_position_embeddings=None):
    """Set YaRN by ``factor`` in ``config`` (in place; returned): ``rope_parameters`` and
    ``max_position_embeddings = factor * original``, standardised and validated by
    transformers' own RoPE utilities."""
    params = yarn_rope_parameters(config, factor, original_max_position_embeddings)
    config.rope_parameters = params
    config.max_position_embeddings = int(round(params["factor"] * params["original_max_position_embeddings"]))
    config.standardize_rope_params()
    config.validate_rope()
    return config


def _seer_lm(model):
    """The Seer causal LM of ``model`` (unwrapping a PEFT model) and its base model."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    base = getattr(lm, "model", None)
    if base is None or not hasattr(base, "rotary_emb") or not hasattr(base, "gate_rotary_emb"):
        raise TypeError(f"expected a Seer causal LM (its .model holding rotary_emb and gate_rotary_emb), got "
                        f"{type(lm).__name__}")
    return lm, base


def rebuild_rotary(model):
    """Rebuild ``model``'s rotary tables (the model's and the gate's) from its config, with
    the family's own rotary class, on the device they were on."""
    from seer_attn.modeling_seer.seer_layer import gate_rotary_config

    lm, base = _seer_lm(model)
    for name, cfg in (("rotary_emb", lm.config), ("gate_rotary_emb", gate_rotary_config(lm.config))):
        old = getattr(base, name)
        setattr(base, name, type(old)(config=cfg).to(old.inv_freq.device))
    return model


def apply_yarn(model, factor, original_max_position_embeddings=None):
    """Extend a Seer model's context with YaRN by ``factor`` (in place; returned).

    Args:
        model: a Seer causal LM (or a PEFT model around one; YaRN belongs to its base config).
        factor: the context multiplier, >= 1 (1 gives the native RoPE back, through YaRN's formulas).
        original_max_position_embeddings: the pretraining context (default:
            :func:`native_context` of the model's config: a YaRN model keeps its original).

    Returns:
        ``model``, whose ``config.rope_parameters`` is YaRN's and whose rotary tables (the
        model's and the gate's, attention scaling included) are rebuilt from it.
    """
    lm, _ = _seer_lm(model)
    set_yarn_config(lm.config, factor, original_max_position_embeddings)
    return rebuild_rotary(model)
