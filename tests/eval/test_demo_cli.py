"""The main job end to end at a tiny size, and the CLI wiring."""
import json
import os
import subprocess
import sys

import pytest

from seer_attn.eval.cli import main


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
    # 512 tokens: 8 blocks; the keep rules alone keep 21 of 36 causal blocks, streaming's top-4 26
    res = main(["demo", "--cpu", "--steps", "2", "--seq-len", "256", "--eval-length", "512",
                "--densities", "0.7", "--windows", "1", "--output", str(out)])
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
    # the folder to share: the GGUF's tokenizer, no pickle, no checkpoint inside
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(model_dir))
    assert not [n for n in os.listdir(model_dir) if n.endswith((".bin", ".pt", ".pth"))
                or os.path.isdir(os.path.join(model_dir, n))]
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    # the saved folder is set to the gate threshold the run measured as best, not the default 2e-3
    own = [r for r in result["rows"] if r.get("label") == "Seer gate, distilled now"]
    assert cfg["seer_mode"] == "sparse" and cfg["seer_threshold"] == result["best"]["seer_threshold"]
    assert cfg["seer_threshold"] in [r["param"] for r in own] and cfg["seer_keep_sink"] is True


@pytest.mark.parametrize("argv,match", [(["--steps", "-1"], "argument --steps: invalid value '-1'"),
                                        (["--densities", "2"], "argument --densities: invalid value '2'"),
                                        (["--windows", "0"], "argument --windows: invalid value '0'")],
                         ids=["steps", "densities", "windows"])
def test_demo_rejects_bad_sizes(tmp_path, capsys, argv, match):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--cpu", *argv, "--output", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def _row(selector, density, ppl, target=None, label=None):
    return {"selector": selector, "density": density, "ppl": ppl, "target_density": target, "label": label}


def test_summary_says_where_the_gate_is_behind():
    from seer_attn.eval.demo import summarize
    rows = [_row("dense", 1.0, 10.0), _row("streaming", 0.3, 11.0, 0.3), _row("streaming", 0.5, 10.5, 0.5),
            _row("gate", 0.29, 10.4, 0.3, "Seer gate, distilled now"), _row("gate", 0.5, 10.6, 0.5, "Seer gate, x")]
    text = summarize(rows)
    assert "at density 0.30: gate distilled now +4.0% (at 0.29), streaming +10.0%" in text
    assert text.endswith("The gate is NOT ahead of streaming for: Seer gate, x at 0.50.")
    rows[-1]["ppl"] = 10.4
    assert summarize(rows).endswith("The gate is ahead of streaming at every density.")


def test_densities_at_the_keep_rules_floor_are_refused(tmp_path, capsys):
    # 256 tokens: 4 blocks; sink + local + diagonal already keep 9 of 10, streaming cannot go below
    with pytest.raises(SystemExit) as exc:  # bad input: one line, exit 2
        main(["demo", "--cpu", "--steps", "1", "--seq-len", "256", "--eval-length", "256", "--densities", "0.5",
              "--windows", "1", "--no-shipped-gates", "--output", str(tmp_path)])
    out = capsys.readouterr()
    assert exc.value.code == 2 and "density 0.5: streaming's nearest top-k keeps only what the keep rules keep" in out.out
    assert "lies above the keep rules' floor (0.900) at 256 tokens" in out.err and "Traceback" not in out.err


def test_demo_config_sizes_over_the_profile():
    from seer_attn.eval.demo import PROFILES, DemoConfig, resolve_profile
    on_gpu, prof = resolve_profile(DemoConfig(cpu=True, steps=3, densities=[0.5]))
    assert not on_gpu and prof.steps == 3 and prof.densities == (0.5,)
    assert prof.seq_len == PROFILES["cpu"].seq_len and prof.windows == PROFILES["cpu"].windows


@pytest.mark.parametrize("fields, message", [
    ({"steps": 0}, "steps=0 is invalid: expected an integer >= 1"),
    ({"densities": (0.3, 2)}, r"densities\[1\]=2 is invalid: expected a number 0 < x <= 1"),
    ({"profile": "tpu"}, "profile='tpu' is invalid: expected one of"),
    ({"seed": -1}, "seed=-1 is invalid: expected an integer >= 0"),
], ids=["steps", "densities", "profile", "seed"])
def test_demo_config_refuses_bad_fields(fields, message):
    from seer_attn.eval.demo import DemoConfig
    with pytest.raises(ValueError, match=message):
        DemoConfig(**fields)
