"""The decode-quality protocol on CPU with a tiny model: the decode-step scoring loop equals
``generate``'s per-step logits (dense and sparse decode) and, with dense decode, the ordinary
perplexity of the same tokens; the whole run (distil, check, decode perplexity, paired passkey)
writes a complete results envelope."""
import json

import pytest
import torch
import torch.nn.functional as F

from seer_attn.eval import decode_quality as dq


def _decode_model(tokenizer, seed=0):
    from seer_attn.modeling_seer import SeerLlamaConfig, SeerLlamaForCausalLM
    cfg = SeerLlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                          seer_gate_hidden_size=32, seer_decode_gate=True, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return SeerLlamaForCausalLM(cfg).eval()


def _ids(tokenizer, B, L, seed=0):
    eos = tokenizer.eos_token_id
    ids = torch.randint(0, len(tokenizer), (B, L), generator=torch.Generator().manual_seed(seed))
    return torch.where(ids == eos, (eos + 1) % len(tokenizer), ids)  # generate would stop at an EOS


@pytest.mark.parametrize("setting", ["dense", "share=0.3", "budget=128"])
def test_decode_loop_equals_generate_scoring(tokenizer, setting):
    m = _decode_model(tokenizer)
    dq.apply_decode(m, dq.decode_setting(setting))
    ids = _ids(tokenizer, 2, 330)
    a = dq.decode_nll(m, ids, 200)
    b = dq.generate_nll(m, ids, 200, tokenizer.pad_token_id)
    assert a.shape == (2, 130)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    if setting != "dense":
        assert m.seer_decode_density().max() < 1.0  # blocks were dropped


@pytest.mark.parametrize("setting", ["dense", "share=0.3", "budget=128", "mass=0.5", "budget=128,prior=0.5",
                                     "budget=128,keys=f8", "share=0.3,keys=i8"])
def test_graph_decode_loop_equals_the_eager_loop(tokenizer, setting):
    """Teacher-forced graph-mode steps (static cache; eager here) score what the eager loop
    scores, crossing block boundaries, with the same kept share."""
    m = _decode_model(tokenizer)
    dq.apply_decode(m, dq.decode_setting(setting))
    ids = _ids(tokenizer, 2, 330, seed=2)
    a = dq.decode_nll(m, ids, 200)
    density = m.seer_decode_density()
    g = dq.graph_decode_nll(m, ids, 200)
    assert g.shape == (2, 130)
    torch.testing.assert_close(g, a, atol=1e-5, rtol=1e-5)
    if setting != "dense":
        torch.testing.assert_close(m.seer_decode_density(), density)


@torch.no_grad()
def test_dense_decode_scores_are_the_ordinary_perplexity(tokenizer):
    m = _decode_model(tokenizer)
    ids = _ids(tokenizer, 2, 300, seed=1)
    logits = m(ids).logits[:, 149:-1].float()
    full = F.cross_entropy(logits.transpose(1, 2), ids[:, 150:], reduction="none").double()
    torch.testing.assert_close(dq.decode_nll(m, ids, 150), full, atol=1e-5, rtol=1e-5)
    dq.apply_decode(m, dq.decode_setting("share=0.2"))
    sparse = dq.decode_nll(m, ids, 150)
    assert (sparse - full).abs().max() > 1e-3  # sparse decode changes the scores
    dq.apply_decode(m, dq.decode_setting("share=0.2,local=1,oracle"))
    assert (m.config.seer_decode_selector, m.config.seer_decode_keep_local) == ("oracle", 1)
    assert (dq.decode_nll(m, ids, 150) - sparse).abs().max() > 1e-3
    dq.apply_decode(m, dq.decode_setting("share=0.2"))  # the options it leaves out go back to their defaults
    assert (m.config.seer_decode_selector, m.config.seer_decode_keep_local) == ("gate", 0)
    # ... the gate keys to the model's dtype (a setting's name means what it meant in every earlier run), though
    # a model's own default is int8 since session 47
    assert m.config.seer_decode_key_format == "model" and type(m.config)().seer_decode_key_format == "i8"
    torch.testing.assert_close(dq.decode_nll(m, ids, 150), sparse)


def test_settings_and_options(capsys):
    assert dq.decode_setting("share=0.1") == {"seer_decode_method": "share", "seer_decode_share": 0.1}
    assert dq.decode_setting("budget=2048") == {"seer_decode_method": "budget", "seer_decode_budget": 2048}
    assert dq.decode_setting("mass=0.85,local=1") == {"seer_decode_method": "mass", "seer_decode_mass": 0.85,
                                                      "seer_decode_keep_local": 1}
    assert dq.decode_setting("share=0.1,local=2,oracle") == {
        "seer_decode_method": "share", "seer_decode_share": 0.1, "seer_decode_keep_local": 2,
        "seer_decode_selector": "oracle"}
    assert dq.decode_setting("budget=2048,prior=0.5") == {"seer_decode_method": "budget", "seer_decode_budget": 2048,
                                                          "seer_decode_meanpool_prior": 0.5}
    assert dq.decode_setting_text("share=0.20,prior=1.0,local=1") == "share=0.2,local=1,prior=1"
    assert dq.decode_setting("budget=2048,keys=f8") == {"seer_decode_method": "budget", "seer_decode_budget": 2048,
                                                        "seer_decode_key_format": "f8"}
    assert dq.decode_setting_text("share=0.1,keys=i8,prior=0.5") == "share=0.1,prior=0.5,keys=i8"
    # the model's dtype spelled out is the setting without keys= (what every run up to session 47 measured)
    assert dq.decode_setting("share=0.1,keys=model")["seer_decode_key_format"] == "model"
    assert dq.decode_setting_text("share=0.1,keys=model") == "share=0.1"
    cfg = dq.DecodeQualityConfig(settings=["share=0.10", "budget=4096", "share=.1,streaming,local=1", "mass=.90"],
                                 gates="g.safetensors", phases=["ppl"])
    assert cfg.settings == ("share=0.1", "budget=4096", "share=0.1,local=1,streaming", "mass=0.9")
    assert cfg.out.startswith("seer_outputs/")
    for kw, msg in [(dict(settings=["topk=3"]), r"settings\[0\]='topk=3' is invalid: invalid decode setting"),
                    (dict(settings=["share=0.1,local=1,local=2"]), r"invalid part 'local=2' of decode setting"),
                    (dict(settings=["share=0.1,topk"]), r"invalid part 'topk' of decode setting"),
                    (dict(settings=["share=0.1,local=-1"]), r"expected an integer >= 0"),
                    (dict(settings=["share=0.1,prior=1.5"]), r"settings\[0\]='share=0.1,prior=1.5' is invalid: .*expected a number 0 <= x <= 1"),
                    (dict(settings=["share=0.1,prior=0.5,oracle"]), r"prior=A mixes the decode gate's scores; the "
                                                                    r"oracle selector has none"),
                    (dict(settings=["share=0.1,keys=f4"]), r"invalid part 'keys=f4' of decode setting"),
                    (dict(settings=["share=0.1,keys=f8,streaming"]), r"keys=... stores the decode gate's keys"),
                    (dict(gates="g.safetensors"), r"gates skips distillation"),
                    (dict(phases=["ppl"]), r"without the distill phase, gates must name distilled gates"),
                    (dict(length=100), r"length=100 is invalid: expected an integer >= 256")]:
        with pytest.raises(ValueError, match=msg):
            dq.DecodeQualityConfig(**kw)
    with pytest.raises(TypeError, match="run_decode_quality takes a DecodeQualityConfig, got Namespace"):
        dq.run_decode_quality(dq.parser().parse_args([]))
    for bad, msg in [(["--settings", "topk=3"], "invalid decode setting 'topk=3'"),
                     (["--settings", "budget=64"], "expected an integer >= 128"),
                     (["--gates", "g.safetensors"], "--gates skips distillation")]:
        with pytest.raises(SystemExit) as exc:
            dq.main(bad + ["--cpu"])
        assert exc.value.code == 2 and msg in capsys.readouterr().err


def test_whole_run_on_cpu(tokenizer, corpus_path, tmp_path, check_envelope):
    folder = tmp_path / "tiny_decode"
    _decode_model(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    out = tmp_path / "out"
    report = dq.main(["--cpu", "--model", str(folder), "--train", corpus_path, "--eval", corpus_path, "--steps", "2",
                      "--seq-len", "256", "--length", "256", "--windows", "2", "--batch-size", "2",
                      "--passkey-lengths", "384", "--passkey-samples", "1", "--out", str(out), "--no-progress"])
    env = check_envelope(json.loads((out / "decode_quality.json").read_text()), "decode_quality")
    assert [r["setting"] for r in env["rows"]] == ["dense", "share=0.1", "budget=2048", "budget=2048,prior=0.7"]
    assert all(r["tokens"] == 2 * 128 and r["ppl"] > 1 for r in env["rows"])
    assert env["rows"][0]["decode_density"] is None and 0 < env["rows"][1]["decode_density"] < 1
    assert env["checks"][0]["decode_nll_vs_generate_max_abs"] < 1e-4
    assert env["checks"][0]["graph_decode_nll_vs_decode_nll_max_abs"] < 1e-4
    names = list(env["passkey"])
    assert names == ["dense", "decode_share=0.1", "decode_budget=2048", "decode_budget=2048,prior=0.7",
                     "prefill_threshold_0.002+decode_share=0.1"]
    assert all(env["passkey"][n]["vs_dense"]["n"] == 5 for n in names[1:])
    assert env["cost"]["steps"] == 2 and (out / "gates_decode_bf16.safetensors").is_file()
    assert "| share=0.1 |" in (out / "decode_quality.md").read_text() and report == env
    assert dq.DecodeQualityConfig(**env["config"]).settings == ("share=0.1", "budget=2048", "budget=2048,prior=0.7")


def test_run_with_retrieval_data_and_comparison_selectors(tokenizer, corpus_path, tmp_path, monkeypatch):
    """--retrieval-mix rewrites that share of the distillation data, --decode-rows reaches the
    model; oracle and streaming settings are scored beside the gate's."""
    from seer_attn.training import retrieval_data
    calls = []
    real = retrieval_data.mix_retrieval
    monkeypatch.setattr(retrieval_data, "mix_retrieval",
                        lambda data, frac, **kw: calls.append(frac) or real(data, frac, **kw))
    folder = tmp_path / "tiny_decode"
    _decode_model(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    out = tmp_path / "out"
    dq.main(["--cpu", "--model", str(folder), "--train", corpus_path, "--eval", corpus_path, "--steps", "2",
             "--seq-len", "256", "--length", "768", "--windows", "2", "--batch-size", "2", "--phases", "distill", "ppl",
             "--retrieval-mix", "0.5", "--decode-rows", "4", "--settings", "share=0.3", "share=0.3,oracle",
             "share=0.3,local=1,streaming", "--out", str(out), "--no-progress"])
    env = json.loads((out / "decode_quality.json").read_text())
    assert calls == [0.5] and env["config"]["decode_rows"] == 4
    rows = {r["setting"]: r for r in env["rows"]}
    assert list(rows) == ["dense", "share=0.3", "share=0.3,oracle", "share=0.3,local=1,streaming"]
    assert len({round(r["nll"], 6) for r in env["rows"]}) == 4, [r["nll"] for r in env["rows"]]  # four selections


def test_seer_attn_decode_quality_forwards_every_option(capsys, monkeypatch):
    """``seer-attn decode-quality`` is the module's command line (its options and errors, named by the command)."""
    from seer_attn.eval import cli
    with pytest.raises(SystemExit) as exit_:
        cli.main(["decode-quality", "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and out.startswith("usage: seer-attn decode-quality ") and ",prior=A" in out
    with pytest.raises(SystemExit) as exit_:
        cli.main(["decode-quality", "--settings", "topk=3", "--cpu"])
    assert exit_.value.code == 2 and "seer-attn decode-quality: error:" in capsys.readouterr().err
    seen = []
    monkeypatch.setattr(dq, "main", seen.append)
    assert cli.main(["decode-quality", "--settings", "budget=2048,prior=0.7"]) == 0
    assert seen == [["--settings", "budget=2048,prior=0.7"]]
