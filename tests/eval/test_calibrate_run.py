"""``seer-attn calibrate`` (eval/calibrate_run.py): the solved setting keeps what the envelope
says on the sample, the held-out perplexity rows, the gates' fingerprint, and bad input as
one line."""
import json
import subprocess
import sys

import pytest
import torch

from seer_attn.eval.calibrate_run import (DEFAULT_MEANPOOL_PRIOR, CalibrateConfig, gates_sha256, gates_to_load,
                                         run_calibrate)
from seer_attn.eval.calibration import measure_density, pick_calibration_windows
from seer_attn.eval.perplexity import load_documents, make_windows
from seer_attn.modeling_seer.conversion import load_seer_model


@pytest.fixture(scope="module")
def calibrated(model_dir, corpus_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("calibrate")
    config = CalibrateConfig(density=0.6, model=str(model_dir), data=corpus_path, max_length=1024, windows=2,
                             keep_sink=True, dense_last_rows=0, eval_data=corpus_path, eval_windows=2, out=str(out),
                             no_progress=True)
    return config, run_calibrate(config), out


def test_the_setting_keeps_the_density_the_envelope_reports(calibrated, tokenizer, capsys):
    config, env, out = calibrated
    assert json.loads((out / "calibration.json").read_text())["settings"] == env["settings"]
    assert env["kind"] == "calibration" and env["complete"]
    assert env["method"] == "gain" and env["settings"]["seer_sparsity_method"] == "gain"  # the default rule
    assert env["settings"]["seer_gain"] == env["param"] and 0 < env["param"] < 1
    # the model sets no share: the default prior, recorded with the parameter solved on it
    assert env["settings"]["seer_meanpool_prior"] == DEFAULT_MEANPOOL_PRIOR == 0.5
    assert env["within_tol"] == (abs(env["density"] / 0.6 - 1) <= 0.02)
    assert abs(env["density"] - 0.6) <= 0.05
    assert [r["pass"] for r in env["rows"]] == list(range(1, len(env["rows"]) + 1))
    # the same windows, the shipped setting and keep rules: the model keeps what the envelope says
    model = load_seer_model(config.model)
    wins = pick_calibration_windows(make_windows(load_documents(config.data), tokenizer, 1024, 1), 2)
    settings = dict(env["settings"])
    model.set_seer_mode(settings.pop("seer_mode"), **settings, **env["keep"])
    assert measure_density(model, wins) == pytest.approx(env["density"], rel=1e-4)


def test_a_calibration_of_the_gate_alone_ships_no_prior(model_dir, corpus_path, tokenizer, tmp_path):
    """--meanpool-prior 0: the parameter is solved on the gate's scores alone, the settings say
    so, and with them the model keeps the density the envelope reports."""
    config = CalibrateConfig(density=0.6, model=str(model_dir), data=corpus_path, max_length=1024, windows=2,
                             method="threshold", keep_sink=True, dense_last_rows=0, meanpool_prior=0.0,
                             out=str(tmp_path), no_progress=True)
    env = run_calibrate(config)
    assert env["settings"]["seer_meanpool_prior"] == 0.0
    model = load_seer_model(config.model)
    wins = pick_calibration_windows(make_windows(load_documents(config.data), tokenizer, 1024, 1), 2)
    settings = dict(env["settings"])
    model.set_seer_mode(settings.pop("seer_mode"), **settings, **env["keep"])
    assert measure_density(model, wins) == pytest.approx(env["density"], rel=1e-4)
    assert env["gates_sha256"] == gates_sha256(model)
    assert env["sample"] == {"data": config.data, "windows": 2, "max_length": 1024}
    # the keep rules given override the model's (sink off, 2 dense last rows) and are recorded
    assert env["keep"] == dict(seer_keep_diagonal=True, seer_keep_sink=True, seer_keep_local=0, seer_dense_last_rows=0,
                               seer_dense_layers=0)


def test_the_default_prior_needs_the_sink_kept(model_dir, corpus_path, tmp_path):
    """Without --meanpool-prior and with the sink block left to the scores, the gate alone."""
    config = CalibrateConfig(density=0.6, model=str(model_dir), data=corpus_path, max_length=1024, windows=2,
                             keep_sink=False, max_forwards=1, out=str(tmp_path), no_progress=True)
    env = run_calibrate(config)
    assert env["settings"]["seer_meanpool_prior"] == 0.0 and env["keep"]["seer_keep_sink"] is False


def test_the_models_own_prior_share_wins_over_the_default(model_dir, corpus_path, tmp_path):
    """A model whose config sets a share (gates distilled through the prior) is calibrated with it."""
    import shutil
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "seer_meanpool_prior": 0.3}))
    config = CalibrateConfig(density=0.6, model=str(folder), data=corpus_path, max_length=1024, windows=2,
                             max_forwards=1, out=str(tmp_path / "out"), no_progress=True)
    assert run_calibrate(config)["settings"]["seer_meanpool_prior"] == 0.3


def test_held_out_rows_and_the_summary(calibrated):
    _, env, _ = calibrated
    dense, mine, knob = env["ppl"]
    assert dense["selector"] == "dense" and mine["method"] == "gain" and knob["method"] == "density"
    assert mine["param"] == pytest.approx(env["param"])
    assert knob["matched_to"] == mine["setting"] and knob["ppl_ratio"] == pytest.approx(knob["ppl"] / mine["ppl"])
    assert abs(knob["density"] - mine["density"]) <= 0.02  # the knob at the calibrated setting's density
    from seer_attn.eval.calibrate_run import summary
    text = summary(env)
    assert f"gain {env['param']:.6g} keeps {env['density']:.4f}" in text
    assert "seer_sparsity_method='gain'" in text and "--results" in text


def test_the_coverage_rule_calibrates_and_keeps_what_it_reports(model_dir, corpus_path, tokenizer, tmp_path):
    config = CalibrateConfig(density=0.6, model=str(model_dir), method="coverage", data=corpus_path, max_length=1024,
                             windows=2, keep_sink=True, dense_last_rows=0, out=str(tmp_path), no_progress=True)
    env = run_calibrate(config)
    assert env["settings"]["seer_sparsity_method"] == "coverage" and env["settings"]["seer_coverage"] == env["param"]
    assert 0 < env["param"] < 1 and abs(env["density"] - 0.6) <= 0.05
    model = load_seer_model(config.model)
    wins = pick_calibration_windows(make_windows(load_documents(config.data), tokenizer, 1024, 1), 2)
    settings = dict(env["settings"])
    model.set_seer_mode(settings.pop("seer_mode"), **settings, **env["keep"])
    assert measure_density(model, wins) == pytest.approx(env["density"], rel=1e-4)


def test_the_fingerprint_ignores_bf16_rounding_and_sees_a_change(model_dir):
    model = load_seer_model(str(model_dir))
    ref = gates_sha256(model)
    with torch.no_grad():
        for t in model.gate_state_dict().values():
            t.copy_(t.to(torch.bfloat16).float())
    assert gates_sha256(model) == ref  # a bf16 copy of float32 gates
    with torch.no_grad():
        next(iter(model.gate_state_dict().values())).mul_(1.5)
    assert gates_sha256(model) != ref


def test_gates_to_load(model_dir, tmp_path):
    assert gates_to_load(str(model_dir), None) is None  # a Seer folder carries its own
    assert gates_to_load("x.gguf", "g.safetensors") == "g.safetensors"
    with pytest.raises(ValueError, match=r"--model .*x\.gguf has no trained gates"):
        gates_to_load(str(tmp_path / "x.gguf"), None)
    from transformers import LlamaConfig
    LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2).save_pretrained(tmp_path / "stock")
    with pytest.raises(ValueError, match="stock checkpoint or GGUF file"):
        gates_to_load(str(tmp_path / "stock"), None)


@pytest.mark.parametrize("kw, match", [(dict(), "density=None is invalid: a value is required"),
                                       (dict(density=1.5), r"density=1\.5 is invalid"),
                                       (dict(density=0.1, method="nz_ratio"), "method='nz_ratio' is invalid"),
                                       (dict(density=0.1, max_length=64), "max_length=64 is invalid")])
def test_config_errors_name_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        CalibrateConfig(**kw)


def test_cli_errors_are_one_line(corpus_path, model_dir):
    def run(*args):
        r = subprocess.run([sys.executable, "-m", "seer_attn.hub_cards.cli", "calibrate", *args], capture_output=True,
                           text=True, timeout=300)
        return r.returncode, r.stderr.strip().splitlines()
    code, err = run("--density", "2")
    assert code == 2 and len(err) == 1 and "--density" in err[0] and "'2'" in err[0], err
    code, err = run("--density", "0.1", "--model", str(model_dir), "--data", corpus_path, "--max-length", "100000")
    assert code == 2 and err[-1].startswith("seer-attn calibrate: error: --data") and "100000 tokens" in err[-1], err
