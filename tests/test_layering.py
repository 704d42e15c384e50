"""The data flows one way (docs/design.md §3): kernels -> modeling_seer -> training -> eval ->
hub_cards. No module imports a folder after its own, at module top or inside a function."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TIERS = ("kernels", "modeling_seer", "training", "eval", "hub_cards")


def _imported_tiers(path, tier):
    """(line, tier) of every seer_attn folder that ``path`` imports."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""] if not node.level else \
                [f"seer_attn.{tier}.{node.module or ''}" if node.level == 1 else f"seer_attn.{node.module or ''}"]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "seer_attn" and len(parts) > 1 and parts[1] in TIERS:
                out.append((node.lineno, parts[1]))
    return out


@pytest.mark.parametrize("tier", TIERS)
def test_no_module_imports_a_later_folder(tier):
    allowed = set(TIERS[:TIERS.index(tier) + 1])
    files = sorted((ROOT / tier).rglob("*.py"))
    assert files or tier == "hub_cards", f"no module found under {tier}/"
    bad = [f"{p.relative_to(ROOT)}:{line} imports seer_attn.{t}" for p in files
           for line, t in _imported_tiers(p, tier) if t not in allowed]
    assert not bad, bad


def test_the_check_sees_an_upward_import(tmp_path):
    mod = tmp_path / "m.py"
    mod.write_text("def f():\n    from seer_attn.eval.baselines import Setting\n    from ..eval import x\n")
    assert _imported_tiers(mod, "training") == [(2, "eval"), (3, "eval")]
