"""The source-joined windows protocol (each source's documents joined with EOS between them, cut
into windows, up to N per source), its table, and the experiment script's pure parts and
phase bookkeeping (one cheap phase on the CPU, the time budget, the target checks)."""
import json

import pytest
import torch

from seer_attn.eval import finetune_run as fr
from seer_attn.eval.finetune_eval import format_table, source_windows
from seer_attn.eval.perplexity import make_source_windows


def test_source_windows_join_each_source_with_eos_between(corpus_docs, tokenizer):
    L = 256
    windows = make_source_windows(corpus_docs, tokenizer, L, windows_per_source=2)
    eos = tokenizer.eos_token_id
    streams = {}
    for d in corpus_docs:
        ids = tokenizer(d["text"], add_special_tokens=False)["input_ids"]
        streams[d["source"]] = streams[d["source"]] + [eos] + ids if d["source"] in streams else list(ids)
    expected = [(s, w, stream[w * L:(w + 1) * L]) for s, stream in streams.items()
                for w in range(min(2, len(stream) // L))]
    assert [(w.source, w.index, w.input_ids.tolist()) for w in windows] == expected
    assert {w.source for w in windows} == {"austen", "kjv", "cpython-stdlib"}
    assert all(w.input_ids.numel() == L and w.doc_id == f"{w.source} (joined)" for w in windows)
    kjv = [w for w in windows if w.source == "kjv"]
    n_kjv = len(streams["kjv"]) // L
    assert len(kjv) == min(2, n_kjv)
    # a window crosses a document boundary: the EOS between the kjv documents is inside the stream
    assert eos in streams["kjv"][:n_kjv * L]
    with pytest.raises(ValueError, match="windows_per_source=0 is invalid"):
        make_source_windows(corpus_docs, tokenizer, L, windows_per_source=0)


def test_source_windows_error_and_table(corpus_path, tokenizer):
    with pytest.raises(ValueError, match="no source of the evaluation corpus .* holds 1000000 tokens"):
        source_windows(tokenizer, 1_000_000, corpus_path)
    rows = [{"setting": "x", "ppl": 12.345, "density": None, "per_source": {"a": 10.0, "b": 15.5}},
            {"setting": "y", "ppl": 13.0, "density": 0.1234, "per_source": {"b": 16.0}}]
    assert format_table(rows).splitlines() == ["| setting | density | PPL all | a | b |", "|---|---|---|---|---|",
                                               "| x | 1 | 12.35 | 10.00 | 15.50 |", "| y | 0.123 | 13.00 |  | 16.00 |"]


def test_split_windows_keeps_the_text():
    from seer_attn.eval.perplexity import Window
    w = Window("s (joined)", "s", 1, torch.arange(1024))
    parts = fr.split_windows([w], 256)
    assert [p.index for p in parts] == [4, 5, 6, 7] and torch.equal(torch.cat([p.input_ids for p in parts]),
                                                                    w.input_ids)


def test_phases_and_targets():
    config = fr.FineTuneRunConfig(work="w", out="o")
    assert fr.phase_names(config) == ["anchors", "gates0", "timing", "a", "b", "c0.5", "c0.3", "c0.1", "d0.1",
                                      "passkey"]
    assert config.todo == fr.phase_names(config) and config.replace(phases=["c0.1", "a"]).todo == ["a", "c0.1"]
    assert all(fr._expected_s(config, p) > 0 for p in fr.phase_names(config))
    rows = [{"row": "a", "ppl": 11.0, "s_per_step": 0.6}, {"row": "c0.5", "ppl": 11.1},
            {"row": "c0.1", "ppl": 11.2, "s_per_step": 0.35}, {"row": "b0.1", "ppl": 11.5}]
    got = {t["target"]: t["ok"] for t in fr.check_targets(rows, config)}
    assert got == {"(a) PPL <= 11.54 (plain transformers + SDPA)": True, "(a) s/step <= 0.64": True,
                   "(c) at 0.5 within 0.5% of (a)": False, "(c) at 0.1 within 3% of (a)": True,
                   "(c) better than (b) at 0.1": True, "(c) at 0.1: s/step <= 0.3": False}
    assert all(t["ok"] is None for t in fr.check_targets([], config))


# ----------------------------------------------------------------------------- the run config

def test_run_config_is_the_command_lines():
    """Defaults and checks live once, in FineTuneRunConfig; the command line only builds it."""
    import dataclasses

    from seer_attn.training.run_config import config_from_args
    args = fr.build_parser().parse_args(["--work", "w"])
    assert {f.name for f in dataclasses.fields(fr.FineTuneRunConfig)} <= set(vars(args))
    assert config_from_args(fr.FineTuneRunConfig, args) == fr.FineTuneRunConfig(work="w")
    config = fr.FineTuneRunConfig(work="w", densities=[0.2, 0.05], phases=["c0.05", "timing"], passkey_lengths=[])
    assert config.densities == (0.2, 0.05) and config.todo == ["timing", "c0.05"]
    assert fr.FineTuneRunConfig(**json.loads(json.dumps(dataclasses.asdict(config)))) == config  # from an envelope


@pytest.mark.parametrize("fields, message", [
    ({"phases": ["c0.2"]}, r"phases: unknown phases \['c0.2'\]: expected some of \[.*'c0.1'.*\] or all"),
    ({"phases": ["all", "a"]}, r"phases: unknown phases \['all'\]"),
    ({"redo": ["e"]}, r"redo: unknown phases \['e'\]"),
    ({"densities": [0.5, 0]}, r"densities\[1\]=0 is invalid: expected a number 0 < x <= 1"),
    ({"timing_steps": 4}, "timing_steps=4 is invalid: expected an integer >= 5"),
    ({"timing_variants": ["fast"]}, "timing_variants\\[0\\]='fast' is invalid: expected one of"),
    ({"passkey_keep": "none"}, r"passkey_keep='none' is invalid: expected one of \('protocol', 'trained'\)"),
    ({"work": None}, "work=None is invalid: a value is required"),
], ids=["phase", "all-and-a-phase", "redo", "density", "timing-steps", "timing-variant", "passkey-keep", "work"])
def test_run_config_refuses_bad_fields(fields, message):
    with pytest.raises(ValueError, match=message) as err:
        fr.FineTuneRunConfig(**{"work": "w", **fields})
    assert "\n" not in str(err.value)


def test_bad_phase_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        fr.main(["--work", "w", "--phases", "c0.2", "--cpu"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and lines[-1].endswith("error: --phases: unknown phases ['c0.2']: expected some of "
                                                        "['anchors', 'gates0', 'timing', 'a', 'b', 'c0.5', 'c0.3', "
                                                        "'c0.1', 'd0.1', 'passkey'] or all")
    with pytest.raises(SystemExit):
        fr.main(["--work", "w", "--init-gates", "no/such/gates.safetensors", "--cpu"])
    assert "init_gates='no/such/gates.safetensors': no such file" in capsys.readouterr().err
    with pytest.raises(TypeError, match="run_experiment takes a FineTuneRunConfig, got Namespace"):
        fr.run_experiment(fr.build_parser().parse_args(["--work", "w"]))


# ----------------------------------------------------------------------------- timing and its profile

def test_kernel_summary_sorts_kernels_by_kind():
    from types import SimpleNamespace

    from torch.autograd import DeviceType
    ev = [SimpleNamespace(name=n, device_type=DeviceType.CUDA, device_time_total=us) for n, us in [
        ("_attn_fwd_kernel", 1000), ("_attn_bwd_dkdv_kernel", 3000), ("flash_fwd_kernel<...>", 500),
        ("sm90_xmma_gemm_bf16bf16", 2000), ("nvjet_hsh_128x256", 1500), ("vectorized_elementwise_kernel", 700),
        ("_attn_fwd_kernel", 1000)]] + [SimpleNamespace(name="aten::mm", device_type=DeviceType.CPU,
                                                         device_time_total=9999)]
    got = fr.kernel_summary(ev, top=2)
    assert got["busy_ms"] == pytest.approx(9.7)  # device events only: a CPU op's time holds its kernels' again
    assert got["kinds"] == pytest.approx({"attention, ours": 5.0, "attention, SDPA": 0.5, "GEMM": 3.5, "other": 0.7})
    assert got["top"] == [{"name": "_attn_bwd_dkdv_kernel", "ms": 3.0, "calls": 1},
                          {"name": "_attn_fwd_kernel", "ms": 2.0, "calls": 2}]


@pytest.fixture(scope="module")
def seer_folder(tmp_path_factory, tokenizer):
    from seer_attn.modeling_seer import SeerLlamaConfig, SeerLlamaForCausalLM
    cfg = SeerLlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                          seer_gate_hidden_size=32, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("seer")
    SeerLlamaForCausalLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_anchors_phase_on_cpu_and_the_time_budget(seer_folder, corpus_path, tmp_path, capsys, check_envelope):
    argv = ["--cpu", "--model", seer_folder, "--eval", corpus_path, "--work", str(tmp_path / "w"), "--out",
            str(tmp_path / "o"), "--seq-len", "256", "--yarn-factor", "2", "--short-anchor", "128", "--no-progress"]
    assert fr.main(argv + ["--phases", "anchors"]) == 0
    with open(tmp_path / "o" / "finetune_run.json") as f:
        env = check_envelope(json.load(f), "finetune_run", complete=False)  # one phase of ten
    labels = [r["setting"] for r in env["rows"]]
    assert labels == ["native RoPE, 128-token windows", "native RoPE, 256-token windows",
                      "YaRN factor 2, no training, 256-token windows"]
    short, long_ = env["rows"][0], env["rows"][1]
    # the same text cut in halves: as many tokens, each window predicting all but its first
    assert short["windows"] == 2 * long_["windows"]
    assert short["tokens"] + short["windows"] == long_["tokens"] + long_["windows"]
    assert env["phases_done"]["anchors"] and not env["phases_done"]["a"]
    md = (tmp_path / "o" / "finetune_run.md").read_text()
    assert md.startswith("**partial run") and "| native RoPE, 128-token windows | 1 |" in md
    capsys.readouterr()
    assert fr.main(argv + ["--time-budget", "1"]) == 0  # anchors done; gates0 (expected ~40 s) does not fit
    printed = capsys.readouterr().out
    assert "anchors: done before, skipped" in printed and "stopping before gates0" in printed
    with pytest.raises(SystemExit, match=r"phase b needs \['a', 'gates0'\] first"):
        fr.main(argv + ["--phases", "b"])


def test_timing_phase_on_cpu(seer_folder, corpus_path, tmp_path, capsys):
    """Every timing variant trains a few steps through the fine-tuning trainer and gets its
    s/step and a profile of its last step (on the CPU: no device kernels)."""
    out = tmp_path / "o"
    assert fr.main(["--cpu", "--model", seer_folder, "--train", corpus_path, "--eval", corpus_path, "--work",
                    str(tmp_path / "w"), "--out", str(out), "--seq-len", "256", "--yarn-factor", "2",
                    "--init-gates", "none", "--no-progress", "--phases", "timing", "--timing-steps", "5"]) == 0
    with open(out / "finetune_run.json") as f:
        env = json.load(f)
    timing = env["timing"]
    assert timing["gates"] is None and timing["density"] == 0.1 and list(timing["variants"]) == list(fr.TIMING_VARIANTS)
    v = timing["variants"]
    assert v["stride"]["label"] == "density 0.1, gate loss 1 layer in 4 (row c)"
    assert (v["stride"]["gate_loss_stride"], v["frozen"]["gate_loss_stride"], v["every-layer"]["gate_loss_stride"]) \
        == (4, None, 1)
    assert [v[k]["checkpointing"] for k in ("stride", "stride-no-ckpt", "dense", "dense-no-ckpt")] == \
        [True, False, True, False]
    assert v["dense-sdpa"]["selection"] == "dense (SDPA)" and v["dense"]["selection"] == "dense"
    assert v["dense-sdpa"]["attn_implementation"] != "seer kernels"
    # 5 steps: the first 3 not timed, the last (profiled) left out
    assert all(r["timed_steps"] == 1 and r["s_per_step"] > 0 for r in v.values())
    assert all(r["profile"]["busy_ms"] == 0 and set(r["profile"]["kinds"]) == {"attention, ours", "attention, SDPA",
                                                                             "GEMM", "other"} for r in v.values())
    md = (out / "finetune_run.md").read_text()
    assert "| density 1, SDPA (plain transformers' attention) |" in md and "| variant | s/step | peak GiB |" in md
    assert env["config"]["timing_steps"] == 5 and env["config"]["phases"] == ["timing"]


def test_passkey_phase_keeps_the_protocol_blocks(seer_folder, tmp_path, monkeypatch):
    """The sparse passkey run keeps what the project's passkey protocol keeps (sink block,
    local block, 2 dense last rows), whatever the fine-tuned model's own rules; ``trained``
    keeps the model's."""
    from seer_attn.modeling_seer.conversion import load_seer_model
    from seer_attn.training.results import write_json
    import seer_attn.eval.passkey as passkey

    sparse = str(tmp_path / "c0.1")
    load_seer_model(seer_folder).set_seer_mode("sparse", seer_sparsity_method="nz_ratio", seer_nz_ratio=0.1) \
        .save_pretrained(sparse)
    seen = []

    def run(model, tokenizer, samples=None, seed=0, progress=True):
        c = model.config
        seen.append((c.seer_mode, c.seer_keep_sink, c.seer_keep_local, c.seer_dense_last_rows, c.seer_nz_ratio))
        right = c.seer_mode == "dense"
        return {"accuracy": float(right), "per_length": {256: float(right)},
                "samples": [{"seed": seed, "length": s.length, "depth": s.depth, "sample": s.sample,
                             "correct": right} for s in samples]}
    monkeypatch.setattr(passkey, "run_passkey", run)
    monkeypatch.setattr(fr.Experiment, "tokenizer", lambda self: __import__("transformers").AutoTokenizer
                        .from_pretrained(seer_folder))
    for keep, want in (("protocol", (True, 1, 2)), ("trained", (False, 0, 2))):
        work = tmp_path / keep
        for name, folder in (("a", seer_folder), ("c0.1", sparse)):
            write_json(str(work / "phases" / f"{name}.json"), {"rows": [
                {"row": name, "setting": name, "ppl": 10.0, "density": None, "per_source": {}, "model_dir": folder}]})
        seen.clear()
        assert fr.main(["--cpu", "--work", str(work), "--out", str(tmp_path / "o" / keep), "--phases", "passkey",
                        "--passkey-lengths", "256", "--passkey-samples", "1", "--passkey-keep", keep,
                        "--no-progress"]) == 0
        assert seen[0][0] == "dense" and seen[1] == ("sparse", *want, 0.1)
        with open(tmp_path / "o" / keep / "finetune_run.json") as f:
            pk = json.load(f)["passkey"]
        assert pk["passkey_keep"] == keep and pk["paired"]["lost"] == 5 and pk["paired"]["n"] == 5
        assert (pk["keep_rules"]["seer_keep_sink"], pk["keep_rules"]["seer_keep_local"],
                pk["keep_rules"]["seer_dense_last_rows"]) == want
        assert f"keep rules of c0.1: seer_sparsity_method=nz_ratio, seer_nz_ratio=0.1, seer_keep_diagonal=True, " \
               f"seer_keep_sink={want[0]}" in (tmp_path / "o" / keep / "finetune_run.md").read_text()
