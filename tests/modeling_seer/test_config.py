import pytest

from seer_attn.modeling_seer import SeerLlamaConfig



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
    ("seer_selector", "random", "seer_selector"),
    ("seer_dense_last_rows", -1, "seer_dense_last_rows"),
    ("seer_keep_local", -1, "seer_keep_local"),
    ("seer_keep_local", 1.5, "seer_keep_local"),
    ("seer_keep_local", True, "seer_keep_local"),
    ("seer_distill_loss_scale", 0.0, "seer_distill_loss_scale"),
    ("seer_distill_target", "mean", "seer_distill_target"),
], ids=lambda v: str(v))
def test_bad_seer_values_raise_naming_the_field(field, value, match, tiny_kwargs):
    with pytest.raises(ValueError, match=match):
        SeerLlamaConfig(**tiny_kwargs, **{field: value})


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
