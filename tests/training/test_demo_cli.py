"""The main job end to end at a tiny size, and the CLI wiring."""
import json
import os
import subprocess
import sys

import pytest

from seer_attn.training.cli import main


def test_cli_help_lists_every_command(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    for cmd in ("demo", "distill", "eval", "compare", "bench-kernels", "bench-ttft"):
        assert cmd in out


def test_console_script_is_installed():
    exe = os.path.join(os.path.dirname(sys.executable), "seer-attn")
    r = subprocess.run([exe, "distill", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--seq-len" in r.stdout and "--no-eval" in r.stdout


def test_demo_runs_end_to_end_tiny(tmp_path):
    out = tmp_path / "demo"
    res = main(["demo", "--cpu", "--steps", "2", "--seq-len", "256", "--eval-length", "256",
                "--thresholds", "0.05", "--output", str(out)])
    assert res == 0
    result = json.loads((out / "results.json").read_text())
    selectors = {r["selector"] for r in result["rows"]}
    assert {"dense", "gate", "streaming"} <= selectors
    for r in result["rows"]:
        assert r.get("error") or r["ppl"] > 1.0
    gate = next(r for r in result["rows"] if r["selector"] == "gate")
    assert 0.0 < gate["density"] <= 1.0
    assert (out / "results.md").read_text().count("|") > 10
    model_dir = result["model_dir"]
    assert os.path.isfile(os.path.join(model_dir, "seer_gates.safetensors"))
    assert os.path.isfile(os.path.join(model_dir, "block_sparse_attn.py"))  # remote-code bundle
    with open(os.path.join(model_dir, "config.json")) as f:
        assert json.load(f)["seer_mode"] == "sparse"


def test_demo_rejects_bad_sizes(tmp_path):
    with pytest.raises(ValueError, match="--steps"):
        main(["demo", "--cpu", "--steps", "-1", "--output", str(tmp_path)])
    with pytest.raises(ValueError, match="--thresholds"):
        main(["demo", "--cpu", "--thresholds", "2", "--output", str(tmp_path)])
