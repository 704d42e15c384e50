"""Model cards rendered from results envelopes (docs/design.md §4), never typed by hand.

:func:`render_card` turns the envelopes a model's numbers came from, and what the export
knows about the folder (:class:`CardSpec`: name, base, gates-only or full, files, the
shipped sparsity setting), into a ``huggingface_hub.ModelCard``:

- the YAML header (:class:`huggingface_hub.ModelCardData`): ``base_model`` and
  ``base_model_relation`` (``adapter`` for gates-only, ``finetune`` for a full folder),
  ``library_name: transformers``, the base's license where known, tags, ``pipeline_tag``,
  Hub datasets used for distillation, and a ``model-index`` with perplexity at every
  measured block density and passkey accuracy;
- the body: SeerAttention in two sentences, what the repository holds, a usage snippet
  (``trust_remote_code=True``), the perplexity and passkey tables and the PPL-vs-density
  plot, the measured settings and the recommended one, the training run and its cost, the
  provenance (commit, GPU, versions) of every envelope, and the paper citation.

Envelopes read: ``demo`` and ``quality`` and ``ppl_compare`` (perplexity rows; ``quality``
also passkey), ``distill`` (the training run), ``finetune`` (a fine-tuning run: the weights
are no longer the base's), ``finetune_eval`` (its closing perplexity table), ``calibration``
(the shipped setting) and ``decode_quality`` (sparse decode: decode perplexity and passkey,
a "Sparse decode" section with the recommended decode setting; the folder must hold decode gates). Gate rows of
an envelope that measured several gates (the demo: "distilled now" and "shipped") are picked
by their label. Each command's envelope as it writes it now is read, and as it wrote it
before its run config (``seer-attn demo`` kept its profile and keep rules under ``config``,
now under ``resolved``).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from seer_attn.modeling_seer.selection import METHOD_FIELD

#: envelope kinds whose rows are perplexity measurements (docs/design.md §4)
PPL_KINDS = ("demo", "quality", "ppl_compare")
#: envelope kinds of training runs (the card's "Training" section)
TRAINING_KINDS = ("distill", "finetune")
#: the closing perplexity table of ``seer-attn finetune`` (eval/finetune_eval.py)
TUNED_PPL_KIND = "finetune_eval"
#: ``seer-attn calibrate``'s envelope: the setting that keeps an asked density (eval/calibrate_run.py)
CALIBRATION_KIND = "calibration"
#: ``decode_quality``'s envelope (eval/decode_quality.py): decode perplexity and passkey with sparse decode
DECODE_KIND = "decode_quality"
#: the recommended sparse-decode setting is the sparsest within this ratio of dense decode perplexity
#: (issue 15's quality bar), else the one of lowest perplexity
DECODE_PPL_RATIO = 1.02
#: envelope kinds the card reads
KINDS = PPL_KINDS + TRAINING_KINDS + (TUNED_PPL_KIND, CALIBRATION_KIND, DECODE_KIND)
#: the demo's label of the gates it distils itself (eval/demo.py)
DEMO_OWN_LABEL = "Seer gate, distilled now"
#: what the model's own gate rows are called in the card's tables and plot
THIS_GATE = "Seer gate (this model)"
TAGS = ["sparse-attention", "long-context", "seer-attention", "custom_code"]
PLOT_FILE = "ppl_vs_density.png"
#: the per-method config field of a gate setting
PARAM_FIELD = METHOD_FIELD
CITATION = """@article{gao2024seerattention,
  title   = {SeerAttention: Learning Intrinsic Sparse Attention in Your LLMs},
  author  = {Gao, Yizhao and Zeng, Zhichen and Du, Dayou and Cao, Shijie and So, Hayden Kwok-Hay and
             Cao, Ting and Yang, Fan and Yang, Mao},
  journal = {arXiv preprint arXiv:2410.13276},
  year    = {2024}
}"""


@dataclass
class BaseRef:
    """The base model the gates belong to.

    Args:
        model: Hub id, local path (folder or ``.gguf``) or None (unknown).
        revision: Hub revision (a commit pins it) or None.
        gguf_file: ``.gguf`` file inside the Hub repo or folder, or None.
        license: the base's license identifier (e.g. ``apache-2.0``) or None (unknown).
        hub: whether ``model`` is a Hub id (else a local path, not valid Hub metadata).
    """

    model: str | None = None
    revision: str | None = None
    gguf_file: str | None = None
    license: str | None = None
    hub: bool = False


@dataclass
class CardSpec:
    """What the export knows about the folder the card describes.

    Args:
        name: the model's name (the repo name).
        repo_id: the Hub id it is meant for, or None (the usage snippet then loads ``where``).
        where: what the usage snippet loads when ``repo_id`` is None (the folder path).
        base: :class:`BaseRef`.
        gates_only: gates-only folder (else full weights).
        family: family name (``llama``, ``qwen2``).
        settings: the ``seer_*`` sparsity options the folder's config ships with.
        files: ``[(relative path, bytes)]`` of the model files (the card lists them).
        has_tokenizer: the folder holds a tokenizer.
        gate_label: the label of this model's gate rows in envelopes that measured several gates.
        commit: ``(commit, dirty)`` of the tree that exported the folder.
        results_dir: where the folder keeps copies of the envelopes (the card links them).
        fine_tuned: the weights were fine-tuned (``seer-attn finetune``), so they are not
            the base's (:func:`is_fine_tuned`).
        decode_gates: the model has decode gates (``seer_decode_gate``); None: not known.
    """

    name: str
    base: BaseRef
    gates_only: bool
    family: str
    settings: dict
    files: list = field(default_factory=list)
    repo_id: str | None = None
    where: str = "."
    has_tokenizer: bool = False
    gate_label: str | None = None
    commit: tuple = (None, None)
    results_dir: str = "results"
    fine_tuned: bool = False
    decode_gates: bool | None = None


@dataclass
class Source:
    """One results envelope: its path, its JSON and its name in the folder (``results/...``)."""

    path: str
    env: dict
    name: str = ""

    @property
    def kind(self) -> str:
        return self.env["kind"]


def load_envelope(path) -> Source:
    """Read a results envelope; ValueError naming the file when it is none the card can read."""
    try:
        with open(path, encoding="utf-8") as f:
            env = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not JSON: {err}") from None
    missing = [k for k in ("schema_version", "kind", "provenance", "config", "rows") if not isinstance(env, dict)
               or k not in env]
    if missing:
        raise ValueError(f"{path} is not a results envelope (missing {missing}); cards are rendered from the envelopes "
                         "that seer-attn commands write")
    if env["kind"] not in KINDS:
        raise ValueError(f"{path} is a results envelope of kind {env['kind']!r}; a card reads kinds {list(KINDS)}")
    if not env.get("complete", True):
        raise ValueError(f"{path} is a partial run (complete: false); render cards from complete runs only")
    return Source(os.fspath(path), env)


# -- reading the envelopes -----------------------------------------------------------------

def is_fine_tuned(sources) -> bool:
    """Whether ``sources`` hold a fine-tuning run (kind ``finetune``): the model's weights are
    then its own, not the base's."""
    return any(s.kind == "finetune" for s in sources)


def calibration_of(sources) -> Source | None:
    """The last ``calibration`` envelope of ``sources`` (None without one): export ships its
    setting; two of them would be ambiguous, so ValueError names them."""
    cals = [s for s in sources if s.kind == CALIBRATION_KIND]
    if len(cals) > 1:
        raise ValueError(f"--results holds {len(cals)} calibrations ({', '.join(s.path for s in cals)}): give the one "
                         "whose setting the folder ships")
    return cals[0] if cals else None


def calibration_settings(src: Source) -> dict:
    """The ``seer_*`` options a calibration envelope's setting runs with: its method and
    parameter and the keep rules it counted (all of them, the dense last rows too: the density
    was measured with them)."""
    return {**src.env["settings"], **src.env["keep"]}


def _calibration_text(src: Source, settings) -> list:
    env, smp = src.env, src.env["sample"]
    field_ = PARAM_FIELD[env["method"]]
    shipped = settings.get("seer_sparsity_method") == env["method"] and settings.get(field_) == env["param"]
    text = ("Calibrated" if shipped else "Not shipped (the config keeps its own setting), a calibration")
    prior = env["settings"].get("seer_meanpool_prior") or 0
    on = f" on the gate's scores mixed with the mean-pooled prior (`seer_meanpool_prior={_py(prior)}`)" if prior else ""
    text += (f" (`seer-attn calibrate`, [{src.name}]({src.name})): `{field_}={_py(env['param'])}`{on} keeps "
            f"{env['density']:.3f} of the causal blocks over {smp['windows']} windows of {smp['max_length']} tokens of "
            f"{smp['data']} (asked for {env['target_density']:g}; {_keep_text(env['keep'])}). An adaptive rule keeps "
            "a different share at other prompt lengths: calibrate at the length you serve.")
    ppl = env.get("ppl") or []
    dense = next((r for r in ppl if r["selector"] == "dense"), None)
    mine = next((r for r in ppl if r["selector"] == "gate" and r.get("method") == env["method"]), None)
    knob = next((r for r in ppl if r.get("matched_to")), None)
    if dense and mine:
        text += (f" On {mine.get('windows')} held-out windows it kept {mine['density']:.3f} at perplexity "
                 f"{mine['ppl']:.3f} against {dense['ppl']:.3f} dense ({_pct(mine['ppl'], dense['ppl'])})")
        text += (f"; the per-sequence density knob at that density: {knob['ppl']:.3f}." if knob else ".")
    return [text]


def demo_run(src: Source) -> tuple:
    """``(profile, keep_rules)`` of a ``demo`` envelope: the sizes it ran with (``seq_len``,
    ``steps``, ``eval_length``, ``bf16``, ...) and the keep rules of its comparison. The demo
    records them under ``resolved`` (its ``config`` is the DemoConfig, whose ``profile`` is a
    name); envelopes written before run configs hold them under ``config``."""
    resolved, cfg = src.env.get("resolved") or {}, src.env["config"]
    if isinstance(resolved.get("profile"), dict):
        return resolved["profile"], resolved.get("keep_rules")
    if isinstance(cfg.get("profile"), dict):
        return cfg["profile"], cfg.get("keep_rules")
    raise ValueError(f"{src.path} is a demo envelope without its profile (resolved.profile): not one the card reads")

def _labels(rows) -> list:
    return sorted({r.get("label") or "" for r in rows if r["selector"] == "gate"})


def own_gate_rows(src: Source, label=None) -> list:
    """The gate rows of ``src`` that measure this model's gates: all of them, or, where the
    envelope labels several gates, those labelled ``label`` (ValueError when that is ambiguous)."""
    gates = [r for r in src.env["rows"] if r["selector"] == "gate" and r.get("ppl") is not None]
    labels = _labels(gates)
    if len(labels) <= 1:
        return gates
    if label is None:
        raise ValueError(f"{src.path} measures several gates ({', '.join(map(repr, labels))}): name this model's "
                         "rows with --gate-label")
    if label not in labels:
        raise ValueError(f"--gate-label {label!r} names no gate rows of {src.path}; its labels: "
                         f"{', '.join(map(repr, labels))}")
    return [r for r in gates if r.get("label") == label]


def ppl_setup(src: Source) -> dict:
    """How the perplexity rows of ``src`` were measured: ``window`` (tokens), ``corpus``
    (file name), ``keep`` (the keep rules every selection used, or None when not recorded)."""
    cfg, kind = src.env["config"], src.kind
    bundled = "eval.jsonl.gz"
    if kind == "demo":
        profile, keep = demo_run(src)
        return {"window": profile["eval_length"], "corpus": bundled, "keep": keep}
    if kind == "quality":
        keep = {"seer_keep_diagonal": True, "seer_keep_sink": bool(cfg.get("keep_sink")),
                "seer_keep_local": int(cfg.get("keep_local") or 0), "seer_dense_last_rows": 0}
        return {"window": cfg["eval_length"], "corpus": os.path.basename(cfg["eval"]) if cfg.get("eval") else bundled,
                "keep": keep}
    window = (src.env.get("resolved") or {}).get("max_length") or cfg.get("max_length")  # None: the GPU default
    return {"window": window, "corpus": os.path.basename(cfg["corpus"]) if cfg.get("corpus") else bundled,
            "keep": None}


def ppl_rows(src: Source, label=None) -> list:
    """Dense, this model's gate rows (labelled :data:`THIS_GATE`) and the baselines of ``src``,
    measured rows only, densest first."""
    own = own_gate_rows(src, label)
    rows = [r for r in src.env["rows"] if r.get("ppl") is not None and r["selector"] not in ("gate",)]
    rows += [{**r, "label": THIS_GATE} for r in own]
    return sorted(rows, key=lambda r: (r["selector"] != "dense", -(r.get("density") or 0.0), r["selector"] != "gate"))


def recommend(rows, ratio=None) -> dict | None:
    """The recommended gate setting of ``rows`` (:func:`ppl_rows`): the sparsest within
    ``ratio`` × dense PPL (the demo's rule, ``BEST_PPL_RATIO``), else the lowest PPL."""
    if ratio is None:
        from seer_attn.eval.demo import BEST_PPL_RATIO as ratio
    dense = next((r["ppl"] for r in rows if r["selector"] == "dense"), None)
    gates = [r for r in rows if r["selector"] == "gate" and r.get("method") in PARAM_FIELD and r.get("param")]
    if not gates or dense is None:
        return None
    ok = [r for r in gates if r["ppl"] <= ratio * dense]
    best = min(ok, key=lambda r: r["density"]) if ok else min(gates, key=lambda r: r["ppl"])
    why = (f"the sparsest measured setting within {ratio:g}x the dense perplexity" if ok else
           f"no setting came within {ratio:g}x the dense perplexity: the one with the lowest perplexity")
    return {"method": best["method"], "param": float(best["param"]), "density": best["density"], "ppl": best["ppl"],
            "dense_ppl": dense, "why": why}


def settings_of(rec, keep) -> dict:
    """The ``seer_*`` options that run ``rec`` (:func:`recommend`; its parameter to 6
    significant digits, as the envelopes name settings) with the keep rules ``keep``
    (``seer_dense_last_rows`` is left at the model's: it serves prompts, see the card)."""
    out = {"seer_mode": "sparse", "seer_selector": "gate", "seer_sparsity_method": rec["method"],
           PARAM_FIELD[rec["method"]]: float(f"{rec['param']:.6g}")}
    out.update({k: v for k, v in (keep or {}).items() if k != "seer_dense_last_rows"})
    return out


def training_of(sources, label=None) -> list:
    """What the envelopes say about how this model's gates were trained: a list of dicts
    (``kind``, ``steps``, ``seq_len``, ``seconds``, ``final_loss``, ... ``source``)."""
    out = []
    for s in sources:
        env, cfg = s.env, s.env["config"]
        if s.kind == "distill":
            last = env["rows"][-1] if env["rows"] else {}
            out.append({"kind": "distill", "steps": env.get("global_step") or cfg.get("steps"),
                        "seq_len": env.get("seq_len") or cfg.get("seq_len"), "batch_size": cfg.get("batch_size"),
                        "grad_accum": cfg.get("grad_accum"), "lr": cfg.get("lr"), "warmup": cfg.get("warmup_steps"),
                        "seed": cfg.get("seed"), "bf16": cfg.get("bf16"), "data": env.get("data") or cfg.get("data"),
                        "target": cfg.get("distill_target") or "max", "seconds": last.get("train_runtime"),
                        "final_loss": env.get("final_loss"), "mean_loss": env.get("train_loss"),
                        "distill_prior": cfg.get("distill_prior"), "source": s})
        elif s.kind == "quality" and env.get("cost") and not cfg.get("gates"):
            c = env["cost"]
            out.append({"kind": "quality", "steps": c.get("steps"), "seq_len": c.get("seq_len"),
                        "batch_size": cfg.get("batch_size"), "seconds": c.get("train_seconds"),
                        "peak_gib": c.get("peak_gib"), "final_loss": c.get("final_loss"),
                        "target": c.get("distill_target"), "data": cfg.get("train"), "source": s})
        elif s.kind == "finetune":
            last = env["rows"][-1] if env["rows"] else {}
            out.append({"kind": "finetune", "steps": env.get("global_step") or cfg.get("steps"),
                        "seq_len": env.get("seq_len") or cfg.get("seq_len"), "batch_size": cfg.get("batch_size"),
                        "grad_accum": cfg.get("grad_accum"), "lr": cfg.get("lr"), "warmup": cfg.get("warmup_steps"),
                        "seed": cfg.get("seed"), "autocast_bf16": cfg.get("bf16"),
                        "data": env.get("data") or cfg.get("data"), "seconds": last.get("train_runtime"),
                        "final_loss": env.get("final_loss"), "mean_loss": env.get("train_loss"),
                        "lm_loss": env.get("final_lm_loss"), "gate_loss": env.get("final_gate_loss"),
                        "yarn_factor": env.get("yarn_factor"), "original_context": env.get("original_context"),
                        "selection": env.get("selection"), "lora_r": cfg.get("lora_r") if env.get("lora") else None,
                        "lora_targets": cfg.get("lora_targets"), "freeze_gates": cfg.get("freeze_gates"),
                        "gate_loss_weight": cfg.get("gate_loss_weight"), "source": s})
        elif s.kind == "demo" and label == DEMO_OWN_LABEL:
            p, _ = demo_run(s)
            out.append({"kind": "demo", "steps": p["steps"], "seq_len": p["seq_len"], "bf16": p.get("bf16"),
                        "seed": cfg.get("seed"), "seconds": env.get("train_seconds"),
                        "final_loss": env.get("final_loss"), "data": None, "source": s})
    return out


def hub_datasets(training) -> list:
    """Hub dataset ids among the training data (``hub:name[:config[:split]]`` sources)."""
    out = []
    for t in training:
        for d in t.get("data") or []:
            if isinstance(d, str) and d.startswith("hub:") and d[4:].split(":")[0] not in out:
                out.append(d[4:].split(":")[0])
    return out


# -- the card ----------------------------------------------------------------------------

def fmt_bytes(n) -> str:
    """``n`` bytes in kB / MB / GB (powers of 1000), one decimal."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _pct(x, ref) -> str:
    return f"{100 * (x / ref - 1):+.1f}%"


def _setting_name(r) -> str:
    from seer_attn.eval.baselines import row_label
    if r["selector"] == "dense":
        return "dense"
    return row_label(r)


def _param_text(r) -> str:
    if r.get("param") is None:
        return "—"
    name = {"threshold": "threshold", "nz_ratio": "top-k share", "coverage": "coverage", "gain": "log-mass gain",
            "density": "density knob"}.get(r.get("method"), r.get("method") or "")
    return f"{name} {r['param']:.4g}"


def _ppl_table(rows) -> str:
    dense = next(r["ppl"] for r in rows if r["selector"] == "dense")
    sources = sorted({k for r in rows for k in (r.get("per_source") or {})})
    head = ["selection", "setting", "density", "PPL", "vs dense"] + [f"PPL {s}" for s in sources]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        own = r.get("label") == THIS_GATE
        cells = [f"**{_setting_name(r)}**" if own else _setting_name(r), _param_text(r), f"{r['density']:.3f}",
                 f"{r['ppl']:.3f}", "—" if r["selector"] == "dense" else _pct(r["ppl"], dense)]
        cells += [f"{r['per_source'][s]:.3f}" if s in (r.get("per_source") or {}) else "—" for s in sources]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _keep_text(keep) -> str:
    if not keep:
        return "the keep rules of the model's config at the time (the envelope does not record them)"
    parts = [("the diagonal block" if keep.get("seer_keep_diagonal") else ""),
             ("the first (sink) block" if keep.get("seer_keep_sink") else ""),
             (("the block before the diagonal" if keep["seer_keep_local"] == 1 else
               f"the {keep['seer_keep_local']} blocks before the diagonal") if keep.get("seer_keep_local") else ""),
             (f"the last {keep['seer_dense_last_rows']} block rows in full" if keep.get("seer_dense_last_rows")
              else "")]
    parts = [p for p in parts if p]
    return "every selection kept " + (", ".join(parts) if parts else "no block beyond its own choice")


def _passkey_rows(src: Source):
    return list((src.env.get("passkey") or {}).items())


def _passkey_table(entries, density=True) -> str:
    """Passkey accuracy by setting and prompt length, paired with dense; ``density``: with the
    prefill's block density column (a decode run's entries have none)."""
    lengths = sorted({int(n) for _, res in entries for n in (res.get("per_length") or {})})
    head = ["setting"] + (["density"] if density else []) + ["accuracy"] + [f"{n} tokens" for n in lengths] + \
        ["vs dense (lost / gained, sign test p)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, res in entries:
        per = res.get("per_length") or {}
        v = res.get("vs_dense")
        dens = [f"{res['density']:.3f}" if res.get("density") is not None else "1 (dense)"] if density else []
        cells = [name.replace("_", " ")] + dens + [f"{res['accuracy']:.3f}"] + \
            [f"{per[str(n)]:.2f}" if str(n) in per else "—" for n in lengths]
        cells.append(f"{v['lost']} / {v['gained']} of {v['n']}, p = {v['p_value']:.3g}" if v else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _is_gate_passkey(name) -> bool:
    return name == "dense" or name.startswith(("seer_threshold_", "gate:"))


def _source(src: Source, repo_id) -> dict:
    """``EvalResult`` source fields: the envelope's URL in the Hub repo (none without a repo id)."""
    if not repo_id:
        return {}
    return {"source_name": f"seer-attn {src.kind} results", "source_url": f"https://huggingface.co/{repo_id}/blob/main/"
            f"{src.name}"}


def eval_results(tables, passkeys, repo_id=None, tuned=(), decodes=()) -> list:
    """``EvalResult`` entries: dense and this model's gate perplexity at each measured
    density, passkey accuracy of dense and the gate settings, the perplexity rows of
    fine-tuning's closing tables (``tuned``: :func:`tuned_tables`) and decode perplexity of
    dense and the gate's decode settings (``decodes``: ``decode_quality`` sources)."""
    from huggingface_hub import EvalResult
    out = []
    for src in decodes:
        cfg = src.env["config"]
        for r in decode_rows(src):
            if r["setting"] != "dense" and not _is_gate_decode(r["setting"]):
                continue
            out.append(EvalResult(task_type="text-generation",
                                  dataset_type=os.path.basename(cfg["eval"]) if cfg.get("eval") else "eval.jsonl.gz",
                                  dataset_name=f"held-out text, {cfg['length']}-token windows, the second half "
                                               "scored as decode steps",
                                  dataset_config=f"{cfg['length']}-token windows, decode from token {r.get('prefix')}",
                                  dataset_args={"window_tokens": cfg["length"], "windows": r.get("windows")},
                                  metric_type="perplexity", metric_value=round(r["ppl"], 4),
                                  metric_name="decode perplexity, " + ("dense decode" if r["setting"] == "dense" else
                                                                        f"sparse decode {r['setting']}"),
                                  metric_config=None if r["setting"] == "dense" else
                                  f"kept share={r['decode_density']:.3f}",
                                  **_source(src, repo_id)))
    for src, setup, rows in tuned:
        for r in rows:
            out.append(EvalResult(task_type="text-generation", dataset_type=setup["corpus"],
                                  dataset_name=f"held-out text ({', '.join(_sources(rows))}), {setup['window']}-token "
                                               "source-joined windows",
                                  dataset_config=f"{setup['window']}-token source-joined windows",
                                  dataset_args={"window_tokens": setup["window"], "windows": r.get("windows")},
                                  metric_type="perplexity", metric_value=round(r["ppl"], 4),
                                  metric_name=f"perplexity, {r['setting']}",
                                  metric_config=None if r.get("density") is None else f"density={r['density']:.3f}",
                                  **_source(src, repo_id)))
    for src, setup, rows in tables:
        dataset = dict(task_type="text-generation", dataset_type=setup["corpus"],
                       dataset_name=f"held-out text ({', '.join(_sources(rows))}), {setup['window']}-token windows",
                       dataset_config=f"{setup['window']}-token windows",
                       dataset_args={"window_tokens": setup["window"], "windows": rows[0].get("windows")},
                       **_source(src, repo_id))
        for r in rows:
            if r["selector"] == "dense":
                out.append(EvalResult(**dataset, metric_type="perplexity", metric_value=round(r["ppl"], 4),
                                      metric_name="perplexity, dense attention"))
            elif r.get("label") == THIS_GATE:
                out.append(EvalResult(**dataset, metric_type="perplexity", metric_value=round(r["ppl"], 4),
                                      metric_name=f"perplexity at block density {r['density']:.3f}",
                                      metric_config=f"{r['method']}={r['param']:.6g}"))
    for src, entries in passkeys:
        lengths = sorted({int(n) for _, res in entries for n in (res.get("per_length") or {})})
        for name, res in entries:
            if not _is_gate_passkey(name):
                continue
            out.append(EvalResult(task_type="text-generation", dataset_type="passkey",
                                  dataset_name=f"passkey retrieval ({', '.join(map(str, lengths))} tokens)",
                                  metric_type="accuracy", metric_value=round(res["accuracy"], 4),
                                  metric_name=f"passkey accuracy, {name.replace('_', ' ')}",
                                  metric_config=None if res.get("density") is None else f"density={res['density']:.3f}",
                                  **_source(src, repo_id)))
    return out


def decode_rows(src: Source) -> list:
    """The decode-perplexity rows of a ``decode_quality`` envelope, dense first (ValueError
    when it has none or no dense row to compare with)."""
    rows = [r for r in src.env["rows"] if r.get("ppl") is not None]
    dense = [r for r in rows if r["setting"] == "dense"]
    if rows and not dense:
        raise ValueError(f"{src.path} has decode-perplexity rows but no dense one to compare them with")
    return dense[:1] + [r for r in rows if r["setting"] != "dense"]


def _is_gate_decode(setting) -> bool:
    """A decode setting the model runs with its own decode gates (not the oracle or streaming)."""
    from seer_attn.eval.settings import decode_setting
    return setting != "dense" and "seer_decode_selector" not in decode_setting(setting)


def recommend_decode(rows, ratio=DECODE_PPL_RATIO) -> dict | None:
    """The recommended decode setting of ``rows`` (:func:`decode_rows`): the sparsest gate setting
    within ``ratio`` x dense decode perplexity, else the one of lowest perplexity; None without one.
    Returns the row with ``why``."""
    gates = [r for r in rows[1:] if _is_gate_decode(r["setting"])]
    if not rows or not gates:
        return None
    dense = rows[0]["ppl"]
    within = [r for r in gates if r["ppl"] <= ratio * dense]
    if within:
        best = min(within, key=lambda r: (r.get("decode_density") or 1.0, r["ppl"]))
        return {**best, "why": f"the sparsest measured setting within {ratio:g}x dense decode perplexity"}
    best = min(gates, key=lambda r: r["ppl"])
    return {**best, "why": f"no setting measured came within {ratio:g}x dense decode perplexity: this one came closest"}


def _decode_options(setting) -> dict:
    """``set_seer_mode`` options of a decode setting's name (``budget=2048,prior=0.7``), as it was
    measured: a setting without ``keys=`` ran with the gate's block keys in the model's dtype
    (``eval.settings.apply_decode``), so the options say so rather than take the model's int8 default."""
    from seer_attn.eval.settings import SETTING_KEY_FORMAT, decode_setting
    opts = decode_setting(setting)
    return {"seer_decode_sparsity": True, **opts,
            "seer_decode_key_format": opts.get("seer_decode_key_format", SETTING_KEY_FORMAT)}


def _decode_table(rows) -> str:
    dense = rows[0]["ppl"]
    lines = ["| decode | kept share of KV blocks | decode perplexity | vs dense |", "|---|---|---|---|"]
    for r in rows:
        kept = "1 (dense)" if r["setting"] == "dense" else f"{r['decode_density']:.3f}"
        lines.append(f"| {r['setting']} | {kept} | {r['ppl']:.3f} | {r['ppl'] / dense:.4f}x |")
    return "\n".join(lines)


def _decode_section(decodes) -> list:
    """The card's "Sparse decode" section from ``decode_quality`` envelopes: how to turn it on
    with the recommended setting (of the first envelope with decode-perplexity rows), then each
    envelope's decode perplexity by setting and its passkey pairing with dense."""
    out = ["## Sparse decode", "",
           "Each layer also has a decode gate that scores the KV cache's full 64-token blocks for every new token "
           "(one choice per KV head, shared by its query heads), so that a sparse decode kernel reads only the "
           "chosen blocks, the first and the current block always among them. Dense decode is the default."]
    measured = [(s, decode_rows(s)) for s in decodes]
    first = next(((s, rows) for s, rows in measured if rows), None)
    rec = recommend_decode(first[1]) if first else None
    if rec is not None:
        dense = first[1][0]["ppl"]
        opts = _decode_options(rec["setting"])
        out += ["", "```python", "model.set_seer_mode(\"sparse\", " + ",\n                     ".join(
            f"{k}={_py(v)}" for k, v in opts.items()) + ")  # sparse prefill and sparse decode",
                "out = model.generate(ids, max_new_tokens=512)",
                "print(model.seer_decode_density())  # kept share of each sequence's KV blocks over the decode steps",
                "```", "",
                f"Recommended: **{rec['setting']}** (kept share of KV blocks {rec['decode_density']:.3f}, decode "
                f"perplexity {rec['ppl']:.3f} against {dense:.3f} dense, {_pct(rec['ppl'], dense)}): {rec['why']}. "
                "`budget=N` reads N tokens of blocks per step, `share=S` that share of them, `prior=A` mixes a "
                "training-free score of each block's mean key into the gate's (`seer_decode_meanpool_prior`); "
                "`seer_decode_key_format` is how the gate's block keys were stored in that run (`\"model\"`: the "
                "model's dtype; the model's own default, `\"i8\"`, keeps them in int8, half the bytes).",
                "", "On a GPU, `generate`'s decode steps are bound by host work; `seer_generate` replays each step "
                "from a CUDA graph (greedy or sampled), fastest with the layers' pointwise work compiled and their "
                "q/k/v and gate/up projections merged (inference options: the weights stay as they are):", "",
                "```python", "model.seer_compile_pointwise()", "model.seer_merge_projections()",
                "out = model.seer_generate(ids, max_new_tokens=512)", "```"]
    elif first is None:  # decode gates, no decode perplexity given to the export
        out += ["", "Sparse decode was not measured for this model (the export was given no `decode-quality` "
                "results; `seer-attn decode-quality --model BASE --gates seer_gates.safetensors` measures it). "
                "To try it:", "", "```python",
                "model.set_seer_mode(\"sparse\", seer_decode_sparsity=True, seer_decode_method=\"budget\", "
                "seer_decode_budget=2048)",
                "out = model.generate(ids, max_new_tokens=512)", "```"]
    for src, rows in measured:
        cfg = src.env["config"]
        if rows:
            corpus = os.path.basename(cfg["eval"]) if cfg.get("eval") else "the bundled corpus"
            out += ["", f"Decode perplexity ({rows[0].get('windows')} windows of {cfg.get('length')} tokens of "
                    f"`{corpus}`: the first {rows[0].get('prefix')} tokens a dense prefill, the rest scored one decode "
                    f"step at a time against the cache), measured{_on_device(src)} ([{src.name}]({src.name})):", "",
                    _decode_table(rows)]
        entries = list((src.env.get("passkey") or {}).items())
        if entries:
            out += ["", f"Passkey retrieval with sparse decode ([{src.name}]({src.name})), each setting paired prompt "
                    "by prompt with dense (`prefill threshold T+decode ...`: sparse prefill at gate threshold T "
                    "too):", "",
                    _passkey_table(entries, density=False)]
    return out + [""]


def tuned_tables(sources) -> list:
    """``[(source, setup, rows)]`` of the ``finetune_eval`` envelopes (the closing table of
    ``seer-attn finetune``): ``setup`` has ``window`` (tokens) and ``corpus`` (file name)."""
    out = []
    for s in sources:
        rows = [r for r in s.env["rows"] if r.get("ppl") is not None] if s.kind == TUNED_PPL_KIND else []
        if rows:
            corpus = s.env.get("corpus")
            corpus = os.path.basename(corpus) if corpus and os.path.splitext(corpus)[1] else "eval.jsonl.gz"
            out.append((s, {"window": rows[0].get("seq_len"), "corpus": corpus}, rows))
    return out


def _tuned_table(rows) -> str:
    sources = _sources(rows)
    head = ["setting", "density", "PPL"] + [f"PPL {s}" for s in sources]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["setting"], "1 (dense)" if r.get("density") is None else f"{r['density']:.3f}", f"{r['ppl']:.3f}"]
        cells += [f"{r['per_source'][s]:.3f}" if s in (r.get("per_source") or {}) else "—" for s in sources]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _sources(rows) -> list:
    return sorted({k for r in rows for k in (r.get("per_source") or {})})


def _py(value) -> str:
    """``value`` as Python source (strings in double quotes, as in the rest of the snippet)."""
    return json.dumps(value) if isinstance(value, str) else repr(value)


def _usage(spec: CardSpec, rec_settings) -> str:
    where = _py(spec.repo_id or spec.where)
    b = spec.base
    lines = ["```python", "import torch", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
             "device = \"cuda\" if torch.cuda.is_available() else \"cpu\"  # Triton kernels on a GPU; torch "
             "references on a CPU (slow)"]
    if spec.gates_only:
        lines.append(f"# fetches the base model {b.model} first, then applies this repository's gates")
    lines.append(f"model = AutoModelForCausalLM.from_pretrained({where}, trust_remote_code=True).to(device)")
    if spec.has_tokenizer:
        lines.append(f"tok = AutoTokenizer.from_pretrained({where}, trust_remote_code=True)")
    elif b.model:
        extra = "".join(f", {k}={_py(v)}" for k, v in (("gguf_file", b.gguf_file), ("revision", b.revision)) if v)
        lines.append(f"tok = AutoTokenizer.from_pretrained({_py(b.model)}{extra})  # the base model's tokenizer")
    lines += ["", "ids = tok(\"A long prompt ...\", return_tensors=\"pt\").input_ids.to(device)",
              "out = model.generate(ids, max_new_tokens=32)  # block-sparse prefill, dense decoding",
              "print(tok.decode(out[0, ids.shape[1]:]))",
              "print(model.seer_density().mean())  # kept share of causal 64x64 blocks in the prefill"]
    if rec_settings:
        dense = ("full attention over these fine-tuned weights" if spec.fine_tuned else
                 "the base model's exact outputs")
        lines += ["", f"# dense attention ({dense}), and back to the shipped setting",
                  "model.set_seer_mode(\"dense\")",
                  "model.set_seer_mode(\"sparse\", " + ",\n                     ".join(
                      f"{k}={_py(v)}" for k, v in rec_settings.items() if k != "seer_mode") + ")"]
    lines.append("```")
    return "\n".join(lines)


def _needs(spec: CardSpec) -> str:
    """What loading the repository needs installed."""
    gguf = spec.gates_only and (spec.base.gguf_file or str(spec.base.model or "").lower().endswith(".gguf"))
    return ("Needs `torch` and `transformers` (5.x)" + (", and `gguf` to read the base's GGUF file" if gguf else "") +
            "; the model code ships in this repository (on a GPU its kernels use Triton, which CUDA builds of "
            "torch include).")


def _contents(spec: CardSpec) -> str:
    b = spec.base
    base = f"`{b.model}`" + (f" (revision `{b.revision}`" if b.revision else "") + \
        (f"{', ' if b.revision else ' ('}file `{b.gguf_file}`)" if b.gguf_file else (")" if b.revision else ""))
    if spec.gates_only:
        text = (f"This repository holds only the gates and the code that applies them. `from_pretrained` reads the "
                f"base model {base} through huggingface_hub (from the local cache when it is there), loads its "
                "weights into the SeerAttention model and then the gates from this repository; the base's weights "
                "are used unchanged. If the base cannot be had, loading stops with one line naming it.")
    elif spec.fine_tuned:
        text = ("This repository holds the whole model (its fine-tuned weights and the gates) with the code that runs "
                "it" + (f"; it was fine-tuned from {base}." if b.model else "."))
    else:
        text = ("This repository holds the whole model (the base weights, unchanged, and the gates) with the code "
                "that runs it" + (f"; the base is {base}." if b.model else "."))
    code = [(n, size) for n, size in spec.files if n.endswith(".py")]
    rows = [f"| `{n}` | {fmt_bytes(size)} |" for n, size in spec.files if not n.endswith(".py")]
    if code:
        rows.append(f"| the model code: {', '.join(f'`{n}`' for n, _ in code)} | "
                    f"{fmt_bytes(sum(size for _, size in code))} |")
    return text + "\n\n| file | size |\n|---|---|\n" + "\n".join(rows)


def _finetune_parts(t) -> tuple:
    """What a ``finetune`` run trained (text) and the parts of its recipe beyond steps and batch."""
    if t.get("lora_r"):
        targets = ", ".join(f"`{m}`" for m in t.get("lora_targets") or [])
        what = (f"LoRA of rank {t['lora_r']}" + (f" on {targets}" if targets else "") +
                ", merged into the weights of this repository")
    else:
        what = "full fine-tuning: every weight"
    what += ", the gates frozen" if t.get("freeze_gates") else ", the gates trained beside them"
    parts = []
    if t.get("yarn_factor"):
        parts.append(f"YaRN context extension by {t['yarn_factor']:g}x over the original "
                     f"{t.get('original_context')} positions")
    sel = t.get("selection") or "dense"
    parts.append("dense attention" if sel == "dense" else f"block-sparse attention at {sel}")
    if not t.get("freeze_gates") and t.get("gate_loss_weight") is not None:
        parts.append(f"gate loss weight {t['gate_loss_weight']:g}")
    return what, parts


def _on(prov) -> str:
    gpu = prov.get("gpu")
    return "" if not gpu else " on the CPU" if gpu == "cpu" else f" on one {gpu}"


def _on_device(src: Source) -> str:
    gpu = src.env["provenance"].get("gpu")
    return " on a device not recorded" if not gpu else " on the CPU" if gpu == "cpu" else f" on {gpu}"


def _training_text(training) -> list:
    out = []
    for t in training:
        src, prov = t["source"], t["source"].env["provenance"]
        what = {"distill": "`seer-attn distill`", "quality": "`python -m seer_attn.eval.quality_run`",
                "demo": "`seer-attn demo`", "finetune": "`seer-attn finetune`"}[t["kind"]]
        tuned = t["kind"] == "finetune"
        data = t.get("data")
        if data:
            data = ", ".join(f"`{os.path.basename(str(d))}`" for d in data)
        else:
            data = "the bundled training corpus (`train.jsonl.gz`: Austen, the King James Bible, CPython modules)"
        parts = [f"{t['steps']} optimizer step{'' if t['steps'] == 1 else 's'} of {t['seq_len']} tokens"]
        if t.get("batch_size"):
            parts[-1] += f" (batch {t['batch_size']}" + (f" x {t['grad_accum']} accumulation" if
                                                         (t.get("grad_accum") or 1) > 1 else "") + ")"
        if tuned:
            trained, more = _finetune_parts(t)
            parts += more
        else:
            trained = "only the gates trained, base weights frozen"
        if t.get("lr"):
            parts.append(f"learning rate {t['lr']:g} with {t.get('warmup', 0)} warm-up steps, cosine decay")
        if t.get("seed") is not None:
            parts.append(f"seed {t['seed']}")
        if t.get("bf16") is not None:
            parts.append("bfloat16 base weights" if t["bf16"] else "float32 base weights")
        if t.get("autocast_bf16") is not None:
            parts.append("bfloat16 autocast over float32 weights" if t["autocast_bf16"] else "float32")
        if not tuned:
            parts.append(f"target: the {'max-pooled' if t.get('target', 'max') == 'max' else 'mass-pooled'} "
                         "attention map of the frozen model")
        if t.get("distill_prior"):
            a = t["distill_prior"]
            parts.append(f"the loss read through the mean-pooled prior at share {a:g} (`seer_distill_prior`): the "
                         f"gates are a residual, meant to be served with `seer_meanpool_prior` = {a:g}")
        cost = []
        if t.get("seconds"):
            cost.append(f"{t['seconds']:.0f} s" + _on(prov))
        if t.get("peak_gib"):
            cost.append(f"peak memory {t['peak_gib']:.2f} GiB")
        if t.get("final_loss") is not None:
            more = [", ".join(f"{name} {t[k]:.3f}" for k, name in (("lm_loss", "LM loss"), ("gate_loss", "gate loss"))
                              if t.get(k) is not None)]
            if t.get("mean_loss") is not None:
                more.append(f"{t['mean_loss']:.3f} averaged over the run")
            more = "; ".join(m for m in more if m)
            cost.append(f"final logged {'loss' if tuned else 'gate loss'} {t['final_loss']:.3f}" +
                        (f" ({more})" if more else ""))
        out.append(f"- {what} ([{src.name}]({src.name})), {trained}, on {data}: "
                   + "; ".join(parts) + ". Cost: " + ("; ".join(cost) if cost else "not recorded") + ".")
        if prov.get("command"):
            cmd = [os.path.basename(prov["command"][0]), *prov["command"][1:]]
            out.append(f"  Command: `{' '.join(cmd)}`")
    return out


def _provenance_table(sources, spec: CardSpec) -> str:
    lines = ["| results | kind | commit | GPU | torch / transformers / triton | created |", "|---|---|---|---|---|---|"]
    for s in sources:
        p = s.env["provenance"]
        v = p.get("versions") or {}
        commit = (p.get("commit") or "not recorded")[:12] + (" (uncommitted changes)" if p.get("commit_dirty") else "")
        lines.append(f"| [{s.name}]({s.name}) | {s.kind} | {commit} | {p.get('gpu') or 'not recorded'} | "
                     f"{v.get('torch', '—')} / {v.get('transformers', '—')} / {v.get('triton', '—')} | "
                     f"{p.get('created') or '—'} |")
    by_note = {}
    for s in sources:
        if s.env.get("provenance_note"):
            by_note.setdefault(s.env["provenance_note"], []).append(s.name)
    notes = [f"- {', '.join(names)}: {note}" for note, names in by_note.items()]
    commit, dirty = spec.commit
    made = (f"Exported by seer-attn at commit {commit[:12]}" + (" (with uncommitted changes)" if dirty else "")
            if commit else "Exported by seer-attn (no commit recorded)")
    return "\n".join(lines) + ("\n\nNotes:\n" + "\n".join(notes) if notes else "") + \
        f"\n\n{made}; [{spec.results_dir}/export.json]({spec.results_dir}/export.json) records the export."


def render_card(spec: CardSpec, sources, plot_file=PLOT_FILE):
    """The model card (``huggingface_hub.ModelCard``) of the folder ``spec`` describes, from
    the results envelopes ``sources`` (:class:`Source`, ``name`` set to their path in the
    folder). ``plot_file``: the PPL-vs-density PNG in the folder (None: no plot)."""
    from huggingface_hub import ModelCard, ModelCardData

    tables = [(s, ppl_setup(s), ppl_rows(s, spec.gate_label)) for s in sources if s.kind in PPL_KINDS]
    tables = [t for t in tables if any(r["selector"] == "dense" for r in t[2]) and
              any(r.get("label") == THIS_GATE for r in t[2])]
    passkeys = [(s, _passkey_rows(s)) for s in sources if s.kind == "quality" and s.env.get("passkey")]
    tuned = tuned_tables(sources)
    training = training_of(sources, spec.gate_label)
    decodes = [s for s in sources if s.kind == DECODE_KIND]
    if decodes and spec.decode_gates is False:
        raise ValueError(f"{decodes[0].path} measures sparse decode, but the model has no decode gates "
                         "(seer_decode_gate is off): export a model distilled with them, or leave that envelope out")
    b = spec.base

    data = ModelCardData(
        model_name=spec.name, base_model=b.model if b.hub else None,
        base_model_relation=("adapter" if spec.gates_only else "finetune") if b.hub else None,
        library_name="transformers", license=b.license, tags=list(TAGS), pipeline_tag="text-generation",
        datasets=hub_datasets(training) or None,
        eval_results=eval_results(tables, passkeys, spec.repo_id, tuned, decodes) or None)

    if spec.gates_only:
        title = f"{spec.name}: SeerAttention gates for {b.model}"
    else:
        name = b.model if b.hub or not b.model else os.path.basename(b.model)
        title = f"{spec.name}: " + ((f"{name} fine-tuned with SeerAttention" if spec.fine_tuned else
                                     f"{name} with SeerAttention gates") if b.model else "a SeerAttention model")
    if spec.fine_tuned:
        how = ("This model was then fine-tuned with block-sparse attention (`seer-attn finetune`, see Training): its "
               "weights are its own, not the base model's, and dense mode runs them with full attention.")
    else:
        how = ("The gates are distilled from the frozen model's own attention maps: the base weights stay as they "
               "were, and dense mode gives the base model's outputs exactly.")
    body = [f"# {title}", "",
            "SeerAttention (Gao et al., 2024) gives every attention layer a small learned gate that reads block-pooled "
            "queries and keys and predicts which 64x64 blocks of the attention map matter, so that a block-sparse "
            "FlashAttention kernel computes only those blocks during prefill. " + how, "",
            "## What is here", "", _contents(spec), "",
            "## Usage", "",
            _needs(spec), "",
            _usage(spec, spec.settings), ""]
    if spec.settings:
        s = spec.settings
        shipped = ", ".join(f"`{k}={_py(v)}`" for k, v in s.items())
        body += ["## Sparsity settings", "", f"The config ships with {shipped}."]
    cal = next((s for s in sources if s.kind == CALIBRATION_KIND), None)
    if cal is not None:
        body += [""] + _calibration_text(cal, spec.settings or {})
    if tables:
        src, setup, rows = tables[0]
        rec = recommend(rows)
        body += ["", "Measured settings: every gate row of the tables below (the `setting` column gives the "
                 "selection method and its parameter); " + _keep_text(setup["keep"]) + ". "
                 f"Recommended: **{rec['method']} {rec['param']:.6g}** (block density {rec['density']:.3f} at "
                 f"{setup['window']}-token windows, perplexity {rec['ppl']:.3f} against {rec['dense_ppl']:.3f} dense, "
                 f"{_pct(rec['ppl'], rec['dense_ppl'])}): {rec['why']}. A threshold keeps a different share of "
                 "blocks at other lengths (longer prompts: usually fewer); `model.seer_density()` reports it. The "
                 "config keeps the last 2 block rows of a prompt in full (`seer_dense_last_rows`), where the question "
                 "of a long prompt sits; the perplexity rows were measured without that."]
    body.append("")
    if tables or tuned or passkeys:
        body += ["## Results", ""]
    for i, (src, setup, rows) in enumerate(tables):
        body += [f"Perplexity on held-out text ({', '.join(_sources(rows))}; corpus `{setup['corpus']}`), "
                 f"{rows[0].get('windows')} windows of {setup['window']} tokens ({rows[0].get('tokens')} predicted "
                 f"tokens), measured{_on_device(src)} ([{src.name}]({src.name})); {_keep_text(setup['keep'])}. "
                 "Density is the kept share of causal blocks; the baselines are compared at matched densities.", "",
                 _ppl_table(rows), ""]
        if i == 0 and plot_file:
            body += [f"![perplexity against block density]({plot_file})", ""]
    for src, setup, rows in tuned:
        body += [f"Perplexity after fine-tuning at the training length, {setup['window']} tokens: each source of the "
                 f"held-out text ({', '.join(_sources(rows))}; corpus `{setup['corpus']}`) joined into one stream "
                 f"and cut into windows ({rows[0].get('windows')} windows, {rows[0].get('tokens')} predicted tokens), "
                 f"measured{_on_device(src)} ([{src.name}]({src.name})):", "", _tuned_table(rows), ""]
    if passkeys:
        for src, entries in passkeys:
            body += [f"Passkey retrieval (a five-digit key hidden at several depths of repeated filler, greedy "
                     f"decoding; [{src.name}]({src.name})); each sparse setting is paired prompt by prompt with "
                     "dense:", "", _passkey_table(entries), ""]
    if decodes or spec.decode_gates:
        body += _decode_section(decodes)
    body += ["## Training", ""]
    body += _training_text(training) if training else [
        "The results given to the export do not include the training run of these gates."]
    body += ["", "## Provenance", "", _provenance_table(sources, spec), "",
             "## Citation", "", "```bibtex", CITATION, "```", ""]
    return ModelCard("---\n" + data.to_yaml() + "\n---\n\n" + "\n".join(body))


def plot(spec: CardSpec, sources, path) -> str | None:
    """The PPL-vs-density PNG of the first perplexity envelope with this model's rows
    (:func:`seer_attn.eval.baselines.plot_ppl_vs_density`); None when there is none.
    Raises ImportError naming the package when matplotlib is missing."""
    from seer_attn.eval.baselines import plot_ppl_vs_density
    for s in sources:
        if s.kind not in PPL_KINDS:
            continue
        rows = ppl_rows(s, spec.gate_label)
        if any(r.get("label") == THIS_GATE for r in rows) and any(r["selector"] == "dense" for r in rows):
            title = f"{spec.name}: {ppl_setup(s)['window']}-token windows"
            if plot_ppl_vs_density(rows, path, title=title) is None:
                raise ImportError("the card's plot needs matplotlib: pip install matplotlib")
            return path
    return None
