"""The ``seer-attn`` command line: forwarded commands get every option, bad input ends as one
line with exit code 2 (real bugs keep their traceback), ``--help`` imports nothing heavy, and
the closing evaluation of ``distill`` reads the user's data."""
import importlib
import os
import subprocess
import sys

import pytest

from seer_attn.eval import cli

EXE = os.path.join(os.path.dirname(sys.executable), "seer-attn")


@pytest.mark.parametrize("command, option", [("compare", "--max-length"), ("bench-kernels", "--lengths"),
                                             ("bench-ttft", "--nz-ratios")])
def test_forwarded_commands_get_every_option(command, option, capsys, monkeypatch):
    """They rejected every option, --help included (an argparse.REMAINDER took no leading option)."""
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and option in out  # the module's own help
    assert out.startswith(f"usage: seer-attn {command} ")  # named as the command, not as bare seer-attn
    module = importlib.import_module(cli.COMMANDS[command][1])
    seen = []
    monkeypatch.setattr(module, "main", seen.append)
    assert cli.main([command, "--model", "m", option, "7", "--out", "x"]) == 0
    assert seen == [["--model", "m", option, "7", "--out", "x"]]


BAD_OPTIONS = [("--steps", "-3"), ("--lr", "0"), ("--seq-len", "0"), ("--seq-len", "128"), ("--threshold", "1.5"),
               ("--warmup-steps", "-1"), ("--batch-size", "0"), ("--grad-accum", "0"), ("--logging-steps", "0"),
               ("--save-steps", "0"), ("--eval-length", "0"), ("--eval-windows", "0"), ("--eval-densities", "1.5"),
               ("--seed", "-1"), ("--lr", "nan")]


@pytest.mark.parametrize("option, value", BAD_OPTIONS)
def test_bad_option_value_is_one_line_and_exit_2(option, value, capsys):
    """They were tracebacks with exit code 1 (--eval-length 0 was silently the default)."""
    with pytest.raises(SystemExit) as exit_:
        cli.main(["distill", option, value])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"seer-attn distill: error: argument {option}: invalid value '{value}'")


def test_seq_len_too_short_to_distil_says_why(capsys):
    with pytest.raises(SystemExit):
        cli.main(["distill", "--seq-len", "192"])
    assert "expected an integer >= 256 (with fewer than 4 blocks of 64 tokens a sparse prefill keeps every block" \
        in capsys.readouterr().err


def test_console_script_bad_input_exit_2_without_traceback(tmp_path):
    r = subprocess.run([EXE, "distill", "--steps", "-3"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    missing = tmp_path / "missing.jsonl"
    r = subprocess.run([EXE, "distill", "--data", str(missing), "--output", str(tmp_path / "out"), "--cpu"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1] == f"seer-attn distill: error: data file not found: '{missing}'"


def test_only_input_errors_become_usage_lines(capsys):
    def bug(_):
        raise ValueError("a bug")

    def bad_input(_):
        with cli.user_input():
            raise FileNotFoundError("no such file: x")

    with pytest.raises(ValueError, match="a bug"):  # a real bug keeps its traceback
        cli._run("seer-attn x", bug, None)
    with pytest.raises(SystemExit) as exit_:
        cli._run("seer-attn x", bad_input, None)
    assert exit_.value.code == 2 and capsys.readouterr().err == "seer-attn x: error: no such file: x\n"


@pytest.mark.parametrize("argv", [["--help"], ["distill", "--help"], []], ids=["help", "distill-help", "bare"])
def test_help_imports_nothing_heavy(argv):
    """``seer-attn --help`` took 5-7 s: it imported torch, transformers and lm-eval."""
    code = (f"import sys\nfrom seer_attn.eval.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n"
            "    pass\nheavy = ('torch', 'transformers', 'datasets', 'lm_eval')\n"
            "print('HEAVY', [m for m in heavy if m in sys.modules])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "HEAVY []" in r.stdout, r.stdout + r.stderr


def test_closing_evaluation_reads_the_users_data(tmp_path, monkeypatch, capsys):
    """It evaluated on the bundled corpus whatever --data said."""
    from seer_attn.eval import demo
    from seer_attn.training import distill
    calls = []
    monkeypatch.setattr(distill, "run_distill", lambda args: {"model_dir": "M", "gates_path": "G"})
    monkeypatch.setattr(demo, "evaluate_gates", lambda *a, **kw: calls.append((a, kw)) or
                        {"table": "TABLE", "conclusion": "", "plot": None})
    mine = str(tmp_path / "mine.jsonl")
    out = ["--cpu", "--output", str(tmp_path / "out")]
    assert cli.main(["distill", "--data", mine, *out]) == 0
    assert calls[-1][1]["corpus"] == mine and "not held out" in capsys.readouterr().out
    assert cli.main(["distill", *out, "--eval-length", "512", "--eval-windows", "3", "--eval-densities", "0.3"]) == 0
    args, kwargs = calls[-1]
    assert kwargs["corpus"] is None and args[2:5] == (512, 3, (0.3,))  # no --data: the bundled held-out corpus
    # data the evaluation cannot read: no evaluation on the bundled corpus, and it says so
    assert cli.main(["distill", "--data", str(tmp_path / "mine.txt"), *out]) == 0
    assert len(calls) == 2 and "no closing evaluation" in capsys.readouterr().out
    assert cli.main(["distill", "--data", mine, "--no-eval", *out]) == 0 and len(calls) == 2


def test_distill_with_decode_gates_says_how_to_measure_them(tmp_path, monkeypatch, capsys):
    """--decode-gate: the saved model still decodes densely; the command names the one that measures it."""
    from seer_attn.training import distill
    seen = []
    monkeypatch.setattr(distill, "run_distill", lambda config: seen.append(config) or
                        {"model_dir": "M", "gates_path": "M/g.safetensors", "model": "src", "decode_gate": True})
    assert cli.main(["distill", "--decode-gate", "--no-eval", "--output", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert seen[-1].decode_gate and seen[-1].decode_rows is None
    assert "seer-attn decode-quality --model src --gates M/g.safetensors" in out and "decodes densely" in out
    monkeypatch.setattr(distill, "run_distill", lambda config: {"model_dir": "M", "gates_path": "G"})
    assert cli.main(["distill", "--no-eval", "--output", str(tmp_path / "out")]) == 0
    assert "decode-quality" not in capsys.readouterr().out  # no decode gates: no hint
    with pytest.raises(SystemExit) as exc:
        cli.main(["distill", "--decode-rows", "32", "--output", str(tmp_path / "out")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("seer-attn distill: error: --decode-rows sets what the decode gates learn from") \
        and "add --decode-gate" in err


def test_distill_calibrate_density_calibrates_the_trained_folder(tmp_path, monkeypatch):
    """--calibrate-density: after training, the trained folder is calibrated at --seq-len on the
    user's jsonl (else the bundled training corpus), into OUTPUT; the result names the envelope
    for --push-to-hub."""
    from seer_attn.eval import calibrate_run
    from seer_attn.training import distill
    calls = []
    monkeypatch.setattr(distill, "run_distill", lambda args: {"model_dir": "M", "gates_path": "G"})
    monkeypatch.setattr(calibrate_run, "run_calibrate", lambda config: calls.append(config) or {})
    out = str(tmp_path / "out")
    mine = str(tmp_path / "mine.jsonl")
    res = cli._run_distill(cli_args(["distill", "--data", mine, "--cpu", "--seq-len", "512", "--output", out,
                                     "--no-eval", "--calibrate-density", "0.2"]))
    (c,) = calls
    assert (c.density, c.method, c.model, c.data, c.max_length, c.out, c.device) == (0.2, "gain", "M", mine, 512,
                                                                                 out, "cpu")
    assert res["calibration_path"] == os.path.join(out, "calibration.json")
    cli._run_distill(cli_args(["distill", "--data", str(tmp_path / "mine.txt"), "--output", out, "--no-eval",
                               "--calibrate-density", "0.1", "--calibrate-method", "threshold"]))
    assert calls[-1].data is None and calls[-1].method == "threshold"  # unreadable by the calibration: bundled
    res = cli._run_distill(cli_args(["distill", "--output", out, "--no-eval"]))
    assert "calibration_path" not in res and len(calls) == 2


def cli_args(argv):
    """The parsed options of one ``seer-attn`` command line."""
    import argparse
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    cli.COMMANDS[argv[0]][1](sub.add_parser(argv[0]))
    return parser.parse_args(argv)


def _configs():
    import argparse

    from seer_attn.eval import baselines, demo, harness, quality_run
    from seer_attn.training import distill

    def sub(add):
        return lambda: add(argparse.ArgumentParser())
    return {"distill": (distill.DistillConfig, sub(distill.add_distill_args), [], {}),
            "demo": (demo.DemoConfig, sub(demo.add_demo_args), [], {}),
            "eval": (harness.EvalConfig, sub(harness.add_eval_args), ["--max-length", "8"], {"max_length": 8}),
            "compare": (baselines.CompareConfig, baselines.compare_parser, [], {}),
            "quality_run": (quality_run.QualityRunConfig, quality_run.quality_parser, [], {})}


@pytest.mark.parametrize("command", ["distill", "demo", "eval", "compare", "quality_run"])
def test_every_config_field_is_an_option_with_the_configs_default(command):
    """Defaults and checks live once, in the run config; the command line only builds it."""
    import dataclasses

    from seer_attn.training.run_config import config_from_args
    cls, make_parser, argv, required = _configs()[command]
    args = make_parser().parse_args(argv)
    assert {f.name for f in dataclasses.fields(cls)} <= set(vars(args))  # every field can be set from the CLI
    assert config_from_args(cls, args) == cls(**required)


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("command", ["distill", "demo", "eval", "compare", "quality_run", "bench_kernels",
                                     "bench_ttft"])
def test_default_outputs_go_to_the_ignored_folder(command):
    """Results written without an output option land in seer_outputs/, which git ignores."""
    from seer_attn.eval import bench_kernels, bench_ttft
    if command.startswith("bench"):
        out = {"bench_kernels": bench_kernels, "bench_ttft": bench_ttft}[command].parser().parse_args([]).out
    else:
        cls, _, _, required = _configs()[command]
        config = cls(**required)
        out = getattr(config, "output", None) or config.out
    with open(os.path.join(REPO, ".gitignore")) as f:
        ignored = f.read().split()
    assert out.startswith("seer_outputs/") and "seer_outputs/" in ignored
