"""quality_run: every phase on a tiny model, partial results marked as such, bad arguments."""
import json
import os

import pytest

from seer_attn.eval import quality_run
from seer_attn.eval.baselines import BASELINES
from seer_attn.eval.quality_run import QualityRunConfig


def _args(model_dir, corpus_path, out, *extra):
    return ["--cpu", "--model", model_dir, "--train", corpus_path, "--eval", corpus_path, "--seq-len", "256",
            "--eval-length", "512", "--steps", "2", "--thresholds", "2e-3", "--nz-ratios", "0.5",
            "--passkey-lengths", "256", "--out", str(out), "--work", str(out.parent / "work"), *extra]


def test_all_phases(model_dir, corpus_path, tmp_path, capfd, check_envelope):
    out = tmp_path / "out"
    quality_run.main(_args(model_dir, corpus_path, out, "--no-progress", "--baseline-densities", "0.6",
                           "--passkey-threshold", "1e-2", "--passkey-dense-last-rows", "0", "2"))
    assert "it/s]" not in capfd.readouterr().err  # --no-progress reaches the distillation Trainer too
    res = check_envelope(json.loads((out / "quality.json").read_text()), "quality")
    assert res["provenance"]["model"] == model_dir and res["provenance"]["gpu"] == "cpu"
    assert res["config"]["steps"] == 2 and res["config"]["baseline_densities"] == [0.6]
    assert res["cost"]["steps"] == 2 and res["cost"]["steps_per_s"] > 0
    assert (out / "gates_max_bf16.safetensors").is_file() and not (out / "work").exists()
    settings = {r["setting"] for r in res["rows"]}
    assert {"dense", "gate:threshold=0.002", "gate:nz_ratio=0.5"} <= settings
    assert any(s.startswith("streaming:nz_ratio@") for s in settings)
    for sel, method in BASELINES:  # each baseline at the asked density: a PPL or an "unreachable" row
        assert f"{sel}:{method}@0.6" in settings
    dense = next(r for r in res["rows"] if r["setting"] == "dense")
    assert dense["ppl"] > 1 and dense["density"] == 1.0
    assert set(res["passkey"]) == {"dense", "seer_threshold_0.01_dense_last_rows_0",
                                   "seer_threshold_0.01_dense_last_rows_2"}
    assert not (out / "quality.md").read_text().startswith("**partial")


def test_passkey_samples_per_cell(model_dir, corpus_path, tmp_path):
    out = tmp_path / "out"
    quality_run.main(_args(model_dir, corpus_path, out, "--no-progress", "--phases", "distill", "passkey",
                           "--passkey-threshold", "1e-2", "--passkey-dense-last-rows", "2", "--passkey-samples", "3",
                           "--keep-local", "1", "--passkey-lengths", "1024", "--passkey-settings", "oracle_max:nz_ratio=0.5",
                           "streaming:nz_ratio=0.5"))
    res = json.loads((out / "quality.json").read_text())
    assert set(res["passkey"]) == {"dense", "seer_threshold_0.01_dense_last_rows_2_keep_local_1",
                                   "oracle_max:nz_ratio=0.5_dense_last_rows_2_keep_local_1",
                                   "streaming:nz_ratio=0.5_dense_last_rows_2_keep_local_1"}
    assert res["passkey"]["dense"]["density"] is None
    for name in ("oracle_max:nz_ratio=0.5_dense_last_rows_2_keep_local_1",
                 "streaming:nz_ratio=0.5_dense_last_rows_2_keep_local_1"):
        assert 0 < res["passkey"][name]["density"] < 1
    for name, run in res["passkey"].items():
        assert [c["n"] for c in run["cells"]] == [3] * 5  # one length, five depths
        assert len(run["samples"]) == 15 and all("prompt" not in r and "generation" in r for r in run["samples"])
        if name != "dense":
            v = run["vs_dense"]
            assert v["n"] == 15 and 0 <= v["lost"] + v["gained"] <= 15 and 0 < v["p_value"] <= 1


def test_passkey_settings_alone_from_python(model_dir, corpus_path, tmp_path):
    """The Python API: a QualityRunConfig, no argparse; the envelope's config rebuilds it."""
    config = QualityRunConfig(cpu=True, model=model_dir, train=(corpus_path,), eval=corpus_path, seq_len=256,
                              eval_length=512, steps=2, passkey_lengths=(256,), out=str(tmp_path / "out"),
                              work=str(tmp_path / "work"), no_progress=True, phases=("distill", "passkey"),
                              passkey_dense_last_rows=(0,), passkey_settings=("gate:nz_ratio=0.30",))
    env = quality_run.run_quality(config)
    res = json.loads((tmp_path / "out" / "quality.json").read_text())
    assert res == json.loads(json.dumps(env)) and QualityRunConfig(**res["config"]) == config
    assert set(res["passkey"]) == {"dense", "gate:nz_ratio=0.3_dense_last_rows_0"}
    assert res["config"]["passkey_settings"] == ["gate:nz_ratio=0.3"]  # the canonical form


def test_stopped_run_is_marked_partial(model_dir, corpus_path, tmp_path, monkeypatch, check_envelope):
    def fail(*a, **k):
        raise RuntimeError("stopped")
    monkeypatch.setattr("seer_attn.eval.quality_run.run_passkey", fail)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="stopped"):
        quality_run.main(_args(model_dir, corpus_path, out, "--phases", "distill", "ppl", "passkey"))
    res = check_envelope(json.loads((out / "quality.json").read_text()), "quality", complete=False)
    assert res["passkey"] == {}
    assert any(r["setting"] == "dense" for r in res["rows"])  # the ppl phase's rows were kept
    assert (out / "quality.md").read_text().startswith("**partial run")
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


@pytest.mark.parametrize("extra, message", [
    (["--gates", "g.safetensors"], "error: --gates skips distillation"),
    (["--phases", "ppl"], "error: without the distill phase, --gates must name distilled gates"),
    (["--phases", "distill", "passkey"], "error: the passkey phase needs --passkey-threshold"),
    (["--passkey-samples", "0"], "error: argument --passkey-samples: invalid value '0': expected an integer >= 1"),
    (["--passkey-settings", "oracle_max:nz_ratio@0.2"], "'@DENSITY' calibration is for perplexity"),
    (["--passkey-settings", "dense"], "--passkey-settings: dense: give a sparse SELECTOR:METHOD=PARAM"),
    (["--seq-len", "128"], "--seq-len=128 is invalid: expected an integer >= 256"),  # too short to distil
    (["--passkey-settings", "bogus:nz_ratio=0.2"], "argument --passkey-settings: selector='bogus' is invalid"),
    (["--steps", "-3"], "argument --steps: invalid value '-3': expected an integer >= 1"),
    (["--seq-len", "0"], "argument --seq-len: invalid value '0': expected an integer >= 2"),
    (["--thresholds", "1.5"], "argument --thresholds: invalid value '1.5': expected a number 0 < x < 1"),
    (["--nz-ratios", "0"], "argument --nz-ratios: invalid value '0': expected a number 0 < x <= 1"),
    (["--baseline-densities", "nan"], "argument --baseline-densities: invalid value 'nan'"),
    (["--keep-local", "-1"], "argument --keep-local: invalid value '-1': expected an integer >= 0"),
])
def test_bad_arguments_are_one_line_errors(model_dir, corpus_path, tmp_path, extra, message, capsys):
    with pytest.raises(SystemExit) as exc:
        quality_run.main(_args(model_dir, corpus_path, tmp_path / "out", *extra))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err.splitlines()[-1] and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # refused before anything ran


def test_no_gpu_is_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(SystemExit) as exc:
        quality_run.main(["--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].endswith("error: needs a CUDA GPU, and torch sees none "
                                                 "(or pass --cpu for a smoke test)")


@pytest.mark.parametrize("fields, message", [
    ({"gates": "g.safetensors"}, "gates skips distillation: drop 'distill' from phases or drop gates"),
    ({"phases": ("ppl",)}, "without the distill phase, gates must name distilled gates"),
    ({"phases": ("distill", "tune")}, r"phases\[1\]='tune' is invalid: expected one of"),
    ({"passkey_settings": ("oracle_max:nz_ratio@0.2",)}, "passkey_settings: oracle_max:nz_ratio@0.2: give a sparse"),
    ({"seq_len": 128}, "seq_len=128 is invalid: expected an integer >= 256"),  # the distill phase's own check
    ({"keep_local": -1}, "keep_local=-1 is invalid: expected an integer >= 0"),
], ids=["gates-and-distill", "no-gates", "phase", "passkey-setting", "seq-len", "keep-local"])
def test_config_refuses_bad_fields(fields, message):
    with pytest.raises(ValueError, match=message):
        QualityRunConfig(**fields)


def test_density_knob_rows_and_distill_options(model_dir, corpus_path, tmp_path, capsys):
    """--densities: the knob keeps what it is asked (one block of the layer's 4 x 36), beside the
    threshold solved to the same density and the knob again at the threshold's achieved density;
    --retrieval-mix / --peak-weight reach the distillation."""
    out = tmp_path / "out"
    quality_run.main(_args(model_dir, corpus_path, out, "--no-progress", "--phases", "distill", "ppl",
                           "--densities", "0.6", "--retrieval-mix", "0.5", "--peak-weight", "2"))
    res = json.loads((out / "quality.json").read_text())
    assert res["config"]["densities"] == [0.6] and res["config"]["retrieval_mix"] == 0.5
    assert res["config"]["peak_weight"] == 2.0
    rows = {r["setting"]: r for r in res["rows"]}
    knob = rows["gate:density=0.6"]
    assert abs(knob["density"] - 0.6) <= 0.5 / (4 * 36) + 1e-9
    matched = next(r for r in res["rows"] if r.get("matched_to"))
    thr = rows[matched["matched_to"]]
    assert thr["method"] == "threshold" and matched["method"] == "density"
    assert thr["calibrated_on"] == "evaluated"  # quality_run solves it on the windows it evaluates
    assert abs(matched["density"] - thr["density"]) <= 0.5 / (4 * 36) + 1e-9
    assert matched["ppl_ratio"] == pytest.approx(matched["ppl"] / thr["ppl"])
    assert f"density knob vs {thr['setting']} at density" in capsys.readouterr().out
