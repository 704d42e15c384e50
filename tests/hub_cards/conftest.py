"""Fixtures of the hub_cards tests: a Hugging Face cache laid out as huggingface_hub lays it
out (so that Hub ids load offline), tiny models, and the committed results envelopes."""
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
LEGACY_QUALITY = ROOT / "results" / "quality_h100" / "quality_keep_sink.json"
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
def committed():
    """Paths of the committed envelopes and gates the tests render from."""
    return SimpleNamespace(demo_gpu=DEMO_GPU, demo_cpu=DEMO_CPU, distill=SHIPPED_DISTILL, gates=SHIPPED_GATES,
                           legacy_quality=LEGACY_QUALITY, shipped_label=SHIPPED_LABEL)


@pytest.fixture(scope="session")
def tiny():
    """``tiny.stock(seed)``, ``tiny.seer(stock)`` (:func:`tiny_stock`, :func:`tiny_seer`), ``tiny.files(folder)``."""
    return SimpleNamespace(stock=tiny_stock, seer=tiny_seer, files=folder_files, config=dict(TINY))


@pytest.fixture
def quality_env(tmp_path):
    """Path of a ``quality`` envelope built by :func:`quality_envelope`."""
    return quality_envelope(tmp_path / "quality.json")


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


def quality_envelope(path):
    """A results envelope of kind ``quality`` (what ``seer_attn.eval.quality_run`` writes
    now) holding the rows, passkey results and cost of a committed quality run of the older
    format (``meta`` instead of ``provenance``): real measurements in today's layout."""
    from seer_attn.training.results import envelope, write_json
    legacy = json.loads(LEGACY_QUALITY.read_text())
    env = envelope("quality", legacy["rows"], config=legacy["meta"]["args"], model=legacy["meta"]["args"]["model"],
                   cost=legacy["cost"], passkey=legacy["passkey"])
    env["provenance"].update(gpu=legacy["meta"]["gpu"], commit=None, commit_dirty=None)
    write_json(path, env)
    return path
