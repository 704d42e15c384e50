"""Passkey (needle-in-a-haystack) retrieval: a deterministic prompt generator, a scorer and a
runner.

A prompt is an instruction, filler text with one needle sentence holding a random 5-7
digit passkey at a chosen depth, and a question::

    There is an important info hidden inside a lot of irrelevant text. Find it and memorize
    it. I will quiz you about the important information there.
    <filler ...> The pass key is 68130. Remember it. 68130 is the pass key. <filler ...>
    What is the pass key? The pass key is

``length`` counts the whole sequence in tokens, prompt plus the ``answer_tokens``
generated after it, so that a length-8192 sample fits an 8192-token context exactly: the
filler is the longest that keeps ``len(tokenizer(prompt).input_ids) + answer_tokens <=
length``. ``depth`` in [0, 1] is the share of the filler placed before the needle. The
filler is a fixed repeated passage (``filler="repeat"``) or text of the bundled evaluation
corpus (``filler="corpus"``, or any string). Everything is a function of
``(seed, length, depth, sample index)``: the same seed gives identical prompts.

A generation is right when the first run of digits in it is exactly the passkey.

    from seer_attn.eval.passkey import run_passkey
    res = run_passkey(model, tokenizer, lengths=[2048, 4096, 8192], depths=[0, 0.25, 0.5, 0.75, 1])
    res["accuracy"], res["cells"]
"""
import math
import random
import re
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from .perplexity import DensityMeter, load_documents, model_device

INSTRUCTION = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
               "I will quiz you about the important information there.\n")
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "\nWhat is the pass key? The pass key is"
REPEAT_FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
DEFAULT_LENGTHS = (1024, 2048, 4096, 8192)
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
DEFAULT_ANSWER_TOKENS = 12
_DIGITS = re.compile(r"\d+")


@dataclass
class PasskeySample:
    """One prompt: ``passkey`` (digits) is hidden at ``depth`` of a ``length``-token sequence;
    ``prompt_tokens`` is the prompt's length with the tokenizer's default special tokens."""

    prompt: str
    passkey: str
    length: int
    depth: float
    sample: int
    seed: int
    prompt_tokens: int


def random_passkey(rng: random.Random) -> str:
    """A random 5, 6 or 7 digit number (no leading zero), as a string."""
    n = rng.choice((5, 6, 7))
    return str(rng.randint(10 ** (n - 1), 10 ** n - 1))


def score_passkey(generation: str, passkey) -> bool:
    """True when the first run of digits in ``generation`` is exactly ``passkey``."""
    m = _DIGITS.search(generation or "")
    return m is not None and m.group(0) == str(passkey)


def _filler_units(filler):
    """Filler as a list of units (sentences of the repeated passage, or words of a text)."""
    if filler == "repeat":
        return [s + "." for s in REPEAT_FILLER.split(".") if s.strip()], True
    if filler == "corpus":
        text = " ".join(d["text"] for d in load_documents())
    elif isinstance(filler, str) and filler.strip():
        text = filler
    else:
        raise ValueError(f"filler={filler!r} is invalid: expected 'repeat', 'corpus' or a non-empty text")
    return [" " + w for w in text.split()], False


class PasskeyGenerator:
    """Builds :class:`PasskeySample` prompts for a tokenizer (see the module docstring)."""

    def __init__(self, tokenizer, *, seed=0, filler="repeat", answer_tokens=DEFAULT_ANSWER_TOKENS):
        if not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        if not isinstance(answer_tokens, int) or answer_tokens < 1:
            raise ValueError(f"answer_tokens={answer_tokens!r} is invalid: expected a positive integer")
        self.tokenizer = tokenizer
        self.seed = seed
        self.answer_tokens = answer_tokens
        self.units, self.cyclic = _filler_units(filler)
        self.filler = filler if filler in ("repeat", "corpus") else "text"

    def _n_tokens(self, text):
        return len(self.tokenizer(text)["input_ids"])

    def _prompt(self, n_units, depth, key, offset):
        if self.cyclic:
            units = [self.units[(offset + i) % len(self.units)] for i in range(n_units)]
        else:
            if n_units > len(self.units):
                raise ValueError(f"the filler text has {len(self.units)} words, fewer than the {n_units} needed")
            start = offset % max(1, len(self.units) - n_units + 1)
            units = self.units[start:start + n_units]
        cut = round(depth * n_units)
        before = "".join(units[:cut]).lstrip()
        needle = NEEDLE.format(key=key)
        return INSTRUCTION + before + (needle if before else needle.lstrip()) + "".join(units[cut:]) + QUESTION

    def sample(self, length, depth, index=0) -> PasskeySample:
        """The ``index``-th sample of cell (``length``, ``depth``); deterministic in the seed."""
        if not isinstance(length, int) or length < 1:
            raise ValueError(f"length={length!r} is invalid: expected a positive integer (tokens)")
        depth = float(depth)
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth={depth!r} is invalid: expected a fraction in [0, 1]")
        rng = random.Random(f"passkey/{self.seed}/{length}/{depth:.6f}/{index}")
        key = random_passkey(rng)
        offset = rng.randrange(1 << 30)
        budget = length - self.answer_tokens
        if self._n_tokens(self._prompt(0, depth, key, offset)) > budget:
            raise ValueError(f"length={length} is too short: the instruction, needle and question alone take "
                             f"{self._n_tokens(self._prompt(0, depth, key, offset))} tokens, plus "
                             f"{self.answer_tokens} answer tokens")

        def fits(n):
            return self._n_tokens(self._prompt(n, depth, key, offset)) <= budget

        # the largest number of filler units that fits: exponential, then binary search
        limit = None if self.cyclic else len(self.units)
        lo, hi = 0, 1
        while fits(hi):
            lo = hi
            if limit is not None and hi == limit:
                raise ValueError(f"the filler text ({limit} words) is too short for length={length} tokens")
            hi = hi * 2 if limit is None else min(hi * 2, limit)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if fits(mid):
                lo = mid
            else:
                hi = mid
        prompt = self._prompt(lo, depth, key, offset)
        return PasskeySample(prompt, key, length, depth, index, self.seed, self._n_tokens(prompt))

    def samples(self, lengths=DEFAULT_LENGTHS, depths=DEFAULT_DEPTHS, samples_per_cell=1) -> list:
        """Every (length, depth, index) sample, lengths outermost."""
        if not isinstance(samples_per_cell, int) or samples_per_cell < 1:
            raise ValueError(f"samples_per_cell={samples_per_cell!r} is invalid: expected a positive integer")
        return [self.sample(int(n), d, i) for n in lengths for d in depths for i in range(samples_per_cell)]


def generate_passkey_samples(tokenizer, lengths=DEFAULT_LENGTHS, depths=DEFAULT_DEPTHS, samples_per_cell=1, *,
                             seed=0, filler="repeat", answer_tokens=DEFAULT_ANSWER_TOKENS) -> list:
    """:meth:`PasskeyGenerator.samples` in one call."""
    gen = PasskeyGenerator(tokenizer, seed=seed, filler=filler, answer_tokens=answer_tokens)
    return gen.samples(lengths, depths, samples_per_cell)


@torch.no_grad()
def run_passkey(model, tokenizer, lengths=DEFAULT_LENGTHS, depths=DEFAULT_DEPTHS, samples_per_cell=1, *, seed=0,
                filler="repeat", max_new_tokens=DEFAULT_ANSWER_TOKENS, samples=None, progress=True) -> dict:
    """Greedy passkey retrieval accuracy of ``model`` per (length, depth).

    Each prompt is encoded with the tokenizer's default special tokens and decoded greedily
    for ``max_new_tokens`` tokens, one prompt at a time (no padding).

    Returns:
        dict with ``accuracy`` (all samples), ``cells`` (list of ``{length, depth,
        accuracy, n}``), ``per_length`` (``{length: accuracy}``), ``density`` (mean kept
        share of causal blocks over the prefills; None unless sparse), ``density_per_length``
        (``{length: density}``; None unless sparse; short prompts keep a larger share, since the
        diagonal, sink and dense last rows weigh more), ``samples`` (each with its generation,
        whether it was right and its prefill's density), ``seed`` and ``filler``.
    """
    if samples is None:
        samples = generate_passkey_samples(tokenizer, lengths, depths, samples_per_cell, seed=seed, filler=filler,
                                           answer_tokens=max_new_tokens)
    dev = model_device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    records = []
    try:
        with DensityMeter(model) as meter:
            for s in tqdm(samples, desc="passkey", unit="prompt", disable=not progress):
                n_before = len(meter.values)
                enc = tokenizer(s.prompt, return_tensors="pt")
                ids = enc["input_ids"].to(dev)
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                     do_sample=False, num_beams=1, pad_token_id=pad)
                text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
                kept = meter.values[n_before:]  # the prompt's prefill (decode steps add nothing)
                records.append({**asdict(s), "generation": text, "generated_tokens": out.shape[1] - ids.shape[1],
                                "correct": score_passkey(text, s.passkey),
                                "density": sum(kept) / len(kept) if kept else None})
    finally:
        model.train(was_training)
    cells = {}
    for r in records:
        cells.setdefault((r["length"], r["depth"]), []).append(r["correct"])
    per_length, dens_length = {}, {}
    for r in records:
        per_length.setdefault(r["length"], []).append(r["correct"])
        if r["density"] is not None:
            dens_length.setdefault(r["length"], []).append(r["density"])
    return {
        "accuracy": sum(r["correct"] for r in records) / len(records) if records else float("nan"),
        "cells": [{"length": n, "depth": d, "accuracy": sum(v) / len(v), "n": len(v)}
                  for (n, d), v in sorted(cells.items())],
        "per_length": {n: sum(v) / len(v) for n, v in sorted(per_length.items())},
        "density": meter.mean,
        "density_per_length": {n: sum(v) / len(v) for n, v in sorted(dens_length.items())} or None,
        "samples": records,
        "seed": seed,
        "filler": filler,
    }


def sample_key(r):
    """A kept sample's prompt identity ``(seed, length, depth, sample index)``: what pairs two
    results prompt by prompt (the generator rebuilds the same prompt from it)."""
    return r["seed"], r["length"], round(float(r["depth"]), 6), r["sample"]


def paired_passkey(reference: dict, other: dict) -> dict:
    """Prompt-by-prompt comparison of two :func:`run_passkey` results on the same prompts.

    Returns ``{"n", "lost", "gained", "p_value"}``: ``lost`` prompts right in ``reference``
    and wrong in ``other``, ``gained`` the reverse, and the exact two-sided sign-test
    (McNemar) p-value of that split under "both are equally accurate" (1.0 when no prompt
    differs). A small p-value says the accuracies really differ; a large one says the
    difference is within what these prompts can resolve, not that they are equal.

    Raises:
        ValueError: a result without ``samples``, or the two were not run on the same prompts.
    """
    for name, res in (("reference", reference), ("other", other)):
        if not res.get("samples"):
            raise ValueError(f"the {name} result has no samples to pair (run_passkey keeps them under 'samples')")
    ref = {sample_key(r): bool(r["correct"]) for r in reference["samples"]}
    oth = {sample_key(r): bool(r["correct"]) for r in other["samples"]}
    if ref.keys() != oth.keys():
        raise ValueError(f"the results were run on different prompts ({len(ref.keys() - oth.keys())} only in the "
                         f"reference, {len(oth.keys() - ref.keys())} only in the other); pair runs of one prompt set")
    lost = sum(ref[k] and not oth[k] for k in ref)
    gained = sum(oth[k] and not ref[k] for k in ref)
    m = lost + gained
    tail = sum(math.comb(m, i) for i in range(min(lost, gained) + 1)) / 2 ** m if m else 0.5
    return {"n": len(ref), "lost": lost, "gained": gained, "p_value": min(1.0, 2 * tail)}


@torch.no_grad()
def needle_block_recall(model, tokenizer, sample: PasskeySample) -> dict:
    """Which heads keep the needle's block, in ``model``'s current sparse mode, for one prompt.

    Runs one prefill of ``sample.prompt`` recording every layer's block mask and reads the
    needle's block column over the rows where nothing forces it: after the needle's own block
    and the ``seer_keep_local`` blocks after it, before the ``seer_dense_last_rows``. Comparing
    selectors (the gate, ``oracle_max``, ...) at equal density shows where a selection drops
    the block that retrieval needs.

    Returns:
        dict with ``needle_token`` and ``needle_block`` (of the key's first token),
        ``num_blocks``, ``rows`` (``[first, last)`` block rows read) and ``recall``: float
        ``[layers, query heads]``, the share of those rows that keep the needle's block.

    Raises:
        ValueError: the model is not in sparse mode, the tokenizer gives no offsets, or the
            needle sits too close to the end to leave any such row.
    """
    from seer_attn.modeling_seer.seer_layer import SeerForwardContext
    cfg = model.config
    if cfg.seer_mode != "sparse":
        raise ValueError(f"needle_block_recall needs seer_mode 'sparse', the model is in {cfg.seer_mode!r}")
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("needle_block_recall needs a fast tokenizer (it locates the key by character offsets)")
    enc = tokenizer(sample.prompt, return_offsets_mapping=True, return_tensors="pt")
    char = sample.prompt.index(NEEDLE.format(key=sample.passkey).strip()) + NEEDLE.strip().index("{key}")
    offsets = enc["offset_mapping"][0].tolist()
    token = next(i for i, (a, b) in enumerate(offsets) if a <= char < b)
    bs = cfg.seer_block_size
    T = enc["input_ids"].shape[1]
    nb, block = (T + bs - 1) // bs, token // bs
    first, last = block + 1 + cfg.seer_keep_local, nb - cfg.seer_dense_last_rows
    if first >= last:
        raise ValueError(f"the needle (block {block} of {nb}) leaves no block row between its keep_local="
                         f"{cfg.seer_keep_local} window and the {cfg.seer_dense_last_rows} dense last rows")
    ctx = SeerForwardContext(masks=[])
    was_training = model.training
    model.eval()
    try:
        model(input_ids=enc["input_ids"].to(model_device(model)), seer_ctx=ctx, logits_to_keep=1)
    finally:
        model.train(was_training)
    recall = torch.stack([m[0, :, first:last, block].float().mean(-1).cpu() for m in ctx.masks])
    return {"needle_token": token, "needle_block": block, "num_blocks": nb, "rows": (first, last), "recall": recall}
