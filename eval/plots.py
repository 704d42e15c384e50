"""Plots of comparison rows: perplexity against achieved density."""
import os

from .tables import row_label

def plot_ppl_vs_density(rows, path, title=None, metric="ppl"):
    """Line plot of ``metric`` against achieved density, one line per (selector, method); the
    dense PPL as a horizontal line. Returns the path, or None when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    lines = {}
    dense = None
    for r in rows:
        if r.get(metric) is None:
            continue
        if r["selector"] == "dense":
            dense = r[metric]
            continue
        if r.get("density") is None:
            continue
        lines.setdefault((row_label(r), r["method"]), []).append((r["density"], r[metric]))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (label, method), pts in sorted(lines.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{label} ({method})")
    if dense is not None:
        ax.axhline(dense, color="black", linestyle="--", linewidth=1, label="dense")
    ax.set_xlabel("kept share of causal blocks (density)")
    ax.set_ylabel(metric)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
