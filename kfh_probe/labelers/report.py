"""``kfh-probe label-report``: how good is each labeller, measured on the organism where the truth is known.

For each labeller, on the same traces and the same steps:

- agreement with the organism's ground truth over the steps the labeller labelled (accuracy and
  Cohen's kappa, scikit-learn), and its per-class counts;
- the heads a sweep with those labels would pick: every head's SRA under the labeller's labels,
  the top 3, and the SRA of that top-3 ensemble measured with the labeller's own labels (what its
  user would see) and with the ground truth (how good the chosen heads really are).

Step scores do not depend on labels, so the model runs once for all labellers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from .. import SegmenterConfig, Step, Trace
from ..errors import InputError
from ..io import shown_path
from .base import Labeler, Labels, run_labeler

TOP_K = 3
COLUMNS = ("labeller", "traces labelled", "essential", "redundant", "null", "accuracy", "Cohen's kappa",
           f"top-{TOP_K} heads (layer, head)", f"top-{TOP_K} SRA, own labels", f"top-{TOP_K} SRA, ground truth")


def shipped_traces_path() -> Path | None:
    """The organism's model-sampled trace file shipped with the package, if there is one."""
    path = Path(__file__).resolve().parent.parent / "data" / "organism_traces.jsonl"
    return path if path.is_file() else None


def load_report_traces(
    traces: str | Path | None, model_path: str | Path, n: int, seed: int, marker: str = "</think>"
) -> tuple[list[Trace], str]:
    """The traces to measure on and a description of where they came from: ``traces``, else the shipped
    file, else ``n`` fresh samples from the model (``seed``)."""
    from .. import read_traces
    from ..traces import parse_record

    path = traces or shipped_traces_path()
    if path is not None:
        return read_traces(path, marker)[0], shown_path(path)
    from ..organism.traces import sample_labeled_traces

    records = sample_labeled_traces(model_path, n, seed)
    parsed = [parse_record(r, i + 1, marker) for i, r in enumerate(records)]
    return parsed, f"{len(parsed)} fresh samples of {shown_path(model_path)} (seed {seed})"


def agreement(predicted: list[Labels], truth: list[Labels]) -> dict:
    """Accuracy, Cohen's kappa and counts over the steps ``predicted`` labels (None: unlabelled)."""
    from sklearn.metrics import accuracy_score, cohen_kappa_score

    pairs = [(p, t) for ps, ts in zip(predicted, truth) for p, t in zip(ps, ts) if p is not None and t is not None]
    flat = [p for ps in predicted for p in ps]
    result = {"essential": flat.count("essential"), "redundant": flat.count("redundant"), "null": flat.count(None)}
    if not pairs:
        return {**result, "accuracy": math.nan, "kappa": math.nan}
    pred, true = zip(*pairs)
    kappa = cohen_kappa_score(true, pred, labels=["essential", "redundant"]) if len(set(pred) | set(true)) > 1 else math.nan
    return {**result, "accuracy": accuracy_score(true, pred), "kappa": float(kappa)}


def best_rows(flat_scores: list[torch.Tensor], labels: list[Labels], k: int = TOP_K) -> list[int]:
    """Rows of the ``k`` heads with the highest SRA under ``labels`` (ties: lower row first); empty
    when no trace has a pair."""
    from .. import per_trace_auc

    auc, _, _ = per_trace_auc(flat_scores, labels)
    if auc.shape[0] == 0:
        return []
    sra = auc.mean(dim=0)
    return sorted(range(len(sra)), key=lambda r: (-float(sra[r]), r))[:k]


def _fmt(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.3f}"


def markdown_table(rows: list[dict], header: str) -> str:
    lines = [header, "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = [r["labeller"], f"{r['labelled']}/{r['traces']}", r["essential"], r["redundant"], r["null"],
                 _fmt(r["accuracy"]), _fmt(r["kappa"]), " ".join(f"({l},{h})" for l, h in r["heads"]) or "n/a",
                 _fmt(r["sra_own"]), _fmt(r["sra_truth"])]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


LabelerFactory = Callable[[nn.Module, object], Labeler]
"""Makes a labeller, given the loaded model and its tokenizer (the ablation labeller uses them)."""


def label_report(
    model_path: str | Path,
    labelers: dict[str, LabelerFactory],
    traces: str | Path | None = None,
    *,
    n: int = 64,
    seed: int = 0,
    marker: str = "</think>",
    segmenter: SegmenterConfig | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    progress: bool = True,
    note: str = "",
) -> str:
    """Run every labeller on the organism's traces and return the markdown table.

    Args:
        model_path: the organism's model folder (loaded once; step scores do not depend on labels).
        labelers: name -> factory, one row each, in this order.
        traces: organism traces (default: the shipped ones, else ``n`` fresh samples with ``seed``).
        segmenter: cuts traces that have no steps (the default segmenter when None).
        note: appended to the table's header (the ablation rule, say).

    Raises:
        kfh_probe.errors.InputError: no trace is an organism trace that maps onto tokens.
        kfh_probe.labelers.base.LabelerError: a labeller failed as a whole.
    """
    from .. import (
        SweepConfig, collect_step_scores, ensemble_sra, load_model, load_tokenizer, pad_token_id, prepare_traces,
    )
    from .rules import OrganismLabeler

    segmenter = segmenter or SegmenterConfig()
    model, tokenizer = load_model(model_path, dtype, device), load_tokenizer(model_path)
    traces_used, source = load_report_traces(traces, model_path, n, seed, marker)
    config = SweepConfig(marker=marker, skip_invalid=True)
    truth_run = run_labeler(traces_used, OrganismLabeler(), segmenter, marker, skip_invalid=True, source=source)
    prepared = prepare_traces(truth_run.traces, tokenizer, config, source)
    if not prepared.traces:
        raise InputError(f"no trace of {source} is an organism trace that maps onto tokens")
    truth = prepared.labels
    scores = collect_step_scores(model, prepared.tokenized, config, pad_token_id(tokenizer), progress=progress)
    num_heads = scores[0].shape[1]
    flat = [s.reshape(-1, s.shape[-1]) for s in scores]
    # Every labeller sees the same steps, unlabelled; "given" sees the file's labels on them.
    originals = {t.id: t for t in traces_used}
    unlabelled = [replace(t, steps=tuple(Step(s.text) for s in t.steps)) for t in prepared.traces]
    given_steps = [replace(t, steps=originals[t.id].steps or t.steps) for t in unlabelled]
    rows = []
    for name, make in labelers.items():
        run = run_labeler(given_steps if name == "given" else unlabelled, make(model, tokenizer), segmenter,
                          marker, skip_invalid=True, source=source)
        by_id = {t.id: [s.label for s in t.steps] for t in run.traces}
        labels = [by_id.get(t.id, [None] * len(t.steps)) for t in prepared.traces]
        heads = best_rows(flat, labels)
        rows.append({
            "labeller": name, "labelled": len(run.traces), "traces": len(prepared.traces), **agreement(labels, truth),
            "heads": [(r // num_heads, r % num_heads) for r in heads],
            "sra_own": ensemble_sra(flat, labels, heads) if heads else math.nan,
            "sra_truth": ensemble_sra(flat, truth, heads) if heads else math.nan,
        })
    header = (f"Labellers against the organism's ground truth on {len(prepared.traces)} traces ({source}); "
              f"model {shown_path(model_path)}{'; ' + note if note else ''}.")
    return markdown_table(rows, header)
