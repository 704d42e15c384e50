"""Distillation sequences with retrieval structure, built from the training corpus itself.

The gates learn the frozen model's attention on the data they are distilled on. Ordinary text
rarely makes a late layer look back at one distant block, so the gates learn little about
the heads that retrieval needs (docs/experiments/gate_quality.md). :func:`mix_retrieval`
rewrites a share of the packed training sequences so that their later part repeats what an
earlier part holds:

- ``repeat``: passages of the sequence are copied to later positions of the same sequence
  (the copy's tokens are predicted from the earlier occurrence);
- ``lookup``: key-value records (a key and a value, each a short span of corpus tokens from
  elsewhere in the data, written ``<nl> key <sep> value <nl>``) are written over the
  sequence's text in its first half, then repeated in shuffled order at random places of
  its second half (a query: the value follows the key again);
- ``haystack``: the same with the records in the first three quarters of a background that
  is one short passage of the sequence repeated to the sequence's length (a record is then
  the one novel block in repetitive text), queried in the last quarter.

Every token comes from the corpus, except the two delimiters (the tokenizer's encoding of
``" ="`` and a newline); nothing of the passkey generator (its instruction, needle, question
or filler) is used. Everything is a function of the data and ``seed``: sequence ``i`` is
rewritten by a generator seeded with ``(seed, i)``, so the same seed gives the same data.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RETRIEVAL_KINDS = ("repeat", "lookup", "haystack")


@dataclass(frozen=True)
class Copy:
    """``length`` tokens at ``dst`` equal to those at ``src`` (``src + length <= dst``)."""

    src: int
    dst: int
    length: int


def _slots(rng, lo, hi, sizes):
    """Start positions of disjoint spans of ``sizes`` in ``[lo, hi)``, in increasing order, or
    None when they do not fit."""
    free = (hi - lo) - sum(sizes)
    if free < 0:
        return None
    gaps = np.sort(rng.integers(0, free + 1, size=len(sizes)))
    starts, pos = [], lo
    for i, size in enumerate(sizes):
        start = lo + int(gaps[i]) + sum(sizes[:i])
        starts.append(max(start, pos))
        pos = starts[-1] + size
    return starts


def _span(rng, corpus, n):
    """``n`` consecutive tokens from a random place of ``corpus`` (flat int array)."""
    start = int(rng.integers(0, corpus.size - n + 1))
    return corpus[start:start + n]


def retrieval_sequence(background, corpus, rng, kind, sep=(), newline=()):
    """One retrieval sequence of ``len(background)`` tokens.

    Args:
        background: int array ``[T]``, a packed training sequence (the text written over).
        corpus: flat int array of training tokens, where keys and values are drawn from.
        rng: a ``numpy.random.Generator``.
        kind: one of :data:`RETRIEVAL_KINDS` (module docstring).
        sep, newline: token ids of the record delimiters (``key sep value newline``).

    Returns:
        ``(tokens, copies)``: int array ``[T]`` and the list of :class:`Copy` that make its
        retrieval structure (each copy's tokens repeat an earlier span of the sequence).
    """
    T = len(background)
    out = np.array(background, copy=True)
    sep, newline = np.asarray(sep, dtype=out.dtype), np.asarray(newline, dtype=out.dtype)
    copies = []
    if kind == "repeat":
        n = int(rng.integers(1, 4))
        length = [int(rng.integers(max(8, T // 32), max(9, T // 8) + 1)) for _ in range(n)]
        src = _slots(rng, 0, T // 2, length)
        dst = _slots(rng, T // 2 + T // 8, T, length)
        if src is None or dst is None:
            raise ValueError(f"a sequence of {T} tokens is too short for repeated passages")
        for s, d, m in zip(src, dst, length):
            out[d:d + m] = background[s:s + m]
            copies.append(Copy(s, d, m))
        return out, copies
    if kind not in ("lookup", "haystack"):
        raise ValueError(f"kind={kind!r} is invalid: expected one of {RETRIEVAL_KINDS}")
    if kind == "haystack":
        period = int(rng.integers(max(16, T // 64), max(17, T // 8) + 1))
        start = int(rng.integers(0, T - period + 1))
        out = np.resize(background[start:start + period], T).astype(background.dtype)
        n, body = int(rng.integers(1, 5)), 3 * T // 4
    else:
        n, body = int(rng.integers(4, 17)), T // 2
    n = min(n, max(1, (T - body) // 32))  # short sequences hold fewer records (at most 19 tokens each)
    records = [np.concatenate([newline, _span(rng, corpus, int(rng.integers(2, 5))), sep,
                               _span(rng, corpus, int(rng.integers(3, 9))), newline]) for _ in range(n)]
    placed = _slots(rng, 0, body, [len(r) for r in records])
    order = [int(i) for i in rng.permutation(n)]
    asked = _slots(rng, body, T, [len(records[i]) for i in order])
    if placed is None or asked is None:
        raise ValueError(f"a sequence of {T} tokens is too short for {n} key-value records")
    for r, p in zip(records, placed):
        out[p:p + len(r)] = r
    for i, q in zip(order, asked):
        out[q:q + len(records[i])] = records[i]
        copies.append(Copy(placed[i], q, len(records[i])))
    return out, copies


def delimiter_ids(tokenizer):
    """``(sep, newline)`` token ids of a record (``" ="`` and ``"\\n"``) in ``tokenizer``."""
    enc = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in (" =", "\n")]
    return tuple(enc[0]), tuple(enc[1])


def mix_retrieval(dataset, fraction, *, seed=0, tokenizer=None, kinds=RETRIEVAL_KINDS):
    """Rewrite ``fraction`` of the sequences of a packed dataset as retrieval sequences.

    Args:
        dataset: ``datasets.Dataset`` of ``{"input_ids": [T]}`` rows (``pack_documents``).
        fraction: share of the sequences rewritten, in [0, 1]: ``round(fraction * N)`` of
            them, chosen with ``seed``; the others are left as they are.
        seed: seed of the choice and of every rewritten sequence.
        tokenizer: gives the record delimiters (:func:`delimiter_ids`); None: records
            without delimiters.
        kinds: the kinds drawn from (uniformly, per sequence), :data:`RETRIEVAL_KINDS`.

    Returns:
        a ``datasets.Dataset`` with the same rows, features and format, ``fraction`` of them
        rewritten (:func:`retrieval_sequence`).
    """
    import datasets

    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(f"mix_retrieval takes a map-style datasets.Dataset (not streaming), got "
                        f"{type(dataset).__name__}")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction={fraction!r} is invalid: expected a share in [0, 1]")
    kinds = tuple(kinds)
    bad = [k for k in kinds if k not in RETRIEVAL_KINDS]
    if not kinds or bad:
        raise ValueError(f"kinds={kinds!r} is invalid: expected a non-empty subset of {RETRIEVAL_KINDS}")
    arr = np.array(dataset.with_format("numpy")["input_ids"])
    N = len(arr)
    n = int(np.floor(fraction * N + 0.5))
    if n == 0:
        return dataset
    sep, newline = delimiter_ids(tokenizer) if tokenizer is not None else ((), ())
    corpus = arr.reshape(-1)
    chosen = np.sort(np.random.default_rng([seed, N]).choice(N, size=n, replace=False))
    for i in chosen:
        rng = np.random.default_rng([seed, int(i)])
        kind = kinds[int(rng.integers(0, len(kinds)))]
        arr[i], _ = retrieval_sequence(arr[i], corpus, rng, kind, sep, newline)
    fmt = dataset.format
    out = datasets.Dataset.from_dict({"input_ids": arr}, features=dataset.features)
    return out.with_format(fmt["type"], columns=fmt["columns"], output_all_columns=fmt["output_all_columns"])
