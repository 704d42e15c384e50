"""Retrieval-structured distillation data (training/retrieval_data.py): each kind repeats earlier
spans later in the sequence, every token comes from the corpus (or the two delimiters), the mix
rewrites exactly the asked share of sequences, deterministically in the seed."""
import numpy as np
import pytest
import torch

from seer_attn.training import data as D
from seer_attn.training.retrieval_data import RETRIEVAL_KINDS, delimiter_ids, mix_retrieval, retrieval_sequence

SEP, NL = (3,), (4,)


def _corpus(seed=0, n=40_000):
    return np.random.default_rng(seed).integers(10, 5000, size=n)


@pytest.mark.parametrize("T", [256, 1000, 2048, 8192])
@pytest.mark.parametrize("kind", RETRIEVAL_KINDS)
def test_every_copy_repeats_an_earlier_span(kind, T):
    """The copies a sequence reports hold: the later span equals the earlier one, which ends
    before it starts; repeated passages lie at least T/8 later and are at least T/32 long."""
    corpus = _corpus()
    for s in range(20):
        out, copies = retrieval_sequence(corpus[s * 97:s * 97 + T], corpus, np.random.default_rng([s]), kind, SEP, NL)
        assert out.shape == (T,) and copies
        for c in copies:
            assert c.src + c.length <= c.dst and c.dst + c.length <= T
            assert np.array_equal(out[c.src:c.src + c.length], out[c.dst:c.dst + c.length])
            if kind == "repeat":
                assert c.dst - c.src >= T // 8 and c.length >= T // 32
            else:  # a record: newline, key, separator, value, newline
                rec = out[c.dst:c.dst + c.length]
                assert rec[0] == NL[0] and rec[-1] == NL[0] and (rec[1:-1] == SEP[0]).sum() >= 1


@pytest.mark.parametrize("kind", RETRIEVAL_KINDS)
def test_tokens_come_from_the_corpus_and_the_delimiters_only(kind):
    """Nothing is invented: no token outside the corpus and the delimiters (so nothing of the
    passkey generator's text unless the corpus holds it)."""
    corpus = _corpus(1)
    allowed = set(corpus.tolist()) | set(SEP) | set(NL)
    for s in range(10):
        out, _ = retrieval_sequence(corpus[:2048], corpus, np.random.default_rng([s, 1]), kind, SEP, NL)
        assert set(out.tolist()) <= allowed


def test_haystack_background_repeats_one_passage():
    corpus = _corpus(2)
    out, copies = retrieval_sequence(corpus[:4096], corpus, np.random.default_rng(5), "haystack", SEP, NL)
    written = np.zeros(4096, dtype=bool)
    for c in copies:
        written[c.src:c.src + c.length] = written[c.dst:c.dst + c.length] = True
    # outside the records, token t equals token t - period for some period below T/8
    periods = [p for p in range(16, 4096 // 8 + 1)
               if np.all(out[p:][~written[p:] & ~written[:-p]] == out[:-p][~written[p:] & ~written[:-p]])]
    assert periods


def _packed(n=24, T=512, seed=0):
    import datasets
    arr = np.random.default_rng(seed).integers(10, 5000, size=(n, T)).astype(np.int32)
    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"), length=T)})
    return datasets.Dataset.from_dict({"input_ids": arr}, features=features).with_format("torch")


@pytest.mark.parametrize("fraction", [0.0, 0.25, 1.0])
def test_mix_rewrites_the_asked_share_deterministically(fraction):
    ds = _packed()
    before = ds[:]["input_ids"]
    mixed = mix_retrieval(ds, fraction, seed=7)
    after = mixed[:]["input_ids"]
    assert after.dtype == before.dtype and after.shape == before.shape and mixed.features == ds.features
    changed = (after != before).any(-1)
    assert int(changed.sum()) == round(fraction * len(ds))
    assert torch.equal(mix_retrieval(ds, fraction, seed=7)[:]["input_ids"], after)
    if 0 < fraction:
        assert not torch.equal(mix_retrieval(ds, fraction, seed=8)[:]["input_ids"], after)


def test_mix_with_one_kind_and_a_real_tokenizer(byte_tokenizer):
    sep, nl = delimiter_ids(byte_tokenizer)
    assert byte_tokenizer.decode(list(sep)) == " =" and byte_tokenizer.decode(list(nl)) == "\n"
    mixed = mix_retrieval(_packed(8), 1.0, seed=1, tokenizer=byte_tokenizer, kinds=("lookup",))
    for row in mixed[:]["input_ids"]:
        assert (row == sep[-1]).sum() >= 2 and (row == nl[0]).sum() >= 4  # records and their queries


@pytest.mark.parametrize("kwargs,match", [
    (dict(fraction=1.5), "fraction=1.5 is invalid"),
    (dict(fraction=True), "fraction=True is invalid"),
    (dict(fraction=0.5, kinds=("needle",)), "kinds=\\('needle',\\) is invalid"),
    (dict(fraction=0.5, kinds=()), "kinds=\\(\\) is invalid"),
])
def test_mix_refuses_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mix_retrieval(_packed(4), **kwargs)


def test_mix_refuses_a_stream(byte_tokenizer, tmp_path, datasets_cache):
    src = tmp_path / "d.jsonl"
    src.write_text("\n".join('{"text": "%s"}' % ("word " * 200) for _ in range(4)) + "\n")
    stream = D.load_packed_dataset(str(src), byte_tokenizer, 256, streaming=True, cache_dir=datasets_cache)
    with pytest.raises(TypeError, match="not streaming"):
        mix_retrieval(stream, 0.5)
