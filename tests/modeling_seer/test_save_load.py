"""Saving: full folders, gates only, and the flat trust_remote_code bundle."""
import json
import re
import os
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import seer_attn.kernels as kernels_pkg
from seer_attn.hub_cards.push import run_without_package
from seer_attn.modeling_seer import SeerLlamaConfig, SeerLlamaForCausalLM
from seer_attn.modeling_seer.remote_bundle import bundle_sources, flatten_source

SPARSE = dict(seer_mode="sparse", seer_sparsity_method="nz_ratio", seer_nz_ratio=0.4, seer_dense_last_rows=0)


def _x(T=400):
    return torch.randint(0, 96, (1, T), generator=torch.Generator().manual_seed(7))


@torch.no_grad()
def test_save_pretrained_round_trip(tiny, tmp_path):
    m = tiny(seed=3, **SPARSE)
    ref = m(_x()).logits
    m.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "seer_llama" and cfg["seer_mode"] == "sparse"
    assert cfg["auto_map"] == {"AutoConfig": "configuration_seer_llama.SeerLlamaConfig",
                               "AutoModelForCausalLM": "modeling_seer_llama.SeerLlamaForCausalLM"}
    m2 = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(m2, SeerLlamaForCausalLM)
    assert torch.equal(m2(_x()).logits, ref)


@torch.no_grad()
def test_gates_only_round_trip_and_mismatch(tiny, tmp_path):
    trained = tiny(seed=3, **SPARSE)
    path = trained.save_gates(tmp_path / "g")
    assert os.path.getsize(path) < 200_000  # gates only, not the model
    fresh = tiny(seed=3, **SPARSE)  # same base weights (same seed) ...
    for layer in fresh.model.layers:  # ... but other gates
        torch.nn.init.normal_(layer.self_attn.attn_gate.q_weight)
    assert not torch.equal(fresh(_x()).logits, trained(_x()).logits)
    fresh.load_gates(tmp_path / "g")
    assert torch.equal(fresh(_x()).logits, trained(_x()).logits)


def test_gates_of_another_model_are_refused(tiny, tiny_kwargs, tmp_path):
    tiny(seed=0).save_gates(tmp_path)
    other = SeerLlamaForCausalLM(SeerLlamaConfig(**{**tiny_kwargs, "num_hidden_layers": 3},
                                                 seer_gate_hidden_size=32))
    with pytest.raises(ValueError, match="num_hidden_layers: gates 2 vs model 3"):
        other.load_gates(tmp_path)
    with pytest.raises(FileNotFoundError):
        other.load_gates(tmp_path / "nowhere.safetensors")


def test_bundle_is_generated_from_the_kernel_sources():
    files = bundle_sources("seer_llama")
    kdir = Path(kernels_pkg.__file__).parent
    expected = {"configuration_seer_llama.py", "modeling_seer_llama.py", "gate.py", "remote_bundle.py",
                "block_sparse_attn.py", "block_mask.py", "kernel_utils.py", "reference.py"}
    assert expected <= set(files)
    for name in ("block_sparse_attn.py", "block_mask.py", "kernel_utils.py", "reference.py"):
        assert files[name] == flatten_source((kdir / name).read_text())
    for name, text in files.items():
        assert "seer_attn." not in "".join(l for l in text.splitlines() if l.lstrip().startswith(("from", "import"))), name


#: the scripts' first lines: seer_attn and triton cannot be imported in them
NO_PACKAGES = textwrap.dedent("""
    import importlib.abc, sys, torch
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("seer_attn", "triton"):
                raise ImportError("not installed here: " + name)
    sys.meta_path.insert(0, Block())
""")
FRESH = NO_PACKAGES + textwrap.dedent("""
    for mod in ("seer_attn.kernels", "triton"):
        try:
            __import__(mod)
            raise SystemExit(mod + " importable: the test would prove nothing")
        except ImportError:
            pass
    from transformers import AutoModelForCausalLM
    folder, ref_path = sys.argv[1], sys.argv[2]
    m = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    x, ref = torch.load(ref_path)
    assert type(m).__module__.startswith("transformers_modules"), type(m).__module__
    with torch.no_grad():
        out = m(x).logits
    print("MAXDIFF", (out - ref).abs().max().item(), "DENSITY", m.seer_density().mean().item())
    # fine-tuning through remote code: the kernels' backward is there too
    m.set_seer_mode("distill").train()
    m(x).gate_loss.backward()
    print("GATEGRAD", sum(p.grad.abs().sum().item() for n, p in m.named_parameters() if p.grad is not None))
""")


def test_fresh_environment_trust_remote_code(tiny, tmp_path):
    m = tiny(seed=5, **SPARSE)
    x = _x()
    with torch.no_grad():
        ref = m(x).logits
    m.save_pretrained(tmp_path / "model")
    torch.save((x, ref), tmp_path / "ref.pt")
    r = run_without_package(FRESH, [tmp_path / "model", tmp_path / "ref.pt"], tmp_path, 300, HF_HUB_OFFLINE="1",
                            HF_MODULES_CACHE=str(tmp_path / "modules"))
    assert r.returncode == 0, r.stdout + r.stderr
    line = next(l for l in r.stdout.splitlines() if l.startswith("MAXDIFF"))
    assert float(line.split()[1]) == 0.0 and float(line.split()[3]) < 0.9
    grad_line = next(l for l in r.stdout.splitlines() if l.startswith("GATEGRAD"))
    assert float(grad_line.split()[1]) > 0


def test_gates_saved_in_bfloat16(tiny, tmp_path):
    from safetensors import safe_open
    trained = tiny(seed=0)
    path = trained.save_gates(tmp_path / "g.safetensors", dtype=torch.bfloat16)
    with safe_open(path, framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    fresh = tiny(seed=1).load_gates(path)
    for k, v in trained.gate_state_dict().items():
        got = fresh.gate_state_dict()[k]
        assert got.dtype == v.dtype and torch.equal(got, v.to(torch.bfloat16).to(v.dtype))
    with pytest.raises(TypeError, match="dtype=torch.int8 is invalid"):
        trained.save_gates(tmp_path / "bad.safetensors", dtype=torch.int8)


@pytest.mark.parametrize("bad", ["nan", "inf", "int32"])
def test_load_gates_refuses_non_finite_or_integer_tensors(tiny, tmp_path, bad):
    """NaN/inf or integer gate tensors were loaded silently (NaN scores, or a cast of int weights)."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    path = tiny(seed=0).save_gates(tmp_path / "g.safetensors")
    with safe_open(path, framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    name = sorted(tensors)[1]
    t = tensors[name]
    if bad == "int32":
        tensors[name] = t.to(torch.int32)
    else:
        t.view(-1)[3] = float(bad)
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=meta)
    fresh = tiny(seed=1)
    before = {k: v.clone() for k, v in fresh.gate_state_dict().items()}
    match = rf"gate tensor {re.escape(name)} " + ("has dtype torch.int32, expected a floating dtype"
                                                   if bad == "int32" else r"holds 1 NaN/inf values")
    with pytest.raises(ValueError, match=match):
        fresh.load_gates(tmp_path / "bad.safetensors")
    assert all(torch.equal(v, before[k]) for k, v in fresh.gate_state_dict().items())  # nothing half-loaded


FRESH_DECODE = NO_PACKAGES + textwrap.dedent("""
    from transformers import AutoModelForCausalLM
    folder, ref_path = sys.argv[1], sys.argv[2]
    m = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    x, ref = torch.load(ref_path)
    assert m.config.seer_decode_key_format == "f8" and m.config.seer_decode_sparsity
    out = m.generate(x, max_new_tokens=80, do_sample=False, pad_token_id=0)
    print("SAME", bool(torch.equal(out, ref)), "DENSITY", m.seer_decode_density().max().item())
""")


@torch.no_grad()
def test_fresh_environment_sparse_decode_with_8bit_keys(tiny, tmp_path):
    """A saved model with decode sparsity on float8 gate keys (``seer_decode_key_format``) loads through
    the flat remote-code bundle where neither seer_attn nor triton is importable and generates the
    tokens it generates here, reading a share of the KV blocks (its pooled-K cache's 8-bit keys come
    from the bundle's copy of the kernels' rounding)."""
    m = tiny(seed=3, seer_decode_gate=True, seer_decode_sparsity=True, seer_decode_budget=2 * 64,
             seer_decode_key_format="f8")
    x = _x(300)
    ref = m.generate(x, max_new_tokens=80, do_sample=False, pad_token_id=0)
    assert m.seer_decode_density().max() < 0.8
    m.save_pretrained(tmp_path / "model")
    torch.save((x, ref), tmp_path / "ref.pt")
    r = run_without_package(FRESH_DECODE, [tmp_path / "model", tmp_path / "ref.pt"], tmp_path, 300,
                            HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    assert r.returncode == 0, r.stdout + r.stderr
    line = next(l for l in r.stdout.splitlines() if l.startswith("SAME"))
    assert line.split()[1] == "True" and float(line.split()[3]) < 0.8, line
