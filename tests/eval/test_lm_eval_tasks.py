"""The lm-eval tasks in seer_attn/eval/tasks and ``seer-attn eval`` (harness), offline, on a tiny
random SeerLlama: tasks load from local files, token perplexity is exp(-sum ll / sum tokens)
with lm-eval's own windows, passkey prompts come from the generator, densities are recorded."""
import argparse
import importlib.util
from dataclasses import asdict
import json
import math
import os

import pytest
import torch

from seer_attn.eval.harness import TASKS_DIR, EvalConfig, add_eval_args, run_eval, settings_for
from seer_attn.training.run_config import config_from_args
from seer_attn.eval.passkey import PasskeyGenerator, score_passkey

lm_eval = pytest.importorskip("lm_eval", reason="the eval extra (lm-eval) is not installed")
from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

SEER_TASKS = ("seer_ppl", "seer_ppl_pg19", "seer_ppl_proofpile", "seer_passkey")


def _utils():
    spec = importlib.util.spec_from_file_location("seer_task_utils_under_test", os.path.join(TASKS_DIR, "utils.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _evaluate(model, tokenizer, task, metadata, max_length, limit=None):
    lm = HFLM(pretrained=model, tokenizer=tokenizer, max_length=max_length, batch_size=1)
    tm = TaskManager(include_path=TASKS_DIR, include_defaults=False, metadata=metadata)
    return simple_evaluate(model=lm, tasks=[task], task_manager=tm, limit=limit, bootstrap_iters=0, log_samples=True)


def test_tasks_load_from_the_include_path():
    tm = TaskManager(include_path=TASKS_DIR, include_defaults=False)
    assert set(SEER_TASKS) <= set(tm.all_tasks)
    assert "seer_long" in tm.all_tags
    for name in SEER_TASKS:
        assert os.path.isfile(os.path.join(TASKS_DIR, f"{name}.yaml"))
    assert os.path.isfile(os.path.join(TASKS_DIR, "README.md"))


def test_seer_ppl_token_perplexity(model, tokenizer, tokenizer_dir, corpus_path, corpus_docs):
    L = 256
    res = _evaluate(model, tokenizer, "seer_ppl", {"tokenizer": tokenizer_dir, "max_length": L, "corpus": corpus_path},
                    L, limit=2)
    samples = res["samples"]["seer_ppl"]
    assert len(samples) == 2
    lls, counts = [], []
    for s in samples:
        doc = s["doc"]
        original = next(d["text"] for d in corpus_docs if d["id"] == doc["id"])
        assert original.startswith(doc["text"])  # cut at a token boundary after 2 full windows
        ids = tokenizer(doc["text"])["input_ids"]  # what HFLM.tok_encode scores
        assert doc["n_tokens"] == len(ids) == 2 * L and doc["n_windows"] == 2
        ll = s["resps"][0][0]
        # lm-eval's disjoint rolling windows, recomputed: [prefix] + t[0:L-1] -> t[0:L], [t[L-1]] + t[L:2L-1] -> t[L:2L]
        t = torch.tensor(ids)
        ref = 0.0
        with torch.no_grad():
            for inp, tgt in ((torch.cat([torch.tensor([tokenizer.bos_token_id]), t[:L - 1]]), t[:L]),
                             (t[L - 1:2 * L - 1], t[L:2 * L])):
                logp = torch.log_softmax(model(inp[None]).logits[0].double(), -1)
                ref += logp[torch.arange(L), tgt].sum().item()
        assert ll == pytest.approx(ref, rel=1e-5)
        lls.append(ll)
        counts.append(doc["n_tokens"])
    r = res["results"]["seer_ppl"]
    assert r["token_perplexity,none"] == pytest.approx(math.exp(-sum(lls) / sum(counts)), rel=1e-9)
    austen = [(s["resps"][0][0], s["doc"]["n_tokens"]) for s in samples if s["doc"]["source"] == "austen"]
    assert r["token_perplexity_austen,none"] == pytest.approx(math.exp(-austen[0][0] / austen[0][1]), rel=1e-9)
    words = sum(len(s["doc"]["text"].split()) for s in samples)
    assert r["word_perplexity,none"] == pytest.approx(math.exp(-sum(lls) / words), rel=1e-9)
    assert r["token_perplexity,none"] < r["word_perplexity,none"]


def test_seer_passkey_task(model, tokenizer, tokenizer_dir):
    meta = {"tokenizer": tokenizer_dir, "max_length": 320, "passkey_lengths": [256, 320], "passkey_depths": [0, 1],
            "passkey_seed": 5}
    res = _evaluate(model, tokenizer, "seer_passkey", meta, 320)
    samples = res["samples"]["seer_passkey"]
    expected = PasskeyGenerator(tokenizer, seed=5, answer_tokens=12).samples([256, 320], [0.0, 1.0])
    assert [s["doc"]["prompt"] for s in samples] == [e.prompt for e in expected]  # fixed seed, same prompts
    assert [s["arguments"][0][0] for s in samples] == [e.prompt for e in expected]  # sent as they are
    correct = [score_passkey(s["resps"][0][0], s["doc"]["passkey"]) for s in samples]
    r = res["results"]["seer_passkey"]
    assert r["acc,none"] == pytest.approx(sum(correct) / 4)
    assert r["acc_len256,none"] == pytest.approx(sum(correct[:2]) / 2)
    assert r["acc_len320_depth1,none"] == pytest.approx(float(correct[3]))


def test_task_utils_validate_metadata(tokenizer_dir, corpus_path, tokenizer):
    u = _utils()
    with pytest.raises(ValueError, match="needs `max_length`"):
        u.ppl_local(tokenizer=tokenizer_dir, corpus=corpus_path)
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        u.ppl_local(max_length=256, corpus=corpus_path)
    with pytest.raises(ValueError, match="no document has a full window of max_length=100000"):
        u.ppl_local(tokenizer=tokenizer_dir, max_length=100000, corpus=corpus_path)
    with pytest.raises(ValueError, match=r"passkey_lengths \[400\] exceed max_length=320"):
        u.passkey(tokenizer=tokenizer_dir, max_length=320, passkey_lengths=[256, 400])
    with pytest.raises(ValueError, match="windows_per_doc=0"):
        u.ppl_local(tokenizer=tokenizer_dir, max_length=256, corpus=corpus_path, windows_per_doc=0)
    # metadata as lm-eval's --metadata / --model_args strings
    ds = u.passkey(pretrained=tokenizer_dir, max_length="400", passkey_lengths="256,400", passkey_depths="[0.5]")
    assert ds["test"]["length"] == [256, 400]


@pytest.mark.parametrize("partial", [False, True], ids=["full-windows", "partial"])
def test_task_documents_are_cut_to_windows(tokenizer_dir, corpus_path, corpus_docs, tokenizer, partial):
    L = 1000
    docs = _utils().ppl_local(tokenizer=tokenizer_dir, max_length=L, corpus=corpus_path,
                              partial_windows=partial)["test"]
    by_id = {d["id"]: d for d in docs}
    for d in corpus_docs:
        n = len(tokenizer(d["text"])["input_ids"])
        if n < L and not partial:
            assert d["id"] not in by_id
            continue
        doc = by_id[d["id"]]
        want = min(n, 2 * L) if partial else min(2, n // L) * L
        assert doc["n_tokens"] == want == len(tokenizer(doc["text"])["input_ids"])
        assert d["text"].startswith(doc["text"])


def test_process_ppl_weights():
    u = _utils()
    out = u.process_ppl({"text": "a bc déf", "n_tokens": 7, "source": "kjv"}, [-3.5])
    assert out["token_perplexity"] == (-3.5, 7) and out["token_perplexity_kjv"] == (-3.5, 7)
    assert out["word_perplexity"] == (-3.5, 3) and out["byte_perplexity"] == (-3.5, 9)
    other = u.process_ppl({"text": "x", "n_tokens": 1, "source": "pg19"}, [-1.0])
    assert not any(k.startswith("token_perplexity_") for k in other)


def test_hflm_truncates_prompts_from_the_left(model, tokenizer):
    """The fact README.md states for LongBench: HFLM keeps the last max_length - max_gen_toks tokens."""
    lm = HFLM(pretrained=model, tokenizer=tokenizer, max_length=64, batch_size=1)
    text = " ".join(str(i) for i in range(200))
    ids = tokenizer(text)["input_ids"]
    enc, _ = lm.tok_batch_encode([text], left_truncate_len=64 - 12)
    assert enc[0].tolist() == ids[-(64 - 12):]


# ----------------------------------------------------------------------------- harness

def _parse(argv):
    return add_eval_args(argparse.ArgumentParser()).parse_args(argv)


def _args(argv):
    """The EvalConfig the command line ``seer-attn eval ARGV`` builds."""
    return config_from_args(EvalConfig, _parse(argv))


def test_settings_for(model):
    assert [str(s) for s in settings_for(_args(["--max-length", "8", "--output", "x"]), model)] == ["dense"]
    a = _args(["--max-length", "8", "--output", "x", "--seer-mode", "sparse", "--selector", "oracle_max",
               "--method", "nz_ratio", "--param", "0.2", "0.1"])
    assert [str(s) for s in settings_for(a, model)] == ["oracle_max:nz_ratio=0.2", "oracle_max:nz_ratio=0.1"]
    a = _args(["--max-length", "8", "--output", "x", "--seer-mode", "sparse", "--density", "0.3"])
    assert [str(s) for s in settings_for(a, model)] == ["gate:threshold@0.3"]
    a = _args(["--max-length", "8", "--output", "x", "--seer-mode", "sparse", "--method", "density", "--param", "0.1"])
    assert [str(s) for s in settings_for(a, model)] == ["gate:density=0.1"]
    with pytest.raises(ValueError, match="add --seer-mode sparse"):
        settings_for(_args(["--max-length", "8", "--output", "x", "--param", "0.1"]), model)
    with pytest.raises(ValueError, match="either --param or --density"):
        settings_for(_args(["--max-length", "8", "--output", "x", "--seer-mode", "sparse", "--param", "0.1",
                                  "--density", "0.2"]), model)
    with pytest.raises(SystemExit):  # --max-length is required: HFLM must never guess it
        _parse(["--output", "x"])


def test_run_eval_end_to_end(model_dir, corpus_path, tmp_path, check_envelope):
    """From Python: an EvalConfig, no argparse; the envelope records the config as given."""
    out_dir = tmp_path / "out"
    config = EvalConfig(model=model_dir, tasks=("seer_ppl", "seer_passkey"), max_length=512, limit=2,
                        corpus=corpus_path, metadata={"passkey_lengths": [256, 512], "passkey_depths": [0.5]},
                        settings=("dense", "streaming:nz_ratio=0.3"), output=str(out_dir))
    out = run_eval(config)
    saved = json.loads((out_dir / "results.json").read_text())
    check_envelope(saved, "lm_eval")
    assert EvalConfig(**saved["config"]) == config  # the envelope's config rebuilds the run's
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"  # the harness's device
    prov, cfg, resolved = saved["provenance"], saved["config"], saved["resolved"]
    assert prov["model"] == model_dir and prov["gpu"] == device and cfg["max_length"] == 512
    assert resolved["tasks"] == ["seer_ppl", "seer_passkey"]
    assert resolved["settings"] == ["dense", "streaming:nz_ratio=0.3"]
    assert resolved["task_metadata"]["max_length"] == 512 and resolved["dtype"] == "float32"
    assert os.path.isfile(os.path.join(resolved["task_metadata"]["tokenizer"], "tokenizer.json"))
    dense, sparse = saved["rows"]
    assert dense["setting"] == "dense" and dense["seer"] == {"mode": "dense"} and dense["density"] is None
    assert sparse["seer"]["selector"] == "streaming" and sparse["seer"]["param"] == pytest.approx(0.3)
    # every perplexity window is a 512-token forward (HFLM got max_length): streaming keeps 26 of 36 blocks
    assert sparse["task_density"]["seer_ppl"] == pytest.approx(26 / 36, abs=1e-6)
    # passkey prompts of <= 244 tokens (4 blocks, all kept) and <= 500 tokens (8 blocks, 26 of 36)
    assert sparse["task_density"]["seer_passkey"] == pytest.approx((1 + 26 / 36) / 2, abs=1e-6)
    ppl_d = dense["lm_eval"]["results"]["seer_ppl"]["token_perplexity,none"]
    ppl_s = sparse["lm_eval"]["results"]["seer_ppl"]["token_perplexity,none"]
    assert ppl_d > 1 and ppl_s > 1 and ppl_d != pytest.approx(ppl_s, rel=1e-7)
    assert sparse["metrics"]["seer_ppl"]["token_perplexity"] == ppl_s
    assert "acc" in sparse["metrics"]["seer_passkey"]
    table = (out_dir / "results.md").read_text()
    assert "| setting | density | density seer_ppl | density seer_passkey |" in table
    assert "| dense | 1.000 |" in table and "| streaming:nz_ratio=0.3 | " in table
    assert out["plot"] == str(out_dir / "ppl_vs_density.png") and os.path.getsize(out["plot"]) > 1000


@pytest.mark.parametrize("extra, message", [
    (["--max-length", "1"], "argument --max-length: invalid value '1': expected an integer >= 2"),
    (["--max-length", "64", "--batch-size", "0"], "argument --batch-size: invalid value '0': expected an integer >= 1"),
    (["--max-length", "64", "--param", "1.5"], "argument --param: invalid value '1.5': expected a number 0 < x <= 1"),
    (["--max-length", "64", "--param", "1", "--method", "threshold"],
     "--param=1.0 is invalid for method 'threshold': expected 0 < threshold < 1"),
    (["--max-length", "64", "--method", "threshold", "--param", "0.1", "1"], "--param=1.0 is invalid for method"),
    (["--max-length", "64", "--density", "0"], "argument --density: invalid value '0'"),
    (["--max-length", "64", "--calib-tol", "inf"], "argument --calib-tol: invalid value 'inf'"),
    (["--max-length", "64", "--limit", "-1"], "argument --limit: invalid value '-1'"),
    (["--max-length", "64", "--tasks", ","], "argument --tasks: invalid value ',': names no task"),
    (["--max-length", "64", "--metadata", "{oops"], "argument --metadata: invalid value '{oops': not valid JSON"),
    (["--max-length", "64", "--settings", "gate:threshold=2"], "argument --settings: param=2.0 is invalid"),
])
def test_eval_rejects_bad_arguments(extra, message, capsys):
    with pytest.raises(SystemExit) as exc:
        _parse(["--output", "x", *extra])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err.splitlines()[-1] and "Traceback" not in err


def test_eval_accepts_nz_ratio_one():
    assert _args(["--output", "x", "--max-length", "64", "--method", "nz_ratio", "--param", "1"]).param == (1.0,)


@pytest.mark.parametrize("fields, message", [
    ({"max_length": 1}, "max_length=1 is invalid: expected an integer >= 2"),
    ({"max_length": 64, "param": (0.1,), "density": (0.2,)}, "give either param or density, not both"),
    ({"max_length": 64, "method": "threshold", "param": (0.1, 1.0)},
     "param=1.0 is invalid for method 'threshold': expected 0 < threshold < 1"),
    ({"max_length": 64, "selector": "nope"}, "selector='nope' is invalid: expected one of"),
    ({"max_length": 64, "tasks": "seer_ppl"}, "tasks='seer_ppl' is invalid: expected a list of values"),
    ({"max_length": 64, "settings": ("gate:threshold=2",)}, r"settings\[0\]='gate:threshold=2' is invalid"),
    ({"max_length": 64, "metadata": "{oops"}, "metadata='{oops' is invalid: not valid JSON"),
], ids=["max-length", "param-and-density", "param-range", "selector", "tasks-string", "settings", "metadata"])
def test_eval_config_refuses_bad_fields(fields, message):
    with pytest.raises(ValueError, match=message):
        EvalConfig(**fields)


def test_eval_config_needs_max_length():
    with pytest.raises(TypeError, match="max_length"):  # HFLM must never guess it
        EvalConfig()
    with pytest.raises(ValueError, match="max_length=None is invalid: a value is required"):
        EvalConfig(max_length=None)


def _tiny_decode_model(tokenizer):
    from seer_attn.modeling_seer import SeerLlamaConfig, SeerLlamaForCausalLM
    cfg = SeerLlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                          seer_gate_hidden_size=32, seer_decode_gate=True, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    return SeerLlamaForCausalLM(cfg).eval()


def test_run_eval_with_sparse_decode(tokenizer, corpus_path, tmp_path, monkeypatch):
    """``--decode share=0.5,prior=0.5``: lm-eval's generation (passkey) runs sparse decode steps on the
    model's decode gates, each run records its decode setting, and the model's options come back
    afterwards; a model without decode gates is refused in one line before any run."""
    from seer_attn.eval import harness
    model = _tiny_decode_model(tokenizer)
    monkeypatch.setattr(harness, "_load", lambda config: (model, tokenizer, "float32"))
    config = EvalConfig(model="tiny", tasks=("seer_passkey",), max_length=512, limit=2, corpus=corpus_path,
                        metadata={"passkey_lengths": [512], "passkey_depths": [0.5]}, settings=("dense",),
                        decode="share=0.5,prior=0.5", output=str(tmp_path / "out"))
    out = run_eval(config)
    (row,) = out["rows"]
    assert row["decode"] == "share=0.5,prior=0.5" and out["resolved"]["decode"] == ["share=0.5,prior=0.5"]
    kept = model.seer_decode_density()  # the last generation's decode steps: about half of ~8 blocks
    assert kept is not None and bool(((kept > 0.3) & (kept < 0.9)).all())
    # every generation's decode steps (2 prompts): the run's decode density averages them
    assert 0.3 < row["decode_density"] < 0.9 and row["task_decode_density"]["seer_passkey"] == row["decode_density"]
    assert not model.config.seer_decode_sparsity and model.config.seer_decode_meanpool_prior == 0.0
    table = (tmp_path / "out" / "results.md").read_text()
    assert "decode share=0.5,prior=0.5" in table and "| decode | decode density |" in table
    assert f"| share=0.5,prior=0.5 | {row['decode_density']:.3f} |" in table
    # without --decode the model decodes as it is set (and says so); --decode dense forces dense decode
    model.set_seer_mode("dense", seer_decode_sparsity=True, seer_decode_method="budget", seer_decode_budget=256)
    as_set = run_eval(EvalConfig(**{**asdict(config), "decode": None}))
    # the model as set decodes on its default int8 gate keys (since session 47), and the row names them
    assert as_set["rows"][0]["decode"] == "budget=256,keys=i8" and as_set["rows"][0]["decode_density"] is not None
    dense = run_eval(EvalConfig(**{**asdict(config), "decode": "dense"}))
    assert dense["rows"][0]["decode"] == "dense" and dense["rows"][0]["decode_density"] is None
    assert model.config.seer_decode_budget == 256  # put back after the runs
    plain = _tiny_decode_model(tokenizer)
    plain.config.seer_decode_gate = False
    monkeypatch.setattr(harness, "_load", lambda config: (plain, tokenizer, "float32"))
    with pytest.raises(ValueError, match=r"--decode share=0.5,prior=0.5 needs a model with decode gates"):
        run_eval(config)
    with pytest.raises(ValueError, match="invalid decode setting 'topk=3'"):
        EvalConfig(max_length=64, decode="topk=3")
