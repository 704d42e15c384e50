"""Datasets and metrics of the seer-attn lm-eval tasks (loaded by lm-eval from this folder).

The dataset builders are ``custom_dataset`` functions: lm-eval calls them with the task's
metadata (``simple_evaluate(metadata=...)`` / ``--metadata`` JSON, plus the parsed
``--model_args`` when the model is given by name) and the YAML's ``dataset_kwargs``.
Keys read from the metadata:

- ``max_length`` (required by the perplexity tasks): the same value as HFLM's
  ``max_length``, which sets the rolling-window length;
- ``tokenizer`` or ``pretrained``: tokenizer to count tokens with (a folder, Hub id or
  ``.gguf`` file); it must be the model's tokenizer;
- perplexity: ``windows_per_doc`` (2), ``partial_windows`` (false), ``corpus`` (a
  ``.jsonl``/``.jsonl.gz`` path for ``seer_ppl``; default the bundled eval corpus),
  ``max_docs``; ``add_bos_token`` (mirror HFLM's argument when you set it);
- passkey: ``passkey_lengths``, ``passkey_depths``, ``passkey_samples`` (per cell),
  ``passkey_seed``, ``passkey_filler``.

Token perplexity. lm-eval's ``loglikelihood_rolling`` returns one number per document: the
summed log-likelihood of every token of ``tok_encode(doc)``. Each document here is cut, at
a token boundary, to its first ``windows_per_doc`` full windows of ``max_length`` tokens
(shorter documents are dropped unless ``partial_windows``), and its exact token count
``n_tokens`` -- the length of the token list lm-eval scores, counted with the same
tokenizer call -- is stored in the document. ``token_perplexity`` is then
``exp(-sum(loglikelihood) / sum(n_tokens))`` over the documents (lm-eval's
``weighted_perplexity`` aggregation).
"""
import functools
import json
import os

import datasets

#: Sources of the bundled corpus that get their own ``token_perplexity_<source>`` metric.
PER_SOURCE = ("austen", "kjv", "cpython-stdlib")
PASSKEY_ANSWER_TOKENS = 12  # = generation_kwargs.max_gen_toks of seer_passkey.yaml


# ----------------------------------------------------------------------------- helpers

def _require(kwargs, key, what):
    if kwargs.get(key) in (None, ""):
        raise ValueError(f"{what} needs `{key}` in the task metadata: pass it with simple_evaluate(metadata=...) "
                         f"or --metadata '{{\"{key}\": ...}}' (with an HF model given by name, --model_args "
                         f"{key}=... works too)")
    return kwargs[key]


def _int(kwargs, key, default=None, minimum=1):
    val = kwargs.get(key, default)
    try:
        val = int(val)
    except (TypeError, ValueError):
        raise ValueError(f"task metadata {key}={kwargs.get(key)!r} is invalid: expected an integer") from None
    if val < minimum:
        raise ValueError(f"task metadata {key}={val!r} is invalid: expected >= {minimum}")
    return val


def _bool(kwargs, key, default=False):
    val = kwargs.get(key, default)
    if isinstance(val, str):
        if val.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"task metadata {key}={val!r} is invalid: expected true or false")
        return val.lower() in ("true", "1")
    return bool(val)


def _list(kwargs, key, default, cast):
    val = kwargs.get(key, default)
    if isinstance(val, str):
        val = json.loads(val) if val.strip().startswith("[") else val.split(",")
    if isinstance(val, (int, float)):
        val = [val]
    try:
        out = [cast(v) for v in val]
    except (TypeError, ValueError):
        raise ValueError(f"task metadata {key}={kwargs.get(key)!r} is invalid: expected a list") from None
    if not out:
        raise ValueError(f"task metadata {key} is empty")
    return out


@functools.lru_cache(maxsize=4)
def load_tokenizer(name):
    """A Hugging Face tokenizer from a folder, Hub id or ``.gguf`` file (cached)."""
    from transformers import AutoTokenizer
    name = str(name)
    if name.endswith(".gguf"):
        return AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(name)),
                                             gguf_file=os.path.basename(name))
    return AutoTokenizer.from_pretrained(name)


def _tokenizer(kwargs, what):
    name = kwargs.get("tokenizer") or kwargs.get("pretrained")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{what} counts tokens and needs the model's tokenizer: pass `tokenizer` (a folder, Hub "
                         "id or .gguf path) in the task metadata, or `pretrained=...` in --model_args")
    return load_tokenizer(name)


def _encode_kwargs(kwargs):
    # HFLM.tok_encode: the tokenizer's default special tokens, or add_special_tokens=add_bos_token when set
    add_bos = kwargs.get("add_bos_token")
    if add_bos is None:
        return {}
    return {"add_special_tokens": _bool(kwargs, "add_bos_token")}


# ----------------------------------------------------------------------------- perplexity

def _cut_to_windows(text, tokenizer, max_length, windows_per_doc, partial, enc_kwargs):
    """(text cut at a token boundary to its first full windows, n_tokens as lm-eval counts them),
    or None when the document gives no window."""
    n_special = len(tokenizer("", **enc_kwargs)["input_ids"])
    budget = max_length * windows_per_doc
    # tokenise a prefix long enough for the budget (whole text when it is not)
    probe = text[:budget * 16]
    enc = tokenizer(probe, add_special_tokens=False, return_offsets_mapping=True)
    if len(enc["input_ids"]) < budget + 1 and len(probe) < len(text):
        probe = text
        enc = tokenizer(probe, add_special_tokens=False, return_offsets_mapping=True)
    n_content = len(enc["input_ids"])
    total = n_content + n_special
    if total >= budget:
        keep = budget
    elif total >= max_length:
        keep = total if partial else (total // max_length) * max_length
    elif partial and total >= 2:
        keep = total
    else:
        return None
    n_keep = keep - n_special  # content tokens to keep
    offsets = enc["offset_mapping"]
    while n_keep > 0:
        cut_text = probe if n_keep >= n_content else probe[:offsets[n_keep - 1][1]]
        n_tokens = len(tokenizer(cut_text, **enc_kwargs)["input_ids"])
        if n_tokens <= keep:  # re-tokenising the cut text can merge differently at the end
            return cut_text, n_tokens
        n_keep -= 1
    return None


def _ppl_docs(records, kwargs, what):
    tokenizer = _tokenizer(kwargs, what)
    max_length = _int(kwargs, "max_length", _require(kwargs, "max_length", what), minimum=2)
    windows_per_doc = _int(kwargs, "windows_per_doc", 2)
    partial = _bool(kwargs, "partial_windows", False)
    max_docs = kwargs.get("max_docs")
    enc_kwargs = _encode_kwargs(kwargs)
    rows = []
    for rec in records:
        cut = _cut_to_windows(rec["text"], tokenizer, max_length, windows_per_doc, partial, enc_kwargs)
        if cut is None:
            continue
        text, n_tokens = cut
        rows.append({"id": rec["id"], "source": rec["source"], "text": text, "n_tokens": n_tokens,
                     "n_windows": -(-n_tokens // max_length)})
        if max_docs is not None and len(rows) >= _int(kwargs, "max_docs"):
            break
    if not rows:
        raise ValueError(f"{what}: no document has a full window of max_length={max_length} tokens "
                         "(lower max_length, or set partial_windows=true)")
    return {"test": datasets.Dataset.from_list(rows)}


def ppl_local(**kwargs):
    """``seer_ppl``: documents of a local jsonl corpus (metadata ``corpus``; default: the bundled
    evaluation corpus), each cut to its first ``windows_per_doc`` windows."""
    from seer_attn.eval.perplexity import load_documents
    docs = load_documents(kwargs.get("corpus") or None)
    return _ppl_docs(docs, kwargs, "seer_ppl")


def ppl_hf(**kwargs):
    """Perplexity documents from a Hub dataset: ``dataset_kwargs`` ``hf_path``, ``hf_name``,
    ``hf_data_files``, ``hf_split``, ``text_field``, ``source_name``."""
    path = _require(kwargs, "hf_path", "ppl_hf")
    split = kwargs.get("hf_split", "test")
    ds = datasets.load_dataset(path, kwargs.get("hf_name"), data_files=kwargs.get("hf_data_files"), split=split)
    field = kwargs.get("text_field", "text")
    if field not in ds.column_names:
        raise ValueError(f"{path} has no column {field!r} (columns: {ds.column_names})")
    source = kwargs.get("source_name", path)
    records = ({"id": f"{path}/{split}/{i}", "source": source, "text": row[field]} for i, row in enumerate(ds))
    return _ppl_docs(records, kwargs, path)


def process_ppl(doc, results):
    """Per document: (loglikelihood, weight) pairs for lm-eval's ``weighted_perplexity`` /
    ``bits_per_byte`` aggregations; the token weight is ``doc["n_tokens"]``."""
    (ll,) = results
    text = doc["text"]
    n_bytes = len(text.encode("utf-8"))
    out = {
        "token_perplexity": (ll, doc["n_tokens"]),
        "word_perplexity": (ll, len(text.split())),
        "byte_perplexity": (ll, n_bytes),
        "bits_per_byte": (ll, n_bytes),
    }
    if doc["source"] in PER_SOURCE:
        out[f"token_perplexity_{doc['source']}"] = (ll, doc["n_tokens"])
    return out


# ----------------------------------------------------------------------------- passkey

def passkey(**kwargs):
    """``seer_passkey``: prompts of :class:`seer_attn.eval.passkey.PasskeyGenerator`, fixed seed."""
    from seer_attn.eval.passkey import DEFAULT_DEPTHS, DEFAULT_LENGTHS, PasskeyGenerator
    tokenizer = _tokenizer(kwargs, "seer_passkey")
    max_length = kwargs.get("max_length")
    max_length = _int(kwargs, "max_length") if max_length is not None else None
    default_lengths = [n for n in DEFAULT_LENGTHS if max_length is None or n <= max_length] or [max_length]
    lengths = _list(kwargs, "passkey_lengths", default_lengths, int)
    if max_length is not None:
        too_long = [n for n in lengths if n > max_length]
        if too_long:
            raise ValueError(f"passkey_lengths {too_long} exceed max_length={max_length}: HFLM would cut the "
                             "prompts from the left")
    depths = _list(kwargs, "passkey_depths", list(DEFAULT_DEPTHS), float)
    gen = PasskeyGenerator(tokenizer, seed=_int(kwargs, "passkey_seed", 0, minimum=0),
                           filler=kwargs.get("passkey_filler", "repeat"), answer_tokens=PASSKEY_ANSWER_TOKENS)
    rows = [{"prompt": s.prompt, "passkey": s.passkey, "length": s.length, "depth": s.depth, "sample": s.sample,
             "seed": s.seed, "prompt_tokens": s.prompt_tokens}
            for s in gen.samples(lengths, depths, _int(kwargs, "passkey_samples", 1))]
    return {"test": datasets.Dataset.from_list(rows)}


def process_passkey(doc, results):
    """``acc`` over all prompts, plus ``acc_len<length>`` and ``acc_len<length>_depth<depth>``."""
    from seer_attn.eval.passkey import score_passkey
    correct = float(score_passkey(results[0], doc["passkey"]))
    n, d = doc["length"], doc["depth"]
    return {"acc": correct, f"acc_len{n}": correct, f"acc_len{n}_depth{d:g}": correct}
