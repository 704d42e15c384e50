"""Gates-only checkpoints (modeling_seer/gates_only.py): a config naming its base model plus
the gate tensors; ``from_pretrained`` loads the base's weights, then the gates, and gives the
logits of the full model. Hub ids and GGUF bases: tests/hub_cards/test_export.py."""
import copy
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from seer_attn.modeling_seer import SeerLlamaConfig, SeerLlamaForCausalLM
from seer_attn.modeling_seer.conversion import from_stock, load_seer_model
from seer_attn.modeling_seer.remote_bundle import write_remote_code

SPARSE = dict(seer_gate_hidden_size=32, seer_mode="sparse", seer_sparsity_method="nz_ratio", seer_nz_ratio=0.3,
              seer_dense_last_rows=0)


def _stock(tiny_kwargs, seed=1, **over):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**tiny_kwargs, **over})).eval()


def _trained_gates(seer, seed=7):
    """Gates that differ from any fresh initialisation (as distilled gates would)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in seer.gate_state_dict().values():
            t.copy_(torch.randn(t.shape, generator=g) * 0.2)
    return seer


def write_gates_only(seer, folder, base, **base_fields):
    """A gates-only folder as ``seer-attn export --gates-only`` lays it out."""
    cfg = copy.deepcopy(seer.config)
    cfg.seer_base_model = str(base)
    for k, v in base_fields.items():
        setattr(cfg, f"seer_base_{k}", v)
    cfg.auto_map = {"AutoConfig": "configuration_seer_llama.SeerLlamaConfig",
                    "AutoModelForCausalLM": "modeling_seer_llama.SeerLlamaForCausalLM"}
    cfg.save_pretrained(folder)
    seer.save_gates(folder)
    write_remote_code(folder, "seer_llama")
    return folder


def _x(T=300):
    return torch.randint(0, 96, (1, T), generator=torch.Generator().manual_seed(3))


@torch.no_grad()
def _trained_seer(tiny_kwargs):
    """``(stock, seer, x, logits)``: a stock model, its conversion with trained gates, an input and the
    conversion's logits on it (what a folder written from them must give back)."""
    stock = _stock(tiny_kwargs)
    seer = _trained_gates(from_stock(stock, **SPARSE))
    x = _x()
    return stock, seer, x, seer(x).logits


@pytest.mark.parametrize("fields, bad", [
    (dict(seer_base_revision="abc"), "seer_base_revision"),
    (dict(seer_base_gguf_file="x.gguf"), "seer_base_gguf_file"),
    (dict(seer_base_model=""), "seer_base_model"),
    (dict(seer_base_model=5), "seer_base_model"),
    (dict(seer_base_model="org/name", seer_base_gguf_file="weights.bin"), "seer_base_gguf_file"),
    (dict(seer_base_model="org/name", seer_base_gguf_file="/abs/x.gguf"), "seer_base_gguf_file"),
], ids=["revision-without-base", "gguf-without-base", "empty-base", "int-base", "not-gguf", "absolute-gguf"])
def test_base_fields_are_validated(tiny_kwargs, fields, bad):
    with pytest.raises(ValueError, match=bad):
        SeerLlamaConfig(**tiny_kwargs, **fields)


def test_base_fields_round_trip(tiny_kwargs, tmp_path):
    cfg = SeerLlamaConfig(**tiny_kwargs, seer_base_model="org/name", seer_base_revision="a" * 40,
                          seer_base_gguf_file="m.Q4_1.gguf")
    cfg.save_pretrained(tmp_path)
    back = SeerLlamaConfig.from_pretrained(tmp_path)
    assert (back.seer_base_model, back.seer_base_revision, back.seer_base_gguf_file) == \
        ("org/name", "a" * 40, "m.Q4_1.gguf")


@pytest.mark.parametrize("base_kind", ["stock-folder", "seer-folder"])
def test_gates_only_folder_gives_the_full_model(tiny_kwargs, tmp_path, base_kind):
    stock, seer, x, ref = _trained_seer(tiny_kwargs)
    if base_kind == "stock-folder":
        stock.save_pretrained(tmp_path / "base")
    else:  # a Seer folder with other (fresh) gates: the gates-only folder's gates win
        from_stock(stock, **SPARSE).save_pretrained(tmp_path / "base")
    write_gates_only(seer, tmp_path / "gates", tmp_path / "base")
    model = SeerLlamaForCausalLM.from_pretrained(tmp_path / "gates").eval()
    with torch.no_grad():
        assert torch.equal(model(x).logits, ref)
    assert model.config.seer_base_model is None  # it holds its weights now
    assert model.seer_base_source == {"model": str(tmp_path / "base"), "revision": None, "gguf_file": None}
    loaded = load_seer_model(str(tmp_path / "gates"))  # conversion's entry point takes the same path
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, ref)


def test_saving_a_loaded_gates_only_model_writes_a_full_folder(tiny_kwargs, tmp_path):
    stock = _stock(tiny_kwargs)
    stock.save_pretrained(tmp_path / "base")
    seer = _trained_gates(from_stock(stock, **SPARSE))
    write_gates_only(seer, tmp_path / "gates", tmp_path / "base")
    SeerLlamaForCausalLM.from_pretrained(tmp_path / "gates").save_pretrained(tmp_path / "full")
    cfg = json.loads((tmp_path / "full" / "config.json").read_text())
    assert cfg.get("seer_base_model") is None and (tmp_path / "full" / "model.safetensors").is_file()
    x = _x()
    with torch.no_grad():
        assert torch.equal(SeerLlamaForCausalLM.from_pretrained(tmp_path / "full")(x).logits, seer(x).logits)


def test_seer_options_of_the_call_apply(tiny_kwargs, tmp_path):
    stock = _stock(tiny_kwargs)
    stock.save_pretrained(tmp_path / "base")
    write_gates_only(_trained_gates(from_stock(stock, **SPARSE)), tmp_path / "gates", tmp_path / "base")
    model = SeerLlamaForCausalLM.from_pretrained(tmp_path / "gates", seer_mode="dense").eval()
    assert model.config.seer_mode == "dense"
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, stock(x).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("problem, reason", [("missing-folder", "no such file or folder"),
                                             ("other-shape", "do not fit"), ("offline-hub-id", "offline mode")],
                         ids=["missing-folder", "other-shape", "offline-hub-id"])
def test_a_base_that_cannot_be_had_fails_in_one_line(tiny_kwargs, tmp_path, monkeypatch, problem, reason):
    seer = _trained_gates(from_stock(_stock(tiny_kwargs), **SPARSE))
    if problem == "missing-folder":
        base = tmp_path / "no-such-base"
    elif problem == "other-shape":
        base = tmp_path / "wide"
        _stock(tiny_kwargs, intermediate_size=256).save_pretrained(base)
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        base = "seer-attn-tests/never-cached"
    write_gates_only(seer, tmp_path / "gates", base)
    with pytest.raises(OSError) as err:
        SeerLlamaForCausalLM.from_pretrained(tmp_path / "gates")
    msg = str(err.value)
    assert "\n" not in msg and "gates-only" in msg and str(base) in msg and reason in msg, msg


@pytest.mark.parametrize("kind", ["full-folder", "gates-only"])
def test_decode_gates_added_to_a_saved_seer_model_keep_its_gates(tiny_kwargs, tmp_path, kind):
    """``load_seer_model(seer_folder, seer_decode_gate=True)`` (``seer-attn distill --decode-gate`` from a
    distilled model): decode gates are new modules beside the gates it has, which load unchanged, so the
    prefill path gives the same logits; the other structural options stay refused."""
    stock, seer, x, ref = _trained_seer(tiny_kwargs)
    if kind == "full-folder":
        seer.save_pretrained(tmp_path / "m")
    else:
        stock.save_pretrained(tmp_path / "base")
        write_gates_only(seer, tmp_path / "m", tmp_path / "base")
    grown = load_seer_model(str(tmp_path / "m"), seer_decode_gate=True).eval()
    assert grown.config.seer_decode_gate and not grown.config.seer_decode_sparsity
    decode = {k: v for k, v in grown.gate_state_dict().items() if ".decode_gate." in k}
    assert len(decode) == 2 * tiny_kwargs["num_hidden_layers"]
    # drawn as a conversion draws them (uniform within 1 / sqrt(fan-in), per head), not left uninitialised
    assert all(0 < v.abs().max() <= v.shape[1] ** -0.5 and v.std() > 0.2 * v.shape[1] ** -0.5 for v in decode.values())
    kept = {k: v for k, v in grown.gate_state_dict().items() if ".decode_gate." not in k}
    assert kept.keys() == seer.gate_state_dict().keys()
    assert all(torch.equal(v, seer.gate_state_dict()[k]) for k, v in kept.items())
    with torch.no_grad():
        assert torch.equal(grown(x).logits, ref)
    with pytest.raises(ValueError, match=r"seer_gate_hidden_size=16 cannot be changed on a built model"):
        load_seer_model(str(tmp_path / "m"), seer_decode_gate=True, seer_gate_hidden_size=16)
