"""The data loader: formats, exact packing, dropped-tail logging, determinism, streaming, errors,
and the bundled corpus. The byte tokenizer maps byte b to id b + 1 and <eos> to 0, so every
expected token stream is computed independently of the tokenizer."""
import gzip
import json
import logging
import re

import pytest
import torch

from seer_attn.training import data as D

DOCS = [f"Document {i}: " + "abcdefghij"[i % 10] * (13 * i + 5) + "\nend." for i in range(12)]
SEQ = 64


def _expected_stream(docs):
    out = []
    for d in docs:
        out += [b + 1 for b in d.encode("utf-8")] + [0]
    return out


def _write_jsonl(path, docs, column="text", gz=False, extra=True):
    opener = gzip.open if gz else open
    with opener(path, "wt", encoding="utf-8") as f:
        for i, d in enumerate(docs):
            row = {"id": i, column: d} if extra else {column: d}
            f.write(json.dumps(row) + "\n")
    return str(path)


def _load(src, tok, cache, seq=SEQ, **kw):
    kw.setdefault("shuffle", False)
    return D.load_packed_dataset(src, tok, seq, cache_dir=cache, **kw)


# ----------------------------------------------------------------------------- packing

def test_packs_exact_stream_and_logs_dropped_tail(tmp_path, byte_tokenizer, datasets_cache, caplog):
    src = _write_jsonl(tmp_path / "docs.jsonl", DOCS)
    caplog.set_level(logging.INFO, logger="seer_attn.training.data")
    ds = _load(src, byte_tokenizer, datasets_cache)
    stream = _expected_stream(DOCS)
    n = len(stream) // SEQ
    dropped = len(stream) - n * SEQ
    assert dropped > 0, "test data should leave an incomplete tail"
    assert len(ds) == n
    got = ds[:]["input_ids"]
    assert got.dtype == torch.int64 and tuple(got.shape) == (n, SEQ)
    assert torch.equal(got.flatten(), torch.tensor(stream[:n * SEQ]))
    assert f"packed {len(stream)} tokens into {n} sequences of {SEQ} tokens; dropped the last {dropped} tokens" \
        in caplog.text


def _write_format(tmp_path, fmt):
    if fmt == "jsonl":
        return _write_jsonl(tmp_path / "d.jsonl", DOCS)
    if fmt == "jsonl.gz":
        return _write_jsonl(tmp_path / "d.jsonl.gz", DOCS, gz=True)
    if fmt == "json-array":
        path = tmp_path / "d.json"
        path.write_text(json.dumps([{"text": d, "n": i} for i, d in enumerate(DOCS)]), encoding="utf-8")
        return str(path)
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        path = tmp_path / "d.parquet"
        pq.write_table(pa.table({"text": DOCS, "n": list(range(len(DOCS)))}), path)
        return str(path)
    if fmt in ("txt", "txt.gz"):  # one document per file
        paths = []
        for i, d in enumerate(DOCS):
            p = tmp_path / f"doc{i:02d}.{fmt}"
            if fmt == "txt.gz":
                with gzip.open(p, "wt", encoding="utf-8") as f:
                    f.write(d)
            else:
                p.write_text(d, encoding="utf-8")
            paths.append(str(p))
        return paths
    raise AssertionError(fmt)


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.gz", "json-array", "parquet", "txt", "txt.gz"])
def test_file_formats_give_the_same_sequences(tmp_path, byte_tokenizer, datasets_cache, fmt):
    ds = _load(_write_format(tmp_path, fmt), byte_tokenizer, datasets_cache)
    stream = _expected_stream(DOCS)
    n = len(stream) // SEQ
    assert torch.equal(ds[:]["input_ids"].flatten(), torch.tensor(stream[:n * SEQ]))


def test_folder_source_reads_supported_files_in_name_order(tmp_path, byte_tokenizer, datasets_cache):
    folder = tmp_path / "corpus"
    folder.mkdir()
    _write_jsonl(folder / "a.jsonl", DOCS[:6])
    _write_jsonl(folder / "b.jsonl", DOCS[6:])
    (folder / "notes.md").write_text("not data")  # unsupported files in a folder are skipped
    ds = _load(str(folder), byte_tokenizer, datasets_cache)
    stream = _expected_stream(DOCS)
    assert torch.equal(ds[:]["input_ids"].flatten(), torch.tensor(stream[:len(ds) * SEQ]))


def test_mixed_file_types_keep_the_given_order(tmp_path, byte_tokenizer, datasets_cache):
    a = _write_jsonl(tmp_path / "a.jsonl", DOCS[:4])
    b = tmp_path / "b.txt"
    b.write_text(DOCS[4], encoding="utf-8")
    c = _write_jsonl(tmp_path / "c.jsonl.gz", DOCS[5:], gz=True)
    ds = _load([a, str(b), c], byte_tokenizer, datasets_cache)
    stream = _expected_stream(DOCS)
    assert torch.equal(ds[:]["input_ids"].flatten(), torch.tensor(stream[:len(ds) * SEQ]))


def test_text_column_option(tmp_path, byte_tokenizer, datasets_cache):
    src = _write_jsonl(tmp_path / "d.jsonl", DOCS, column="content")
    ds = _load(src, byte_tokenizer, datasets_cache, text_column="content")
    stream = _expected_stream(DOCS)
    assert torch.equal(ds[:]["input_ids"].flatten(), torch.tensor(stream[:len(ds) * SEQ]))


def test_separator_id_option(tmp_path, byte_tokenizer, datasets_cache):
    src = _write_jsonl(tmp_path / "d.jsonl", DOCS[:2])
    ds = _load(src, byte_tokenizer, datasets_cache, seq=8, separator_id=256)
    flat = ds[:]["input_ids"].flatten().tolist()
    first = len(DOCS[0].encode())
    assert flat[first] == 256 and 0 not in flat


# ----------------------------------------------------------------------------- order

def test_seeded_shuffle_is_deterministic(tmp_path, byte_tokenizer, datasets_cache):
    src = _write_jsonl(tmp_path / "d.jsonl", DOCS)
    a = _load(src, byte_tokenizer, datasets_cache, shuffle=True, seed=3)[:]["input_ids"]
    b = _load(src, byte_tokenizer, datasets_cache, shuffle=True, seed=3)[:]["input_ids"]
    c = _load(src, byte_tokenizer, datasets_cache, shuffle=True, seed=4)[:]["input_ids"]
    plain = _load(src, byte_tokenizer, datasets_cache, shuffle=False)[:]["input_ids"]
    assert torch.equal(a, b)
    assert a.shape == c.shape == plain.shape  # same documents, so the same number of sequences
    assert not torch.equal(a, c)
    assert not torch.equal(a, plain)
    # the shuffle moves whole documents: each first sequence starts with a whole document
    # (its bytes, then <eos>), not in the middle of one
    for first in (a[0].tolist(), c[0].tolist()):
        assert any(first[:len(s)] == s[:SEQ] for s in map(lambda d: _expected_stream([d]), DOCS))


def test_streaming_matches_map_style_and_is_deterministic(tmp_path, byte_tokenizer, datasets_cache, caplog):
    src = _write_jsonl(tmp_path / "d.jsonl", DOCS)
    import datasets
    stream_ds = D.load_packed_dataset(src, byte_tokenizer, SEQ, shuffle=False, streaming=True)
    assert isinstance(stream_ds, datasets.IterableDataset)
    caplog.set_level(logging.INFO, logger="seer_attn.training.data")
    rows = torch.stack([r["input_ids"] for r in stream_ds])
    assert rows.dtype == torch.int64
    assert torch.equal(rows, _load(src, byte_tokenizer, datasets_cache)[:]["input_ids"])
    assert "dropped the last" in caplog.text
    s1 = D.load_packed_dataset(src, byte_tokenizer, SEQ, seed=5, streaming=True)
    s2 = D.load_packed_dataset(src, byte_tokenizer, SEQ, seed=5, streaming=True)
    assert torch.equal(torch.stack([r["input_ids"] for r in s1]), torch.stack([r["input_ids"] for r in s2]))


# ----------------------------------------------------------------------------- per-source packing

def _write_sourced(path, docs):
    with open(path, "w", encoding="utf-8") as f:
        for i, (src, text) in enumerate(docs):
            f.write(json.dumps({"id": i, "source": src, "text": text}) + "\n")
    return str(path)


SOURCED = [("a" if i % 3 else "b", d) for i, d in enumerate(DOCS)]  # the sources interleaved in the file


def test_per_source_packing_joins_each_source_alone(tmp_path, byte_tokenizer, datasets_cache):
    src = _write_sourced(tmp_path / "s.jsonl", SOURCED)
    ds = _load(src, byte_tokenizer, datasets_cache, source_column="source")
    expected = []
    for name in ("b", "a"):  # sources in order of first appearance, documents in file order
        stream = _expected_stream([d for s, d in SOURCED if s == name])
        n = len(stream) // SEQ
        expected += [stream[i * SEQ:(i + 1) * SEQ] for i in range(n)]
    assert ds[:]["input_ids"].tolist() == expected  # no sequence mixes sources; each tail dropped on its own
    shuffled = _load(src, byte_tokenizer, datasets_cache, source_column="source", shuffle=True, seed=3)[:]["input_ids"]
    again = _load(src, byte_tokenizer, datasets_cache, source_column="source", shuffle=True, seed=3)[:]["input_ids"]
    other = _load(src, byte_tokenizer, datasets_cache, source_column="source", shuffle=True, seed=4)[:]["input_ids"]
    assert torch.equal(shuffled, again) and not torch.equal(shuffled, other)  # a seeded order of the same sequences
    assert sorted(map(tuple, shuffled.tolist())) == sorted(map(tuple, expected))


def test_per_source_packing_errors(tmp_path, byte_tokenizer, datasets_cache):
    plain = _write_jsonl(tmp_path / "d.jsonl", DOCS)
    with pytest.raises(ValueError, match=r"source column 'source' not found in .*d.jsonl; columns found: "
                                         r"\['id', 'text'\]"):
        _load(plain, byte_tokenizer, datasets_cache, source_column="source")
    txt = tmp_path / "doc.txt"
    txt.write_text(DOCS[0])
    with pytest.raises(ValueError, match="plain text files .* carry no 'source' field"):
        _load(str(txt), byte_tokenizer, datasets_cache, source_column="source")
    src = _write_sourced(tmp_path / "s.jsonl", SOURCED)
    with pytest.raises(ValueError, match="no source holds 100000 tokens"):
        _load(src, byte_tokenizer, datasets_cache, seq=100000, source_column="source")
    docs = D.load_documents(src, source_column="source", streaming=True)
    with pytest.raises(ValueError, match="per-source packing needs a map-style dataset"):
        D.pack_documents(docs, byte_tokenizer, SEQ, by_source=True)


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("content", [b"", b"  \n\n \t\n"], ids=["zero-bytes", "whitespace"])
@pytest.mark.parametrize("name", ["e.jsonl", "e.txt", "e.jsonl.gz"])
def test_empty_file_raises(tmp_path, byte_tokenizer, datasets_cache, content, name):
    path = tmp_path / name
    path.write_bytes(gzip.compress(content) if name.endswith(".gz") and content else content)
    with pytest.raises(ValueError, match=r"data file .*e\.(jsonl|txt)(\.gz)?' is empty"):
        _load(str(path), byte_tokenizer, datasets_cache)


def test_missing_text_column_names_column_and_columns_found(tmp_path, byte_tokenizer, datasets_cache):
    src = _write_jsonl(tmp_path / "d.jsonl", DOCS, column="body")
    expected = r"text column 'text' not found in .*d\.jsonl; columns found: \['id', 'body'\]"
    with pytest.raises(ValueError, match=expected):
        _load(src, byte_tokenizer, datasets_cache)
    with pytest.raises(ValueError, match=r"text column 'content' not found"):
        D.load_documents(src, text_column="content", streaming=True)


def test_too_short_data_reports_tokens_and_seq_len(tmp_path, byte_tokenizer, datasets_cache):
    src = _write_jsonl(tmp_path / "d.jsonl", ["hello", "world!"])  # 5+1 + 6+1 = 13 tokens
    with pytest.raises(ValueError, match=r"holds 13 tokens .*fewer than one sequence of seq_len=64"):
        _load(src, byte_tokenizer, datasets_cache)
    stream = D.load_packed_dataset(src, byte_tokenizer, 64, streaming=True)
    with pytest.raises(ValueError, match=r"holds 13 tokens .*seq_len=64"):
        list(stream)


def test_unknown_file_type_and_missing_file(tmp_path, byte_tokenizer, datasets_cache):
    csv = tmp_path / "d.csv"
    csv.write_text("text\nhello\n")
    with pytest.raises(ValueError, match=r"unknown data file type of '.*d\.csv'; supported: .*\.jsonl"):
        _load(str(csv), byte_tokenizer, datasets_cache)
    gz_parquet = tmp_path / "d.parquet.gz"
    gz_parquet.write_bytes(b"x")
    with pytest.raises(ValueError, match="unknown data file type"):
        _load(str(gz_parquet), byte_tokenizer, datasets_cache)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        _load(str(tmp_path / "nope.jsonl"), byte_tokenizer, datasets_cache)
    empty_dir = tmp_path / "empty_dir"
    empty_dir.mkdir()
    with pytest.raises(ValueError, match="holds no supported files"):
        _load(str(empty_dir), byte_tokenizer, datasets_cache)


#: text values that are not a string, and how the error describes them
NOT_STRINGS = {"null": (None, "is null or missing"), "int": (7, "holds an int (7)"),
               "list": (["a", "b"], "holds a list (['a', 'b'])"), "object": ({"x": 1}, "holds an object ({'x': 1})"),
               "missing": (..., "is null or missing")}


@pytest.mark.parametrize("streaming", [False, True], ids=["map", "stream"])
@pytest.mark.parametrize("kind", sorted(NOT_STRINGS))
def test_non_string_text_names_file_line_and_column(tmp_path, byte_tokenizer, datasets_cache, kind, streaming):
    """Null, integer, list or object text failed in the tokenizer without naming the file, or
    (a list) was silently joined; a record without the column read as null."""
    value, described = NOT_STRINGS[kind]
    bad = {"other": 1} if value is ... else {"body": value}
    path = tmp_path / "d.jsonl"  # line 2 is blank: the line number counts it
    path.write_text("\n".join([json.dumps({"body": "fine"}), "", json.dumps(bad), json.dumps({"body": "more"})]))
    expected = re.escape(f"data file '{path}', line 3: column 'body' {described}; every record's text must be a string")
    with pytest.raises(ValueError, match=expected):
        ds = D.load_packed_dataset(str(path), byte_tokenizer, 8, text_column="body", streaming=streaming,
                                   cache_dir=datasets_cache)
        list(ds)  # a stream is checked as it is read


def test_non_string_text_in_parquet_json_array_and_bad_json(tmp_path, byte_tokenizer, datasets_cache):
    import pyarrow as pa
    import pyarrow.parquet as pq
    parquet = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["a", None]}), parquet)
    with pytest.raises(ValueError, match=re.escape(f"data file '{parquet}', row 2: column 'text' is null")):
        _load(str(parquet), byte_tokenizer, datasets_cache)
    array = tmp_path / "d.json"
    array.write_text(json.dumps([{"text": "a"}, {"text": 3}]))
    with pytest.raises(ValueError, match=re.escape(f"data file '{array}', record 2: column 'text' holds an int (3)")):
        _load(str(array), byte_tokenizer, datasets_cache)
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"text": "a"}) + "\n" + '{"text": "b"\n')
    with pytest.raises(ValueError, match=re.escape(f"data file '{broken}', line 2: not valid JSON")):
        _load(str(broken), byte_tokenizer, datasets_cache)


@pytest.mark.parametrize("seq_len", [0, -5, 2.5])
def test_bad_seq_len(tmp_path, byte_tokenizer, datasets_cache, seq_len):
    src = _write_jsonl(tmp_path / "d.jsonl", DOCS)
    with pytest.raises(ValueError, match=f"seq_len must be a positive integer, got {seq_len}"):
        _load(src, byte_tokenizer, datasets_cache, seq=seq_len)


def test_parse_source():
    assert D.parse_source("hub:wikitext:wikitext-2-raw-v1:validation") == \
        D.HubSource("wikitext", "wikitext-2-raw-v1", "validation")
    assert D.parse_source("hub:org/name") == D.HubSource("org/name", None, None)
    assert D.parse_source("hub:org/name::test") == D.HubSource("org/name", None, "test")
    assert D.parse_source("data/x.jsonl") == "data/x.jsonl"
    for bad in ("hub:", "hub::cfg", "hub:a:b:c:d"):
        with pytest.raises(ValueError, match=f"bad Hub data spec '{bad}'"):
            D.parse_source(bad)


# ----------------------------------------------------------------------------- bundled corpus

def _read(split):
    with gzip.open(D.default_corpus_path(split), "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_bundled_corpus():
    train, evl = _read("train"), _read("eval")
    for docs in (train, evl):
        assert all(set(d) == {"id", "source", "text"} for d in docs)
        assert {d["source"] for d in docs} == {"austen", "kjv", "cpython-stdlib"}
    train_chars = sum(len(d["text"]) for d in train)
    eval_chars = sum(len(d["text"]) for d in evl)
    assert 1.2e6 < train_chars < 2.0e6 and 0.45e6 < eval_chars < 0.8e6, (train_chars, eval_chars)
    assert not {d["id"] for d in train} & {d["id"] for d in evl}
    assert not {d["text"] for d in train} & {d["text"] for d in evl}
    # 2048-token windows: SmolLM2 averages 3.0-4.5 characters per token on these sources
    # (README), so 6 characters per token is a safe floor for "at least one window".
    assert min(len(d["text"]) for d in evl) >= 6 * 2048
    with pytest.raises(ValueError, match="split='test' is not a bundled corpus split"):
        D.default_corpus_path("test")


def test_default_source_is_the_bundled_corpus(byte_tokenizer, datasets_cache):
    docs = D.load_documents(None, split="eval", cache_dir=datasets_cache)
    assert docs.column_names == ["text"]
    assert docs["text"] == [d["text"] for d in _read("eval")]
