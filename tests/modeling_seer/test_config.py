import math
import re

import pytest
import torch

from seer_attn.modeling_seer import SeerLlamaConfig
from seer_attn.modeling_seer.configuration_seer import BASE_FIELDS, OPTIONAL_LIST_FIELDS
from seer_attn.modeling_seer.configuration_seer_llama import BOOL_FIELDS, FLOAT_FIELDS, INT_FIELDS


@pytest.mark.parametrize("field,value,match", [
    ("seer_mode", "sparsest", "seer_mode"),
    ("seer_block_size", 32, "seer_block_size"),
    ("seer_gate_hidden_size", 63, "seer_gate_hidden_size"),
    ("seer_q_pooling", ["median"], "seer_q_pooling"),
    ("seer_k_pooling", [], "seer_k_pooling"),
    ("seer_k_pooling", ["max", "max"], "seer_k_pooling"),
    ("seer_sparsity_method", "topp", "seer_sparsity_method"),
    ("seer_threshold", 0.0, "seer_threshold"),
    ("seer_threshold", 1.5, "seer_threshold"),
    ("seer_nz_ratio", 0.0, "seer_nz_ratio"),
    ("seer_coverage", 1.2, "seer_coverage"),
    ("seer_gain", 0.0, "seer_gain"),
    ("seer_gain", 1.0, r"seer_gain=1.0 is invalid: expected 0 < gain < 1"),
    ("seer_density", 0.0, "seer_density"),
    ("seer_density", 1.5, "seer_density"),
    ("seer_selector", "random", "seer_selector"),
    ("seer_dense_last_rows", -1, "seer_dense_last_rows"),
    ("seer_dense_layers", -1, "seer_dense_layers"),
    ("seer_density_profile", [1.0], r"seer_density_profile=\[1.0\] is invalid: expected one entry per layer \(2\)"),
    ("seer_density_profile", [1.0, -0.5], "seer_density_profile"),
    ("seer_density_profile", [1.0, float("nan")], "seer_density_profile"),
    ("seer_density_profile", [1.0, True], "seer_density_profile"),
    ("seer_density_profile", 1.0, "seer_density_profile"),
    ("seer_density_profile", [], "seer_density_profile"),
    ("seer_keep_local", -1, "seer_keep_local"),
    ("seer_keep_local", 1.5, "seer_keep_local"),
    ("seer_keep_local", True, "seer_keep_local"),
    ("seer_distill_loss_scale", 0.0, "seer_distill_loss_scale"),
    ("seer_distill_target", "mean", "seer_distill_target"),
    ("seer_distill_peak_weight", -1.0, "seer_distill_peak_weight"),
    ("seer_meanpool_prior", -0.5, r"seer_meanpool_prior=-0.5 is invalid: expected a share 0 <= a <= 1"),
    ("seer_meanpool_prior", 1.5, "seer_meanpool_prior"),
    ("seer_distill_prior", True, r"seer_distill_prior=True is invalid: needs 0 < seer_meanpool_prior < 1 .* got 0.0"),
    ("seer_distill_prior", 1, "seer_distill_prior=1 is invalid: expected True or False"),
], ids=lambda v: str(v))
def test_bad_seer_values_raise_naming_the_field(field, value, match, tiny_kwargs):
    with pytest.raises(ValueError, match=match):
        SeerLlamaConfig(**tiny_kwargs, **{field: value})


def test_distill_prior_refuses_the_prior_alone(tiny_kwargs):
    # at share 1 the mixture ignores the gate: nothing to distil
    with pytest.raises(ValueError, match="seer_distill_prior=True is invalid: .* got 1.0"):
        SeerLlamaConfig(**tiny_kwargs, seer_distill_prior=True, seer_meanpool_prior=1.0)
    assert SeerLlamaConfig(**tiny_kwargs, seer_distill_prior=True, seer_meanpool_prior=0.5).seer_distill_prior


# wrong types and non-finite numbers, refused where the config is built (they used to fail
# late: a TypeError in forward, NaN gate_loss, save_pretrained choking on a tensor)
TYPE_CASES = [
    ("seer_threshold", "0.1"), ("seer_threshold", torch.tensor(0.1)), ("seer_threshold", True),
    ("seer_threshold", None), ("seer_block_size", 64.0), ("seer_block_size", "64"), ("seer_block_size", True),
    ("seer_gate_hidden_size", 32.0), ("seer_dense_last_rows", True), ("seer_dense_last_rows", 2.0),
    ("seer_dense_layers", 1.0),
    ("seer_keep_local", torch.tensor(1)), ("seer_keep_diagonal", "no"), ("seer_keep_diagonal", 1),
    ("seer_keep_sink", "no"), ("seer_keep_sink", None), ("seer_gate_rope", "no"), ("seer_gate_rope", 0),
    ("seer_q_pooling", None),
    *[(name, bad) for name in FLOAT_FIELDS for bad in (float("nan"), float("inf"), -float("inf"))],
]


@pytest.mark.parametrize("field,value", TYPE_CASES, ids=[f"{f}={v!r}" for f, v in TYPE_CASES])
def test_bad_types_and_non_finite_numbers_raise(field, value, tiny_kwargs):
    with pytest.raises(ValueError, match=rf"^{field}={re.escape(repr(value))} is invalid: expected [^\n]*$"):
        SeerLlamaConfig(**tiny_kwargs, **{field: value})


def test_field_groups_cover_every_typed_field(tiny_kwargs):
    c = SeerLlamaConfig(**tiny_kwargs)
    assert all(type(getattr(c, f)) is bool for f in BOOL_FIELDS)
    assert all(type(getattr(c, f)) is int for f in INT_FIELDS)
    assert all(type(getattr(c, f)) is float for f in FLOAT_FIELDS)
    assert all(getattr(c, f) is None for f in BASE_FIELDS)  # None or a string (gates-only checkpoints)
    assert set(BOOL_FIELDS) | set(INT_FIELDS) | set(FLOAT_FIELDS) == \
        {k for k, v in vars(c).items() if k.startswith("seer_") and not isinstance(v, (str, list))
         and k not in BASE_FIELDS + OPTIONAL_LIST_FIELDS}


def test_numbers_of_either_kind_are_accepted(tiny_kwargs):
    c = SeerLlamaConfig(**tiny_kwargs, seer_nz_ratio=1, seer_distill_loss_scale=3, seer_threshold=0.25)
    assert c.seer_nz_ratio == 1 and c.seer_distill_loss_scale == 3 and math.isclose(c.seer_threshold, 0.25)


@pytest.mark.parametrize("key,hint", [("seer_treshold", " (did you mean seer_threshold?)"), ("seer_zzzzzzzz", "")])
def test_unknown_seer_key_is_refused(key, hint, tiny_kwargs):
    with pytest.raises(ValueError, match=rf"^{key}=0\.1 is invalid: no such seer option{re.escape(hint)}$"):
        SeerLlamaConfig(**tiny_kwargs, **{key: 0.1})


def test_transformers_keys_and_round_trips_still_work(tmp_path, tiny_kwargs):
    """Non-seer extra keys stay transformers' business; to_dict / from_dict and a saved
    config.json load back unchanged."""
    c = SeerLlamaConfig(**tiny_kwargs, seer_mode="sparse", seer_nz_ratio=1, my_extra_key=3)
    assert c.my_extra_key == 3
    d = c.to_dict()
    assert SeerLlamaConfig.from_dict(d).to_dict() == d
    c.save_pretrained(tmp_path)
    loaded = SeerLlamaConfig.from_pretrained(tmp_path).to_dict()
    assert loaded.pop("auto_map") == {"AutoConfig": "configuration_seer_llama.SeerLlamaConfig"} and loaded == d


def test_defaults_follow_the_paper(tiny_kwargs):
    c = SeerLlamaConfig(**tiny_kwargs)
    assert c.model_type == "seer_llama"
    assert c.seer_block_size == 64 and c.seer_gate_hidden_size == 128
    assert c.seer_q_pooling == ["avg"] and c.seer_k_pooling == ["max", "min", "avg"]
    assert c.seer_distill_loss_scale == 10.0 and c.seer_dense_last_rows == 2


def test_config_json_round_trip(tmp_path, tiny_kwargs):
    c = SeerLlamaConfig(**tiny_kwargs, seer_mode="sparse", seer_threshold=5e-3, seer_k_pooling=["max"])
    c.save_pretrained(tmp_path)
    c2 = SeerLlamaConfig.from_pretrained(tmp_path)
    for k in ("seer_mode", "seer_threshold", "seer_k_pooling", "num_key_value_heads"):
        assert getattr(c2, k) == getattr(c, k)


def test_set_seer_mode_validates_and_rolls_back(tiny):
    m = tiny()
    with pytest.raises(ValueError, match="seer_threshold"):
        m.set_seer_mode("sparse", seer_threshold=2.0)
    assert m.config.seer_mode == "dense" and m.config.seer_threshold == 2e-3
    with pytest.raises(ValueError, match="unknown seer options"):
        m.set_seer_mode("sparse", threshold=0.1)
    for bad in (dict(seer_treshold=0.1), dict(seer_keep_sink="no"), dict(seer_distill_loss_scale=float("nan"))):
        with pytest.raises(ValueError, match=re.escape(next(iter(bad)))):
            m.set_seer_mode("sparse", **bad)
        assert m.config.seer_mode == "dense" and not hasattr(m.config, "seer_treshold")
        assert m.config.seer_keep_sink is False and m.config.seer_distill_loss_scale == 10.0


STRUCTURAL = [("seer_gate_hidden_size", 64), ("seer_q_pooling", ["max"]), ("seer_k_pooling", ("avg",)),
              ("seer_gate_rope", False), ("seer_block_size", 128)]


@pytest.mark.parametrize("field,value", STRUCTURAL, ids=[f for f, _ in STRUCTURAL])
def test_set_seer_mode_refuses_structural_options(tiny, field, value):
    """The built gates ignore them: refuse instead of letting config and gates disagree."""
    m = tiny()
    before = m.config.to_dict()
    msg = (rf"^{field}={re.escape(repr(value))} cannot be changed on a built model .*convert the base model again.*"
           rf"load_seer_model\(base, {field}={re.escape(repr(value))}\)$")
    with pytest.raises(ValueError, match=msg):
        m.set_seer_mode("sparse", **{field: value})
    assert m.config.to_dict() == before


def test_set_seer_mode_names_the_way_to_add_decode_gates(tiny):
    m = tiny()
    with pytest.raises(ValueError, match=r"^seer_decode_gate=True cannot be changed on a built model .*load the saved "
                                         r"model with them: load_seer_model\(folder, seer_decode_gate=True\)"):
        m.set_seer_mode("sparse", seer_decode_gate=True)
    assert not m.config.seer_decode_gate


def test_set_seer_mode_accepts_structural_options_at_their_values(tiny):
    m = tiny()
    current = {k: v for k, v in vars(m.config).items() if k.startswith("seer_")}
    current.update(seer_mode="sparse", seer_q_pooling=("avg",))
    m.set_seer_mode(current.pop("seer_mode"), **current)
    assert m.config.seer_mode == "sparse" and m.config.seer_q_pooling == ["avg"]
    with pytest.raises(ValueError, match=r"seer_block_size=64\.0 is invalid: expected an integer"):
        m.set_seer_mode("sparse", seer_block_size=64.0)  # equal, but not an int
    assert m.config.seer_block_size == 64
