"""What people look at: the ranked table, the layer x head heatmap, and the agreement of two manifests."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from .io import atomic_write_bytes


def sra_grid(manifest: dict) -> np.ndarray:
    """``[layers, heads]`` SRA (NaN for layers that were not probed)."""
    model = manifest["model"]
    grid = np.full((model["num_layers"], model["num_heads"]), np.nan)
    for head in manifest["heads"]:
        if head["sra"] is not None:
            grid[head["layer"], head["head"]] = head["sra"]
    return grid


def format_table(manifest: dict, rows: int = 20) -> str:
    """The ranked heads as a fixed-width table, with the recommended top-N marked."""
    model, probe = manifest["model"], manifest["probe"]
    lines = [
        f"{model['name_or_path']} ({model['architecture']}, {model['num_layers']} layers x {model['num_heads']} heads, "
        f"{model['num_kv_heads']} KV heads)",
        f"{probe.get('traces_with_pairs', '?')} traces with pairs, {probe.get('pairs', '?')} pairs; top_n = {manifest['top_n']}",
        "",
        f"{'rank':>4}  {'layer':>5}  {'head':>4}  {'SRA':>6}  {'95% CI':>15}",
    ]
    for rank, head in enumerate(manifest["heads"][:rows], start=1):
        lo, hi = head["ci95"]
        mark = "  *" if rank <= manifest["top_n"] else ""
        lines.append(f"{rank:>4}  {head['layer']:>5}  {head['head']:>4}  {head['sra']:6.3f}  [{lo:.3f}, {hi:.3f}]{mark}")
    sras = np.array([h["sra"] for h in manifest["heads"]], dtype=float)
    lines += ["", f"median SRA over {len(sras)} heads: {np.nanmedian(sras):.3f}"]
    lines += ["ensemble (top-k by SRA): " + ", ".join(f"k={e['k']}: {e['sra']:.3f}" for e in manifest["ensemble"])]
    return "\n".join(lines)


def plot_heatmap(manifest: dict, out: str | Path, top_n: int | None = None) -> None:
    """Layer x head SRA heatmap (PNG), the top-N heads outlined; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns


    grid = sra_grid(manifest)
    layers, heads = grid.shape
    top_n = manifest["top_n"] if top_n is None else top_n
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * heads + 2), max(3.0, 0.3 * layers + 1.5)))
    sns.heatmap(grid, ax=ax, cmap="viridis", vmin=0.0, vmax=1.0, center=None, cbar_kws={"label": "Step Ranking Accuracy"},
                annot=layers * heads <= 64, fmt=".2f", mask=np.isnan(grid))
    for head in manifest["heads"][:top_n]:
        ax.add_patch(plt.Rectangle((head["head"], head["layer"]), 1, 1, fill=False, edgecolor="red", lw=2))
    ax.set_xlabel("query head")
    ax.set_ylabel("layer")
    ax.set_title(f"SRA per head: {manifest['model']['name_or_path']} (top {top_n} outlined)", fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(out, buffer.getvalue())


def compare_manifests(a: dict, b: dict, top_n: int | None = None) -> dict:
    """Rank agreement of two manifests over the heads both ranked.

    Returns:
        ``spearman``, ``kendall`` (rank correlations of the SRA tables), ``pearson``, ``heads``
        (heads in common), ``top_n`` and ``top_overlap`` (shared heads among each one's top N).
    """
    from scipy.stats import kendalltau, pearsonr, spearmanr

    shape_a = tuple(a["model"][k] for k in ("num_layers", "num_heads"))
    shape_b = tuple(b["model"][k] for k in ("num_layers", "num_heads"))
    if shape_a != shape_b:
        raise ValueError(f"the manifests rank different shapes: {shape_a} vs {shape_b} (layers, heads)")
    sra_a = {(h["layer"], h["head"]): h["sra"] for h in a["heads"]}
    sra_b = {(h["layer"], h["head"]): h["sra"] for h in b["heads"]}
    common = sorted(sra_a.keys() & sra_b.keys())
    if len(common) < 3:
        raise ValueError(f"the manifests share only {len(common)} heads; at least 3 are needed")
    x = np.array([sra_a[k] for k in common])
    y = np.array([sra_b[k] for k in common])
    top_n = top_n or min(a["top_n"], b["top_n"])
    top_a = {(h["layer"], h["head"]) for h in a["heads"][:top_n]}
    top_b = {(h["layer"], h["head"]) for h in b["heads"][:top_n]}
    return {
        "heads": len(common),
        "spearman": float(spearmanr(x, y).statistic),
        "kendall": float(kendalltau(x, y).statistic),
        "pearson": float(pearsonr(x, y).statistic),
        "top_n": top_n,
        "top_overlap": len(top_a & top_b),
        "top_shared": sorted([list(k) for k in top_a & top_b]),
    }
