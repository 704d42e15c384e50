"""``seer-attn finetune``: bad arguments (YaRN factor < 1, density outside (0, 1], a sequence
longer than factor x the model's context) end as one line with exit code 2 before any model
loads; ``--help`` imports nothing heavy; a run fine-tunes (full or LoRA), resumes, writes its
envelopes and prints the closing table of the source-joined windows protocol."""
import json
import os
import subprocess
import sys

import pytest
import torch

from seer_attn.eval import cli

NATIVE = 256


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory, tokenizer):
    """A stock LlamaForCausalLM folder (native context 256) with the eval tests' tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=NATIVE,
                      initializer_range=0.3, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _fail(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["finetune", *argv])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("option, value, expected", [
    ("--yarn-factor", "0.5", "expected a number 1 <= x"),
    ("--density", "0", "expected a number 0 < x <= 1"),
    ("--density", "1.5", "expected a number 0 < x <= 1"),
    ("--gate-loss-stride", "0", "expected an integer >= 1"),
    ("--lora-r", "0", "expected an integer >= 1"),
], ids=["factor-below-1", "density-0", "density-above-1", "stride-0", "lora-r-0"])
def test_bad_option_value_is_one_line_and_exit_2(option, value, expected, capsys):
    line = _fail([option, value], capsys)
    assert line == f"seer-attn finetune: error: argument {option}: invalid value '{value}': {expected} " \
                   "(see seer-attn finetune --help)"


def test_sequence_longer_than_the_extended_context_fails_before_any_model_loads(llama_folder, capsys, monkeypatch,
                                                                                tmp_path):
    import seer_attn.modeling_seer.conversion as conversion

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(conversion, "load_seer_model", no_model)
    out = ["--model", llama_folder, "--output", str(tmp_path), "--cpu"]
    line = _fail(["--seq-len", "1024", "--yarn-factor", "2", *out], capsys)
    assert line == ("seer-attn finetune: error: seq-len 1024 is above yarn factor x original context = 2 x 256 = 512 "
                    "positions; raise the factor to at least 4 or shorten the sequences")
    assert "= 1 x 256 = 256 positions" in _fail(["--seq-len", "512", *out], capsys)  # no --yarn-factor: the native RoPE
    assert "give one, not both" in _fail(["--seq-len", "256", "--density", "0.5", "--threshold", "0.01", *out], capsys)


def test_help_imports_nothing_heavy():
    code = ("import sys\nfrom seer_attn.eval.cli import main\ntry:\n    main(['finetune', '--help'])\n"
            "except SystemExit:\n    pass\nprint('HEAVY', [m for m in ('torch', 'transformers', 'datasets', 'peft') "
            "if m in sys.modules])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "HEAVY []" in r.stdout and "--yarn-factor" in r.stdout, r.stdout + r.stderr


def _argv(model, corpus, out, *extra):
    return ["finetune", "--model", model, "--data", corpus, "--eval-data", corpus, "--seq-len", "512",
            "--yarn-factor", "2", "--lr", "1e-3", "--warmup-steps", "1", "--logging-steps", "1", "--save-steps", "2",
            "--output", str(out), "--cpu", "--no-progress", "--gate-loss-stride", "1", *extra]


def test_finetune_end_to_end_resume_and_closing_table(llama_folder, corpus_path, tmp_path, capsys, check_envelope):
    from seer_attn.training.finetune import load_finetuned

    out = tmp_path / "run"
    assert cli.main(_argv(llama_folder, corpus_path, out, "--density", "0.5", "--steps", "2")) == 0
    printed = capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["checkpoints", "finetune_eval.json", "finetune_summary.json", "model"]
    with open(out / "finetune_summary.json") as f:
        summary = check_envelope(json.load(f), "finetune")
    assert summary["global_step"] == 2 and summary["selection"] == "nz_ratio=0.5" and summary["yarn_factor"] == 2
    assert summary["original_context"] == NATIVE and summary["config"]["seq_len"] == 512
    assert all("lm_loss" in r and "block_density" in r for r in summary["rows"] if "loss" in r)
    model = load_finetuned(out / "model")
    assert model.config.rope_parameters["rope_type"] == "yarn" and model.config.max_position_embeddings == 512
    assert model.config.seer_mode == "sparse" and model.config.seer_nz_ratio == 0.5

    with open(out / "finetune_eval.json") as f:
        ev = check_envelope(json.load(f), "finetune_eval")
    assert [r["setting"] for r in ev["rows"]] == ["fine-tuned, nz_ratio=0.5", "fine-tuned, evaluated dense"]
    sources = sorted(ev["rows"][0]["per_source"])
    assert sources == ["austen", "cpython-stdlib", "kjv"] and all(r["seq_len"] == 512 for r in ev["rows"])
    assert "| setting | density | PPL all | austen | cpython-stdlib | kjv |" in printed
    assert f"| fine-tuned, nz_ratio=0.5 | {ev['rows'][0]['density']:.3f} | {ev['rows'][0]['ppl']:.2f} |" in printed

    assert cli.main(_argv(llama_folder, corpus_path, out, "--density", "0.5", "--steps", "3", "--resume",
                          "--no-eval")) == 0
    with open(out / "finetune_summary.json") as f:
        resumed = json.load(f)
    assert resumed["global_step"] == 3 and resumed["resumed_from"].endswith("checkpoint-2")


def test_lora_run_saves_an_adapter_that_loads(llama_folder, corpus_path, tmp_path, capsys):
    from seer_attn.training.finetune import is_adapter_folder, load_finetuned

    out = tmp_path / "lora"
    assert cli.main(_argv(llama_folder, corpus_path, out, "--density", "0.5", "--steps", "2", "--lora-r", "4",
                          "--lora-targets", "q_proj", "v_proj")) == 0
    assert "| fine-tuned, nz_ratio=0.5 |" in capsys.readouterr().out
    assert is_adapter_folder(out / "model") and os.path.isfile(out / "base" / "config.json")
    model = load_finetuned(out / "model")  # AutoPeftModelForCausalLM, merged
    assert type(model).__name__ == "SeerLlamaForCausalLM" and model.config.seer_nz_ratio == 0.5
