"""Tables of comparison rows (dicts of :func:`seer_attn.eval.baselines.run_setting`): their
order, labels and markdown."""
from seer_attn.modeling_seer.selection import SPARSITY_METHODS, baseline_pairs

from .settings import SELECTOR_LABELS


def gate_densities(rows, method=None) -> list:
    """Achieved densities (3 decimals, ascending, distinct) of the gate rows of ``rows``, of
    ``method`` only when given: the densities baselines are matched to."""
    return sorted({round(r["density"], 3) for r in rows
                   if r["selector"] == "gate" and (method is None or r["method"] == method) and r.get("density")})


def sort_rows(rows) -> list:
    """Dense first, then by target (or achieved) density descending; gate rows before the
    baselines, baselines in :func:`baseline_pairs` order."""
    order = {("gate", m): i for i, m in enumerate(SPARSITY_METHODS)}
    order.update({b: 10 + i for i, b in enumerate(baseline_pairs())})

    def key(r):
        if r["selector"] == "dense":
            return (0, 0.0, 0)
        d = r["target_density"] if r["target_density"] is not None else (r["density"] or 0.0)
        return (1, -round(d, 4), order.get((r["selector"], r["method"]), 99))
    return sorted(rows, key=key)


def _fmt(x, spec):
    return "—" if x is None else format(x, spec)


def row_label(row) -> str:
    """A row's name in tables and plots: its own ``label`` when set (e.g. two gates side by
    side), else the selector's entry in :data:`SELECTOR_LABELS`."""
    return row.get("label") or SELECTOR_LABELS.get(row["selector"], row["selector"])


def format_table(rows, sources=None) -> str:
    """Markdown table: selection, method, parameter, target and achieved density, PPL (all)
    and PPL per source (``sources``: default, every source seen in the rows)."""
    if sources is None:
        sources = sorted({s for r in rows for s in r.get("per_source", {})})
    head = ["selection", "method", "parameter", "target density", "density", "PPL (all)"] + \
        [f"PPL {s}" for s in sources]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [row_label(r), r["method"] or "—", _fmt(r["param"], ".4g"),
                 _fmt(r["target_density"], ".3f"), _fmt(r["density"], ".3f"), _fmt(r["ppl"], ".3f")]
        cells += [_fmt(r.get("per_source", {}).get(s), ".3f") for s in sources]
        if r.get("error"):
            cells[-1 - len(sources)] = "unreachable"
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)
