"""The sweep: step scores of every head on every labeled trace, then SRA, intervals, ensembles and the
manifest. Traces are checked and tokenised before any model work, so a bad file fails in a second.
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from . import __version__
from .alignment import AlignmentError, TokenizedTrace, tokenize_trace
from .capture import model_shape
from .errors import InputError
from .layers import check_layers
from .manifest import FORMAT, VERSION
from .partials import PartStore, plan_batches
from .scoring import (
    DIRECTIONS, bootstrap_ci, ensemble_sra, greedy_ensemble, per_trace_auc, permutation_null, split_half_reliability,
)
from .settings import Interval, check_settings, setting
from .step_scorer import StepScorer
from .traces import SkippedTrace, Trace, TraceFileError

QUERY_SPAN = "final-answer tokens: every token after the end-of-thinking marker, EOS included"
ENSEMBLE_SIZES = 10
TOP_N_TOLERANCE = 0.005  # top_n: the smallest k whose ensemble SRA is within this of the best k


@dataclass
class SweepConfig:
    """Settings of a sweep (recorded in the manifest); each one's help and constraints are declared at its
    field (``kfh_probe.settings``)."""

    layers: list[int] | None = setting(None, "Layers to probe (all when None).")
    batch_size: int = setting(8, "Traces per forward (right-padded; results do not depend on it).", Interval(1, None))
    top_n: int | None = setting(
        None, "Heads recommended for training; chosen from the ensemble curve when None.", Interval(1, None)
    )
    seed: int = setting(0, "Seed of the bootstrap, the permutation null and the split halves.")
    bootstrap: int = setting(1000, "Bootstrap resamples for the 95% intervals.", Interval(1, None))
    permutations: int = setting(
        1000, "Draws of the permutation null (step scores shuffled within each trace).", Interval(1, None)
    )
    marker: str = setting("</think>", "End-of-thinking marker.")
    skip_invalid: bool = setting(False, "Leave out broken traces (counted in the manifest) instead of failing.")
    backend: str = setting(
        "hf", "How attention is captured: hf (default), nnsight or lens (kfh_probe.backends)."
    )

    def __post_init__(self) -> None:
        check_settings(self)


@dataclass
class PreparedTraces:
    """Traces ready for the model: tokenised, with the labels of their steps."""

    traces: list[Trace]
    tokenized: list[TokenizedTrace]
    labels: list[list[str | None]]
    skipped: list[SkippedTrace]


def prepare_traces(traces: list[Trace], tokenizer, config: SweepConfig, source: str = "<memory>") -> PreparedTraces:
    """Check that every trace is labeled and maps onto tokens.

    Raises:
        TraceFileError: some trace cannot be used and ``config.skip_invalid`` is False.
    """
    kept, tokenized, labels, problems = [], [], [], []
    for trace in traces:
        try:
            if trace.steps is None:
                raise ValueError("no 'steps' with labels: label the file first (kfh-probe label)")
            if not any(s.label for s in trace.steps):
                raise ValueError("no step has a label")
            tokenized.append(
                tokenize_trace(tokenizer, trace.prompt, trace.response, [s.text for s in trace.steps], config.marker)
            )
        except (ValueError, AlignmentError) as err:
            problems.append(SkippedTrace(trace.line, trace.id, str(err)))
            continue
        kept.append(trace)
        labels.append([s.label for s in trace.steps])
    if problems and not config.skip_invalid:
        raise TraceFileError(source, problems)
    return PreparedTraces(kept, tokenized, labels, problems)


def _one_or_counts(names: list[str]) -> str | dict[str, int]:
    """The single name every entry has, or how many entries have each name (sorted)."""
    counts = Counter(names)
    return names[0] if len(counts) == 1 else dict(sorted(counts.items()))


def provenance(traces: list[Trace], tokenized: list[TokenizedTrace], source: str = "<memory>") -> dict:
    """What the manifest says about where the used traces' labels and steps came from (design page).

    Args:
        traces: the traces the sweep uses; tokenized: the same traces as tokenised.
    Returns:
        ``labeler``: the labeller every trace names (``given`` for one that names none), or a count per
        labeller when they differ; ``steps_from``: ``file`` (the steps came with the labelled file),
        ``segmenter`` (``kfh-probe label`` cut them), or a count of each when mixed; ``segmenter``: the
        segmenter's settings, only when it cut some trace's steps; ``eos_appended``: how many traces got
        the EOS id appended to F because the response text did not end with it.
    Raises:
        kfh_probe.errors.InputError: the traces were cut with different segmenter settings (naming two of them).
    """
    block: dict = {
        "labeler": _one_or_counts([t.labeler or "given" for t in traces]),
        "steps_from": _one_or_counts(["file" if t.segmenter is None else "segmenter" for t in traces]),
        "eos_appended": sum(t.eos_appended for t in tokenized),
    }
    cut = [t for t in traces if t.segmenter is not None]
    other = next((t for t in cut if t.segmenter != cut[0].segmenter), None)
    if other is not None:
        raise InputError(
            f"{source}: traces were cut with different segmenter settings (line {cut[0].line}, id {cut[0].id!r}, "
            f"and line {other.line}, id {other.id!r}); a manifest records one segmenter: label them with one setting"
        )
    if cut:
        block["segmenter"] = cut[0].segmenter.to_dict()
    return block


def collect_step_scores(
    model: nn.Module,
    tokenized: list[TokenizedTrace],
    config: SweepConfig,
    pad_id: int,
    progress: bool = True,
    tokenizer=None,
) -> list[torch.Tensor]:
    """Step scores of every probed head on every trace, in memory (batches as :func:`plan_batches`),
    captured by ``config.backend`` (``tokenizer``: the model's; the ``nnsight`` and ``lens`` backends need it).

    Returns:
        per trace, ``[layers, heads, K]`` float32 (layers as in ``config.layers``, all by default).
    """
    results: list[torch.Tensor | None] = [None] * len(tokenized)
    batches = plan_batches([t.length for t in tokenized], config.batch_size)
    scorer = StepScorer(model, pad_id, tokenizer, config.backend)
    for chunk, scores in scorer.score_batches(tokenized, batches, config.layers, progress):
        for i, score in zip(chunk, scores):
            results[i] = score
    return results  # type: ignore[return-value]


def collect_step_scores_resumable(
    model: nn.Module,
    tokenized: list[TokenizedTrace],
    config: SweepConfig,
    pad_id: int,
    store: PartStore,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
    tokenizer=None,
) -> list[torch.Tensor] | None:
    """Step scores with every finished batch saved in ``store``; batch ``j`` runs on rank ``j % world_size``.

    A rerun skips the batches already saved. Rank 0 waits for every rank, then returns all traces'
    scores (in trace order); other ranks return None once their share is saved.
    """
    batches = plan_batches([t.length for t in tokenized], config.batch_size)
    store.open(rank)
    done = store.done()
    mine = [j for j in range(len(batches)) if j % world_size == rank]
    todo = [j for j in mine if j not in done]
    finished = sum(len(batches[j]) for j in mine if j in done)
    if finished:
        print(f"resuming: {finished} traces already scored in {store.directory}", file=sys.stderr)
    scorer = StepScorer(model, pad_id, tokenizer, config.backend)
    scored = scorer.score_batches(tokenized, [batches[j] for j in todo], config.layers, progress, finished)
    for j, (chunk, scores) in zip(todo, scored):
        store.save(j, chunk, scores)
    store.mark_done(rank)
    if rank != 0:
        return None
    store.wait_for_ranks(world_size)
    return store.load(len(tokenized))


def _rounded(value: float) -> float:
    return round(float(value), 6)


def _sra_with_ci(auc: torch.Tensor, config: SweepConfig) -> tuple[list[float | None], list[list[float] | None]]:
    """Per head (columns of ``auc``, ``[traces, heads]``): SRA and bootstrap interval, rounded; None without traces."""
    if auc.shape[0] == 0:
        return [None] * auc.shape[1], [None] * auc.shape[1]
    ci = bootstrap_ci(auc, config.bootstrap, config.seed)
    return [_rounded(v) for v in auc.mean(dim=0)], [[_rounded(lo), _rounded(hi)] for lo, hi in ci]


def baselines_block(
    flat: list[torch.Tensor], labels: list[list[str | None]], step_lengths: list[list[int]], sra: torch.Tensor,
    config: SweepConfig,
) -> dict:
    """The manifest's ``baselines``: SRA of rankings no head is needed for, and a null for heads.

    ``position_later`` ranks a trace's steps by position (later higher), ``position_earlier`` the
    reverse, ``step_length`` by length in tokens (longer higher); ``permutation_null`` gives the 95th
    percentile of one head's SRA, and of the best head's, when every trace's step scores are permuted
    (:func:`kfh_probe.scoring.permutation_null`), and how many heads exceed the first.

    Args:
        flat: per trace, ``[heads, K]`` step scores; sra: ``[heads]`` the heads' SRA.
    """
    rankings = {
        "position_later": [torch.arange(len(lab), dtype=torch.float64)[None] for lab in labels],
        "position_earlier": [-torch.arange(len(lab), dtype=torch.float64)[None] for lab in labels],
        "step_length": [torch.tensor(lengths, dtype=torch.float64)[None] for lengths in step_lengths],
    }
    block: dict = {}
    for name, scores in rankings.items():
        values, intervals = _sra_with_ci(per_trace_auc(scores, labels)[0], config)
        block[name] = {"sra": values[0], "ci95": intervals[0]}
    null = permutation_null(flat, labels, config.permutations, config.seed)
    head_p95 = float(np.quantile(null, 0.95))
    block["permutation_null"] = {
        "draws": config.permutations,
        "seed": config.seed,
        "head_sra_p95": _rounded(head_p95),
        "best_head_sra_p95": _rounded(np.quantile(null.max(axis=1), 0.95)),
        "heads_above_head_p95": int((sra > head_p95).sum()),
    }
    return block


def build_manifest(
    step_score_list: list[torch.Tensor],
    labels: list[list[str | None]],
    layers: list[int],
    model_block: dict,
    probe_block: dict,
    config: SweepConfig,
    step_lengths: list[list[int]],
) -> dict:
    """Rank every probed head by SRA and assemble the manifest (design page, schema version 2).

    Args:
        step_score_list: per trace, ``[layers, heads, K]``.
        step_lengths: per trace, the K steps' lengths in tokens (for the step-length baseline).
    """
    num_heads = model_block["num_heads"]
    flat = [s.reshape(len(layers) * num_heads, -1) for s in step_score_list]  # row = layer_pos * H + head
    auc, used, pairs = per_trace_auc(flat, labels)
    if auc.shape[0] == 0:
        raise InputError(
            "no trace has both an essential and a redundant step, so no head can be ranked; "
            "check the labels (kfh-probe label) or use more traces"
        )
    sra = auc.mean(dim=0)
    values, intervals = _sra_with_ci(auc, config)
    directional, direction_counts = {}, {}
    for direction in DIRECTIONS:
        d_auc, d_used, d_pairs = per_trace_auc(flat, labels, direction)
        directional[direction] = _sra_with_ci(d_auc, config)
        direction_counts |= {f"traces_redundant_{direction}": len(d_used), f"pairs_redundant_{direction}": d_pairs}
    order = sorted(range(len(sra)), key=lambda r: (-float(sra[r]), r))
    heads = []
    for r in order:
        head = {"layer": layers[r // num_heads], "head": r % num_heads, "sra": values[r], "ci95": intervals[r], "traces": len(used)}
        for direction, (d_values, d_intervals) in directional.items():
            head[f"sra_redundant_{direction}"] = d_values[r]
            head[f"sra_redundant_{direction}_ci95"] = d_intervals[r]
        heads.append(head)
    with_pairs = [flat[i] for i in used]
    used_labels = [labels[i] for i in used]
    ensemble = []
    for k in range(1, min(ENSEMBLE_SIZES, len(order)) + 1):
        members = order[:k]
        ensemble.append({
            "k": k,
            "sra": round(ensemble_sra(with_pairs, used_labels, members), 6),
            "heads": [[layers[r // num_heads], r % num_heads] for r in members],
        })
    greedy = [
        {"head": [layers[r // num_heads], r % num_heads], "sra": round(value, 6)}
        for r, value in greedy_ensemble(with_pairs, used_labels, max_size=ENSEMBLE_SIZES)
    ]
    if config.top_n is not None:
        if config.top_n > len(sra):
            raise InputError(f"--top-n {config.top_n}: the sweep ranks only {len(sra)} heads")
        top_n = config.top_n
    else:
        best = max(e["sra"] for e in ensemble)
        top_n = next(e["k"] for e in ensemble if e["sra"] >= best - TOP_N_TOLERANCE)
    reliability = split_half_reliability(auc, top_n, config.seed)
    if reliability is not None and reliability["spearman"] is not None:
        reliability["spearman"] = _rounded(reliability["spearman"])
    probe = {
        **probe_block,
        "traces_used": len(step_score_list),
        "traces_with_pairs": len(used),
        "traces_without_pairs": len(step_score_list) - len(used),
        "pairs": pairs,
        **direction_counts,
        "reliability": reliability,
        "layers": layers,
        "seed": config.seed,
        "bootstrap_resamples": config.bootstrap,
        "permutation_draws": config.permutations,
        "marker": config.marker,
        "query_span": QUERY_SPAN,
        "package_version": __version__,
        "top_n_rule": "given by --top-n" if config.top_n is not None else
        f"smallest k whose top-k ensemble SRA is within {TOP_N_TOLERANCE} of the best k <= {ENSEMBLE_SIZES}",
    }
    return {
        "format": FORMAT,
        "version": VERSION,
        "model": model_block,
        "probe": probe,
        "heads": heads,
        "top_n": top_n,
        "ensemble": ensemble,
        "greedy_ensemble": greedy,
        "baselines": baselines_block(flat, labels, step_lengths, sra, config),
    }


def probed_layers(model: nn.Module, layers: list[int] | None) -> list[int]:
    """The sorted layers a sweep covers (``--layers``), checked against the model (:func:`~kfh_probe.layers.check_layers`)."""
    return check_layers(layers, model_shape(model)["num_layers"])
