"""Perplexity of a (Seer)Llama model on long documents, the protocol of docs/design.md §4.

Protocol (``evaluate_perplexity``):

1. documents: one JSON object per line (``text``, optional ``id`` and ``source``), from a
   ``.jsonl`` or ``.jsonl.gz`` file; by default the bundled evaluation corpus
   (``seer_attn.training.data.default_corpus_path("eval")``);
2. each document is tokenised whole, without special tokens;
3. it is cut into non-overlapping windows of exactly ``max_length`` tokens (8192 in the
   protocol), the first ``windows_per_doc`` (2) of them: ``tokens[0:L]``, ``tokens[L:2L]``.
   A document shorter than ``max_length`` gives no window (``partial_windows=True`` adds
   one shorter window per document instead, for corpora of short documents);
4. every window is one independent forward pass; token ``t`` of a window is predicted from
   tokens ``0..t-1`` of the same window, so a window of ``n`` tokens scores ``n - 1``
   tokens;
5. PPL = exp(mean NLL over every predicted token of every window); per-source PPL the
   same over the windows of that source.

For long contexts (32k tokens), :func:`make_source_windows` replaces steps 2-3 by the
"source-joined windows" protocol: each source's documents joined with EOS between them and
cut into windows, up to ``windows_per_source`` per source.

In sparse mode the achieved density is the mean over windows (each window weighs the
same) of ``model.seer_density()`` averaged over layers and heads: the kept share of
causal 64x64 blocks.

Check against the H100 measurement (SmolLM2-135M GGUF in bf16, the project corpus
``eval.jsonl`` of the project corpora, 8192 tokens): 25 windows of 17 documents, dense PPL
11.301 (11.30 in the table; 11.291 in fp32). The bundled default corpus is a smaller
subset of that file, so its numbers differ.

    from seer_attn.modeling_seer.conversion import load_seer_model, load_tokenizer
    from seer_attn.eval.perplexity import evaluate_perplexity
    model, tok = load_seer_model(dtype=torch.bfloat16, device="cuda"), load_tokenizer()
    model.set_seer_mode("sparse", seer_selector="streaming", seer_sparsity_method="nz_ratio",
                        seer_nz_ratio=0.2)
    res = evaluate_perplexity(model, tok, max_length=8192)
    res["ppl"], res["per_source"]["kjv"]["ppl"], res["density"]
"""
import gzip
import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

DEFAULT_MAX_LENGTH = 8192
DEFAULT_WINDOWS_PER_DOC = 2
_NLL_CHUNK = 2048  # positions per fp32 cross-entropy chunk (bounds the fp32 copy of the logits)


# ----------------------------------------------------------------------------- corpus

def default_corpus_path() -> str:
    """Path of the bundled evaluation corpus (``seer_attn.training.data``)."""
    try:
        from seer_attn.training.data import default_corpus_path as _corpus_path
    except ImportError as err:
        raise FileNotFoundError(
            "no default evaluation corpus: seer_attn.training.data.default_corpus_path is not available "
            f"({err}); pass the path of a .jsonl corpus explicitly (corpus=...)") from err
    return str(_corpus_path("eval"))


def load_documents(path=None, *, sources=None, limit=None) -> list:
    """Read a corpus of one JSON object per line.

    Args:
        path: ``.jsonl`` or ``.jsonl.gz`` file; None: :func:`default_corpus_path`.
        sources: keep only documents whose ``source`` is in this collection.
        limit: keep only the first ``limit`` documents (after the source filter).

    Returns:
        list of dicts with ``id``, ``source`` (``"unknown"`` when absent) and ``text``.
    """
    path = str(path) if path is not None else default_corpus_path()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"corpus file not found: {path}")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit={limit!r} is invalid: expected a positive integer or None")
    opener = gzip.open if path.endswith(".gz") else open
    docs = []
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno} is not valid JSON: {err}") from err
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise ValueError(f"{path}:{lineno}: expected an object with a string field 'text'")
            doc = {"id": str(obj.get("id", f"{os.path.basename(path)}:{lineno}")),
                   "source": str(obj.get("source", "unknown")), "text": obj["text"]}
            if sources is not None and doc["source"] not in sources:
                continue
            docs.append(doc)
            if limit is not None and len(docs) >= limit:
                break
    if not docs:
        raise ValueError(f"no documents in {path}" + (f" with source in {sorted(sources)}" if sources else ""))
    return docs


@dataclass
class Window:
    """One evaluation window: ``input_ids`` is a 1-D LongTensor of at most ``max_length`` tokens."""

    doc_id: str
    source: str
    index: int  # window number inside its document
    input_ids: torch.Tensor

    @property
    def num_predicted(self) -> int:
        return max(0, self.input_ids.numel() - 1)


def make_windows(documents, tokenizer, max_length=DEFAULT_MAX_LENGTH, windows_per_doc=DEFAULT_WINDOWS_PER_DOC,
                 partial_windows=False, progress=False) -> list:
    """Cut tokenised documents into the evaluation windows of the protocol (module docstring).

    Args:
        documents: dicts with ``text`` (and ``id``, ``source``), e.g. from :func:`load_documents`.
        tokenizer: a Hugging Face tokenizer; documents are encoded without special tokens.
        max_length: tokens per window (>= 2).
        windows_per_doc: at most this many windows per document (>= 1).
        partial_windows: also keep a shorter last window (>= 2 tokens) when a document
            runs out before ``windows_per_doc`` full windows.

    Returns:
        list of :class:`Window`, in document order.
    """
    if not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length={max_length!r} is invalid: expected an integer >= 2")
    if not isinstance(windows_per_doc, int) or windows_per_doc < 1:
        raise ValueError(f"windows_per_doc={windows_per_doc!r} is invalid: expected an integer >= 1")
    windows = []
    for doc in tqdm(documents, desc="tokenising", disable=not progress, leave=False):
        ids = tokenizer(doc["text"], add_special_tokens=False)["input_ids"]
        for w in range(windows_per_doc):
            chunk = ids[w * max_length:(w + 1) * max_length]
            if len(chunk) < max_length and not (partial_windows and len(chunk) >= 2):
                break
            windows.append(Window(doc.get("id", "?"), doc.get("source", "unknown"), w,
                                  torch.tensor(chunk, dtype=torch.long)))
            if len(chunk) < max_length:
                break
    return windows


def make_source_windows(documents, tokenizer, max_length, windows_per_source=4, separator_id=None) -> list:
    """The "source-joined windows" protocol (long-context evaluation, docs/finetune.md): the
    documents of each source, in corpus order, tokenised without special tokens and joined
    with one separator token between them (the tokenizer's EOS unless ``separator_id``), then
    cut into non-overlapping windows of exactly ``max_length`` tokens, the first
    ``windows_per_source`` of each source. Long windows exist even when most documents are
    shorter; a source whose joined text is shorter than one window gives none.

    Returns:
        list of :class:`Window` (``doc_id`` ``"<source> (joined)"``, ``index`` the window
        number in its source), sources in order of first appearance.
    """
    if not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length={max_length!r} is invalid: expected an integer >= 2")
    if not isinstance(windows_per_source, int) or windows_per_source < 1:
        raise ValueError(f"windows_per_source={windows_per_source!r} is invalid: expected an integer >= 1")
    sep = tokenizer.eos_token_id if separator_id is None else separator_id
    if sep is None:
        raise ValueError(f"{type(tokenizer).__name__} has no eos_token_id; pass separator_id=")
    streams = {}
    for doc in documents:
        ids = tokenizer(doc["text"], add_special_tokens=False)["input_ids"]
        stream = streams.setdefault(doc.get("source", "unknown"), [])
        stream += ([sep] if stream else []) + list(ids)
    windows = []
    for source, stream in streams.items():
        for w in range(min(windows_per_source, len(stream) // max_length)):
            windows.append(Window(f"{source} (joined)", source, w,
                                  torch.tensor(stream[w * max_length:(w + 1) * max_length], dtype=torch.long)))
    return windows


# ----------------------------------------------------------------------------- model side

def model_device(model) -> torch.device:
    return next(model.parameters()).device


def seer_settings(model) -> dict:
    """The selection a Seer model is set to (``mode``, ``selector``, ``method``, ``param``);
    ``{"mode": "dense"}`` for dense Seer models and models without ``seer_*`` config."""
    from seer_attn.modeling_seer.selection import METHOD_FIELD

    cfg = model.config
    mode = getattr(cfg, "seer_mode", None)
    if mode != "sparse":
        return {"mode": mode or "dense"}
    method = cfg.seer_sparsity_method
    return {"mode": "sparse", "selector": cfg.seer_selector, "method": method,
            "param": float(getattr(cfg, METHOD_FIELD[method])),
            "keep_diagonal": bool(cfg.seer_keep_diagonal), "keep_sink": bool(cfg.seer_keep_sink),
            "keep_local": int(cfg.seer_keep_local), "dense_last_rows": int(cfg.seer_dense_last_rows)}


def _density_tensor(model):
    fn = getattr(model, "seer_density", None)
    return fn() if callable(fn) else None


def _is_sparse(model) -> bool:
    return getattr(model.config, "seer_mode", "dense") == "sparse"


class _ForwardMeter:
    """A forward hook's values while active (``with``): after each forward ``_current(model)``
    is read, and each object different from the last one seen (the one before entry included)
    goes to ``_new``; ``mean`` averages ``values``."""

    def __init__(self, model):
        self.model = model
        self.values = []
        self._handle = None
        self._last = None

    def __enter__(self):
        self._last = self._current(self.model)  # what ran before: not counted
        self._handle = self.model.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc):
        self._handle.remove()
        self._handle = None
        return False

    def _hook(self, module, args, output):
        x = self._current(module)
        if x is not None and x is not self._last:
            self._last = x
            self._new(x)

    @property
    def mean(self):
        return sum(self.values) / len(self.values) if self.values else None


class DensityMeter(_ForwardMeter):
    """Records the kept-block density of every sparse prefill a model runs while active.

    A forward hook reads ``model.seer_density()`` after each forward; a new tensor means a
    new sparse prefill (decode steps attend densely and leave it unchanged). One value per
    sequence of the batch: the mean over layers and heads.

        with DensityMeter(model) as meter:
            model.generate(...)
        meter.mean  # None when no sparse prefill ran
    """

    _current = staticmethod(_density_tensor)

    def _new(self, d):
        self.values.extend(d.float().mean(dim=(0, 2)).tolist())  # [L, B, H] -> per sequence


class DecodeDensityMeter(_ForwardMeter):
    """Records the kept share of KV blocks of every KV cache a model decodes sparsely while active.

    A forward hook notes the model's decode statistics after each forward (one object per KV
    cache: a ``generate`` call; caches follow each other, none returns); on exit each cache's
    per-sequence share over its sparse decode steps (:meth:`seer_decode_density`) becomes one
    value per sequence. Read once at exit, so the steps add no device synchronisation.

        with DecodeDensityMeter(model) as meter:
            model.generate(...)
        meter.mean  # None when no sparse decode step ran
    """

    def __init__(self, model):
        super().__init__(model)
        self._stats = []

    @staticmethod
    def _current(model):
        return getattr(model, "_last_decode_stats", None)

    def _new(self, stats):
        self._stats.append(stats)

    def __exit__(self, *exc):
        super().__exit__(*exc)
        for stats in self._stats:
            d = stats.density()
            if d is not None:
                self.values.extend(d.float().tolist())
        self._stats = []
        return False


@torch.no_grad()
def window_nll(model, input_ids: torch.Tensor):
    """Summed NLL of a batch of equal-length windows.

    Args:
        input_ids: LongTensor ``[B, T]`` (or ``[T]``), T >= 2, on any device.

    Returns:
        (nll ``[B]`` float64 sums over the ``T - 1`` predicted tokens, density ``[B]`` float
        or None): density is the kept share of causal blocks averaged over layers and heads,
        for models in sparse mode.
    """
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must be [B, T] with T >= 2, got shape {tuple(input_ids.shape)}")
    input_ids = input_ids.to(model_device(model))
    before = _density_tensor(model)
    logits = model(input_ids=input_ids, use_cache=False).logits
    B, T, V = logits.shape
    nll = torch.zeros(B, dtype=torch.float64, device=logits.device)
    for s in range(0, T - 1, _NLL_CHUNK):
        e = min(T - 1, s + _NLL_CHUNK)
        lp = logits[:, s:e].float()
        nll += F.cross_entropy(lp.reshape(-1, V), input_ids[:, s + 1:e + 1].reshape(-1),
                               reduction="none").view(B, -1).double().sum(-1)
    density = None
    if _is_sparse(model):
        d = _density_tensor(model)
        if d is None or d is before:
            raise RuntimeError("the model is in sparse mode but reported no new block density for this forward")
        density = d.float().mean(dim=(0, 2)).cpu()
    return nll.cpu(), density


def _batches(windows, batch_size):
    """Consecutive groups of at most batch_size windows of equal length (no padding needed)."""
    group = []
    for w in windows:
        if group and (len(group) == batch_size or group[0].input_ids.numel() != w.input_ids.numel()):
            yield group
            group = []
        group.append(w)
    if group:
        yield group


def _ppl(nll_sum, count):
    return math.exp(nll_sum / count) if count else float("nan")


def evaluate_perplexity(model, tokenizer=None, *, corpus=None, documents=None, windows=None,
                        max_length=DEFAULT_MAX_LENGTH, windows_per_doc=DEFAULT_WINDOWS_PER_DOC,
                        partial_windows=False, sources=None, limit_docs=None, batch_size=1, progress=True,
                        desc=None) -> dict:
    """Perplexity of ``model`` under the protocol of the module docstring.

    Args:
        model: a causal LM (``SeerLlamaForCausalLM`` in any mode, or any HF causal LM);
            its current mode and ``seer_*`` settings are used as they are.
        tokenizer: needed unless ``windows`` is given.
        corpus: path of a ``.jsonl``/``.jsonl.gz`` corpus (default: the bundled eval corpus);
            ignored when ``documents`` or ``windows`` is given.
        documents: already loaded documents (see :func:`load_documents`).
        windows: already built windows (see :func:`make_windows`); then ``max_length``,
            ``windows_per_doc`` and ``partial_windows`` are not used.
        sources / limit_docs: document filters, as in :func:`load_documents`.
        batch_size: windows per forward pass (only windows of equal length are batched).

    Returns:
        dict with ``ppl``, ``nll`` (mean NLL per predicted token), ``tokens`` (predicted
        tokens), ``windows``, ``documents``, ``per_source`` (``{source: {ppl, nll, tokens,
        windows, density}}``), ``density`` (mean kept share of causal blocks over windows;
        None unless the model is in sparse mode), ``max_length``, ``windows_per_doc``,
        ``partial_windows`` and ``seer`` (:func:`seer_settings`).
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} is invalid: expected a positive integer")
    if windows is None:
        if tokenizer is None:
            raise ValueError("a tokenizer is needed to build the evaluation windows (or pass windows=...)")
        if documents is None:
            documents = load_documents(corpus, sources=sources, limit=limit_docs)
        windows = make_windows(documents, tokenizer, max_length, windows_per_doc, partial_windows)
    windows = [w for w in windows if w.num_predicted > 0]
    if not windows:
        raise ValueError(f"no evaluation window: every document is shorter than max_length={max_length} tokens "
                         "(use a smaller max_length, or partial_windows=True)")
    was_training = model.training
    model.eval()
    total = {"nll": 0.0, "tokens": 0}
    per_source = {}
    densities = []
    bar = tqdm(total=len(windows), desc=desc or f"perplexity {_label(model)}", unit="win", disable=not progress)
    try:
        for group in _batches(windows, batch_size):
            nll, dens = window_nll(model, torch.stack([w.input_ids for w in group]))
            for i, w in enumerate(group):
                src = per_source.setdefault(w.source, {"nll": 0.0, "tokens": 0, "windows": 0, "densities": []})
                src["nll"] += nll[i].item()
                src["tokens"] += w.num_predicted
                src["windows"] += 1
                total["nll"] += nll[i].item()
                total["tokens"] += w.num_predicted
                if dens is not None:
                    densities.append(dens[i].item())
                    src["densities"].append(dens[i].item())
            bar.update(len(group))
            bar.set_postfix(ppl=f"{_ppl(total['nll'], total['tokens']):.3f}",
                            **({"density": f"{sum(densities) / len(densities):.3f}"} if densities else {}))
    finally:
        bar.close()
        model.train(was_training)
    return {
        "ppl": _ppl(total["nll"], total["tokens"]),
        "nll": total["nll"] / total["tokens"],
        "tokens": total["tokens"],
        "windows": len(windows),
        "documents": len({w.doc_id for w in windows}),
        "per_source": {
            s: {"ppl": _ppl(v["nll"], v["tokens"]), "nll": v["nll"] / v["tokens"], "tokens": v["tokens"],
                "windows": v["windows"],
                "density": sum(v["densities"]) / len(v["densities"]) if v["densities"] else None}
            for s, v in sorted(per_source.items())},
        "density": sum(densities) / len(densities) if densities else None,
        "max_length": max(w.input_ids.numel() for w in windows),
        "windows_per_doc": windows_per_doc,
        "partial_windows": partial_windows,
        "seer": seer_settings(model),
    }


def _label(model):
    s = seer_settings(model)
    if s["mode"] != "sparse":
        return s["mode"]
    return f"{s['selector']}/{s['method']}={s['param']:.4g}"
