"""Training data for gate distillation: documents -> tokens -> fixed-length packed sequences.

One loader, built on :mod:`datasets`, for

- local files: ``.jsonl`` / ``.json`` (one object per line or a JSON array), ``.txt`` (one
  document per file) and ``.parquet``; ``.jsonl.gz``, ``.json.gz`` and ``.txt.gz`` are read
  transparently; a folder stands for the supported files directly inside it, and glob
  patterns are expanded;
- Hub datasets, written ``hub:name[:config[:split]]`` (e.g. ``hub:wikitext:wikitext-103-raw-v1:train``);
- the bundled default corpus (:func:`default_corpus_path`), used when no source is given.

Each record's text must be a string: null or missing text, numbers, lists and objects are
refused (never converted or joined), and so are lines that are not valid JSON; the error
names the file and the line (jsonl), record (JSON array) or row (parquet) and the column.

Documents are tokenised without special tokens, each followed by one separator token (the
tokenizer's EOS unless ``separator_id`` is given), joined into one stream and cut into
sequences of exactly ``seq_len`` tokens: no padding, so every token is real and the model
needs no attention mask. The incomplete tail is dropped and the number of dropped tokens
is logged. The document order is shuffled with ``seed`` (deterministic). With
``streaming=True`` nothing is downloaded or tokenised up front: the result is a
:class:`datasets.IterableDataset` packing on the fly (use it with ``max_steps``).

Per-source packing (``source_column=``, for long-context fine-tuning) joins the documents of
each source only and cuts each source's stream on its own, then shuffles the sequences
(:func:`pack_documents`).

Entry point: :func:`load_packed_dataset`; its parts :func:`load_documents` and
:func:`pack_documents` are public too.
"""
from __future__ import annotations

import glob
import gzip
import importlib.resources
import json
import logging
import os
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

#: file suffix -> datasets builder name (a trailing ``.gz`` is allowed for the text formats)
FILE_TYPES = {".jsonl": "json", ".json": "json", ".txt": "text", ".parquet": "parquet"}
HUB_PREFIX = "hub:"
CORPUS_SPLITS = ("train", "eval")
#: column every loaded document dataset is normalised to
TEXT = "text"
#: column of the document's source (per-source packing)
SOURCE = "source"


# ----------------------------------------------------------------------------- sources

def default_corpus_path(split: str = "train") -> str:
    """Path of the bundled default corpus file for ``split`` ("train" or "eval").

    The files (``corpus/train.jsonl.gz``, ``corpus/eval.jsonl.gz``: fields id, source, text)
    are package data of ``seer_attn.training``; see ``corpus/README.md`` for their origin.
    """
    if split not in CORPUS_SPLITS:
        raise ValueError(f"split={split!r} is not a bundled corpus split; expected one of {CORPUS_SPLITS}")
    res = importlib.resources.files("seer_attn.training").joinpath("corpus", f"{split}.jsonl.gz")
    path = str(res)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"the bundled corpus file {path} is missing (was the package installed without "
                                "its package data?)")
    return path


@dataclass(frozen=True)
class HubSource:
    """A Hub dataset: ``load_dataset(name, config, split=split)``."""

    name: str
    config: str | None = None
    split: str | None = None


def parse_source(spec) -> HubSource | str:
    """``"hub:name[:config[:split]]"`` -> :class:`HubSource`; anything else is a local path.

    Empty fields mean "default": ``hub:name::validation`` picks the default config.
    """
    if isinstance(spec, HubSource):
        return spec
    spec = os.fspath(spec)
    if not spec.startswith(HUB_PREFIX):
        return spec
    parts = spec[len(HUB_PREFIX):].split(":")
    if not parts[0] or len(parts) > 3:
        raise ValueError(f"bad Hub data spec {spec!r}; expected hub:name[:config[:split]], e.g. "
                         "hub:wikitext:wikitext-103-raw-v1:train")
    parts += [""] * (3 - len(parts))
    return HubSource(parts[0], parts[1] or None, parts[2] or None)


def _file_type(path: str) -> str:
    name = path.lower()
    gz = name.endswith(".gz")
    if gz:
        name = name[:-3]
    suffix = os.path.splitext(name)[1]
    kind = FILE_TYPES.get(suffix)
    if kind is None or (gz and kind == "parquet"):
        supported = ", ".join(sorted(FILE_TYPES)) + " (and .jsonl.gz, .json.gz, .txt.gz)"
        raise ValueError(f"unknown data file type of {path!r}; supported: {supported}")
    return kind


def _expand_path(path: str) -> list[str]:
    """A file, a folder (its supported files, sorted) or a glob pattern -> list of files."""
    if any(ch in path for ch in "*?["):
        files = sorted(p for p in glob.glob(path) if os.path.isfile(p))
        if not files:
            raise FileNotFoundError(f"no data files match {path!r}")
        return files
    if os.path.isdir(path):
        files = []
        for name in sorted(os.listdir(path)):
            full = os.path.join(path, name)
            if os.path.isfile(full):
                try:
                    _file_type(full)
                except ValueError:
                    continue
                files.append(full)
        if not files:
            raise ValueError(f"data folder {path!r} holds no supported files ({', '.join(sorted(FILE_TYPES))})")
        return files
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path!r}")
    return [path]


def _open(path: str, mode: str = "rb"):
    """``path`` opened for reading (text modes: UTF-8), through gzip for ``.gz`` files."""
    opener = gzip.open if path.lower().endswith(".gz") else open
    return opener(path, mode, encoding="utf-8" if "t" in mode else None)


def _check_not_empty(path: str, kind: str) -> None:
    """Raise ValueError for an empty file (text formats: no non-whitespace byte at all)."""
    if os.path.getsize(path) == 0:
        raise ValueError(f"data file {path!r} is empty (0 bytes)")
    if kind == "parquet":
        return
    with _open(path) as f:
        while True:
            chunk = f.read(1 << 16)
            if not chunk:
                raise ValueError(f"data file {path!r} is empty (whitespace only)")
            if chunk.strip():
                return


def _select_text(ds, text_column: str, where: str, files=(), source_column: str | None = None):
    """Keep only ``text_column`` (renamed to "text"), and ``source_column`` (renamed to
    "source") when given; clear error when one is missing or the text holds anything but
    strings (:func:`_check_strings`; ``files``: the local files of ``ds``)."""
    cols = ds.column_names
    if cols is None:  # streaming dataset with unknown features: peek at one example
        first = next(iter(ds), None)
        cols = list(first) if first is not None else []
    if text_column not in cols:
        raise ValueError(f"text column {text_column!r} not found in {where}; columns found: {list(cols)} "
                         "(choose one with text_column=... / --text-column)")
    if source_column is not None and source_column not in cols:
        raise ValueError(f"source column {source_column!r} not found in {where}; columns found: {list(cols)} "
                         "(per-source packing joins the documents of each source; choose the column with "
                         "--source-column, or pack the documents as one stream)")
    keep = [text_column] + ([source_column] if source_column not in (None, text_column) else [])
    ds = ds.select_columns(keep)
    ds = ds.rename_column(text_column, TEXT) if text_column != TEXT else ds
    if source_column not in (None, text_column, SOURCE):
        ds = ds.rename_column(source_column, SOURCE)
    return _check_strings(ds, text_column, where, list(files))


def _is_string_feature(feature) -> bool:
    return getattr(feature, "dtype", None) in ("string", "large_string")


def _check_strings(ds, column, where, files):
    """Refuse text that is not a string (null or missing, a number, a list, an object): it is
    never converted or joined. Map-style data is checked at once (arrow types and null
    counts); a stream is checked at once when its column type is known not to be text, and
    batch by batch as it is read otherwise. The error names the file and line (jsonl), record
    (json array) or row (parquet) and the column."""
    import datasets

    feature = (ds.features or {}).get(TEXT)
    if isinstance(ds, datasets.IterableDataset):
        if feature is not None and not _is_string_feature(feature):
            _raise_not_string(enumerate(ds[TEXT]), column, where, files)
        return ds.map(_check_batch, batched=True, with_indices=True,
                      fn_kwargs={"column": column, "where": where, "files": files})
    if not _is_string_feature(feature) or ds.data.column(TEXT).null_count:
        _raise_not_string(enumerate(ds[TEXT]), column, where, files)
    return ds


def _check_batch(batch, indices, column, where, files):
    if not all(isinstance(t, str) for t in batch[TEXT]):
        _raise_not_string(zip(indices, batch[TEXT]), column, where, files)
    return batch


def _records(path: str, column: str):
    """``(where, value of column)`` of each record of a local json/jsonl/parquet file: ``where``
    is "line N" (jsonl; blank lines are skipped, as datasets does), "record N" (a JSON
    array) or "row N" (parquet)."""
    if _file_type(path) == "parquet":
        import pyarrow.parquet as pq
        table = pq.read_table(path)
        values = table.column(column).to_pylist() if column in table.column_names else [None] * table.num_rows
        yield from ((f"row {i + 1}", v) for i, v in enumerate(values))
        return
    with _open(path, "rt") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        rows = [(f"record {i + 1}", r) for i, r in enumerate(_parse_json(text, f"data file {path!r}"))]
    else:
        rows = ((f"line {n}", _parse_json(line, f"data file {path!r}, line {n}"))
                for n, line in enumerate(text.split("\n"), 1) if line.strip())
    for where, r in rows:
        yield where, (r.get(column) if isinstance(r, dict) else None)


def _parse_json(text, loc):
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{loc}: not valid JSON ({err})") from None


def _first_non_string(path: str, column: str):
    """``(location, value)`` of the first record of ``path`` whose ``column`` is not a string, or None."""
    return next(((f"data file {path!r}, {where}", v) for where, v in _records(path, column)
                 if not isinstance(v, str)), None)


def _describe(value) -> str:
    if value is None:
        return "is null or missing"
    name = {list: "list", dict: "object"}.get(type(value), type(value).__name__)
    kind = f"{'an' if name[0] in 'aeiou' else 'a'} {name}"
    shown = repr(value)
    return f"holds {kind} ({shown[:60] + '...' if len(shown) > 60 else shown})"


def _locate_non_string(files, column):
    return next(filter(None, (_first_non_string(p, column) for p in files)), None)


def _not_string_error(loc, value, column):
    return ValueError(f"{loc}: column {column!r} {_describe(value)}; every record's text must be a string "
                      "(nothing is converted or joined)")


def _raise_not_string(records, column, where, files):
    """Raise for the first non-string text: located in ``files`` when given, else (a Hub
    dataset) by its index in ``records``, ``(index, value)`` pairs."""
    found = _locate_non_string(files, column)
    if found is None:
        i, value = next(((i, v) for i, v in records if not isinstance(v, str)), (None, None))
        found = (f"{where}, record {i + 1}" if i is not None else where), value
    raise _not_string_error(*found, column)


def load_documents(sources=None, *, split: str = "train", text_column: str = TEXT, streaming: bool = False,
                   cache_dir: str | None = None, source_column: str | None = None):
    """Load raw documents as a dataset with a ``"text"`` column (and ``"source"``, with ``source_column``).

    Args:
        sources: a path / glob / folder, a ``hub:name[:config[:split]]`` string, a
            :class:`HubSource`, or a list of those (concatenated in the given order).
            None: the bundled corpus file of ``split`` (:func:`default_corpus_path`).
        split: split of Hub datasets without an explicit one, and of the bundled corpus
            ("train" or "eval"). Local files always form one split.
        text_column: column holding the document text in jsonl/json/parquet files and Hub
            datasets. Plain ``.txt`` files have no columns: each file is one document.
        streaming: return a :class:`datasets.IterableDataset` (nothing downloaded or
            converted up front).
        cache_dir: datasets cache folder (default: datasets' own).
        source_column: also keep this column (jsonl/json/parquet/Hub), as ``"source"``: what
            :func:`pack_documents` ``by_source=True`` groups documents by. Plain ``.txt`` files
            have none (ValueError).

    Returns:
        ``datasets.Dataset`` (or ``IterableDataset`` when streaming) with column ``"text"``
        (and ``"source"``).

    Raises:
        ValueError: an empty file, an unknown file type, a missing text column (the message
            names the column and the columns found), text that is not a string or a line
            that is not JSON (the message names the file, line / record / row and column;
            a stream is checked as it is read), or no documents at all.
        FileNotFoundError: a path that does not exist.
    """
    import datasets

    if sources is None:
        sources = [default_corpus_path(split)]
    elif isinstance(sources, (str, os.PathLike, HubSource)):
        sources = [sources]
    sources = [parse_source(s) for s in sources]
    if not sources:
        raise ValueError("no data sources given")

    parts = []
    run: list[str] = []  # consecutive local files of one type, loaded together (keeps the given order)
    run_kind = None

    def flush():
        if not run:
            return
        kwargs = {"sample_by": "document"} if run_kind == "text" else {}
        col = TEXT if run_kind == "text" else text_column
        if run_kind == "text" and source_column is not None:
            raise ValueError(f"plain text files ({run[0]}, ...) carry no {source_column!r} field for per-source "
                             "packing; use .jsonl with a source field, or pack the documents as one stream")
        try:
            ds = datasets.load_dataset(run_kind, data_files=list(run), split="train", streaming=streaming,
                                       cache_dir=cache_dir, **kwargs)
        except Exception as err:  # datasets' parse errors name no file or line: find the bad record
            found = _locate_non_string(run, col) if run_kind != "text" else None
            if found is not None:
                raise _not_string_error(*found, col) from err
            raise
        where = run[0] if len(run) == 1 else f"{len(run)} {run_kind} files ({run[0]}, ...)"
        parts.append(_select_text(ds, col, where, run if run_kind != "text" else (), source_column))
        run.clear()

    for src in sources:
        if isinstance(src, HubSource):
            flush()
            ds = datasets.load_dataset(src.name, src.config, split=src.split or split, streaming=streaming,
                                       cache_dir=cache_dir)
            parts.append(_select_text(ds, text_column, f"Hub dataset {src.name!r} (config {src.config!r}, "
                                                       f"split {src.split or split!r})", (), source_column))
            continue
        for path in _expand_path(src):
            kind = _file_type(path)
            _check_not_empty(path, kind)
            if kind != run_kind:
                flush()
                run_kind = kind
            run.append(path)
    flush()

    docs = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    if not streaming and len(docs) == 0:
        raise ValueError(f"no documents found in {[str(s) for s in sources]}")
    return docs


# ----------------------------------------------------------------------------- packing

def _separator(tokenizer, separator_id):
    sep = tokenizer.eos_token_id if separator_id is None else separator_id
    if sep is None:
        raise ValueError(f"{type(tokenizer).__name__} has no eos_token_id; pass separator_id= (the token placed "
                         "between documents)")
    return int(sep)


def _tokenize_batch(batch, tokenizer, sep):
    ids = tokenizer(batch[TEXT], add_special_tokens=False, verbose=False)["input_ids"]
    return {"input_ids": [list(x) + [sep] if len(x) else [] for x in ids]}


def _too_short(total, seq_len):
    return ValueError(f"the data holds {total} tokens (separators included), fewer than one sequence of "
                      f"seq_len={seq_len}; give more data or a smaller seq_len")


def _log_packing(total, n_seq, seq_len):
    dropped = total - n_seq * seq_len
    msg = (f"packed {total} tokens into {n_seq} sequences of {seq_len} tokens; dropped the last {dropped} "
           f"tokens (an incomplete sequence)")
    if dropped:
        logger.warning(msg)
    else:
        logger.info(msg)


def _pack_stream(docs, tokenizer, seq_len, sep, batch_size):
    """Generator behind the streaming dataset: tokenise batches of documents, emit full sequences."""
    buf = np.empty(0, dtype=np.int64)
    total = n_seq = 0
    for batch in docs.iter(batch_size=batch_size):
        ids = _tokenize_batch(batch, tokenizer, sep)["input_ids"]
        new = [np.asarray(x, dtype=np.int64) for x in ids if x]
        if not new:
            continue
        total += sum(len(x) for x in new)
        buf = np.concatenate([buf, *new])
        n = len(buf) // seq_len
        for i in range(n):
            yield {"input_ids": buf[i * seq_len:(i + 1) * seq_len]}
        n_seq += n
        buf = buf[n * seq_len:]
    if n_seq == 0:
        raise _too_short(total, seq_len)
    _log_packing(total, n_seq, seq_len)


def pack_documents(docs, tokenizer, seq_len: int, *, seed: int | None = 0, shuffle: bool = True,
                   separator_id: int | None = None, num_proc: int | None = None, batch_size: int = 256,
                   shuffle_buffer: int = 1000, by_source: bool = False):
    """Tokenise documents, join them with a separator token and cut fixed-length sequences.

    ``by_source=True`` (per-source packing, for long sequences): the documents of each source
    (``"source"`` column, :func:`load_documents` ``source_column=``) are joined in their
    order in the data, each followed by the separator, and each source's stream is cut into
    ``seq_len`` sequences on its own (its incomplete tail dropped): a sequence never mixes
    sources, so 32k-token sequences of one kind of text exist even when most documents are
    shorter. The sequences of all sources are then shuffled with ``seed`` (``shuffle``).

    Args:
        docs: ``datasets.Dataset`` or ``IterableDataset`` with a ``"text"`` column
            (:func:`load_documents`).
        tokenizer: a Hugging Face tokenizer (called with ``add_special_tokens=False``).
        seq_len: tokens per sequence (> 0).
        seed: seed of the document shuffle (ignored when ``shuffle`` is False).
        shuffle: shuffle the documents before packing (deterministic for a given seed).
        separator_id: token appended after every document (default: ``tokenizer.eos_token_id``).
        num_proc: worker processes for tokenisation (map-style datasets only).
        batch_size: documents tokenised per call.
        shuffle_buffer: shuffle buffer size of streaming datasets.
        by_source: per-source packing (above; map-style datasets only).

    Returns:
        A dataset whose rows are ``{"input_ids": LongTensor [seq_len]}`` (torch format):
        ``datasets.Dataset`` with ``floor(total_tokens / seq_len)`` rows, or an
        ``IterableDataset`` for streaming input. The dropped tail is logged.

    Raises:
        ValueError: fewer tokens than one sequence (the message gives the count and
            seq_len), bad seq_len, no separator token.
    """
    import datasets

    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len <= 0:
        raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
    sep = _separator(tokenizer, separator_id)
    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"), length=seq_len)})

    if by_source:
        return _pack_by_source(docs, tokenizer, seq_len, sep, seed if shuffle else None, num_proc, batch_size,
                               features)
    if isinstance(docs, datasets.IterableDataset):
        if shuffle:
            docs = docs.shuffle(seed=seed, buffer_size=shuffle_buffer)
        packed = datasets.IterableDataset.from_generator(
            _pack_stream, features=features,
            gen_kwargs={"docs": docs, "tokenizer": tokenizer, "seq_len": seq_len, "sep": sep,
                        "batch_size": batch_size})
        return packed.with_format("torch")

    if shuffle:
        docs = docs.shuffle(seed=seed)
    tokens = docs.map(_tokenize_batch, batched=True, batch_size=batch_size, num_proc=num_proc,
                      remove_columns=docs.column_names, fn_kwargs={"tokenizer": tokenizer, "sep": sep},
                      desc="Tokenizing")
    # Concatenate in dataset order (the arrow format respects any indices mapping).
    chunks = [b["input_ids"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
              for b in tokens.with_format("arrow").iter(batch_size=4096)]
    flat = np.concatenate(chunks) if chunks else np.empty(0, dtype=np.int64)
    total = int(flat.size)
    n_seq = total // seq_len
    if n_seq == 0:
        raise _too_short(total, seq_len)
    _log_packing(total, n_seq, seq_len)
    arr = flat[:n_seq * seq_len].astype(np.int32).reshape(n_seq, seq_len)
    return datasets.Dataset.from_dict({"input_ids": arr}, features=features).with_format("torch")


def _pack_by_source(docs, tokenizer, seq_len, sep, seed, num_proc, batch_size, features):
    """:func:`pack_documents` with ``by_source=True`` (``seed`` None: sources in order of first
    appearance, sequences in stream order)."""
    import datasets

    if isinstance(docs, datasets.IterableDataset):
        raise ValueError("per-source packing needs a map-style dataset (not streaming): every source's stream is "
                         "cut on its own")
    if SOURCE not in docs.column_names:
        raise ValueError(f"per-source packing needs a {SOURCE!r} column (load_documents(..., source_column=...)); "
                         f"columns: {docs.column_names}")
    tokens = docs.map(_tokenize_batch, batched=True, batch_size=batch_size, num_proc=num_proc,
                      remove_columns=[TEXT], fn_kwargs={"tokenizer": tokenizer, "sep": sep}, desc="Tokenizing")
    streams: dict = {}
    for b in tokens.with_format("arrow").iter(batch_size=4096):
        ids = b["input_ids"]
        for i, src in enumerate(b[SOURCE].to_pylist()):
            if src is None:
                raise ValueError(f"a document has no {SOURCE!r} value; per-source packing needs one per document")
            streams.setdefault(str(src), []).append(ids[i].values.to_numpy(zero_copy_only=False))
    rows, total, per_source = [], 0, {}
    for src, parts in streams.items():
        flat = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
        n = flat.size // seq_len
        total += flat.size
        per_source[src] = n
        rows.append(flat[:n * seq_len].astype(np.int32).reshape(n, seq_len))
        logger.info(f"source {src!r}: {flat.size} tokens -> {n} sequences of {seq_len} tokens "
                    f"(dropped the last {flat.size - n * seq_len})")
    arr = np.concatenate(rows) if rows else np.empty((0, seq_len), dtype=np.int32)
    if len(arr) == 0:
        longest = max(streams, key=lambda k: sum(p.size for p in streams[k]), default=None)
        raise ValueError(f"no source holds {seq_len} tokens (separators included) for one sequence: the longest, "
                         f"{longest!r}, holds {sum(p.size for p in streams.get(longest, []))}; give more data or a "
                         "smaller seq_len")
    if seed is not None:
        arr = arr[np.random.default_rng(seed).permutation(len(arr))]
    logger.info(f"per-source packing: {len(arr)} sequences of {seq_len} tokens from {total} tokens "
                f"({', '.join(f'{k}: {v}' for k, v in per_source.items())})")
    return datasets.Dataset.from_dict({"input_ids": arr}, features=features).with_format("torch")


def load_packed_dataset(sources=None, tokenizer=None, seq_len: int = 2048, *, split: str = "train",
                        text_column: str = TEXT, seed: int | None = 0, shuffle: bool = True,
                        streaming: bool = False, separator_id: int | None = None, num_proc: int | None = None,
                        cache_dir: str | None = None, source_column: str | None = None):
    """Load documents and pack them into ``seq_len``-token sequences (see the module docstring).

    Args:
        sources: see :func:`load_documents` (None: the bundled corpus of ``split``).
        tokenizer: a Hugging Face tokenizer (required).
        seq_len, seed, shuffle, separator_id, num_proc: see :func:`pack_documents`.
        split, text_column, streaming, cache_dir: see :func:`load_documents`.
        source_column: per-source packing by this column (:func:`pack_documents` ``by_source``);
            None: one stream of all documents.

    Returns:
        ``datasets.Dataset`` (or ``IterableDataset`` when streaming) of
        ``{"input_ids": LongTensor [seq_len]}`` rows, ready for a ``Trainer``.
    """
    if tokenizer is None:
        raise ValueError("load_packed_dataset needs a tokenizer")
    docs = load_documents(sources, split=split, text_column=text_column, streaming=streaming, cache_dir=cache_dir,
                          source_column=source_column)
    return pack_documents(docs, tokenizer, seq_len, seed=seed, shuffle=shuffle, separator_id=separator_id,
                          num_proc=num_proc, by_source=source_column is not None)
