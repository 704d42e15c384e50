"""Long-context perplexity of fine-tuned models: the "source-joined windows" protocol and the
closing table of ``seer-attn finetune``.

Protocol (docs/finetune.md): each source's documents of the evaluation corpus joined with EOS
between them and cut into windows of the training length, up to ``windows_per_source`` (4)
per source (:func:`seer_attn.eval.perplexity.make_source_windows`); PPL over every
predicted token, and per source, as in :mod:`seer_attn.eval.perplexity`.

The training function (:func:`seer_attn.training.finetune.run_finetune`) never imports this
module; the ``seer-attn`` dispatcher runs :func:`closing_evaluation` after it returns.
"""
from __future__ import annotations

import os

import torch

from .perplexity import evaluate_perplexity, load_documents, make_source_windows

DEFAULT_WINDOWS_PER_SOURCE = 4
EVAL_FILE = "finetune_eval.json"


def source_windows(tokenizer, seq_len, corpus=None, windows_per_source=DEFAULT_WINDOWS_PER_SOURCE) -> list:
    """The protocol's windows of ``corpus`` (default: the bundled eval corpus); ValueError when
    no source holds ``seq_len`` tokens."""
    windows = make_source_windows(load_documents(corpus), tokenizer, seq_len, windows_per_source)
    if not windows:
        raise ValueError(f"no source of the evaluation corpus {corpus or '(bundled)'} holds {seq_len} tokens, even "
                         "with its documents joined: give a larger corpus (--eval-data) or a shorter --seq-len")
    return windows


def ppl_row(model, windows, label, progress=True) -> dict:
    """One table row: ``setting``, ``ppl``, ``per_source`` (``{source: ppl}``), ``density``
    (sparse mode only), ``tokens``, ``windows``, ``seq_len``."""
    res = evaluate_perplexity(model, windows=windows, progress=progress, desc=label)
    return {"setting": label, "ppl": res["ppl"], "density": res["density"], "tokens": res["tokens"],
            "windows": res["windows"], "seq_len": res["max_length"],
            "per_source": {s: v["ppl"] for s, v in res["per_source"].items()}}


def format_table(rows) -> str:
    """Markdown table of :func:`ppl_row` rows: setting, density, PPL over all tokens, PPL per source."""
    sources = []
    for r in rows:
        sources += [s for s in r.get("per_source", {}) if s not in sources]
    head = "| setting | density | PPL all | " + " | ".join(sources) + " |"
    lines = [head, "|" + "---|" * (3 + len(sources))]
    for r in rows:
        dens = "1" if r.get("density") is None else f"{r['density']:.3f}"
        per = [f"{r['per_source'][s]:.2f}" if s in r.get("per_source", {}) else "" for s in sources]
        lines.append(f"| {r['setting']} | {dens} | {r['ppl']:.2f} | " + " | ".join(per) + " |")
    return "\n".join(lines)


def closing_evaluation(res: dict, *, corpus=None, windows_per_source=DEFAULT_WINDOWS_PER_SOURCE, device=None,
                       dtype=None, progress=True, config=None) -> dict:
    """The closing table of ``seer-attn finetune``: PPL at the training length on the
    source-joined windows of ``corpus``, for the fine-tuned model at its trained selection and,
    when that is sparse, dense too.

    Args:
        res: what :func:`seer_attn.training.finetune.run_finetune` returned (``model_dir``,
            ``seq_len``, ``selection``, ``output_dir``).
        corpus: evaluation jsonl (default: the bundled eval corpus).
        device, dtype: where and how to evaluate (default: CUDA in bf16 when present, else CPU float32).
        config: the run's :class:`~seer_attn.training.finetune.FineTuneConfig`, recorded in the envelope
            (``dataclasses.asdict``).

    Returns:
        dict with ``rows``, ``table`` (markdown) and ``path`` (``OUT/finetune_eval.json``, a
        results envelope of kind ``"finetune_eval"``).
    """
    from seer_attn.modeling_seer.conversion import load_tokenizer
    from seer_attn.training.finetune import load_finetuned
    from seer_attn.training.results import write_envelope

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype is None:
        dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    tokenizer = load_tokenizer(res["model_dir"])
    windows = source_windows(tokenizer, res["seq_len"], corpus, windows_per_source)
    model = load_finetuned(res["model_dir"], dtype=dtype, device=device)
    rows = [ppl_row(model, windows, f"fine-tuned, {res['selection']}", progress)]
    if model.config.seer_mode == "sparse" and res["selection"] != "dense":
        model.set_seer_mode("dense")
        rows.append(ppl_row(model, windows, "fine-tuned, evaluated dense", progress))
    path = os.path.join(res["output_dir"], EVAL_FILE)
    write_envelope(path, "finetune_eval", rows, config=config or {}, model=res["model_dir"], device=device,
                   corpus=str(corpus) if corpus else "bundled eval corpus", windows_per_source=windows_per_source)
    return {"rows": rows, "table": format_table(rows), "path": path}
