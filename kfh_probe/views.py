"""What people look at: the ranked table, the layer x head heatmap, and the agreement of two manifests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import InputError
from .io import atomic_write_png


def sra_grid(manifest: dict, key: str = "sra") -> np.ndarray:
    """``[layers, heads]`` of a per-head value, ``sra`` by default (NaN where absent or not probed).

    Raises:
        InputError: no head of the manifest has ``key`` (a version-1 manifest has no controls).
    """
    model = manifest["model"]
    if not any(key in head for head in manifest["heads"]):
        raise InputError(f"the manifest (version {manifest['version']}) has no per-head {key!r}; sweep again to get it")
    grid = np.full((model["num_layers"], model["num_heads"]), np.nan)
    for head in manifest["heads"]:
        if head.get(key) is not None:
            grid[head["layer"], head["head"]] = head[key]
    return grid


def _value(value: float | None, width: int = 6) -> str:
    return f"{value:{width}.3f}" if value is not None else f"{'-':>{width}}"


def _baseline_lines(manifest: dict) -> list[str]:
    """What a head has to beat (version 2): position and length rankings, the permutation null, reliability."""
    baselines, reliability = manifest.get("baselines"), manifest["probe"].get("reliability")
    if baselines is None:
        return ["(version-1 manifest: no baselines or controls; sweep again to get them)"]
    null = baselines["permutation_null"]
    lines = [
        "baselines (SRA of a ranking no head is needed for): "
        f"position, later higher {_value(baselines['position_later']['sra'], 0)}; "
        f"position, earlier higher {_value(baselines['position_earlier']['sra'], 0)}; "
        f"step length, longer higher {_value(baselines['step_length']['sra'], 0)}",
        f"permutation null ({null['draws']} draws): 95th percentile {null['head_sra_p95']:.3f} for one head, "
        f"{null['best_head_sra_p95']:.3f} for the best of {len(manifest['heads'])}; "
        f"{null['heads_above_head_p95']} heads above the first",
    ]
    if reliability is not None:
        rho = reliability["spearman"]
        lines.append(
            f"split-half reliability ({reliability['traces'][0]} + {reliability['traces'][1]} traces): Spearman "
            f"{_value(rho, 0)} over all heads, top-{reliability['top_n']} overlap "
            f"{reliability['top_n_overlap']}/{reliability['top_n']}"
        )
    return lines


def format_table(manifest: dict, rows: int = 20) -> str:
    """The ranked heads as a fixed-width table, with the recommended top-N marked; the baselines above it
    and, per head, the SRA over the pairs whose redundant step comes after / before (version 2)."""
    model, probe = manifest["model"], manifest["probe"]
    controls = "baselines" in manifest
    header = f"{'rank':>4}  {'layer':>5}  {'head':>4}  {'SRA':>6}  {'95% CI':>15}"
    if controls:
        header += f"  {'R after':>7}  {'R before':>8}"
    lines = [
        f"{model['name_or_path']} ({model['architecture']}, {model['num_layers']} layers x {model['num_heads']} heads, "
        f"{model['num_kv_heads']} KV heads)",
        f"{probe.get('traces_with_pairs', '?')} traces with pairs, {probe.get('pairs', '?')} pairs; top_n = {manifest['top_n']}",
        *_baseline_lines(manifest),
        "",
        header,
    ]
    for rank, head in enumerate(manifest["heads"][:rows], start=1):
        lo, hi = head["ci95"]
        row = f"{rank:>4}  {head['layer']:>5}  {head['head']:>4}  {head['sra']:6.3f}  [{lo:.3f}, {hi:.3f}]"
        if controls:
            row += f"  {_value(head['sra_redundant_after'], 7)}  {_value(head['sra_redundant_before'], 8)}"
        lines.append(row + ("  *" if rank <= manifest["top_n"] else ""))
    if controls:
        lines.append(
            f"R after / R before: SRA over only the pairs whose redundant step comes after / before the essential one "
            f"({probe['pairs_redundant_after']} / {probe['pairs_redundant_before']} pairs)"
        )
    sras = np.array([h["sra"] for h in manifest["heads"]], dtype=float)
    lines += ["", f"median SRA over {len(sras)} heads: {np.nanmedian(sras):.3f}"]
    lines += ["ensemble (top-k by SRA): " + ", ".join(f"k={e['k']}: {e['sra']:.3f}" for e in manifest["ensemble"])]
    return "\n".join(lines)


PANEL_TITLES = {
    "sra": "SRA per head",
    "sra_redundant_after": "SRA, redundant step after the essential one",
    "sra_redundant_before": "SRA, redundant step before the essential one",
}


def plot_heatmap(manifest: dict, out: str | Path, top_n: int | None = None, panels: tuple[str, ...] = ("sra",)) -> None:
    """Layer x head heatmaps (PNG), one panel per per-head value in ``panels``, the top-N heads
    outlined; written atomically.

    Raises:
        InputError: a panel the manifest has no values for (version 1 has only ``sra``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    grids = [sra_grid(manifest, key) for key in panels]
    layers, heads = grids[0].shape
    top_n = manifest["top_n"] if top_n is None else top_n
    width = max(4.0, 0.45 * heads + 2)
    fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), max(3.0, 0.3 * layers + 1.5)), squeeze=False)
    for ax, key, grid in zip(axes[0], panels, grids):
        sns.heatmap(grid, ax=ax, cmap="viridis", vmin=0.0, vmax=1.0, center=None, cbar_kws={"label": "Step Ranking Accuracy"},
                    annot=layers * heads <= 64, fmt=".2f", mask=np.isnan(grid))
        for head in manifest["heads"][:top_n]:
            ax.add_patch(plt.Rectangle((head["head"], head["layer"]), 1, 1, fill=False, edgecolor="red", lw=2))
        ax.set_xlabel("query head")
        ax.set_ylabel("layer")
        ax.set_title(f"{PANEL_TITLES.get(key, key)}: {manifest['model']['name_or_path']} (top {top_n} outlined)", fontsize=9)
    fig.tight_layout()
    atomic_write_png(out, fig, dpi=120)
    plt.close(fig)


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
        raise InputError(f"the manifests rank different shapes: {shape_a} vs {shape_b} (layers, heads)")
    sra_a = {(h["layer"], h["head"]): h["sra"] for h in a["heads"]}
    sra_b = {(h["layer"], h["head"]): h["sra"] for h in b["heads"]}
    common = sorted(sra_a.keys() & sra_b.keys())
    if len(common) < 3:
        raise InputError(f"the manifests share only {len(common)} heads; at least 3 are needed")
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
