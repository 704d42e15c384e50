"""seer_attn.eval.perplexity: corpus loading, windows, and the PPL protocol against a plain loop."""
import gzip
import json
import math
import os

import pytest
import torch

from seer_attn.eval.perplexity import (DensityMeter, Window, default_corpus_path, evaluate_perplexity,
                                       load_documents, make_windows, seer_settings, window_nll)


# ----------------------------------------------------------------------------- corpus

def test_load_documents_jsonl_and_gz(tmp_path, corpus_path, corpus_docs):
    docs = load_documents(corpus_path)
    assert [d["id"] for d in docs] == [d["id"] for d in corpus_docs]
    assert docs[0]["text"] == corpus_docs[0]["text"]
    gz = tmp_path / "c.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        for d in corpus_docs:
            f.write(json.dumps(d) + "\n")
    assert load_documents(str(gz)) == docs
    assert [d["source"] for d in load_documents(corpus_path, sources={"kjv"})] == ["kjv"] * 3
    assert len(load_documents(corpus_path, limit=2)) == 2


def test_load_documents_defaults_and_errors(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text('{"text": "abc"}\n\n{"text": "def", "source": "s", "id": 7}\n')
    docs = load_documents(str(p))
    assert docs == [{"id": "c.jsonl:1", "source": "unknown", "text": "abc"}, {"id": "7", "source": "s", "text": "def"}]
    p.write_text('{"text": "abc"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r"c.jsonl:2.*'text'"):
        load_documents(str(p))
    p.write_text('{"text": "abc"\n')
    with pytest.raises(ValueError, match="not valid JSON"):
        load_documents(str(p))
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_documents(str(tmp_path / "nope.jsonl"))
    p.write_text('{"text": "abc", "source": "a"}\n')
    with pytest.raises(ValueError, match="no documents"):
        load_documents(str(p), sources={"b"})
    with pytest.raises(ValueError, match="limit=0"):
        load_documents(str(p), limit=0)


def test_default_corpus_is_the_bundled_eval_corpus():
    path = default_corpus_path()
    assert os.path.isfile(path) and "eval" in os.path.basename(path)
    docs = load_documents()
    assert len(docs) > 1 and {"austen", "kjv", "cpython-stdlib"} <= {d["source"] for d in docs}


# ----------------------------------------------------------------------------- windows

@pytest.mark.parametrize("max_length,per_doc", [(256, 2), (256, 1), (1000, 2)], ids=["L256x2", "L256x1", "L1000x2"])
def test_make_windows_full_non_overlapping(corpus_docs, tokenizer, max_length, per_doc):
    windows = make_windows(corpus_docs, tokenizer, max_length, per_doc)
    expected = []
    for d in corpus_docs:
        ids = tokenizer(d["text"], add_special_tokens=False)["input_ids"]
        for w in range(min(per_doc, len(ids) // max_length)):
            expected.append((d["id"], w, ids[w * max_length:(w + 1) * max_length]))
    assert [(w.doc_id, w.index, w.input_ids.tolist()) for w in windows] == expected
    assert all(w.input_ids.numel() == max_length for w in windows)
    assert "kjv/tiny" not in {w.doc_id for w in windows}  # shorter than one window


def test_make_windows_partial(corpus_docs, tokenizer):
    windows = make_windows(corpus_docs, tokenizer, 1000, 2, partial_windows=True)
    by_doc = {}
    for w in windows:
        by_doc.setdefault(w.doc_id, []).append(w.input_ids.numel())
    n_short = len(tokenizer(corpus_docs[2]["text"], add_special_tokens=False)["input_ids"])
    assert by_doc["kjv/short"] == [1000, n_short - 1000]
    assert by_doc["kjv/tiny"] == [len(tokenizer(corpus_docs[4]["text"], add_special_tokens=False)["input_ids"])]
    assert by_doc["austen/novel"] == [1000, 1000]


def test_make_windows_validates(corpus_docs, tokenizer):
    with pytest.raises(ValueError, match="max_length=1"):
        make_windows(corpus_docs, tokenizer, 1)
    with pytest.raises(ValueError, match="windows_per_doc=0"):
        make_windows(corpus_docs, tokenizer, 64, 0)


# ----------------------------------------------------------------------------- protocol

def _plain_loop(model, windows):
    """exp(mean NLL) over every predicted token, computed independently: fp64 log-softmax."""
    total, count, per_source = 0.0, 0, {}
    with torch.no_grad():
        for w in windows:
            ids = w.input_ids[None]
            logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
            nll = -logp[torch.arange(ids.shape[1] - 1), ids[0, 1:]].sum().item()
            total += nll
            count += ids.shape[1] - 1
            s = per_source.setdefault(w.source, [0.0, 0])
            s[0] += nll
            s[1] += ids.shape[1] - 1
    return math.exp(total / count), count, {k: math.exp(v[0] / v[1]) for k, v in per_source.items()}


@pytest.mark.parametrize("batch_size", [1, 3], ids=["bs1", "bs3"])
def test_dense_ppl_equals_plain_loop(model, corpus_path, tokenizer, batch_size):
    res = evaluate_perplexity(model, tokenizer, corpus=corpus_path, max_length=256, batch_size=batch_size,
                              progress=False)
    windows = make_windows(load_documents(corpus_path), tokenizer, 256, 2)
    ppl, count, per_source = _plain_loop(model, windows)
    # fp32 logits in both; the evaluator's fp32 chunked cross-entropy vs the loop's fp64 log-softmax
    assert res["ppl"] == pytest.approx(ppl, rel=1e-5)
    assert res["tokens"] == count == len(windows) * 255
    assert res["windows"] == len(windows) == 8
    assert res["documents"] == 4
    assert set(res["per_source"]) == set(per_source) == {"austen", "kjv", "cpython-stdlib"}
    for s, v in per_source.items():
        assert res["per_source"][s]["ppl"] == pytest.approx(v, rel=1e-5)
    assert res["density"] is None and res["seer"] == {"mode": "dense"}
    assert math.log(res["ppl"]) == pytest.approx(res["nll"], rel=1e-12)


def test_sparse_ppl_and_density(model, corpus_path, tokenizer):
    windows = make_windows(load_documents(corpus_path), tokenizer, 512, 1)
    dense = evaluate_perplexity(model, windows=windows, progress=False)
    # streaming keeps sink + recent blocks; at 512 tokens (8 blocks) with k = 1 block per row,
    # the diagonal and the 2 dense last rows: rows 0..5 keep {0, i} -> 1 + 2*5, rows 6, 7 keep 7 + 8
    model.set_seer_mode("sparse", seer_selector="streaming", seer_sparsity_method="nz_ratio", seer_nz_ratio=0.3)
    res = evaluate_perplexity(model, windows=windows, progress=False)
    assert res["density"] == pytest.approx(26 / 36, abs=1e-6)
    assert all(v["density"] == pytest.approx(26 / 36, abs=1e-6) for v in res["per_source"].values())
    assert res["seer"]["selector"] == "streaming" and res["seer"]["param"] == pytest.approx(0.3)
    ppl, _, _ = _plain_loop(model, windows)  # the loop in sparse mode gives the same numbers
    assert res["ppl"] == pytest.approx(ppl, rel=1e-5)
    assert res["ppl"] != pytest.approx(dense["ppl"], rel=1e-6)  # dropping blocks changed the logits


def test_density_of_gate_matches_recorded_density(model, corpus_path, tokenizer):
    windows = make_windows(load_documents(corpus_path), tokenizer, 512, 1)[:3]
    model.set_seer_mode("sparse", seer_selector="gate", seer_sparsity_method="threshold", seer_threshold=0.25)
    res = evaluate_perplexity(model, windows=windows, progress=False)
    per_window = []
    with torch.no_grad():
        for w in windows:
            model(w.input_ids[None])
            per_window.append(model.seer_density().mean().item())
    assert res["density"] == pytest.approx(sum(per_window) / len(per_window), abs=1e-6)
    assert 0.0 < res["density"] < 1.0


def test_window_nll_and_errors(model, tokenizer):
    ids = torch.arange(3, 40)[None]
    nll, dens = window_nll(model, ids)
    assert nll.dtype == torch.float64 and nll.shape == (1,) and dens is None
    with pytest.raises(ValueError, match=r"T >= 2"):
        window_nll(model, torch.tensor([[5]]))
    with pytest.raises(ValueError, match="batch_size=0"):
        evaluate_perplexity(model, windows=[Window("d", "s", 0, ids[0])], batch_size=0)
    with pytest.raises(ValueError, match="tokenizer is needed"):
        evaluate_perplexity(model, corpus="unused")


def test_no_window_is_an_error(model, corpus_path, tokenizer):
    with pytest.raises(ValueError, match="max_length=100000"):
        evaluate_perplexity(model, tokenizer, corpus=corpus_path, max_length=100000, progress=False)


def test_density_meter_counts_prefills_not_decode_steps(model, tokenizer):
    model.set_seer_mode("sparse", seer_selector="streaming", seer_sparsity_method="nz_ratio", seer_nz_ratio=0.3)
    ids = torch.randint(5, len(tokenizer), (2, 512), generator=torch.Generator().manual_seed(0))
    with DensityMeter(model) as meter, torch.no_grad():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                       pad_token_id=tokenizer.pad_token_id)
        model(ids[:1, :256])
    # one value per sequence of the 512-token prefill (26/36), one for the 256-token forward (dense: 4 blocks)
    assert meter.values == pytest.approx([26 / 36, 26 / 36, 1.0], abs=1e-6)
    model.set_seer_mode("dense")
    with DensityMeter(model) as meter, torch.no_grad():
        model(ids)
    assert meter.values == [] and meter.mean is None
    assert seer_settings(model) == {"mode": "dense"}


def test_decode_density_meter_averages_every_generation(tokenizer):
    """One value per sequence of each generate call that decoded sparsely (the kept share over its decode
    steps, as seer_decode_density gives it), none for dense decode or a model that never decoded."""
    from seer_attn.eval.perplexity import DecodeDensityMeter
    from seer_attn.modeling_seer import SeerLlamaConfig, SeerLlamaForCausalLM
    cfg = SeerLlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                          seer_gate_hidden_size=32, seer_decode_gate=True)
    torch.manual_seed(0)
    m = SeerLlamaForCausalLM(cfg).eval()
    ids = torch.randint(5, len(tokenizer), (2, 640), generator=torch.Generator().manual_seed(0))
    gen = dict(attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False, pad_token_id=0)
    with DecodeDensityMeter(m) as meter, torch.no_grad():
        m.generate(input_ids=ids, **gen)  # dense decode: nothing recorded
    assert meter.values == [] and meter.mean is None
    m.set_seer_mode("dense", seer_decode_sparsity=True, seer_decode_method="share", seer_decode_share=0.2)
    kept = []
    with DecodeDensityMeter(m) as meter, torch.no_grad():
        for n in (640, 320):
            m.generate(input_ids=ids[:, :n], **{**gen, "attention_mask": torch.ones_like(ids[:, :n])})
            kept += m.seer_decode_density().tolist()
    assert meter.values == pytest.approx(kept) and len(kept) == 4 and all(0 < k < 1 for k in kept)
