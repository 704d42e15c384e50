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
    args = fr.build_parser().parse_args(["--work", "w", "--out", "o"])
    assert fr.phase_names(args) == ["anchors", "gates0", "timing", "a", "b", "c0.5", "c0.3", "c0.1", "d0.1", "passkey"]
    assert all(fr._expected_s(args, p) > 0 for p in fr.phase_names(args))
    rows = [{"row": "a", "ppl": 11.0, "s_per_step": 0.6}, {"row": "c0.5", "ppl": 11.1},
            {"row": "c0.1", "ppl": 11.2, "s_per_step": 0.35}, {"row": "b0.1", "ppl": 11.5}]
    got = {t["target"]: t["ok"] for t in fr.check_targets(rows, args)}
    assert got == {"(a) PPL <= 11.54 (plain transformers + SDPA)": True, "(a) s/step <= 0.64": True,
                   "(c) at 0.5 within 0.5% of (a)": False, "(c) at 0.1 within 3% of (a)": True,
                   "(c) better than (b) at 0.1": True, "(c) at 0.1: s/step <= 0.3": False}
    assert all(t["ok"] is None for t in fr.check_targets([], args))


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
