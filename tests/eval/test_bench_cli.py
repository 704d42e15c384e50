"""The GPU benchmarks (bench_kernels, bench_ttft) on a CPU: --help works, a run says in one
line that it needs a GPU (exit code 2), bad options are argparse errors, their run configs
refuse bad fields, and the JSON they write is a results envelope (written from fake rows)."""
import csv
import json
import os
import subprocess
import sys

import pytest

from seer_attn.eval import bench_kernels, bench_ttft

MODULES = {"bench_kernels": bench_kernels, "bench_ttft": bench_ttft}
CONFIGS = {"bench_kernels": bench_kernels.KernelBenchConfig, "bench_ttft": bench_ttft.TTFTBenchConfig}


@pytest.mark.parametrize("name", MODULES)
def test_help_on_a_cpu(name):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run([sys.executable, "-m", f"seer_attn.eval.{name}", "--help"], capture_output=True, text=True,
                       timeout=120, env=env)
    assert r.returncode == 0 and "--lengths" in r.stdout and "--out" in r.stdout, r.stderr


@pytest.mark.parametrize("name", MODULES)
def test_no_gpu_is_one_line_exit_2(name, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(SystemExit) as exc:
        MODULES[name].main(["--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].endswith("error: needs a CUDA GPU, and torch sees none"), captured.err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name, extra, message", [
    ("bench_kernels", ["--lengths", "0"], "argument --lengths: invalid value '0': expected an integer >= 1"),
    ("bench_kernels", ["--densities", "1.5"],
     "argument --densities: invalid value '1.5': expected a number 0 < x <= 1"),
    ("bench_kernels", ["--kv-heads", "5"], "--kv-heads=5 does not divide --heads=32"),
    ("bench_ttft", ["--nz-ratios", "0"], "argument --nz-ratios: invalid value '0': expected a number 0 < x <= 1"),
    ("bench_ttft", ["--reps", "0"], "argument --reps: invalid value '0': expected an integer >= 1"),
    ("bench_ttft", ["--lengths", "32"], "argument --lengths: invalid value '32': expected an integer >= 64"),
])
def test_bad_options(name, extra, message, capsys):
    with pytest.raises(SystemExit) as exc:
        MODULES[name].main(extra)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err.splitlines()[-1] and "Traceback" not in err


def _read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_kernels_json_is_an_envelope(tmp_path, check_envelope):
    config = bench_kernels.KernelBenchConfig(lengths=(8192,), heads=8, kv_heads=2, out=str(tmp_path))
    rows = [{"T": 8192, "sdpa_flash": 1.5, "ours_d0.1": 0.4}, {"T": 32768, "sdpa_flash": 20.0}]
    checks, tuning = [{"T": 8192, "dense_vs_sdpa": 1e-3}], [{"kernel": "fwd", "config": [64, 64, 4, 3], "ms": 1.0}]
    env = bench_kernels.write_results(config, rows, checks, tuning, {"('fwd', True, 128)": [64, 64, 4, 3]}, "cpu")
    saved = check_envelope(json.loads((tmp_path / "kernels.json").read_text()), "kernels")
    assert saved == json.loads(json.dumps(env))
    assert saved["rows"] == rows and saved["checks"] == checks and saved["tuning"] == tuning
    assert bench_kernels.KernelBenchConfig(**saved["config"]) == config
    assert saved["resolved"]["shape"] == {"HQ": 8, "H": 2, "D": 128, "dtype": "bf16", "B": 1}
    assert saved["resolved"]["configs"] == {"('fwd', True, 128)": [64, 64, 4, 3]}
    assert "8 query heads, 2 KV heads" in saved["provenance"]["model"]
    table = _read_csv(tmp_path / "kernels.csv")
    assert list(table[0]) == ["T", "ours_d0.1", "sdpa_flash"] and table[1]["ours_d0.1"] == ""


def test_ttft_json_is_an_envelope(tmp_path, check_envelope):
    config = bench_ttft.TTFTBenchConfig(lengths=(4096,), layers=2, out=str(tmp_path))
    rows = [{"T": 4096, "sdpa_flash": 0.5, "seer_nz0.3": 0.4, "seer_nz0.3_density": 0.31}]
    over = [{"T": 32768, "gate_mask_ms": 0.1, "dense_attn_ms": 2.0, "overhead_share": 0.05}]
    bench_ttft.write_results(config, rows, over, "cpu")
    saved = check_envelope(json.loads((tmp_path / "ttft.json").read_text()), "ttft")
    assert saved["rows"] == rows and saved["overhead"] == over
    assert saved["config"]["layers"] == 2 and saved["config"]["nz_ratios"] == [0.3, 0.1]
    assert "2 layers" in saved["provenance"]["model"] and saved["provenance"]["gpu"] == "cpu"
    assert _read_csv(tmp_path / "ttft.csv")[0]["seer_nz0.3"] == "0.4"


@pytest.mark.parametrize("name, fields, message", [
    ("bench_kernels", {"kv_heads": 5}, "kv_heads=5 does not divide heads=32"),
    ("bench_kernels", {"densities": (0.5, 0)}, r"densities\[1\]=0 is invalid: expected a number 0 < x <= 1"),
    ("bench_ttft", {"lengths": (32,)}, r"lengths\[0\]=32 is invalid: expected an integer >= 64"),
    ("bench_ttft", {"reps": 0}, "reps=0 is invalid: expected an integer >= 1"),
], ids=["kv-heads", "density", "length", "reps"])
def test_bench_configs_refuse_bad_fields(name, fields, message):
    with pytest.raises(ValueError, match=message):
        CONFIGS[name](**fields)


@pytest.mark.parametrize("name", MODULES)
def test_bench_command_line_defaults_are_the_configs(name):
    from seer_attn.training.run_config import config_from_args
    args = MODULES[name].parser().parse_args([])
    assert config_from_args(CONFIGS[name], args) == CONFIGS[name]()
