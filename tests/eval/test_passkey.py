"""seer_attn.eval.passkey: deterministic prompts, the scorer, and the runner."""
import random
import re

import pytest
import torch

from seer_attn.eval.passkey import (INSTRUCTION, QUESTION, PasskeyGenerator, generate_passkey_samples,
                                    needle_block_recall, paired_passkey, random_passkey, run_passkey, score_passkey)


# ----------------------------------------------------------------------------- scorer

@pytest.mark.parametrize("generation,key", [
    (" 68130. Remember it.", "68130"),
    ("68130", "68130"),
    ("\n 1234567 is the pass key", "1234567"),
    (" is 555555, yes 12", 555555),
], ids=["sentence", "bare", "newline", "int-key"])
def test_score_right(generation, key):
    assert score_passkey(generation, key)


@pytest.mark.parametrize("generation,key", [
    (" 6813.", "68130"),  # prefix of the key
    (" 681301", "68130"),  # longer number
    (" 12 68130", "68130"),  # the first number is not the key
    (" sixty-eight thousand", "68130"),
    ("", "68130"),
    (None, "68130"),
], ids=["short", "long", "other-first", "words", "empty", "none"])
def test_score_wrong(generation, key):
    assert not score_passkey(generation, key)


# ----------------------------------------------------------------------------- generator

def test_random_passkey_has_5_to_7_digits():
    rng = random.Random(0)
    keys = [random_passkey(rng) for _ in range(300)]
    assert {len(k) for k in keys} == {5, 6, 7}
    assert all(k.isdigit() and k[0] != "0" for k in keys)


def test_same_seed_same_prompts(tokenizer):
    a = generate_passkey_samples(tokenizer, [256, 400], [0.0, 0.5, 1.0], 2, seed=7)
    b = generate_passkey_samples(tokenizer, [256, 400], [0.0, 0.5, 1.0], 2, seed=7)
    assert a == b and len(a) == 12
    c = generate_passkey_samples(tokenizer, [256, 400], [0.0, 0.5, 1.0], 2, seed=8)
    assert [s.passkey for s in a] != [s.passkey for s in c]
    assert len({s.passkey for s in a}) > 6  # keys vary across cells and samples
    # a sample depends on (seed, length, depth, index) only, not on the rest of the grid
    single = PasskeyGenerator(tokenizer, seed=7).sample(400, 0.5, 1)
    assert single == [s for s in a if (s.length, s.depth, s.sample) == (400, 0.5, 1)][0]


@pytest.mark.parametrize("length", [256, 400, 1000])
@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_prompt_fills_length_and_places_needle(tokenizer, length, depth):
    gen = PasskeyGenerator(tokenizer, seed=0, answer_tokens=12)
    s = gen.sample(length, depth)
    n = len(tokenizer(s.prompt)["input_ids"])
    assert n == s.prompt_tokens and n + 12 <= length
    # maximal: one more filler sentence would not fit (a sentence is at most ~20 tokens here)
    assert n > length - 12 - 25
    assert s.prompt.startswith(INSTRUCTION) and s.prompt.endswith(QUESTION)
    assert re.findall(r"\d+", s.prompt) == [s.passkey, s.passkey] and 5 <= len(s.passkey) <= 7
    filler_start, filler_end = len(INSTRUCTION), len(s.prompt) - len(QUESTION)
    pos = s.prompt.index("The pass key is")
    needle_len = len(f"The pass key is {s.passkey}. Remember it. {s.passkey} is the pass key.")
    share = (pos - filler_start) / (filler_end - filler_start - needle_len)
    assert share == pytest.approx(depth, abs=0.05)


def test_corpus_and_text_filler(tokenizer, corpus_docs):
    text = corpus_docs[0]["text"]
    s = PasskeyGenerator(tokenizer, seed=1, filler=text).sample(300, 0.5)
    assert s.prompt_tokens + 12 <= 300
    words = s.prompt[len(INSTRUCTION):].split()
    assert words[0] in text.split()
    assert "The grass is green" not in s.prompt
    s2 = PasskeyGenerator(tokenizer, seed=1, filler="corpus").sample(300, 0.5)  # the bundled eval corpus
    assert s2.prompt_tokens + 12 <= 300 and "The grass is green" not in s2.prompt


def test_generator_errors(tokenizer):
    gen = PasskeyGenerator(tokenizer)
    with pytest.raises(ValueError, match="length=40 is too short"):
        gen.sample(40, 0.5)
    with pytest.raises(ValueError, match="depth=1.5"):
        gen.sample(300, 1.5)
    with pytest.raises(ValueError, match="length=0"):
        gen.sample(0, 0.5)
    with pytest.raises(ValueError, match="filler=''"):
        PasskeyGenerator(tokenizer, filler="")
    with pytest.raises(ValueError, match="too short for length=5000"):
        PasskeyGenerator(tokenizer, filler="just a few words here").sample(5000, 0.5)
    with pytest.raises(ValueError, match="samples_per_cell=0"):
        gen.samples([300], [0.5], 0)


# ----------------------------------------------------------------------------- runner

def test_run_passkey_dense_and_sparse(model, tokenizer):
    res = run_passkey(model, tokenizer, lengths=[256, 320], depths=[0.0, 1.0], seed=3, max_new_tokens=6,
                      progress=False)
    assert len(res["samples"]) == 4 and res["density"] is None and res["density_per_length"] is None
    assert all(r["density"] is None for r in res["samples"])
    assert [(c["length"], c["depth"], c["n"]) for c in res["cells"]] == [(256, 0.0, 1), (256, 1.0, 1),
                                                                      (320, 0.0, 1), (320, 1.0, 1)]
    for r in res["samples"]:
        assert r["correct"] == score_passkey(r["generation"], r["passkey"])
        assert 1 <= r["generated_tokens"] <= 6
    assert res["accuracy"] == sum(r["correct"] for r in res["samples"]) / 4
    assert res["per_length"][256] == (res["samples"][0]["correct"] + res["samples"][1]["correct"]) / 2
    again = run_passkey(model, tokenizer, lengths=[256, 320], depths=[0.0, 1.0], seed=3, max_new_tokens=6,
                        progress=False)
    assert [r["generation"] for r in again["samples"]] == [r["generation"] for r in res["samples"]]  # greedy

    model.set_seer_mode("sparse", seer_selector="streaming", seer_sparsity_method="nz_ratio", seer_nz_ratio=0.3)
    samples = generate_passkey_samples(tokenizer, [700], [0.5], seed=3, answer_tokens=6)
    assert 640 < samples[0].prompt_tokens <= 694
    sparse = run_passkey(model, tokenizer, samples=samples, max_new_tokens=6, progress=False)
    # one prefill of 641..694 tokens: 11 blocks; streaming with k = 1 keeps {0, i} in rows 0..8,
    # the last 2 rows dense: (1 + 2 * 8 + 10 + 11) of 66 causal blocks; decode steps add nothing
    assert sparse["density"] == pytest.approx((1 + 2 * 8 + 10 + 11) / 66, abs=1e-6)
    assert sparse["samples"][0]["density"] == pytest.approx(sparse["density"], abs=1e-6)
    assert sparse["density_per_length"] == {700: pytest.approx(sparse["density"], abs=1e-6)}


# ----------------------------------------------------------------------------- paired comparison

def _res(correct, seed=0):
    return {"samples": [{"seed": seed, "length": 2048, "depth": i / 10, "sample": 0, "correct": c}
                        for i, c in enumerate(correct)]}


def test_paired_passkey_counts_and_sign_test():
    ref = _res([1, 1, 1, 1, 1, 1, 0, 0, 1])
    oth = _res([0, 0, 0, 0, 0, 1, 1, 0, 1])  # lost 5, gained 1
    v = paired_passkey(ref, oth)
    assert (v["n"], v["lost"], v["gained"]) == (9, 5, 1)
    assert v["p_value"] == pytest.approx(2 * (1 + 6) / 64)  # exact: 2 * P(Bin(6, 1/2) <= 1)
    assert paired_passkey(ref, ref) == {"n": 9, "lost": 0, "gained": 0, "p_value": 1.0}
    many = paired_passkey(_res([1] * 12), _res([0] * 12))
    assert many["p_value"] == pytest.approx(2 / 2 ** 12)
    assert paired_passkey(_res([0, 1]), _res([1, 0]))["p_value"] == 1.0  # one each way: capped at 1


def test_paired_passkey_rejects_unpaired_results():
    with pytest.raises(ValueError, match="different prompts"):
        paired_passkey(_res([1, 1]), _res([1, 1], seed=1))
    with pytest.raises(ValueError, match="the other result has no samples"):
        paired_passkey(_res([1]), {"accuracy": 1.0})


# ----------------------------------------------------------------------------- needle recall

def test_needle_block_recall(model, tokenizer):
    gen = PasskeyGenerator(tokenizer, seed=5)
    s = gen.sample(1000, 0.4)
    ids = tokenizer(s.prompt)["input_ids"]
    model.set_seer_mode("sparse", seer_selector="oracle_max", seer_sparsity_method="nz_ratio", seer_nz_ratio=1.0,
                        seer_keep_local=1, seer_dense_last_rows=2)
    full = needle_block_recall(model, tokenizer, s)
    nb = (len(ids) + 63) // 64
    assert full["num_blocks"] == nb and full["needle_block"] == full["needle_token"] // 64
    assert s.passkey.startswith(tokenizer.decode(ids[full["needle_token"]]).strip())  # the key's first token
    assert full["rows"] == (full["needle_block"] + 2, nb - 2)
    assert full["recall"].shape == (model.config.num_hidden_layers, model.config.num_attention_heads)
    assert torch.all(full["recall"] == 1.0)  # everything kept
    # streaming keeping 2 blocks a row (sink + diagonal): no row after the needle keeps it
    model.set_seer_mode("sparse", seer_selector="streaming", seer_nz_ratio=2 / nb, seer_keep_local=0,
                        seer_dense_last_rows=0, seer_keep_sink=False)
    none = needle_block_recall(model, tokenizer, s)
    assert none["rows"] == (none["needle_block"] + 1, nb) and torch.all(none["recall"] == 0.0)
    model.set_seer_mode("sparse", seer_dense_last_rows=nb)
    with pytest.raises(ValueError, match="leaves no block row"):
        needle_block_recall(model, tokenizer, s)
    model.set_seer_mode("dense")
    with pytest.raises(ValueError, match="needs seer_mode 'sparse'"):
        needle_block_recall(model, tokenizer, s)
