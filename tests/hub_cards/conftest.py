"""Fixtures of the hub_cards tests: a Hugging Face cache laid out as huggingface_hub lays it
out (so that Hub ids load offline), tiny models, and the committed results envelopes (also
rewritten in the layouts other than their own: the demo's current one, the pre-envelope one)."""
from types import SimpleNamespace
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
DEMO_GPU = ROOT / "results" / "demo" / "h200.json"
DEMO_CPU = ROOT / "results" / "demo" / "h200_cpu_profile.json"
SHIPPED_DISTILL = ROOT / "training" / "gates" / "smollm2-135m-instruct.distill.json"
SHIPPED_GATES = ROOT / "training" / "gates" / "smollm2-135m-instruct.seer_gates.safetensors"
QUALITY = ROOT / "results" / "quality" / "h100_sink_local_400steps.json"
KERNELS = ROOT / "results" / "kernels" / "h200.json"
SHIPPED_LABEL = "Seer gate, shipped"

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False)


def put_in_cache(cache, repo_id, files, commit):
    """Store ``files`` (``{name in repo: local path}``) as revision ``commit`` (also ``main``)
    of the model repo ``repo_id`` in the cache folder ``cache``, in huggingface_hub's layout:
    ``models--org--name/{blobs/<sha256>, refs/main, snapshots/<commit>/<name> -> blob}``.
    Large files are linked, not copied."""
    repo = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    for name, path in files.items():
        path = Path(path).resolve()
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        blob = repo / "blobs" / h.hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            blob.symlink_to(path)
        dest = snap / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.symlink_to(os.path.relpath(blob, dest.parent))
    return commit


def folder_files(folder):
    """``{relative path: path}`` of every file under ``folder``."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): p for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def hub_cache(tmp_path):
    """An empty Hugging Face cache: ``.path``, ``.put(repo_id, files, commit)`` (:func:`put_in_cache`)."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    return SimpleNamespace(path=cache, put=lambda repo_id, files, commit: put_in_cache(cache, repo_id, files, commit))


@pytest.fixture(scope="session")
def hubfs():
    """``.put(cache, repo_id, files, commit)`` (:func:`put_in_cache`), ``.files(folder)`` (:func:`folder_files`)."""
    return SimpleNamespace(put=put_in_cache, files=folder_files)


@pytest.fixture(scope="session")
def committed(tmp_path_factory):
    """Paths of the committed envelopes and gates the tests render from, and ``legacy_quality``:
    a results file of the format before envelopes (``meta`` instead of ``provenance``), as the
    quality runs wrote until 2026-11."""
    legacy = tmp_path_factory.mktemp("legacy") / "quality_keep_sink.json"
    env = json.loads(QUALITY.read_text())
    legacy.write_text(json.dumps({"meta": env["legacy_meta"], "rows": env["rows"], "cost": env["cost"],
                                  "passkey": env["passkey"]}))
    return SimpleNamespace(demo_gpu=DEMO_GPU, demo_cpu=DEMO_CPU, distill=SHIPPED_DISTILL, gates=SHIPPED_GATES,
                           legacy_quality=legacy, kernels=KERNELS, shipped_label=SHIPPED_LABEL)


@pytest.fixture(scope="session")
def current_demo(tmp_path_factory):
    """``{name: path}``: the committed demo envelopes in the layout ``seer-attn demo`` writes
    now (``config`` the DemoConfig its recorded command line gives, ``resolved`` the profile,
    keep rules, shipped gates and device); those written before the demo took a run config
    (profile and keep rules under ``config``; the CPU profile's) are converted, those already
    in it (the GPU demo since commit af41b99) are copied."""
    import argparse
    from dataclasses import asdict

    from seer_attn.eval.demo import DemoConfig, add_demo_args
    from seer_attn.training.run_config import config_from_args
    out = {}
    folder = tmp_path_factory.mktemp("current-demo")
    for path in (DEMO_GPU, DEMO_CPU):
        env = json.loads(path.read_text())
        out[path.name] = folder / path.name
        if "resolved" in env:
            out[path.name].write_text(json.dumps(env))
            continue
        old = env["config"]
        args = add_demo_args(argparse.ArgumentParser()).parse_args(env["provenance"]["command"][2:])
        env["config"] = json.loads(json.dumps(asdict(config_from_args(DemoConfig, args))))
        env["resolved"] = {k: old[k] for k in ("profile", "keep_rules", "shipped_gates", "device")}
        out[path.name].write_text(json.dumps(env))
    return out


@pytest.fixture(scope="session")
def tiny():
    """``tiny.stock(seed)``, ``tiny.seer(stock)`` (:func:`tiny_stock`, :func:`tiny_seer`), ``tiny.files(folder)``,
    ``tiny.tokenizer()`` (:func:`byte_tokenizer`)."""
    return SimpleNamespace(stock=tiny_stock, seer=tiny_seer, files=folder_files, config=dict(TINY),
                           tokenizer=byte_tokenizer)


@pytest.fixture
def quality_env():
    """Path of a committed ``quality`` envelope (sink + local block kept, passkey, training cost)."""
    return QUALITY


def byte_tokenizer():
    """A byte-level tokenizer: id 0 = ``<eos>``, ids 1..256 the bytes (no merges, no files needed)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {"<eos>": 0}
    for _, char in sorted(bytes_to_unicode().items()):
        vocab[char] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def tiny_stock(seed=1):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**TINY)).eval()


def tiny_seer(stock, seed=7):
    """``stock`` converted, with gates that differ from a fresh initialisation (as trained
    ones do) and bf16-exact values (so a gates-only export stores them in bfloat16)."""
    from seer_attn.modeling_seer.conversion import from_stock
    seer = from_stock(stock, seer_gate_hidden_size=32, seer_mode="sparse", seer_sparsity_method="nz_ratio",
                      seer_nz_ratio=0.3, seer_dense_last_rows=0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in seer.gate_state_dict().values():
            t.copy_((torch.randn(t.shape, generator=g) * 0.2).to(torch.bfloat16).float())
    return seer
