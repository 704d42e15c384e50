"""README.md's results tables, generated from the committed results envelopes under results/.

    python -m seer_attn.eval.readme_tables            # rewrite every table of README.md
    python -m seer_attn.eval.readme_tables --check    # exit 1 when README.md is out of date

Each table sits between two marker comments in README.md::

    <!-- table:NAME -->
    (generated: a caption with the run's numbers, then the markdown table)
    <!-- /table -->

``NAME`` is an entry of :data:`TABLES`: a function of the repository root that reads
envelopes (:mod:`seer_attn.training.results`) under ``results/`` and returns the block's
text. Every number between the markers comes from an envelope; nothing is typed. CI runs
``--check`` (tests/eval/test_readme_tables.py), so a table that disagrees with the results it
cites fails the suite; after a new run is committed under results/, rerun without
``--check`` and commit README.md. Runs from the repository root (``--root`` to name another).
"""
import argparse
import json
import math
import os
import re
import sys

from .demo import density_table
from .finetune_run import format_timing
from .passkey import paired_passkey
from .settings import SELECTOR_LABELS, Setting

README = "README.md"
_BLOCK = re.compile(r"<!-- table:(?P<name>[\w-]+) -->\n(?P<body>.*?)<!-- /table -->", re.DOTALL)


def load_envelope(root, path) -> dict:
    """The results envelope ``results/...`` at ``path`` (relative to ``root``); ValueError when
    it is not one."""
    with open(os.path.join(root, path), encoding="utf-8") as f:
        env = json.load(f)
    missing = [k for k in ("schema_version", "kind", "complete", "provenance", "config", "rows") if k not in env]
    if missing:
        raise ValueError(f"{path} is not a results envelope: no {', '.join(missing)}")
    return env


def sig3(x) -> str:
    """``x`` with 3 significant digits, at most 2 decimals (1.70, 25.1, 430, 0.21)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    decimals = 2 if x == 0 else max(0, min(2, 2 - math.floor(math.log10(abs(x)))))
    return f"{x:.{decimals}f}"


def _tokens(t) -> str:
    return f"{t // 1024}k" if t % 1024 == 0 else str(t)


def _commit(prov) -> str:
    """The commit a run measured: ``tree_commit`` where the machine's checkout reported another
    HEAD than the tree it ran (added to the envelope with a ``tree_note`` saying so)."""
    return (prov.get("tree_commit") or prov.get("commit") or "commit unknown")[:7]


def _table(head, rows) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- demo

def _dense_ppl(rows):
    return next(r["ppl"] for r in rows if r["selector"] == "dense")


def _demo(path):
    def render(root):
        env = load_envelope(root, path)
        prov = env["provenance"]
        argv = list(prov.get("command") or ["seer-attn", "demo"])[1:]
        if "--output" in argv:  # where the run wrote is no part of what it measured
            i = argv.index("--output")
            del argv[i:i + 2]
        cmd = " ".join(["seer-attn"] + argv)
        caption = (f"`{cmd}` on {'a CPU' if prov['gpu'] == 'cpu' else prov['gpu']}, commit {_commit(prov)} "
                   f"({path}): {env['total_seconds'] / 60:.1f} minutes, {env['train_seconds'] / 60:.1f} of them "
                   f"distilling; PPL above dense ({_dense_ppl(env['rows']):.2f}):")
        return caption + "\n\n" + density_table(env["rows"], footer=False)
    return render


def _above_dense(rows):
    """{(label, target density): PPL above dense in %} of a demo's gate and streaming rows."""
    dense = _dense_ppl(rows)
    return {(r.get("label") or r["selector"], round(r["target_density"], 3)): 100 * (r["ppl"] / dense - 1)
            for r in rows if r["selector"] != "dense" and r.get("ppl")}


def demo_cpu_profile_on_gpu(root) -> str:
    """The CPU demo's profile on a GPU in float32 against the CPU run: the largest difference."""
    cpu, gpu = (load_envelope(root, f"results/demo/{n}.json") for n in ("cpu", "h200_cpu_profile"))
    a, b = _above_dense(cpu["rows"]), _above_dense(gpu["rows"])
    if set(a) != set(b):
        raise ValueError("results/demo/cpu.json and h200_cpu_profile.json compare different selections")
    worst = max(abs(a[k] - b[k]) for k in a)
    return (f"The same profile on an {gpu['provenance']['gpu']} in float32 (results/demo/h200_cpu_profile.json, "
            f"commit {_commit(gpu['provenance'])}) gives each of these percentages within {worst:.2f} points.")


# ----------------------------------------------------------------------------- kernels, TTFT

_KERNEL_COLUMNS = [("SDPA flash", "sdpa_flash"), ("SDPA cuDNN", "sdpa_cudnn"), ("Flex dense", "flex_dense"),
                   ("ours dense", "ours_dense"), ("ours 50%", "ours_d0.5"), ("ours 30%", "ours_d0.3"),
                   ("ours 10%", "ours_d0.1"), ("Flex64 10%", "flex64_d0.1"), ("attn_with_pooling", "attn_with_pooling")]


def _kernels(path):
    def render(root):
        env = load_envelope(root, path)
        prov = env["provenance"]
        shape = env.get("resolved", {}).get("shape") or env["config"]["shape"]  # runs before resolved: in config
        caption = (f"{prov['gpu']}, torch {prov['versions'].get('torch', '?').split('+')[0]}, triton "
                   f"{prov['versions'].get('triton', '?')}, commit {_commit(prov)} ({path}); causal prefill, "
                   f"{shape['dtype']}, {shape['HQ']} query / {shape['H']} KV heads, d={shape['D']}, batch "
                   f"{shape['B']}, median ms:")
        table = _table(["tokens"] + [c for c, _ in _KERNEL_COLUMNS],
                       [[_tokens(r["T"])] + [sig3(r.get(k)) for _, k in _KERNEL_COLUMNS] for r in env["rows"]])
        out = caption + "\n\n" + table
        bwd = [r for r in env["rows"] if "bwd_sdpa_flash" in r]
        for r in bwd[-1:]:  # the longest length with a backward pass
            out += (f"\n\nBackward at {_tokens(r['T'])}: SDPA flash {sig3(r['bwd_sdpa_flash'])} ms, ours dense "
                    f"{sig3(r['bwd_ours_dense'])} ms ({r['bwd_ours_dense'] / r['bwd_sdpa_flash']:.2f}× SDPA "
                    f"flash's), ours at 10% {sig3(r['bwd_ours_d0.1'])} ms "
                    f"({r['bwd_sdpa_flash'] / r['bwd_ours_d0.1']:.1f}× faster than SDPA flash).")
        pool = [r for r in env["rows"] if r.get("attn_with_pooling") and r.get("ours_dense")]
        if pool:
            out += ("\n\nattn_with_pooling over our dense kernel: " + ", ".join(
                f"{_tokens(r['T'])} {r['attn_with_pooling'] / r['ours_dense']:.2f}×" for r in pool) + ".")
        return out
    return render


_KERNEL_OPS = {"dense": "ours dense", "pool": "attn_with_pooling", "bwd_dense": "backward, dense",
               "bwd_d0.1": "backward, 10%"}


def _kernel_op_label(op):
    """A kernel-variant row's op ("dense", "pool", "d0.5", "bwd_dense"...) as the tables name it."""
    return _KERNEL_OPS.get(op) or f"ours {float(op[1:]) * 100:g}%"


def kernel_changes_h200(root) -> str:
    """docs/experiments/kernel_variants.py: one kernel change timed against the kernels before
    it in one process, with attn_with_pooling's cost relative to our dense kernel."""
    path = "results/kernels/h200_one_pass_pooling.json"
    env = load_envelope(root, path)
    prov = env["provenance"]
    rows = [r for r in env["rows"] if "vector_index" not in r["op"]]
    by = {(r["T"], r["op"]): r for r in rows}
    body = []
    for r in rows:
        op = _kernel_op_label(r["op"])
        body.append([_tokens(r["T"]), op, sig3(r["before"]), sig3(r["after"]), f"{r['after'] / r['before']:.2f}"])
    pool = ", ".join(f"{_tokens(T)} {by[(T, 'pool')]['after'] / by[(T, 'dense')]['after']:.2f}x "
                     f"(before {by[(T, 'pool')]['before'] / by[(T, 'dense')]['before']:.2f}x)"
                     for T in sorted({r["T"] for r in rows}) if (T, "pool") in by)
    caption = (f"{prov['gpu']}, commit {_commit(prov)} against the kernels of af41b99, same inputs, one process "
               f"({path}); causal, bf16, 32 query / 8 KV heads, d=128, batch 1, median ms:")
    return (caption + "\n\n" + _table(["tokens", "kernel", "before", "after", "after / before"], body)
            + f"\n\nattn_with_pooling over our dense kernel: {pool}.")


def tma_variants_h200(root) -> str:
    """docs/experiments/tma_variants.py: the forward kernel with K/V through tensor descriptors
    (the launch table's default at d128) against pointer loads, same inputs, one process."""
    path = "results/kernels/h200_tma_variants_d128.json"
    env = load_envelope(root, path)
    prov = env["provenance"]
    body = []
    for r in env["rows"]:
        body.append([_tokens(r["T"]), _kernel_op_label(r["op"]), sig3(r["sdpa_cudnn"]), sig3(r["base"]), sig3(r["tma"]),
                     f"{r['tma'] / r['base']:.2f}"])
    caption = (f"{prov['gpu']}, commit {_commit(prov)}, same inputs, one process ({path}); causal, bf16, 32 query / "
               "8 KV heads, d=128, batch 1, median ms (lower of two rounds):")
    return caption + "\n\n" + _table(["tokens", "kernel", "SDPA cuDNN", "pointer loads", "TMA", "TMA / pointers"],
                                       body)


def tma_bwd_variants_h200(root) -> str:
    """docs/experiments/tma_variants.py --backward: the backward kernels' launch tables with
    pointer loads and with tiles through tensor descriptors, same inputs, one process."""
    path = "results/kernels/h200_tma_bwd_variants.json"
    env = load_envelope(root, path)
    prov = env["provenance"]
    cols = [("pointers, table 0 (before)", "base"), ("TMA, table 0", "tma_table0"),
            ("pointers, table 1", "base_table1"), ("TMA, table 1", "tma")]
    body = []
    for r in env["rows"]:
        now = r["base_table1"] if r["op"] == "dense" else r["base"]
        body.append([_tokens(r["T"]), _kernel_op_label(r["op"]), sig3(r["sdpa_flash"]), sig3(r["sdpa_cudnn"])]
                    + [sig3(r[k]) for _, k in cols] + [f"{now / r['base']:.2f}", f"{now / r['sdpa_flash']:.2f}"])
    caption = (f"{prov['gpu']}, commit {_commit(prov)}, same inputs, one process ({path}); the backward pass alone "
               "(dQ, dK, dV of a causal forward), bf16, 32 query / 8 KV heads, d=128, batch 1, median ms (lower of "
               "two rounds). Table 0: dQ dense 128x64 tiles / 2 stages, dK/dV dense 128x128, sparse 2 stages; "
               "table 1: dQ dense 3 stages, dK/dV dense 64 query rows x 128 keys / 3 stages, sparse 3 stages. Now: "
               "pointer loads, table 1 dense, table 0 sparse:")
    return caption + "\n\n" + _table(["tokens", "backward of", "SDPA flash", "SDPA cuDNN"] + [c for c, _ in cols]
                                      + ["now / before", "now / SDPA flash"], body)


def _pair_variants(gpu):
    """docs/experiments/tma_variants.py --variants base tma pair ...: sparse pair programs (128
    query rows over the union of two query blocks' lists) against the row programs, on i.i.d.
    block masks and on gate-like column stripes, same inputs, one process per mask kind; ``gpu``
    names the files (``results/kernels/{gpu}_pair_variants_{random,stripes}.json``)."""
    return lambda root: pair_variants_table(root, gpu)


def pair_variants_table(root, gpu) -> str:
    parts, prov = [], None
    for kind in ("random", "stripes"):
        path = f"results/kernels/{gpu}_pair_variants_{kind}.json"
        env = load_envelope(root, path)
        prov = env["provenance"]
        for r in env["rows"]:
            if "pair" not in r:
                continue
            best = min(r["pair"], r["pair_s3"], r["pair_s5"])
            parts.append([_tokens(r["T"]), kind, _kernel_op_label(r["op"]), sig3(r["tma"]), sig3(r["pair"]),
                          sig3(r["pair_s3"]), sig3(r["pair_s5"]), f"{best / r['tma']:.2f}"])
    caption = (f"{prov['gpu']}, commit {_commit(prov)}, same inputs, one process per mask kind "
               f"(results/kernels/{gpu}_pair_variants_random.json, results/kernels/{gpu}_pair_variants_stripes.json); "
               "causal, bf16, 32 query / 8 KV heads, d=128, batch 1, TMA loads, median ms (lower of two rounds). "
               "Row programs: one 64-row query block per program (the default); pair programs: 128 rows over the "
               "union of two blocks' lists, 4 / 3 / 5 stages:")
    return caption + "\n\n" + _table(["tokens", "masks", "kernel", "row programs", "pairs", "pairs, 3 stages",
                                       "pairs, 5 stages", "best pairs / rows"], parts)


def dense64_h200(root) -> str:
    """docs/experiments/tma_variants.py --variants ... tma_dense64s5: the dense kernel in the sparse
    rows' 64x64 tile beside the dense kernel's 128x128 and the sparse kernel at density 1.0."""
    path = "results/kernels/h200_tma_variants_dense64.json"
    env = load_envelope(root, path)
    prov = env["provenance"]
    by = {(r["T"], r["op"]): r for r in env["rows"]}
    body = []
    for T in sorted({r["T"] for r in env["rows"]}):
        dense, d1 = by[(T, "dense")], by[(T, "d1")]
        body.append([_tokens(T), sig3(dense["sdpa_cudnn"]), sig3(dense["tma"]), sig3(dense["tma_dense64s5"]),
                     sig3(d1["tma"]), f"{dense['tma_dense64s5'] / dense['tma']:.2f}",
                     f"{d1['tma'] / dense['tma']:.2f}"])
    caption = (f"{prov['gpu']}, commit {_commit(prov)}, same inputs, one process ({path}); causal, bf16, 32 query / "
               "8 KV heads, d=128, batch 1, TMA loads, median ms (lower of two rounds):")
    return caption + "\n\n" + _table(["tokens", "SDPA cuDNN", "dense, 128x128 tiles", "dense, 64x64 tiles / 5 stages",
                                       "sparse at density 1.0 (64x64)", "64x64 / 128x128", "sparse 1.0 / dense"], body)


def _ttft(path):
    return lambda root: ttft_table(root, path)


def ttft_table(root, path) -> str:
    env = load_envelope(root, path)
    prov, rows = env["provenance"], env["rows"]
    names = [k[len("seer_nz"):] for k in rows[0] if k.startswith("seer_nz") and k[len("seer_nz"):].replace(".", "")
             .isdigit()]
    caption = (f"{prov['gpu']} ({path}): {prov['model']}, seconds to the first token (median of the timed "
               "prefills):")
    head = ["tokens", "SDPA flash", "SDPA cuDNN"] + [f"seer nz_ratio {n}" for n in names] + \
        [f"speed-up at {names[-1]} vs flash"]
    body = [[_tokens(r["T"]), f"{sig3(r['sdpa_flash'])} s", f"{sig3(r['sdpa_cudnn'])} s"]
            + [f"{sig3(r['seer_nz' + n])} s" for n in names]
            + [f"{r['sdpa_flash'] / r['seer_nz' + names[-1]]:.2f}×"] for r in rows]
    over = ", ".join(f"{100 * o['overhead_share']:.1f}% at {_tokens(o['T'])}" for o in env["overhead"])
    return (caption + "\n\n" + _table(head, body) + "\n\nGate + block-mask overhead, as a share of one layer's "
            f"dense attention time: {over}.")


# ----------------------------------------------------------------------------- quality

def _by_setting(rows):
    return {r["setting"]: r for r in rows}


def _ppl(row):
    return "" if row is None or row.get("ppl") is None else f"{row['ppl']:.2f}"


def quality_h100(root) -> str:
    """Every gate threshold of the 400-step run, with streaming (and the oracle, where measured)
    at the gate's own density."""
    main_path, base_path = "results/quality/h100_400steps.json", "results/quality/h100_400steps_baselines.json"
    env, base = load_envelope(root, main_path), load_envelope(root, base_path)
    rows, extra = _by_setting(env["rows"]), _by_setting(base["rows"])
    cost = env["cost"]
    gates = sorted((r for r in env["rows"] if r["selector"] == "gate" and r["method"] == "threshold"),
                   key=lambda r: -r["density"])
    body = []
    for g in gates:
        at = f"@{round(g['density'], 3):g}"  # baselines were calibrated to the gate's density, 3 decimals
        body.append([f"{g['density']:.2f}", f"{g['ppl']:.2f} ({g['param']:g})",
                     _ppl(rows.get("streaming:nz_ratio" + at) or extra.get("streaming:nz_ratio" + at)),
                     _ppl(extra.get("oracle_max:nz_ratio" + at))])
    caption = (f"SmolLM2-135M, gates distilled for {cost['steps']} steps at {cost['seq_len']} tokens "
               f"({cost['train_seconds']:.0f} s, {cost['peak_gib']:.2f} GiB peak, {env['provenance']['gpu']}), "
               f"perplexity on `{os.path.basename(env['config']['eval'])}` in {env['config']['eval_length']}-token "
               f"windows, dense "
               f"{_ppl(rows['dense'])} ({main_path}, oracle from {base_path}):")
    return caption + "\n\n" + _table(["density", "Seer gate (threshold)", "streaming (sink + recent)",
                                      "oracle top-k of the true max-pooled map"], body)


def quality_sink_local(root) -> str:
    """The gate (400 and 2400 steps) against every baseline with the sink and local block kept."""
    paths = {"400": "results/quality/h100_sink_local_400steps.json",
             "2400": "results/quality/h100_sink_local_2400steps.json",
             "base": "results/quality/h100_sink_local_baselines.json"}
    envs = {k: load_envelope(root, p) for k, p in paths.items()}
    rows = {k: _by_setting(e["rows"]) for k, e in envs.items()}
    base_targets = sorted({r["target_density"] for r in envs["base"]["rows"]}, reverse=True)
    body = []
    for target in base_targets:
        def gate(run):  # the threshold row of that run nearest the baselines' target
            cands = [r for r in envs[run]["rows"] if r["selector"] == "gate" and r["method"] == "threshold"]
            r = min(cands, key=lambda r: abs(r["density"] - target))
            return f"{r['ppl']:.2f} ({r['density']:.3f})" if abs(r["density"] - target) < 0.02 else ""

        def baseline(sel, method="nz_ratio"):
            r = rows["base"].get(f"{sel}:{method}@{target:g}")
            return "" if r is None or r.get("ppl") is None else f"{r['ppl']:.2f} ({r['density']:.3f})"
        body.append([f"{target:.2f}", gate("400"), gate("2400"), baseline("meanpool"), baseline("streaming"),
                     baseline("oracle_max")])
    head = ["density", "Seer gate, 400 steps", "Seer gate, 2400 steps", SELECTOR_LABELS["meanpool"],
            "streaming (sink + recent)", "oracle top-k of the true max-pooled map"]
    return ("Sink block and the block before the diagonal kept for every selection (`--keep-sink --keep-local 1`; "
            f"PPL (achieved density); dense {_ppl(rows['400']['dense'])}; {', '.join(paths.values())}):\n\n"
            + _table(head, body))


def quality_rerun_h200(root) -> str:
    """The 400-step sink + local run repeated on the H200 with the code after the layer-tier
    refactor (issue 12), setting by setting against the H100 run of the code before it."""
    paths = {"before": "results/quality/h100_sink_local_400steps.json",
             "after": "results/quality/h200_sink_local_400steps.json"}
    envs = {k: load_envelope(root, p) for k, p in paths.items()}
    after = _by_setting(envs["after"]["rows"])
    body = []
    for r in envs["before"]["rows"]:
        a = after.get(r["setting"])
        if a is None:  # a baseline calibrated to a gate density that moved in the third decimal
            a = next((x for x in envs["after"]["rows"] if x["selector"] == r["selector"] and x["method"] == r["method"]
                      and x["param"] == r["param"]), None)
        if a is None:
            continue
        label = r["setting"] if "@" not in r["setting"] else f"{r['selector']}:{r['method']}={r['param']:.4g}"
        body.append([label, f"{r['ppl']:.3f} ({r['density']:.3f})",
                     f"{a['ppl']:.3f} ({a['density']:.3f})", f"{100 * (a['ppl'] / r['ppl'] - 1):+.1f}%"])
    prov = envs["after"]["provenance"]
    head = ["setting", f"before ({envs['before']['provenance']['gpu']}, {paths['before']})",
            f"after ({prov['gpu']}, commit {_commit(prov)}, {paths['after']})", "change"]
    return ("`quality_run --keep-sink --keep-local 1 --steps 400 --thresholds 1e-2 2e-2 4e-2 --nz-ratios 0.1 0.2 "
            "--phases distill ppl`, PPL (achieved density):\n\n" + _table(head, body))


def _passkey_label(name):
    spec = name.split("_dense_last_rows_")[0]
    if spec.startswith("seer_threshold_"):
        spec = "gate:threshold=" + spec[len("seer_threshold_"):]
    s = Setting.parse(spec)
    return f"{SELECTOR_LABELS[s.selector]}, {s.method} {s.param:g}"


def passkey_h100(root) -> str:
    path = "results/quality/h100_sink_local_passkey.json"
    env = load_envelope(root, path)
    runs = env["passkey"]
    dense = runs["dense"]
    lengths = list(dense["per_length"])
    longest = lengths[-1]
    body = [["dense", "1", "1", f"{dense['accuracy']:.3f}", "", "", ""]]
    for name, run in runs.items():
        if name == "dense":
            continue
        v = run["vs_dense"]
        body.append([_passkey_label(name), f"{run['density']:.3f}", f"{run['density_per_length'][longest]:.3f}",
                     f"{run['accuracy']:.3f}", v["lost"], v["gained"], f"{v['p_value']:.2g}"])
    n = sum(c["n"] for c in dense["cells"])
    cfg = env["config"]
    depths = len({c["depth"] for c in dense["cells"]})
    caption = (f"Passkey retrieval, {n} prompts ({' / '.join(_tokens(int(x)) for x in lengths)} tokens × {depths} "
               f"depths × {cfg['passkey_samples']} prompts), greedy; last {cfg['passkey_dense_last_rows'][0]} block "
               f"rows dense, sink + local block kept; each run paired prompt by prompt with dense (lost, gained, exact "
               f"two-sided sign test p) ({path}):")
    return caption + "\n\n" + _table(["selection", "density", f"density at {_tokens(int(longest))}", "accuracy",
                                      "lost", "gained", "p"], body)


# ----------------------------------------------------------------------------- fine-tuning, decode

def finetune_h200(root) -> str:
    """The YaRN fine-tuning experiment (eval/finetune_run.py): every row with PPL per source,
    step time and peak memory, then the issue's targets and the paired passkey."""
    return _finetune_rows(root, "results/finetune/h200.json")


def finetune_compile_h200(root) -> str:
    """Rows (a) and (c) at 0.1 trained with ``compile_pointwise`` (each decoder layer two graphs,
    commit 66d893f), their passkey, and the timing phase of the same commit."""
    path = "results/finetune/h200_compile.json"
    env = load_envelope(root, path)
    rows = format_timing(env["timing"], env["config"]["seq_len"]).split("\n\nbusiest kernels")[0]
    return _finetune_rows(root, path) + "\n\nThe timing phase at the same commit: " + rows[0].lower() + rows[1:]


def _finetune_rows(root, path) -> str:
    env = load_envelope(root, path)
    prov, cfg = env["provenance"], env["config"]
    sources = sorted({s for r in env["rows"] for s in r.get("per_source", {})})
    body = []
    for r in env["rows"]:
        body.append([r["setting"], sig3(r["density"]) if r.get("density") is not None else "1",
                     f"{r['ppl']:.2f}"] + [f"{r['per_source'][s]:.2f}" if s in r.get("per_source", {}) else ""
                                           for s in sources]
                    + [f"{r['s_per_step']:.3f}" if r.get("s_per_step") else "", sig3(r.get("peak_gib"))
                       if r.get("peak_gib") else ""])
    done = [k for k, v in env.get("phases_done", {}).items() if v]
    left = [k for k, v in env.get("phases_done", {}).items() if not v]
    caption = (f"SmolLM2-135M, YaRN factor {cfg['yarn_factor']:g} ({_tokens(cfg['seq_len'])} tokens), "
               f"{cfg['steps']} steps per training row"
               + (", `compile_pointwise`" if cfg.get("compile_pointwise") else "") + f", {prov['gpu']}, commit {_commit(prov)} ({path}; phases run: "
               f"{', '.join(done)}" + (f"; not run: {', '.join(left)}" if left else "") + "). PPL on "
               f"{_tokens(cfg['seq_len'])}-token source-joined windows of eval.jsonl (up to "
               f"{cfg['windows_per_source']} per source); s/step of training ((b): of distillation), peak GiB:")
    table = _table(["row", "density", "PPL all"] + sources + ["s/step", "peak GiB"], body)
    targets = "\n".join(f"- {t['target']}: " + ("not measured in this run" if t["value"] is None else
                                                 f"{'met' if t['ok'] else 'MISSED'} ("
                                                 + (f"{t['value']:.3g}" if isinstance(t["value"], float)
                                                    else str(t["value"])) + ")")
                         for t in env.get("targets", []))
    out = caption + "\n\n" + table + "\n\nTargets (issue 13):\n\n" + targets
    pk = env.get("passkey") or {}
    if pk:
        parts = [f"{name}: {res['accuracy']:.2f}" for name, res in pk.items() if isinstance(res, dict)
                 and "accuracy" in res]
        pairs = [f"{res['other']} vs {res['reference']}: lost {res['lost']}, gained {res['gained']} of {res['n']} "
                 f"(sign test p = {res['p_value']:.3g})" for res in pk.values() if isinstance(res, dict) and "lost" in res]
        out += (f"\n\nPasskey at {', '.join(_tokens(t) for t in cfg['passkey_lengths'])} (5 depths x "
                f"{cfg['passkey_samples']} prompts each), accuracy: {'; '.join(parts)}"
                + (f"; paired: {'; '.join(pairs)}." if pairs else "."))
    return out


def decode_h200(root) -> str:
    """The sparse decode benchmark (eval/bench_decode.py): kernel rows and time per output token."""
    path = "results/decode/h200.json"
    env = load_envelope(root, path)
    prov, cfg = env["provenance"], env["config"]
    shape = (env.get("resolved") or {}).get("shape") or cfg["shape"]  # older envelopes kept it in the config
    caption = (f"{prov['gpu']}, commit {_commit(prov)} ({path}); one decode step, {shape['dtype']}, {shape['HQ']} "
               f"query / {shape['H']} KV heads, d={shape['D']}, median ms; ours reads {cfg['share']:g} of the "
               f"KV blocks (the decode gate's top-k plus the sink and current block):")
    ms = "{:.3f}".format
    body = [[r["B"], _tokens(r["S"]), ms(r["sdpa_flash"]), ms(r["sdpa_cudnn"]), ms(r["ours_all"]),
             ms(r["ours_sparse"]), f"{r['speedup_vs_flash']:.2f}x", ms(r["gate_select_step"]),
             f"{100 * r['gate_share_of_sparse_step']:.0f}%"] for r in env["rows"]]
    head = ["B", "cache", "SDPA flash", "SDPA cuDNN", "ours, every block", "ours, sparse", "flash / ours sparse",
            "gate + selection", "gate share of the sparse step"]
    if all("graph_layer" in r for r in env["rows"]):  # measured since commit bdd4fe6
        head += ["one sparse layer, eager", "the same, CUDA graph"]
        body = [b + [ms(r["eager_layer"]), ms(r["graph_layer"])] for b, r in zip(body, env["rows"])]
    if all(isinstance(r.get("ours_sparse_graph"), float) and isinstance(r.get("graph_layer"), float)
           for r in env["rows"]):  # the kernel alone replayed, and the gate's share of the replayed layer
        head += ["ours, sparse, CUDA graph", "gate share of the layer, CUDA graph"]
        body = [b + [ms(r["ours_sparse_graph"]), f"{100 * (1 - r['ours_sparse_graph'] / r['graph_layer']):.0f}%"]
                for b, r in zip(body, env["rows"])]
    table = _table(head, body)
    e2e_head = ["B", "cache", "dense s/token", "sparse s/token", "speed-up"]
    e2e_body = [[r["B"], _tokens(r["T"]), f"{r['dense_s_per_token']:.4f}", f"{r['sparse_s_per_token']:.4f}",
                 f"{r['speedup']:.2f}x"] for r in env["e2e"]]
    graphed = [("graph_dense_s_per_token", "graph_sparse_s_per_token", "graph_speedup", "CUDA graph"),
               ("graph_fused_dense_s_per_token", "graph_fused_sparse_s_per_token", "graph_fused_speedup",
                "CUDA graph, layers fused")]
    for dense, sparse, speedup, name in graphed:  # seer_generate's graph mode (since commit 7867506)
        if all(isinstance(r.get(sparse), float) for r in env["e2e"]):
            e2e_head += [f"{name}: dense s/token", "sparse s/token", "speed-up"]
            e2e_body = [b + [f"{r[dense]:.4f}", f"{r[sparse]:.4f}", f"{r[speedup]:.2f}x"]
                        for b, r in zip(e2e_body, env["e2e"])]
    return (caption + "\n\n" + table + f"\n\nTime per output token, {cfg['layers']}-layer 8B-shaped model, random "
            "weights, pre-filled cache (eager: dense is SDPA flash over a DynamicCache; CUDA graph: the whole "
            "step replayed over a static cache, dense through our kernel with every block selected; layers "
            "fused: `seer_compile_pointwise`):\n\n" + _table(e2e_head, e2e_body))


def _decode_quality(*runs):
    """Decode-quality runs (eval/decode_quality.py), each ``(path, gates label)``: decode
    perplexity by setting against the same run's dense decode, passkey paired with dense."""
    def render(root) -> str:
        envs = [(load_envelope(root, path), path, label) for path, label in runs]
        first, cfg = envs[0][0], envs[0][0]["config"]
        commits = sorted({_commit(e["provenance"]) for e, _, _ in envs})
        caption = (f"SmolLM2-135M, {first['provenance']['gpu']}, commit {', '.join(commits)} "
                   f"({', '.join(p for _, p, _ in envs)}); gates distilled in each run at "
                   f"{_tokens(first['cost']['seq_len'])}; {first['rows'][0]['windows']} windows of "
                   f"{_tokens(cfg['length'])}, the first half a dense prefill, the second half scored as decode "
                   "steps; `oracle`: the step's true attention mass per block, `streaming`: the latest blocks, "
                   "`local=N`: N blocks before the current one always read:")
        body, lines = [], []
        for env, _, label in envs:
            dense = next(r["ppl"] for r in env["rows"] if r["setting"] == "dense")
            gates = f"{label}, {env['cost']['steps']} steps ({env['cost']['train_seconds']:.0f} s)"
            body += [[gates, r["setting"], f"{r['ppl']:.3f}", f"{r['ppl'] / dense:.3f}x",
                      "1" if r["decode_density"] is None else f"{r['decode_density']:.3f}"] for r in env["rows"]]
            parts = _passkey_parts(env.get("passkey", {}))
            if parts:
                c = env["config"]
                lines.append(f"Passkey, {label} gates ({', '.join(_tokens(t) for t in c['passkey_lengths'])} x 5 "
                             f"depths x {c['passkey_samples']}, needle in the prompt, paired with dense): "
                             + "; ".join(parts) + ".")
        out = caption + "\n\n" + _table(["gates", "decode", "PPL", "vs dense", "kept share of KV blocks"], body)
        return out + "".join("\n\n" + line for line in lines)
    return render


def _passkey_parts(passkey) -> list:
    """``name accuracy (lost L, gained G of N, sign test p = P)`` of each entry of a decode run's passkey."""
    parts = []
    for name, res in passkey.items():
        v = res.get("vs_dense")
        parts.append(f"{name} {res['accuracy']:.3f}" + (
            f" (lost {v['lost']}, gained {v['gained']} of {v['n']}, sign test p = {v['p_value']:.3g})" if v else ""))
    return parts


def decode_prior_h100(root) -> str:
    """Issue 15's decode gate beside the mean-pooled prior (``seer_decode_meanpool_prior``) with
    carried 800-step decode gates: decode perplexity by setting, the passkey pairing (rebuilt from
    its run's log) and the prior's cost per output token (two 16-layer bench_decode runs)."""
    ppl_path = "results/decode/h100_quality_prior.json"
    pk_path = "results/decode/h100_quality_prior_passkey.json"
    bench = [("results/decode/h100_bench_16layers_prior0.json", "gate alone"),
             ("results/decode/h100_bench_16layers_prior07.json", "prior 0.7")]
    env = load_envelope(root, ppl_path)
    cfg = env["config"]
    dense = next(r["ppl"] for r in env["rows"] if r["setting"] == "dense")
    caption = (f"SmolLM2-135M, {env['provenance']['gpu']}, commit {_commit(env['provenance'])} ({ppl_path}); "
               f"session 36's 800-step decode gates carried in; {env['rows'][0]['windows']} windows of "
               f"{_tokens(cfg['length'])}, the first half a dense prefill, the second half scored as decode steps; "
               "`prior=A`: the mixture (1 - A) log p_gate + A log p_meanpool over the full blocks; `oracle`: the "
               "step's true attention mass per block:")
    body = [[r["setting"], f"{r['ppl']:.3f}", f"{r['ppl'] / dense:.4f}x",
             "1" if r["decode_density"] is None else f"{r['decode_density']:.3f}"] for r in env["rows"]]
    out = caption + "\n\n" + _table(["decode", "PPL", "vs dense", "kept share of KV blocks"], body)
    pk = load_envelope(root, pk_path)
    parts = _passkey_parts(pk["passkey"])
    out += f"\n\nPasskey, the same gates ({pk_path}, 75 prompts paired with dense): " + "; ".join(parts) + "."
    cells = []
    for path, label in bench:
        e = load_envelope(root, path)["e2e"][0]
        cells.append(f"{label} {e['graph_sparse_s_per_token'] * 1e3:.2f} ms against dense "
                     f"{e['graph_dense_s_per_token'] * 1e3:.2f} ms ({e['graph_speedup']:.2f}x; layers fused "
                     f"{e['graph_fused_sparse_s_per_token'] * 1e3:.2f} / {e['graph_fused_dense_s_per_token'] * 1e3:.2f} "
                     f"ms, {e['graph_fused_dense_s_per_token'] / e['graph_fused_sparse_s_per_token']:.2f}x)")
    e0 = load_envelope(root, bench[0][0])
    out += (f"\n\nThe prior's cost, {e0['provenance']['gpu']}, CUDA graph, time per output token of a "
            f"{e0['config']['layers']}-layer 8B-shaped model at {e0['e2e'][0]['B']} x {_tokens(e0['e2e'][0]['T'])} "
            f"(32 layers do not fit 80 GB), share 0.1 ({', '.join(p for p, _ in bench)}): " + "; ".join(cells) + ".")
    return out


def decode_free_h100(root) -> str:
    """Issue 15, session 38: decode gates distilled without the sink in their loss (the default since)
    beside session 37's gates with it, setting by setting at the same protocol, the passkey pairing,
    and the prior's cost per output token with ``prior_mix``'s two versions (bench_decode runs and the
    kernel's launch sweep)."""
    free_path, forced_path = "results/decode/h100_quality_free_loss.json", "results/decode/h100_quality_prior.json"
    pk_path = "results/decode/h100_quality_free_loss_passkey.json"
    free, forced = load_envelope(root, free_path), load_envelope(root, forced_path)
    before = {r["setting"]: r["ppl"] for r in forced["rows"]}
    dense_forced, dense_free = before["dense"], next(r["ppl"] for r in free["rows"] if r["setting"] == "dense")
    caption = (f"SmolLM2-135M, {free['provenance']['gpu']}, commit {_commit(free['provenance'])} ({free_path}); "
               f"decode gates distilled {free['cost']['steps']} steps of {_tokens(free['cost']['seq_len'])} in the run "
               f"with the sink left out of the decode loss, beside session 37's gates of the same recipe with it "
               f"({forced_path}); {free['rows'][0]['windows']} windows of {_tokens(free['config']['length'])}, the "
               "second half scored as decode steps:")
    body = []
    for r in free["rows"]:
        if r["setting"] == "dense":
            continue
        old = before.get(r["setting"])
        body.append([r["setting"], f"{r['decode_density']:.3f}",
                     "-" if old is None else f"{old / dense_forced:.4f}x", f"{r['ppl'] / dense_free:.4f}x"])
    out = caption + "\n\n" + _table(["decode", "kept share of KV blocks", "sink in the loss (up to session 37)",
                                      "sink left out (default)"], body)
    pk = load_envelope(root, pk_path)
    parts = _passkey_parts(pk["passkey"])
    out += (f"\n\nPasskey, gates of the same recipe distilled again in the passkey run ({pk_path}, 75 prompts "
            "paired with dense): " + "; ".join(parts) + ".")
    bench = [("results/decode/h100_bench_16layers_prior0_b.json", "gate alone"),
             ("results/decode/h100_bench_16layers_prior07_mix.json", "prior 0.7, prior_mix's broadcast product"),
             ("results/decode/h100_bench_16layers_prior07_dot.json", "prior 0.7, prior_mix with tl.dot")]
    rows = []
    for path, label in bench:
        env = load_envelope(root, path)
        e, k = env["e2e"][0], {r["B"]: r for r in env["rows"]}
        rows.append([label, _commit(env["provenance"]), f"{k[1]['graph_layer'] * 1e3:.0f}",
                     f"{k[16]['graph_layer'] * 1e3:.0f}", f"{e['graph_sparse_s_per_token'] * 1e3:.2f}",
                     f"{e['graph_speedup']:.2f}x", f"{e['graph_fused_speedup']:.2f}x"])
    env = load_envelope(root, bench[0][0])
    out += (f"\n\nThe prior's cost, {env['provenance']['gpu']}, "
            "CUDA graph: one sparse layer's gate, selection and kernel at 128k (us, B = 1 and 16) and time per output "
            f"token of a {env['config']['layers']}-layer 8B-shaped model at {env['e2e'][0]['B']} x "
            f"{_tokens(env['e2e'][0]['T'])}, share 0.1, against dense ({', '.join(p for p, _ in bench)}):\n\n")
    out += _table(["decode scores", "commit", "layer B=1 (us)", "layer B=16 (us)", "sparse ms/token", "speed-up",
                   "layers fused"], rows)
    sweep_path = "results/decode/h100_prior_mix_sweep.json"
    sw = load_envelope(root, sweep_path)
    keys = [k for k in sw["rows"][0] if k in ("torch", "sum64", "dot64", "dot128", "dot256")]
    body = [[f"{r['B']} x {r['N']}", r["means_MB"]] + [r[k] for k in keys] for r in sw["rows"]]
    out += (f"\n\n`prior_mix` alone replayed from a CUDA graph, median us ({sweep_path}; `torch`: the reference; "
            "`sumN` / `dotN`: broadcast product or tl.dot, N blocks per program):\n\n")
    return out + _table(["B x blocks", "means MB"] + keys, body)


def decode_gate_select_h100(root) -> str:
    """Session 39: the decode gate's scoring and selection in one launch against two, and the gate's
    share of a graph-mode sparse layer as the graph step runs it."""
    sweep_path = "results/decode/h100_gate_select_sweep.json"
    sw = load_envelope(root, sweep_path)
    cols = [("two_b1", "two launches, bisection"), ("two_b2", "two, 2 bits a pass"), ("two_b4", "two, 4 bits a pass"),
            ("fused_c64_w4_b1_s1", "one launch"), ("fused_c64_w4_b2_s16", "one launch, 16 programs a row")]
    body = [[f"{r['B']} x {_tokens(r['S'])}", r["query"], r["kernel"]] + [r[k] for k, _ in cols] for r in sw["rows"]]
    out = (f"{sw['provenance']['gpu']}, commit {_commit(sw['provenance'])} ({sweep_path}); one sparse layer's gate and "
           "selection replayed from a CUDA graph, median us, 8B attention shape, share 0.1 (`query`: the query's "
           "projection, in every variant; `kernel`: the decode kernel alone); "
           + ("every variant kept the same blocks as the first"
              if all(r[k + "_same"] == 1.0 for r in sw["rows"] for k, _ in cols) else "the kept blocks differed between variants in some rows (`*_same` in the file)") + ":\n\n")
    out += _table(["B x cache", "query", "kernel"] + [label for _, label in cols], body)
    bench = [("results/decode/h100_bench_16layers_two_launch_gate.json", "two launches (default)"),
             ("results/decode/h100_bench_16layers_one_launch_gate.json", "one launch")]
    rows = []
    for path, label in bench:
        env = load_envelope(root, path)
        e, k = env["e2e"][0], {r["B"]: r for r in env["rows"]}
        share = [1 - k[b]["ours_sparse_graph"] / k[b]["graph_layer"] for b in (1, 16)]
        rows.append([label, f"{k[1]['graph_layer'] * 1e3:.0f}", f"{100 * share[0]:.0f}%",
                     f"{k[16]['graph_layer'] * 1e3:.0f}", f"{100 * share[1]:.0f}%",
                     f"{e['graph_sparse_s_per_token'] * 1e3:.2f}", f"{e['graph_speedup']:.2f}x",
                     f"{e['graph_fused_speedup']:.2f}x"])
    env = load_envelope(root, bench[0][0])
    out += (f"\n\nThe same in bench-decode (one run each, {', '.join(p for p, _ in bench)}): a sparse layer replayed "
            "from a CUDA graph as the graph step runs it at 128k (us) and the gate's share of it (1 - kernel alone / "
            f"layer), and time per output token of a {env['config']['layers']}-layer 8B-shaped model at "
            f"{env['e2e'][0]['B']} x {_tokens(env['e2e'][0]['T'])} against dense:\n\n")
    return out + _table(["gate + selection", "layer B=1", "gate share B=1", "layer B=16", "gate share B=16",
                         "sparse ms/token", "speed-up", "layers fused"], rows)


def decode_gate_rot_h100(root) -> str:
    """Session 44: the query's matmul making G columns (gate_scores makes the RoPE partners), top_blocks'
    warps and gate_scores' keys per program, each in one graph-replayed sparse layer."""
    path = "results/decode/h100_gate_rot_sweep.json"
    sw = load_envelope(root, path)
    cols = [("two_b1", "2G query (up to session 44)"), ("two_b1_rot", "G query"), ("two_b1_rot_w1", "G, 1 warp"),
            ("two_b1_rot_w2", "G, 2 warps"), ("two_b1_rot_w4", "G, 4 warps"), ("two_b1_rot_c32", "G, 32 keys"),
            ("two_b1_rot_c128", "G, 128 keys")]
    body = [[f"{r['B']} x {_tokens(r['S'])}", f"{r['query']} / {r['query_rot']}", r["kernel"]]
            + [f"{r['layer_' + k]:.1f} ({100 * r['share_' + k]:.1f}%)" for k, _ in cols] for r in sw["rows"]]
    same = all(r[k + "_same"] == 1.0 for r in sw["rows"] for k, _ in cols)
    out = (f"{sw['provenance']['gpu']}, commit {_commit(sw['provenance'])} ({path}); one sparse layer (query "
           "projection, `gate_scores`, `top_blocks`, the decode kernel) replayed from a CUDA graph, median us, and the "
           "gate's share of it (1 - kernel / layer), 8B attention shape, share 0.1; `query`: the projection alone, "
           "2G / G columns; `kernel`: the decode kernel alone; warps: `top_blocks` at that many whatever the row's "
           "length (else 4 up to 2048 blocks); keys: per `gate_scores` program (else 64); "
           + ("every variant kept the same blocks" if same else "the kept blocks differed in some rows") + ":\n\n")
    return out + _table(["B x cache", "query", "kernel"] + [label for _, label in cols], body)


def _gate_layer_sweep(path, cols, kernel_head, kernel_cell, note):
    """A gate_select_sweep envelope (session 45 on) as a table: per setting the decode kernel
    (``kernel_cell`` of the row) and each variant's gate / layer us and the gate's share."""
    def table(root) -> str:
        sw = load_envelope(root, path)
        body = [[f"{r['B']} x {_tokens(r['S'])}", kernel_cell(r)]
                + [f"{r[k]} / {r['layer_' + k]:.1f} ({100 * r['share_' + k]:.1f}%)" for k, _ in cols]
                for r in sw["rows"]]
        out = (f"{sw['provenance']['gpu']}, commit {_commit(sw['provenance'])} ({path}); one sparse layer replayed "
               "from a CUDA graph, median us, 8B attention shape, share 0.1: the gate (query projection, "
               "`gate_scores`, `top_blocks`) / the layer (and the decode kernel) and the gate's share of it (1 - "
               f"kernel / layer); `kernel`: the decode kernel alone{note}:\n\n")
        return out + _table(["B x cache", kernel_head] + [label for _, label in cols], body)
    return table


# session 45: two options tried and removed (the value bisection in top_blocks, the decode kernel's in-kernel
# merge) and float8 keys at one scale (timing only); then 8-bit keys with one scale per key row
decode_gate_s45_h100 = _gate_layer_sweep(
    "results/decode/h100_gate_s45_sweep.json",
    [("two_b1_rot", "default"), ("two_b1_rot_v", "value bisection"), ("two_b1_rot_f8", "float8 keys")],
    "kernel / merged", lambda r: f"{r['kernel']} / {r['kernel_merge']}",
    ", with its combine launch / with the last part of each pair merging instead; value bisection: `top_blocks` "
    "first bisecting the row's finite values (the same blocks); float8 keys: `gate_scores` on e4m3 block keys at "
    "one scale (timing only, random keys)")
decode_gate_keys8_h100 = _gate_layer_sweep(
    "results/decode/h100_gate_keys8_sweep.json",
    [("two_b1_rot", "16-bit keys"), ("two_b1_rot_f8", "float8 keys"), ("two_b1_rot_i8", "int8 keys")],
    "kernel", lambda r: r["kernel"],
    "; 8-bit keys: `gate_scores` on float8 e4m3 / int8 keys, one float32 scale per key row multiplying its logit "
    "(`eight_bit_keys`; random keys, so the kept sets are not a quality measure)")


def decode_keys_h100(root) -> str:
    """Session 46: the pooled-K cache storing the gate's block keys in 8 bits (``seer_decode_key_format``),
    bench-decode on one machine: one graph-replayed sparse layer and the 32-layer end to end, keys in the
    model's dtype against float8 (and int8's kernel rows)."""
    runs = [("results/decode/h100_decode32_keys_model.json", "16-bit keys"),
            ("results/decode/h100_decode32_keys_f8.json", "float8 keys"),
            ("results/decode/h100_decode_keys_i8.json", "int8 keys")]
    envs = [load_envelope(root, path) for path, _ in runs]
    body = []
    for i, r0 in enumerate(envs[0]["rows"]):
        cells = [f"{r0['B']} x {_tokens(r0['S'])}", f"{r0['ours_sparse_graph'] * 1e3:.1f}"]
        for env in envs:
            r = env["rows"][i]
            assert (r["B"], r["S"]) == (r0["B"], r0["S"]), "the runs' kernel rows differ in shape"
            cells.append(f"{r['graph_layer'] * 1e3:.1f} ({100 * (1 - r['ours_sparse_graph'] / r['graph_layer']):.1f}%)")
        body.append(cells)
    prov = envs[0]["provenance"]
    out = (f"{prov['gpu']}, commits {', '.join(sorted({_commit(e['provenance']) for e in envs}))} "
           f"({', '.join(path for path, _ in runs)}; one machine); share 0.1, 8B attention shape; one sparse layer "
           "replayed from a CUDA graph as the graph step runs it (us) and the gate's share of it (1 - kernel alone / "
           "layer), with the gate's block keys as the pooled-K cache stores them (`seer_decode_key_format`; random "
           "keys):\n\n")
    out += _table(["B x cache", "kernel alone"] + [label for _, label in runs], body)
    i8_path = "results/decode/h100_decode32_keys_i8_e2e.json"  # session 47, the same machine kind
    i8 = load_envelope(root, i8_path)
    e2e = []
    for e16, e8, ei in zip(envs[0]["e2e"], envs[1]["e2e"], i8["e2e"]):
        assert (e16["B"], e16["T"]) == (ei["B"], ei["T"]), "the end-to-end runs differ in shape"
        trio = (e16, e8, ei)
        e2e.append([f"{e16['B']} x {_tokens(e16['T'])}", e16["layers"],
                    " / ".join(f"{e['graph_fused_dense_s_per_token'] * 1e3:.2f}" for e in (e16, ei)),
                    " / ".join(f"{e['graph_fused_sparse_s_per_token'] * 1e3:.2f}" for e in trio),
                    " / ".join(f"{e['graph_speedup']:.2f}x" for e in trio),
                    " / ".join(f"{e['graph_fused_speedup']:.2f}x" for e in trio)])
    return out + ("\n\nTime per output token, 8B-shaped model, 32 layers with `--shared-kv`, CUDA graph (ms; dense: "
                  "our kernel over every block), 16-bit / float8 / int8 gate keys (int8: another H100 machine, "
                  f"commit {_commit(i8['provenance'])}, {i8_path}, its own dense run second in the dense column); "
                  "layers fused: `seer_compile_pointwise` and `seer_merge_projections`:\n\n"
                  + _table(["B x cache", "layers", "dense, fused", "sparse, fused", "speed-up", "speed-up, fused"],
                           e2e))


def _decode_keys_quality(path, gates):
    """Session 46: decode perplexity with the gate's block keys stored in 8 bits by the pooled-K cache
    (``,keys=f8`` / ``,keys=i8`` settings of eval/decode_quality.py) against the same setting with
    16-bit keys and dense decode, one run."""
    def table(root) -> str:
        env = load_envelope(root, path)
        rows = env["rows"]
        ppl = {r["setting"]: r["ppl"] for r in rows}
        dense = ppl["dense"]
        body = []
        for r in rows:
            base = r["setting"].split(",keys=")[0]
            vs16 = f"{100 * (r['ppl'] / ppl[base] - 1):+.2f}%" if ",keys=" in r["setting"] and base in ppl else ""
            body.append([r["setting"], f"{r['ppl']:.3f}", f"{r['ppl'] / dense:.4f}x", vs16,
                         "1" if r["decode_density"] is None else f"{r['decode_density']:.3f}"])
        prov, cfg = env["provenance"], env["config"]
        out = (f"SmolLM2-135M, {prov['gpu']}, commit {_commit(prov)} ({path}); {gates}; {rows[0]['windows']} "
               f"windows of {_tokens(cfg['length'])}, the first half a dense prefill, the second half scored as "
               "decode steps through the model's pooled-K cache; `keys=f8` / `keys=i8`: the gate's block keys "
               "stored as float8 e4m3 / int8 with a float32 scale per block (`seer_decode_key_format`):\n\n")
        return out + _table(["decode", "PPL", "vs dense", "vs 16-bit keys", "kept share of KV blocks"], body)
    return table


def decode_keys_protocol_h100(root) -> str:
    """Session 47: 8-bit gate keys at issue 15's decode-quality protocol (eval/decode_quality.py, 16 windows of
    8k, gates distilled in the run): decode perplexity by key format, then a second run's paired passkey."""
    ppl = _decode_keys_quality("results/decode/h100_quality_keys8.json",
                               "decode gates distilled in the run (300 steps of 8192 tokens, bf16)")(root)
    pk_path = "results/decode/h100_quality_keys8_passkey.json"
    env = load_envelope(root, pk_path)
    c = env["config"]
    return ppl + (f"\n\nPasskey ({pk_path}, commit {_commit(env['provenance'])}: its own 300-step gates; "
                  f"{', '.join(_tokens(t) for t in c['passkey_lengths'])} x 5 depths x {c['passkey_samples']}, "
                  "needle in the prompt, each paired with dense; `prefill_threshold_T+`: sparse prefill too): "
                  + "; ".join(_passkey_parts(env["passkey"])) + ".")


def _decode_graph_gate(row_paths, e2e_paths, note=""):
    """bench-decode with the graph row as the graph step runs it (the gate's share of a sparse layer
    against issue 15's anchors) and time per output token (session 39 on)."""
    def table(root) -> str:
        rows, e2e = [], []
        for path in row_paths:
            for r in load_envelope(root, path)["rows"]:
                rows.append([r["B"], _tokens(r["S"]), f"{r['ours_sparse_graph'] * 1e3:.0f}",
                             f"{r['graph_layer'] * 1e3:.0f}",
                             f"{100 * (1 - r['ours_sparse_graph'] / r['graph_layer']):.0f}%",
                             f"{r['sdpa_flash'] / r['ours_sparse']:.2f}x"])
        for path in e2e_paths:
            for e in load_envelope(root, path)["e2e"]:
                e2e.append([e["B"], _tokens(e["T"]), e["layers"], f"{e['graph_dense_s_per_token'] * 1e3:.1f}",
                            f"{e['graph_sparse_s_per_token'] * 1e3:.1f}", f"{e['graph_speedup']:.2f}x",
                            f"{e['graph_fused_speedup']:.2f}x"])
        paths = list(dict.fromkeys(row_paths + e2e_paths))
        prov = load_envelope(root, paths[0])["provenance"]
        out = (f"{prov['gpu']}, commit {_commit(prov)} ({', '.join(paths)}); share 0.1{note}; one sparse layer "
               "replayed from a CUDA graph as the graph step runs it (us) and the gate's share of it (1 - kernel alone "
               "/ layer); SDPA flash over ours, eager kernel:\n\n")
        out += _table(["B", "cache", "kernel alone", "layer", "gate share", "flash / ours (eager)"], rows)
        return out + ("\n\nTime per output token, 8B-shaped model, CUDA graph (ms; dense: our kernel with every "
                      "block), layers fused: `seer_compile_pointwise`:\n\n"
                      + _table(["B", "cache", "layers", "dense", "sparse", "speed-up", "layers fused"], e2e))
    return table


def _decode_dense_graph(path):
    """Session 44: dense decode replayed from a CUDA graph, our kernel over every block (the end-to-end rows'
    dense side) against SDPA's flash and cuDNN kernels, none paying the launch's host time."""
    def table(root) -> str:
        env = load_envelope(root, path)
        body = [[r["B"], _tokens(r["S"]), f"{r['ours_all_graph'] * 1e3:.1f}", f"{r['sdpa_flash_graph'] * 1e3:.1f}",
                 f"{r['sdpa_cudnn_graph'] * 1e3:.1f}", f"{r['ours_all_graph'] / r['sdpa_flash_graph']:.3f}x",
                 f"{r['ours_all_graph'] / r['sdpa_cudnn_graph']:.3f}x"] for r in env["rows"]]
        out = (f"{env['provenance']['gpu']}, commit {_commit(env['provenance'])} ({path}); dense decode of one "
               "layer, 32 query / 8 KV heads, d128, bf16, each kernel replayed from a CUDA graph (us):\n\n")
        return out + _table(["B", "cache", "ours, every block", "SDPA flash", "SDPA cuDNN", "ours / flash",
                             "ours / cuDNN"], body)
    return table


def decode_shared_kv_check_h100(root) -> str:
    """Session 43: the end-to-end profile at 16 layers with every layer's KV cache its own and with
    one buffer for all (bench-decode's ``--shared-kv``): the same time per token is what lets the
    32-layer shape run on an 80 GB GPU."""
    paths = [("results/decode/h100_e2e_profile16_unshared.json", "own KV cache per layer"),
             ("results/decode/h100_e2e_profile16_shared_kv.json", "one KV buffer (`--shared-kv`)")]
    body = []
    for path, label in paths:
        env = load_envelope(root, path)
        rows = {r["mode"]: r for r in env["rows"]}
        d, sp = rows["dense"], rows["sparse"]
        body.append([label, f"{d['wall_ms']:.3f}", f"{sp['wall_ms']:.3f}", f"{d['wall_ms'] / sp['wall_ms']:.3f}x",
                     f"{d['groups_ms']['decode kernel']:.3f}", f"{sp['groups_ms']['decode kernel']:.3f}",
                     f"{sp['groups_ms']['gemm']:.3f}"])
    env = load_envelope(root, paths[0][0])
    cfg = env["config"]
    out = (f"{env['provenance']['gpu']}, commit {_commit(env['provenance'])} ({', '.join(p for p, _ in paths)}); "
           f"{cfg['layers']} layers of the 8B shape, {cfg['batch']} x {_tokens(cfg['tokens'])}, merged_early (the "
           "defaults), one token replayed from the graph-mode step (ms; dense: every block through our kernel):\n\n")
    return out + _table(["KV cache", "dense wall", "sparse wall", "dense / sparse", "decode kernel, dense",
                         "decode kernel, sparse", "GEMMs, sparse"], body)


def decode_kernel_tma_h100(root) -> str:
    """Session 43: the decode kernel's K/V blocks through tensor descriptors against pointer loads
    (docs/experiments/decode_kernel_tma.py), best launch of each per setting."""
    path = "results/decode/h100_decode_kernel_tma.json"
    env = load_envelope(root, path)
    body = []
    for r in env["rows"]:
        pb, tb = r["ptr_best"], r["tma_best"]
        body.append([r["B"], _tokens(r["S"]), f"{r['ptr_default_us']:.1f}",
                     f"{r['ptr_best_us']:.1f} ({pb['per_sm']}/SM)", f"{r['ptr_best_gb_per_s'] / 1e3:.2f}",
                     f"{r['tma_best_us']:.1f} ({tb['config'][1]} warps, {tb['config'][2]} stages, {tb['per_sm']}/SM)",
                     f"{r['tma_best_gb_per_s'] / 1e3:.2f}", f"{r['tma_best_us'] / r['ptr_default_us']:.3f}x"])
    cfg = env["config"]
    out = (f"{env['provenance']['gpu']}, commit {_commit(env['provenance'])} ({path}); 32 query / 8 KV heads, d128, "
           f"bf16, share {cfg['share']:g} of the blocks (random, per KV head), each launch replayed from its own CUDA "
           f"graph (us, split kernel and merge); pointer loads at 4 warps, 2 stages and "
           f"{', '.join(map(str, cfg['per_sm']))} programs per SM, TMA at {' / '.join(map(str, cfg['warps']))} warps, "
           f"{min(cfg['stages'])}-{max(cfg['stages'])} stages and the same targets; TB/s of the K/V bytes read:\n\n")
    return out + _table(["B", "cache", "pointers (default)", "best pointers", "TB/s", "best TMA", "TB/s",
                         "TMA / default"], body)


def decode_e2e_h100_s41(root) -> str:
    """Session 41: bench-decode's time per output token on the H100 after the one-launch cache
    writes, then with the merged projections in the fused rows."""
    bench = [("results/decode/h100_bench_16layers_append.json", "cache writes in one launch"),
             ("results/decode/h100_bench_16layers_merged.json", "+ merged projections (fused rows)")]
    rows = []
    for path, label in bench:
        env = load_envelope(root, path)
        for e in env["e2e"]:
            rows.append([label, e["B"], _tokens(e["T"]), e["layers"], f"{e['graph_dense_s_per_token'] * 1e3:.1f}",
                         f"{e['graph_sparse_s_per_token'] * 1e3:.1f}", f"{e['graph_speedup']:.2f}x",
                         f"{e['graph_fused_dense_s_per_token'] * 1e3:.2f}",
                         f"{e['graph_fused_sparse_s_per_token'] * 1e3:.2f}", f"{e['graph_fused_speedup']:.2f}x"])
    prov = load_envelope(root, bench[0][0])["provenance"]
    out = (f"{prov['gpu']}, one run each ({', '.join(p for p, _ in bench)}); time per output token of the 8B-shaped "
           "model, random weights, bf16, share 0.1, replayed from a CUDA graph (ms; dense: our kernel with every "
           "block, unscored); fused: `seer_compile_pointwise` (and in the second run `seer_merge_projections`):\n\n")
    return out + _table(["run", "B", "cache", "layers", "dense", "sparse", "speed-up", "fused dense", "fused sparse",
                         "fused speed-up"], rows)


def _e2e_profile(path, dense_note, fused_note):
    """Where an end-to-end graph decode token's GPU time goes, dense and sparse, by kernel group
    (docs/experiments/decode_e2e_profile.py; session 40 on)."""
    def table(root) -> str:
        env = load_envelope(root, path)
        groups = ["gemm", "decode kernel", "gate", "triton pointwise", "copy", "other"]
        body = []
        for r in env["rows"]:
            g = r["groups_ms"]
            label = r.get("variant") or ("fused" if r.get("fused") else "eager")
            body.append([label, r["mode"], f"{r['wall_ms']:.2f}", f"{r['kernel_ms']:.2f}",
                         f"{r['wall_ms'] - r['kernel_ms']:.2f}", f"{r['launches']:.0f}"]
                        + [f"{g.get(k, 0.0):.2f}" for k in groups])
        cfg = env["config"]
        out = (f"{env['provenance']['gpu']}, commit {_commit(env['provenance'])} ({path}); {cfg['layers']} layers of "
               f"the 8B shape, random weights, bf16, {cfg['batch']} x {_tokens(cfg['tokens'])}, one token replayed "
               f"from the graph-mode step, GPU kernels summed over {cfg['profile_steps']} profiled replays (ms per "
               f"token; `gaps`: replay wall time minus kernel time); dense: every block through our kernel "
               f"{dense_note}; {fused_note}:\n\n")
        return out + _table(["variant", "mode", "wall", "kernels", "gaps", "launches"] + groups, body)
    return table


def finetune_timing_h200(root) -> str:
    """The timing phase of the fine-tuning experiment: s/step, peak memory and GPU ms by kernel
    kind of each variant (the busiest kernels stay in the envelope)."""
    path = "results/finetune/h200_timing.json"
    env = load_envelope(root, path)
    prov, cfg = env["provenance"], env["config"]
    caption = (f"SmolLM2-135M, YaRN factor {cfg['yarn_factor']:g}, {prov['gpu']}, commit {_commit(prov)} ({path}); "
               "each variant a fresh model trained by the fine-tuning trainer with the recipe of the table above, ")
    table = caption + format_timing(env["timing"], cfg["seq_len"]).split("\n\nbusiest kernels")[0]
    later = "results/finetune/h200_timing_sdpa_route.json"  # density 1 through torch SDPA since fd0399f
    env2 = load_envelope(root, later)
    rows = format_timing(env2["timing"], env2["config"]["seq_len"]).split("\n\nbusiest kernels")[0]
    rows = rows[rows.index("| variant"):]
    return (table + f"\n\nThe first two rows again at commit {_commit(env2['provenance'])}, where the Seer layer "
            f"sends density-1 rows to torch SDPA ({later}):\n\n" + rows)


def finetune_timing_compile_h200(root) -> str:
    """The timing phase again with ``compile_pointwise`` and the split dK/dV lists (commit 8c84a20)."""
    path = "results/finetune/h200_timing_compile.json"
    env = load_envelope(root, path)
    rows = format_timing(env["timing"], env["config"]["seq_len"]).split("\n\nbusiest kernels")[0]
    return (f"{env['provenance']['gpu']}, commit {_commit(env['provenance'])} ({path}), the recipe above, "
            + rows[0].lower() + rows[1:])


def gate_calib_h200(root) -> str:
    """The calibrated density knob (gate_quality.py --calib-from train): per asked density, the
    threshold solved on held-out training windows, the density it keeps on the eval windows,
    and its PPL beside the per-sequence knob at the asked and at the achieved density."""
    path = "results/quality/h200_gate_calib.json"
    env = load_envelope(root, path)
    prov, cfg, rows = env["provenance"], env["config"], env["rows"]
    body = []
    for d in cfg["densities"]:
        of = [r for r in rows if r.get("knob_density") == d]
        thr = next(r for r in of if r["method"] == "threshold")
        knob = next(r for r in of if r["method"] == "density" and "matched_to" not in r)
        matched = next(r for r in of if "matched_to" in r)
        body.append([f"{d:g}", f"{thr['param']:.3g}", f"{thr['density']:.3f} ({100 * (thr['density'] / d - 1):+.1f}%)",
                     f"{thr['ppl']:.2f}", f"{knob['ppl']:.2f}", f"{matched['ppl']:.2f}",
                     f"{100 * (matched['ppl_ratio'] - 1):+.1f}%"])
    caption = (f"SmolLM2-135M, gates distilled {cfg['steps']} steps of {_tokens(cfg['seq_len'])} tokens, "
               f"{prov['gpu']}, commit {_commit(prov)} ({path}); thresholds solved on 4 windows of train.jsonl, "
               f"PPL on {_tokens(cfg['eval_length'])}-token windows of eval.jsonl (dense {_dense_ppl(rows):.2f}), "
               "sink, local block and diagonal kept:")
    return caption + "\n\n" + _table(["asked density", "calibrated threshold", "its density on eval",
                                        "its PPL", "per-sequence knob at the asked density",
                                        "knob at the achieved density", "knob / calibrated"], body)


def gate_quality_h200(root) -> str:
    """Issue 17's run (docs/experiments/gate_quality.py): the density knob against the threshold
    solved to the same density, per gate set, the training-free baselines, and passkey."""
    path = "results/quality/h200_gate_quality.json"
    env = load_envelope(root, path)
    prov, cfg, rows = env["provenance"], env["config"], env["rows"]
    dens = cfg["densities"]
    dense = _dense_ppl(rows)

    def cell(r):
        return f"{r['ppl']:.2f} ({r['density']:.3f})" if r else "—"

    def pick(label, d, kind):
        for r in rows:
            if r.get("label") == label and r.get("knob_density") == d:
                matched = "matched_to" in r
                if (kind == "knob" and r["method"] == "density" and not matched) or \
                        (kind == "threshold" and r["method"] == "threshold") or (kind == "matched" and matched):
                    return r
        return None
    body = []
    variants = [v for v in cfg["variants"] if any(r.get("label") == f"gate {v} (density)" for r in rows)]
    for v in variants:
        for kind, what in (("knob", "density knob"), ("threshold", "threshold solved to that density"),
                           ("matched", "knob at the threshold's density")):
            label = f"gate {v} (threshold)" if kind == "threshold" else f"gate {v} (density)"
            body.append([f"gate, {v} data: {what}"] + [cell(pick(label, d, kind)) for d in dens])
        ratios = [pick(f"gate {v} (density)", d, "matched") for d in dens]
        body.append([f"gate, {v} data: knob / threshold, same density"]
                    + [f"{100 * (r['ppl_ratio'] - 1):+.1f}%" if r else "—" for r in ratios])
    for sel in ("streaming", "meanpool"):
        by_d = {r["target_density"]: r for r in rows if r["selector"] == sel}
        body.append([f"{SELECTOR_LABELS.get(sel, sel)} (top-k calibrated)"] + [cell(by_d.get(d)) for d in dens])
    caption = (f"SmolLM2-135M, gates distilled {cfg['steps']} steps of {_tokens(cfg['seq_len'])} tokens per data "
               f"variant (retrieval: {cfg['retrieval_mix']:g} of the sequences rewritten), {prov['gpu']}, commit "
               f"{_commit(prov)} ({path}). PPL (achieved density) on {_tokens(cfg['eval_length'])}-token windows of "
               f"eval.jsonl, sink, local block and diagonal kept by every selection, dense {dense:.2f}; columns: "
               "the knob's density:")
    out = caption + "\n\n" + _table(["selection"] + [f"{d:g}" for d in dens], body)
    pk = env.get("passkey") or {}
    if pk.get("dense"):
        parts = [f"dense {pk['dense']['accuracy']:.3f}"]
        for v, res in pk.items():
            if v != "dense" and res.get("vs_dense"):
                vd = res["vs_dense"]
                parts.append(f"{v} gates {res['accuracy']:.3f} at density {res['density']:.3f} (lost {vd['lost']}, "
                             f"gained {vd['gained']} of {vd['n']} against dense, sign test p = {vd['p_value']:.3g})")
        out += (f"\n\nPasskey ({', '.join(_tokens(t) for t in cfg['passkey_lengths'])} x 5 depths x "
                f"{cfg['passkey_samples']}, knob at {cfg['passkey_density']:g} with the 2 last block rows dense): "
                + "; ".join(parts) + ".")
    if env.get("skipped"):
        out += f" Not run (time budget): {', '.join(env['skipped'])}."
    return out


def _gate_passkey225(path, gates=None):
    """docs/experiments/gate_quality.py --phases passkey at issue 17's size (225 prompts): the
    density knob's passkey per length, paired prompt by prompt with dense. ``gates`` says how the
    gates were made where the run loaded them (``--gates``) rather than distilling them itself."""
    return lambda root: gate_passkey225_table(root, path, gates)


def gate_passkey225_table(root, path, gates=None) -> str:
    env = load_envelope(root, path)
    prov, cfg, pk = env["provenance"], env["config"], env["passkey"]
    dense = pk["dense"]
    body = []
    for v, res in pk.items():
        if v == "dense":
            continue
        for T in cfg["passkey_lengths"] + ["all"]:
            def part(r, T=T):
                return {"samples": [s for s in r["samples"] if T == "all" or s["length"] == T]}
            vd = paired_passkey(part(dense), part(res))
            acc = (res["accuracy"], dense["accuracy"]) if T == "all" else \
                (res["per_length"][str(T)], dense["per_length"][str(T)])
            dens = res["density"] if T == "all" else res["density_per_length"][str(T)]
            body.append([v, "all" if T == "all" else _tokens(T), f"{acc[1]:.3f}", f"{acc[0]:.3f}", f"{dens:.3f}",
                         str(vd["lost"]), str(vd["gained"]), f"{vd['p_value']:.2g}"])
    settings = ", ".join(cfg["passkey_settings"])
    made = gates or (f"gates distilled {cfg['steps']} steps of {_tokens(cfg['seq_len'])} tokens (plain: the corpus "
                     "as it is)")
    prior = cfg.get("meanpool_prior") or 0.0
    made += f", the mean-pooled prior at share {prior:g} on the gate's scores" if prior else ""
    caption = (f"SmolLM2-135M, {made}, {prov['gpu']}, commit {_commit(prov)} ({path}); passkey at "
               f"{', '.join(_tokens(t) for t in cfg['passkey_lengths'])} x 5 "
               f"depths x {cfg['passkey_samples']} prompts, knob at {cfg['passkey_density']:g}, the 2 last block "
               "rows dense, sink and local block kept, greedy, paired prompt by prompt with dense")
    if not env.get("complete"):
        caption += f" (the run was cut by its time limit before the settings {settings} ran)"
    return caption + ":\n\n" + _table(["gates", "tokens", "dense", "gate", "density", "lost", "gained",
                                        "sign test p"], body)


def _passkey_cells_rows(env):
    body = []
    for r in env["rows"]:
        if r["setting"] == "dense":
            body.append(["dense", f"{r['accuracy']:.3f}", "1", "—", "—"])
            continue
        vd = r["vs_dense"]
        body.append([r["setting"], f"{r['accuracy']:.3f}", f"{r['density']:.3f}", f"{vd['lost']} / {vd['gained']}",
                     f"{vd['p_value']:.2g}"])
    return body


_CELLS_HEAD = ["selection", "accuracy", "density", "lost / gained", "sign test p"]
_CELLS_LEGEND = ("knob = density 0.12, sink, 1 local block, diagonal, 2 dense last rows; local=N: N local blocks; "
                 "dense=A-B: layers A..B attend densely; early=A-B:R: layers A..B keep density R; oracle / "
                 "oracle_mass: the true max-pooled map's / block attention mass's top blocks at the knob's density")


def _passkey_cells(paths, lead, tail=""):
    """docs/experiments/passkey_cells.py runs on the GPU on the same prompts and gates, one table
    (the first run's dense row); ``tail`` follows the prompt count in the caption."""
    def render(root) -> str:
        body, envs = [], [load_envelope(root, p) for p in paths]
        for env in envs:
            body += [r for r in _passkey_cells_rows(env) if r[0] != "dense" or not body]
        prov, cfg = envs[0]["provenance"], envs[0]["config"]
        lengths = cfg.get("lengths") or [cfg["length"]]  # runs before 2026-12-04 name one length
        caption = (f"{lead}, {prov['gpu']}, bf16, commit {', '.join(sorted({_commit(e['provenance']) for e in envs}))} "
                   f"({', '.join(paths)}); passkey at {'/'.join(_tokens(t) for t in lengths)} tokens, depths "
                   f"{', '.join(f'{d:g}' for d in cfg['depths'])} x {cfg['samples']} prompts{tail}")
        return caption + ":\n\n" + _table(_CELLS_HEAD, body)
    return render


def _passkey225(paths, gates="the same gates"):
    """passkey_cells.py over the 225 prompts (2k/4k/8k x 5 depths x 15), per length, each run's
    settings paired with its own dense row (run again, or an earlier run's: ``--dense-from``)."""
    def render(root) -> str:
        body, envs = [], [load_envelope(root, p) for p in paths]
        for env in envs:
            rows = env["rows"]
            for r in rows[1:]:
                for T in env["config"]["lengths"] + ["all"]:
                    def part(x, T=T):
                        return [s for s in x["samples"] if T == "all" or s["length"] == T]
                    vd = paired_passkey({"samples": part(rows[0])}, {"samples": part(r)})
                    acc = [sum(s["correct"] for s in part(x)) / len(part(x)) for x in (rows[0], r)]
                    dens = sum(s["density"] for s in part(r)) / len(part(r))
                    body.append([r["setting"], "all" if T == "all" else _tokens(T), f"{acc[0]:.3f}", f"{acc[1]:.3f}",
                                 f"{dens:.3f}", str(vd["lost"]), str(vd["gained"]), f"{vd['p_value']:.2g}"])
        prov, cfg = envs[0]["provenance"], envs[0]["config"]
        froms = sorted({e["rows"][0]["from"] for e in envs if e["rows"][0].get("from")})
        caption = (f"SmolLM2-135M, {gates}, {prov['gpu']}, bf16, commit "
                   f"{', '.join(sorted({_commit(e['provenance']) for e in envs}))} ({', '.join(paths)}); passkey at "
                   f"{', '.join(_tokens(t) for t in cfg['lengths'])} x {len(cfg['depths'])} depths x "
                   f"{cfg['samples']} prompts (issue 17's 225), paired prompt by prompt with dense"
                   + (f" (the dense answers of {', '.join(froms)})" if froms else "")
                   + "; density: mean over the length's prompts")
        return caption + ":\n\n" + _table(["selection", "tokens", "dense", "sparse", "density", "lost", "gained",
                                            "sign test p"], body)
    return render


def layers_ppl_8k_h200(root) -> str:
    """docs/experiments/dense_layers_ppl.py on the GPU: perplexity of the knob, the first layers
    made denser, the coverage rule and the threshold at 8k, ordered by achieved density."""
    paths = ["results/quality/h200_dense_layers_ppl_8k.json", "results/quality/h200_coverage_ppl_8k.json",
             "results/quality/h200_coverage_ppl_8k_b.json"]
    envs = [load_envelope(root, p) for p in paths]
    dense = envs[0]["rows"][0]
    if any(e["rows"][0]["ppl"] != dense["ppl"] for e in envs):
        raise ValueError(f"{paths}: the runs' dense perplexities differ")
    rows = sorted((r for e in envs for r in e["rows"][1:]), key=lambda r: r["density"])
    body = [["dense", f"{dense['ppl']:.3f}", "1.000x", "1", "1", "1"]]
    for r in rows:
        per = r.get("layer_density_last_window")
        body.append([r["setting"], f"{r['ppl']:.3f}", f"{r['ppl'] / dense['ppl']:.3f}x", f"{r['density']:.3f}",
                     f"{per[0]:.2f}" if per else "—", f"{min(per[1:]):.2f}-{max(per[1:]):.2f}" if per else "—"])
    prov, cfg = envs[0]["provenance"], envs[0]["config"]
    caption = (f"SmolLM2-135M, the same gates, {prov['gpu']}, bf16, commit "
               f"{', '.join(sorted({_commit(e['provenance']) for e in envs}))} ({', '.join(paths)}); perplexity over "
               f"{dense['windows']} windows of {_tokens(cfg['length'])} tokens of eval.jsonl (2 per document), sink, "
               "1 local block and diagonal kept, no dense last rows; density=R: the knob at R (every layer keeps R), "
               "coverage=C: per block row the fewest blocks holding C of the gate's probability, threshold=T: "
               "blocks whose gate probability is >= T; layer densities: the last window's")
    return caption + ":\n\n" + _table(["selection", "PPL", "vs dense", "density", "layer 0", "layers 1-29"], body)


#: README table name -> renderer (the repository root -> the text between the markers)
TABLES = {
    "demo-cpu": _demo("results/demo/cpu.json"),
    "demo-cpu-profile-on-gpu": demo_cpu_profile_on_gpu,
    "demo-gpu": _demo("results/demo/h200.json"),
    "kernels-h100": _kernels("results/kernels/h100.json"),
    "kernels-h200": _kernels("results/kernels/h200.json"),
    "kernel-changes-h200": kernel_changes_h200,
    "kernels-h200-dkdv": _kernels("results/kernels/h200_32k_dkdv.json"),
    "ttft-h100": _ttft("results/ttft/h100.json"),
    "tma-variants-h200": tma_variants_h200,
    "kernels-h200-tma": _kernels("results/kernels/h200_tma.json"),
    "ttft-h200": _ttft("results/ttft/h200.json"),
    "tma-bwd-variants-h200": tma_bwd_variants_h200,
    "pair-variants-h200": _pair_variants("h200"),
    "pair-variants-h100": _pair_variants("h100"),
    "dense64-h200": dense64_h200,
    "kernels-h200-bwd-tiles": _kernels("results/kernels/h200_bwd_tiles.json"),
    "ttft-h200-bwd-tiles": _ttft("results/ttft/h200_bwd_tiles.json"),
    "kernels-h100-8dbd9c6": _kernels("results/kernels/h100_8dbd9c6.json"),
    "ttft-h100-8dbd9c6": _ttft("results/ttft/h100_8dbd9c6.json"),
    "quality-h100": quality_h100,
    "quality-sink-local": quality_sink_local,
    "quality-rerun-h200": quality_rerun_h200,
    "passkey-h100": passkey_h100,
    "finetune-h200": finetune_h200,
    "decode-h200": decode_h200,
    "decode-quality-h200": _decode_quality(("results/decode/h200_quality.json", "plain text")),
    "decode-quality-variants-h200": _decode_quality(
        ("results/decode/h200_quality_oracle.json", "plain text"),
        ("results/decode/h200_quality_retrieval.json", "25% retrieval data, 256 rows"),
        ("results/decode/h200_quality_retrieval_800steps.json", "25% retrieval data, 256 rows"),
        ("results/decode/h200_quality_gate_scores.json", "25% retrieval data, 256 rows, float32 step logits")),
    "decode-quality-mass-h200": _decode_quality(
        ("results/decode/h200_quality_mass.json", "25% retrieval data, 256 rows"),
        ("results/decode/h200_quality_mass_oracle.json", "not read by the oracle")),
    "decode-prior-h100": decode_prior_h100,
    "decode-free-h100": decode_free_h100,
    "decode-gate-select-h100": decode_gate_select_h100,
    "decode-gate-rot-h100": decode_gate_rot_h100,
    "decode-gate-s45-h100": decode_gate_s45_h100,
    "decode-gate-keys8-h100": decode_gate_keys8_h100,
    "decode-keys-h100": decode_keys_h100,
    "decode-keys-protocol-h100": decode_keys_protocol_h100,
    "decode-keys-cpu": _decode_keys_quality("results/decode/cpu_decode_keys_model_2k.json",
                                            "session 45's decode gates (40 CPU steps of 2048 tokens)"),
    "decode-graph-gate-h200": _decode_graph_gate(
        ["results/decode/h200_graph_gate_32k.json", "results/decode/h200_graph_gate_128k.json"],
        ["results/decode/h200_graph_gate_32k.json", "results/decode/h200_graph_gate_128k.json"]),
    "decode-graph-gate-early-h100": _decode_graph_gate(
        ["results/decode/h100_graph_gate_early.json"], ["results/decode/h100_bench_16layers_early.json"],
        " (session 42: `top_blocks`' early stop and the one-launch window, the defaults since; layers fused: and "
        "`seer_merge_projections`)"),
    "decode-e2e-profile-early-h100": _e2e_profile(
        "results/decode/h100_e2e_profile_early.json", "(unscored)",
        "merged: `seer_compile_pointwise` with the one-launch cache writes and `seer_merge_projections`; "
        "merged_early: and `top_blocks`' early stop and the window in one launch (the defaults since session 42)"),
    "decode-e2e-32-shared-kv-h100": _decode_graph_gate(
        ["results/decode/h100_bench_32layers_shared_kv.json"],
        ["results/decode/h100_bench_32layers_shared_kv_a.json", "results/decode/h100_bench_32layers_shared_kv.json"],
        " (session 43, two runs on one machine; end to end the 8B shape's 32 layers with `--shared-kv`: every layer's "
        "KV cache one buffer, each layer's reads still from HBM; layers fused: and `seer_merge_projections`)"),
    "decode-e2e-32-h200": _decode_graph_gate(
        ["results/decode/h200_bench_32layers.json"], ["results/decode/h200_bench_32layers.json"],
        " (session 44: the G-column gate query and one-warp `top_blocks` at <= 512 blocks; end to end the 8B "
        "shape's 32 layers, each its own KV cache; layers fused: and `seer_merge_projections`)"),
    "decode-dense-graph-h200": _decode_dense_graph("results/decode/h200_bench_32layers.json"),
    "decode-shared-kv-check-h100": decode_shared_kv_check_h100,
    "decode-kernel-tma-h100": decode_kernel_tma_h100,
    "decode-e2e-profile-tma-h100": _e2e_profile(
        "results/decode/h100_e2e_profile_tma.json", "(unscored)",
        "merged_early: the defaults (merged projections, `top_blocks`' early stop, the window in one launch); "
        "merged_early_tma: and the decode kernel's K/V blocks through tensor descriptors (4 warps, 2 stages, 2 "
        "programs per SM: the sweep's best TMA launch at 4 x 128k)"),
    "decode-e2e-profile-h100": _e2e_profile(
        "results/decode/h100_e2e_profile.json", "(in this run still scored by the gate, as up to session 39)",
        "fused: `seer_compile_pointwise`"),
    "decode-e2e-h100-s41": decode_e2e_h100_s41,
    "decode-e2e-profile-merged-h100": _e2e_profile(
        "results/decode/h100_e2e_profile_merged.json", "(unscored)",
        "fused: `seer_compile_pointwise` with the one-launch cache writes; merged: and `seer_merge_projections`"),
    "decode-e2e-profile-append-h100": _e2e_profile(
        "results/decode/h100_e2e_profile_append.json", "(unscored, since session 40)",
        "fused: `seer_compile_pointwise` with the cache writes in one launch (`decode_append`); fused_stock_append: "
        "with the static cache's own update, as up to session 40; fused_radix: `top_blocks` by radix select; merged: "
        "fused with q/k/v and gate/up as one GEMM each (`seer_merge_projections`)"),
    "finetune-timing-h200": finetune_timing_h200,
    "finetune-timing-compile-h200": finetune_timing_compile_h200,
    "finetune-compile-h200": finetune_compile_h200,
    "gate-quality-h200": gate_quality_h200,
    "gate-calib-h200": gate_calib_h200,
    "gate-passkey225-h200": _gate_passkey225("results/quality/h200_gate_passkey225.json"),
    "passkey225-prior-h100": _gate_passkey225(
        "results/quality/h100_prior_passkey225_8k.json",
        gates="gates distilled 1200 steps of 8k tokens in a separate call of the same session (plain data)"),
    "passkey-cells-4k-h200": _passkey_cells(
        ["results/quality/h200_passkey_cells_4k.json", "results/quality/h200_passkey_cells_4k_b.json"],
        "SmolLM2-135M, the gates of results/quality/h200_gate_passkey225.json",
        f" (the 225-prompt run's), paired with dense. {_CELLS_LEGEND}"),
    "passkey-cells-layers-4k-h200": _passkey_cells(
        ["results/quality/h200_passkey_cells_layers_4k.json", "results/quality/h200_passkey_cells_coverage_4k.json"],
        "The same gates, prompts and pairing"),
    "passkey-cells-8k-h200": _passkey_cells(["results/quality/h200_passkey_cells_8k.json"],
                                            "The same gates and pairing, the 8k prompts at depth 0.75"),
    "passkey225-layers-h200": _passkey225(["results/quality/h200_passkey225_layers.json",
                                           "results/quality/h200_passkey225_coverage.json"]),
    "layers-ppl-8k-h200": layers_ppl_8k_h200,
    "passkey225-gain-bylen-h100": _passkey225(
        ["results/quality/h100_passkey225_gain_bylen.json"],
        "session 35's 1200-step gates with the mean-pooled prior at share 0.5"),
}


# ----------------------------------------------------------------------------- README

def render_readme(text: str, root: str) -> str:
    """``text`` (README.md) with every marked table regenerated; ValueError for a marker
    naming no table, or a table of :data:`TABLES` without its marker."""
    seen = []

    def replace(m):
        name = m.group("name")
        if name not in TABLES:
            raise ValueError(f"README marker table:{name} names no table: expected one of {sorted(TABLES)}")
        seen.append(name)
        return f"<!-- table:{name} -->\n{TABLES[name](root).rstrip()}\n<!-- /table -->"

    out = _BLOCK.sub(replace, text)
    opened = len(re.findall(r"<!-- table:[\w-]+ -->", text))
    if opened != len(seen):
        raise ValueError(f"README has {opened} table markers but {len(seen)} closed by <!-- /table -->")
    missing = sorted(set(TABLES) - set(seen))
    if missing:
        raise ValueError(f"README has no marker for tables {missing}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Regenerate README.md's results tables from results/ "
                                             "(--check: fail when README.md is out of date)")
    ap.add_argument("--root", default=".", help="repository root (default: the current folder)")
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 when a table differs")
    args = ap.parse_args(argv)
    path = os.path.join(args.root, README)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        new = render_readme(text, args.root)
    except (OSError, ValueError, KeyError) as err:
        print(f"readme_tables: error: {err}", file=sys.stderr)
        return 2
    if args.check:
        stale = [m.group("name") for m, n in zip(_BLOCK.finditer(text), _BLOCK.finditer(new))
                 if m.group(0) != n.group(0)]
        if stale:
            print(f"README.md is out of date for tables {stale}: run python -m seer_attn.eval.readme_tables "
                  "and commit README.md", file=sys.stderr)
            return 1
        print(f"README.md: {len(TABLES)} tables up to date")
        return 0
    if new != text:
        with open(path, "w", encoding="utf-8") as f:
            f.write(new)
        print("README.md: tables rewritten from results/")
    else:
        print("README.md: tables already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
