"""Passkey of a few (length, depth) cells under several selections, paired with dense (CPU fp32 or GPU bf16).

Where does the gate lose the passkey? The H200's 225-prompt run (results/quality/h200_gate_passkey225.json)
lost 33 of its 38 prompts at 4k, depths 0.5-1.0. This replays those cells on the CPU with the
same gates and prompts (the generator's seed 0, samples 0..N-1) under selections that each change
one thing: the knob as on the GPU, layers made dense by halves, more dense last rows, the
threshold, the oracle. Run from a clone (after ``bash .ci/install.sh``; the embedded SmolLM2)::

    python docs/experiments/passkey_cells.py GATES --length 4096 --depths 0.5 0.75 --samples 8 \\
        --settings knob knob,dense=0-14 knob,dense=15-29 knob,last=4 threshold=0.03 oracle

A setting is comma-separated: ``knob`` (density 0.12, as gate_quality's passkey phase),
``density=R``, ``threshold=T``, ``coverage=C`` (per row the fewest blocks holding C of the
gate's probability), ``gain=G`` (per row the best blocks while each holds >= G of the kept
mass), ``oracle`` (the true max-pooled map's top blocks at the knob's density) or
``oracle_mass`` (the true block attention mass's), then optional ``dense=A-B`` (layers A..B
attend densely), ``prior=A`` (the mean-pooled q.k prior at share A in the gate's scores:
``seer_meanpool_prior``), ``early=A-B:R`` (layers A..B keep density R instead), ``profile=C``
(the knob spread over the layers as the coverage rule at C spreads it on 4 windows of
``--profile-from``, the bundled train corpus by default: ``seer_density_profile``), ``last=N``
(N dense last block rows; default 2), ``local=N`` (local blocks kept; default 1), ``bylen=L:P/L:P``
(the rule's parameter by prompt length: the first L at least the prompt's tokens). Prints one
line per setting: accuracy, density, lost / gained against dense. ``--lengths 2048 4096 8192
--depths 0 0.25 0.5 0.75 1.0 --samples 15`` is issue 17's 225-prompt protocol (gate_quality's
passkey phase). dense_layers_ppl.py measures the same settings' perplexity. ``--dense-from
ENVELOPE`` pairs with the dense answers of an earlier run on the same prompts (a gate_quality
passkey run or one of this script's; same device kind and dtype, or the pairing mixes their
disagreements in) instead of running dense again.
"""
import contextlib
import argparse
import json
import time

import torch

import seer_attn.modeling_seer.seer_layer as seer_layer
from seer_attn.eval.calibration import density_profile
from seer_attn.eval.passkey import generate_passkey_samples, paired_passkey, run_passkey, sample_key
from seer_attn.modeling_seer.conversion import default_model_path, load_seer_model, load_tokenizer
from seer_attn.training.results import write_envelope


def parse(spec, **keep):
    """``spec`` -> (set_seer_mode keyword arguments, {layer: density or None (dense)}); ``keep``
    overrides the passkey phase's keep rules (the perplexity protocol has no dense last rows)."""
    kw = dict(seer_selector="gate", seer_sparsity_method="density", seer_density=0.12, seer_keep_sink=True,
              seer_keep_local=1, seer_keep_diagonal=True, seer_dense_last_rows=2, seer_density_profile=None,
              seer_meanpool_prior=0.0)
    kw.update(keep)
    layers = {}
    for part in spec.split(","):
        key, _, val = part.partition("=")
        if key == "knob":
            pass
        elif key == "density":
            kw.update(seer_sparsity_method="density", seer_density=float(val))
        elif key == "threshold":
            kw.update(seer_sparsity_method="threshold", seer_threshold=float(val))
        elif key == "coverage":
            kw.update(seer_sparsity_method="coverage", seer_coverage=float(val))
        elif key == "gain":
            kw.update(seer_sparsity_method="gain", seer_gain=float(val))
        elif key == "prior":
            kw["seer_meanpool_prior"] = float(val)
        elif key in ("oracle", "oracle_mass"):
            kw.update(seer_selector="oracle_max" if key == "oracle" else "oracle_mass")
        elif key in ("dense", "early"):
            span, _, rho = val.partition(":")
            if (key == "early") != bool(rho):
                raise ValueError(f"setting part {part!r}: expected dense=A-B or early=A-B:R")
            a, b = (int(x) for x in span.split("-"))
            layers.update(dict.fromkeys(range(a, b + 1), float(rho) if rho else None))
        elif key == "profile":  # the knob spread over the layers as coverage C spreads it (on a sample)
            kw["profile_coverage"] = float(val)
        elif key == "bylen":  # the rule's parameter per prompt length: L:P/L:P/... (first L >= the tokens)
            kw["by_length"] = sorted((int(a), float(b)) for a, b in (x.split(":") for x in val.split("/")))
        elif key == "last":
            kw["seer_dense_last_rows"] = int(val)
        elif key == "local":
            kw["seer_keep_local"] = int(val)
        else:
            raise ValueError(f"setting part {part!r}: expected knob, density=R, threshold=T, coverage=C, gain=G, "
                             "oracle, oracle_mass, prior=A, dense=A-B, early=A-B:R, profile=C, bylen=L:P/.., "
                             "last=N or local=N")
    return kw, layers


def profile_sample(args, tok, spec):
    """4 windows of ``--profile-from`` (or the bundled train corpus) of ``--profile-length``
    tokens when ``spec`` asks for ``profile=C``, else None."""
    if "profile=" not in spec:
        return None
    from seer_attn.eval.perplexity import load_documents, make_windows
    from seer_attn.training.data import default_corpus_path
    return make_windows(load_documents(args.profile_from or default_corpus_path("train")), tok,
                        args.profile_length, 1)[:4]


def model_dtype(args):
    """``--dtype``, or bf16 on a GPU and fp32 on the CPU."""
    name = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    return torch.bfloat16 if name == "bf16" else torch.float32


def lean(samples):
    """Samples without their prompt texts (the generator rebuilds them from seed, length, depth and index)."""
    return [{k: v for k, v in s.items() if k != "prompt"} for s in samples]


def dense_from(path, samples):
    """The dense answers to ``samples`` kept in envelope ``path`` (gate_quality's ``passkey.dense``
    or this script's ``dense`` row) as a :func:`run_passkey`-like result; a clear error when the
    envelope has none or lacks one of the prompts."""
    with open(path) as f:
        env = json.load(f)
    got = (env.get("passkey") or {}).get("dense") or next(
        (r for r in env.get("rows", []) if r.get("setting") == "dense"), None)
    if not got or not got.get("samples"):
        raise SystemExit(f"--dense-from {path}: no dense passkey samples in it (passkey.dense or a 'dense' row)")
    have = {sample_key(r): r for r in got["samples"]}
    missing = [k for k in map(sample_key, samples) if k not in have]
    if missing:
        raise SystemExit(f"--dense-from {path}: {len(missing)} of this run's {len(samples)} prompts are not in it "
                         f"(first: seed, length, depth, sample = {missing[0]})")
    picked = [have[sample_key(r)] for r in samples]
    return {"accuracy": sum(bool(r["correct"]) for r in picked) / len(picked), "samples": picked,
            "from": path, "from_provenance": {k: env.get("provenance", {}).get(k) for k in ("commit", "gpu")}}


@contextlib.contextmanager
def applied(model, spec, profile_windows=None, **keep):
    """``model`` in sparse mode under setting ``spec`` for the ``with`` body. Per-layer parts
    wrap the prefill's selection: a dense layer keeps every causal block, an ``early`` layer
    selects with its own density (the config's, swapped for the call). ``profile=C`` solves
    ``seer_density_profile`` on ``profile_windows`` (:func:`density_profile`)."""
    kw, layers = parse(spec, **keep)
    cov = kw.pop("profile_coverage", None)
    by_length = kw.pop("by_length", None)
    if cov is not None and not profile_windows:
        raise ValueError(f"setting {spec!r}: profile=C needs sample windows (--profile-from)")
    select = seer_layer._selection

    def swapped(attn, field, value, q, rest):  # select with config field set to value for the call
        cfg, old = attn.config, getattr(attn.config, field)
        setattr(cfg, field, value)
        try:
            return select(attn, q, *rest)
        finally:
            setattr(cfg, field, old)

    def selection(attn, q, *rest):
        if attn.layer_idx in layers:
            rho = layers[attn.layer_idx]
            if rho is None:
                return torch.ones_like(select(attn, q, *rest)).tril()  # every causal block
            return swapped(attn, "seer_density", rho, q, rest)
        if by_length:  # q [B, HQ, T, D]: the first listed length holding the prompt, else the longest
            param = next((p for n, p in by_length if q.shape[2] <= n), by_length[-1][1])
            return swapped(attn, f"seer_{attn.config.seer_sparsity_method}", param, q, rest)
        return select(attn, q, *rest)
    seer_layer._selection = selection
    try:
        model.set_seer_mode("sparse", **kw)
        if cov is not None:
            model.set_seer_mode("sparse", seer_density_profile=density_profile(model, profile_windows, cov))
        yield
    finally:
        seer_layer._selection = select


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("gates", help="gates file (gates_*_bf16.safetensors of a gate_quality run)")
    ap.add_argument("--lengths", "--length", type=int, nargs="+", default=[4096])
    ap.add_argument("--depths", type=float, nargs="+", default=[0.5, 0.75])
    ap.add_argument("--out", help="also write the results as a JSON envelope here")
    ap.add_argument("--samples", type=int, default=8, help="prompts per depth (the GPU run's first ones)")
    ap.add_argument("--indices", type=int, nargs="+", help="only these sample indices of each cell (< --samples)")
    ap.add_argument("--settings", nargs="+", default=["knob", "knob,dense=0-14", "knob,dense=15-29"])
    ap.add_argument("--profile-from", help="jsonl corpus of profile=C's sample (default: the bundled train corpus)")
    ap.add_argument("--profile-length", type=int, default=8192, help="tokens per window of that sample")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dense-from", metavar="ENVELOPE",
                    help="pair with the dense answers of this earlier run on the same prompts instead of running dense")
    ap.add_argument("--dtype", choices=["bf16", "fp32"],
                    help="default: bf16 on cuda (as gate_quality's passkey phase), fp32 on cpu")
    args = ap.parse_args()
    torch.set_num_threads(2)
    path = default_model_path()
    dtype = model_dtype(args)
    model = load_seer_model(path, dtype=dtype, gates=args.gates).to(args.device)
    tok = load_tokenizer(path)
    samples = generate_passkey_samples(tok, args.lengths, args.depths, args.samples)
    if args.indices:
        samples = [s for s in samples if s.sample in args.indices]
    t0 = time.time()
    if args.dense_from:
        dense = dense_from(args.dense_from, [{"seed": s.seed, "length": s.length, "depth": s.depth,
                                              "sample": s.sample} for s in samples])
    else:
        model.set_seer_mode("dense")
        dense = run_passkey(model, tok, samples=samples, progress=False)
    src = f", from {args.dense_from}" if args.dense_from else ""
    print(f"dense: {dense['accuracy']:.3f} ({time.time() - t0:.0f} s{src})", flush=True)
    rows = [{"setting": "dense", "accuracy": dense["accuracy"], "density": None, "samples": lean(dense["samples"]),
             **{k: dense[k] for k in ("from", "from_provenance") if k in dense}}]

    def save(complete):  # after every setting: a cut run keeps what it measured, marked incomplete
        if args.out:
            write_envelope(args.out, "passkey_cells", rows, config=vars(args), model=path, complete=complete,
                           device=args.device)
    save(False)
    for spec in args.settings:
        t0 = time.time()
        with applied(model, spec, profile_sample(args, tok, spec)):
            res = run_passkey(model, tok, samples=samples, progress=False)
        vd = paired_passkey(dense, res)
        rows.append({"setting": spec, "accuracy": res["accuracy"], "density": res["density"], "vs_dense": vd,
                     "samples": lean(res["samples"])})
        save(False)
        print(f"{spec}: {res['accuracy']:.3f} at density {res['density']:.3f}, lost {vd['lost']} gained "
              f"{vd['gained']} of {vd['n']} (p = {vd['p_value']:.2g}; {time.time() - t0:.0f} s)", flush=True)
    save(True)


if __name__ == "__main__":
    main()
