"""The layer tier: thin family files, the family and selector registries (import direction: tests/test_layering.py)."""
import ast
import importlib
from pathlib import Path

import pytest
import torch

import seer_attn.modeling_seer as ms
from seer_attn.eval.baselines import SELECTOR_LABELS, Setting, apply_setting, measure_density
from seer_attn.modeling_seer.families import FAMILIES, family_for
from seer_attn.modeling_seer.remote_bundle import bundle_sources
from seer_attn.modeling_seer.selection import SELECTORS, Selector, causal_fill, register_selector

PKG = Path(ms.__file__).parent
#: code lines (no docstrings, comments or blank lines) a family's config + modeling pair may take
FAMILY_PAIR_MAX_LINES = 100


def _code_lines(path):
    text = path.read_text()
    doc = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and ast.get_docstring(node) is not None:
            d = node.body[0]
            doc.update(range(d.lineno, d.end_lineno + 1))
    return [l for i, l in enumerate(text.splitlines(), 1)
            if i not in doc and l.strip() and not l.strip().startswith("#")]


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_pair_stays_thin(name):
    fam = FAMILIES[name]
    n = sum(len(_code_lines(PKG / f"{m}.py")) for m in fam.bundle_modules)
    assert n <= FAMILY_PAIR_MAX_LINES, f"{fam.bundle_modules}: {n} code lines; Seer logic belongs in the layer tier"


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_rows_resolve(name):
    fam = FAMILIES[name]
    assert family_for(fam.stock_model_type) is family_for(fam.seer_model_type) is fam
    assert fam.seer_config_class.model_type == fam.seer_model_type
    assert fam.stock_config_class.model_type == fam.stock_model_type
    assert issubclass(fam.seer_model_class, fam.stock_model_class)
    assert fam.seer_model_class.config_class is fam.seer_config_class
    assert hasattr(importlib.import_module(f"seer_attn.modeling_seer.{fam.modeling_module}"), fam.decoder_layer)
    # FSDP wraps what _no_split_modules names (training/accelerate/fsdp2.yaml names no class)
    assert fam.seer_model_class._no_split_modules == [fam.decoder_layer]
    files = bundle_sources(fam.seer_model_type)
    assert {f"{m}.py" for m in fam.bundle_modules} | {"seer_layer.py", "selection.py", "families.py"} <= set(files)
    with pytest.raises(ValueError, match="'gpt2' has no Seer family"):
        family_for("gpt2")


def _toy_scores(x):
    """Recency only (no sink): the local-only baseline."""
    i = torch.arange(x.num_blocks, device=x.q.device)
    return causal_fill((i[None, :] - i[:, None]).float().expand(x.q.shape[0], x.q.shape[1], -1, -1))


def test_a_toy_selector_is_one_registry_entry(tiny, monkeypatch):
    calls = []

    def scores(x):
        calls.append(x.q.shape)
        return _toy_scores(x)

    monkeypatch.setitem(SELECTORS, "toy", Selector("toy", scores, "local blocks only", content_free=True))
    with pytest.raises(ValueError, match="already registered"):
        register_selector(Selector("toy", scores, "again"))
    # config validation, the model's sparse path and eval read the same entry
    m = tiny(seer_mode="sparse", seer_selector="toy", seer_sparsity_method="nz_ratio", seer_nz_ratio=0.3,
             seer_dense_last_rows=0, seer_keep_diagonal=False)
    ctx = ms.SeerForwardContext(masks=[])
    with torch.no_grad():
        m(torch.randint(0, 96, (1, 320)), seer_ctx=ctx)
    assert len(calls) == m.config.num_hidden_layers and calls[0] == (1, 4, 320, 16)
    # top-1 of 5 blocks per row by recency: the diagonal only
    assert all(torch.equal(mask[0, 0], torch.eye(5, dtype=torch.bool)) for mask in ctx.masks), ctx.masks[0][0, 0]
    setting = Setting("toy", "nz_ratio", param=0.3)
    assert str(setting) == "toy:nz_ratio=0.3" and Setting.parse("toy:nz_ratio@0.5").selector == "toy"
    apply_setting(m, Setting("toy", "nz_ratio", param=0.5))
    assert m.config.seer_selector == "toy" and SELECTOR_LABELS["toy"] == "local blocks only"
    windows = [type("W", (), {"input_ids": torch.randint(0, 96, (320,))})()]
    calls.clear()
    d = measure_density(m, windows)
    assert len(calls) == 1  # content-free: scored once on placeholders, no forward
    with torch.no_grad():
        m(windows[0].input_ids[None])
    assert d == pytest.approx(m.seer_density().float().mean().item())
    monkeypatch.delitem(SELECTORS, "toy")
    with pytest.raises(ValueError, match="seer_selector='toy' is invalid"):
        m.set_seer_mode("sparse", seer_selector="toy")
    with pytest.raises(ValueError, match="selector='toy' is invalid"):
        Setting("toy", "nz_ratio", param=0.3)


def test_builtin_selectors_flags():
    assert [n for n, s in SELECTORS.items() if s.trained] == ["gate"]
    assert {n for n, s in SELECTORS.items() if s.exact_pass} == {"oracle_max", "oracle_mass"}
    with pytest.raises(ValueError, match="baseline_methods \\['topp'\\]"):
        register_selector(Selector("bad", _toy_scores, "bad", baseline_methods=("topp",)))
    assert "bad" not in SELECTORS
