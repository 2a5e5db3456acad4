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
from dataclasses import replace
from pathlib import Path

import torch

from ..errors import InputError
from ..traces import Step, Trace
from .base import Labels, run_labeler

TOP_K = 3
COLUMNS = ("labeller", "traces labelled", "essential", "redundant", "null", "accuracy", "Cohen's kappa",
           f"top-{TOP_K} heads (layer, head)", f"top-{TOP_K} SRA, own labels", f"top-{TOP_K} SRA, ground truth")


def shipped_traces_path() -> Path | None:
    """The organism's model-sampled trace file shipped with the package, if there is one."""
    path = Path(__file__).resolve().parent.parent / "data" / "organism_traces.jsonl"
    return path if path.is_file() else None


def load_report_traces(args, model_path: str) -> tuple[list[Trace], str]:
    """The traces to measure on and a description of where they came from: ``--traces``, else the
    shipped file, else ``--n`` fresh samples from the model (``--seed``)."""
    from ..traces import parse_record, read_traces

    path = args.traces or shipped_traces_path()
    if path is not None:
        return read_traces(path, args.marker)[0], str(path)
    from ..organism.report import sample_labeled_traces

    records = sample_labeled_traces(model_path, args.n, args.seed)
    traces = [parse_record(r, i + 1, args.marker) for i, r in enumerate(records)]
    return traces, f"{len(traces)} fresh samples of {model_path} (seed {args.seed})"


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


def top_heads(flat_scores: list[torch.Tensor], labels: list[Labels], k: int = TOP_K) -> list[int]:
    """Rows of the ``k`` heads with the highest SRA under ``labels`` (ties: lower row first); empty
    when no trace has a pair."""
    from ..scoring import per_trace_auc

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


def label_report(args) -> str:
    """Run every requested labeller on the organism's traces and return the markdown table."""
    from ..loading import load_model, load_tokenizer, pad_token_id
    from ..scoring import ensemble_sra
    from ..sweep import SweepConfig, collect_step_scores, prepare_traces
    from .cli import LABELERS, ablation_labeler, judge_labeler, model_dir, segmenter
    from .rules import GivenLabeler, OrganismLabeler, PostAnswerLabeler

    names = [n.strip() for n in args.labelers.split(",") if n.strip()]
    if (args.judge or args.judge_local) and "judge" not in names:
        names.append("judge")
    unknown = [n for n in names if n not in LABELERS]
    if unknown:
        raise InputError(f"--labelers: unknown {unknown}; choose from {', '.join(LABELERS)}")
    path = model_dir(args)
    model, tokenizer = load_model(path, args.dtype, args.device), load_tokenizer(path)
    traces, source = load_report_traces(args, path)
    config = SweepConfig(marker=args.marker, segmenter=segmenter(args), skip_invalid=True)
    truth_run = run_labeler(traces, OrganismLabeler(), config.segmenter, args.marker, skip_invalid=True, source=source)
    prepared = prepare_traces(truth_run.traces, tokenizer, config, source)
    if not prepared.traces:
        raise InputError(f"no trace of {source} is an organism trace that maps onto tokens")
    truth = prepared.labels
    scores = collect_step_scores(model, prepared.tokenized, config, pad_token_id(tokenizer), progress=not args.quiet)
    num_heads = scores[0].shape[1]
    flat = [s.reshape(-1, s.shape[-1]) for s in scores]
    # Every labeller sees the same steps, unlabelled; "given" sees the file's labels on them.
    originals = {t.id: t for t in traces}
    unlabelled = [replace(t, steps=tuple(Step(s.text) for s in t.steps)) for t in prepared.traces]
    given_steps = [replace(t, steps=originals[t.id].steps or t.steps) for t in unlabelled]
    makers = {"given": GivenLabeler, "organism": OrganismLabeler, "post-answer": lambda: PostAnswerLabeler(args.marker),
              "ablation": lambda: ablation_labeler(args, model, tokenizer), "judge": lambda: judge_labeler(args)}
    rows = []
    for name in names:
        run = run_labeler(given_steps if name == "given" else unlabelled, makers[name](), config.segmenter,
                          args.marker, skip_invalid=True, source=source)
        by_id = {t.id: [s.label for s in t.steps] for t in run.traces}
        labels = [by_id.get(t.id, [None] * len(t.steps)) for t in prepared.traces]
        heads = top_heads(flat, labels)
        rows.append({
            "labeller": name, "labelled": len(run.traces), "traces": len(prepared.traces), **agreement(labels, truth),
            "heads": [(r // num_heads, r % num_heads) for r in heads],
            "sra_own": ensemble_sra(flat, labels, heads) if heads else math.nan,
            "sra_truth": ensemble_sra(flat, truth, heads) if heads else math.nan,
        })
    header = (f"Labellers against the organism's ground truth on {len(prepared.traces)} traces ({source}); "
              f"model {path}; ablation rule: " +
              (f"top {args.top_fraction:.0%} of drops" if args.top_fraction is not None else
               f"drop >= {1.0 if args.threshold is None else args.threshold} nats") + ".")
    return markdown_table(rows, header)
