"""The sweep: step scores of every head on every labeled trace, then SRA, intervals, ensembles and the
manifest. Traces are checked and tokenised before any model work, so a bad file fails in a second.

:func:`run_sweep` is the whole sweep as one call (``kfh-probe sweep`` is a thin wrapper): labeled traces
and a model in, the KFH manifest out. It owns what makes a manifest trustworthy: the run key that lets an
interrupted sweep resume only into the same run, the progress reports, and the provenance block.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import __version__
from .alignment import AlignmentError, TokenizedTrace, tokenize_trace
from .backends import get_backend
from .batch_runner import PartStore, batches_by_length, run_batches, work_folder
from .capture import model_shape
from .errors import InputError
from .io import atomic_write_json, check_output_path, file_sha256, to_stderr
from .layers import check_layers
from .loading import load_model, load_tokenizer, pad_token_id
from .manifest import FORMAT, VERSION, model_record
from .margin import margin_block, uniform_bar
from .scoring import (
    DIRECTIONS, bootstrap_ci, ensemble_sra, greedy_ensemble, per_trace_auc, permutation_null, split_half_reliability,
)
from .settings import Interval, check_settings, setting
from .step_scorer import StepScorer
from .traces import SkippedTrace, Trace, TraceFileError, read_traces

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
    store: PartStore | None = None,
    log: Callable[[str], None] | None = to_stderr,
) -> list[torch.Tensor] | None:
    """Step scores of every probed head on every trace, captured by ``config.backend`` (``tokenizer``: the
    model's; the ``nnsight`` and ``lens`` backends need it), in batches of traces of similar length.

    Batches run through :func:`~kfh_probe.batch_runner.run_batches`: in memory without ``store``; with one,
    each finished batch is saved there, a rerun skips those, and the store's rank runs its share.

    Returns:
        per trace, ``[layer, head, step]`` float32 (layers as in ``config.layers``, all by default); None on
        a rank other than 0 of a store, once its share is saved.
    """
    scorer = StepScorer(model, pad_id, tokenizer, config.backend)
    batches = batches_by_length([t.length for t in tokenized], config.batch_size)
    return run_batches(
        "scores", batches, lambda chunk: scorer.score_batch([tokenized[i] for i in chunk], config.layers),
        len(tokenized), store, progress=progress, log=log,
    )


def _rounded(value: float) -> float:
    return round(float(value), 6)


def _sra_with_ci(auc: torch.Tensor, config: SweepConfig) -> tuple[list[float | None], list[list[float] | None]]:
    """Per head (columns of ``auc``, ``[trace, head]``): SRA and bootstrap interval, rounded; None without traces."""
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
        flat: per trace, ``[head, step]`` step scores (heads of all layers); sra: ``[head]`` the heads' SRA.
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
    uniform_bars: list[float],
) -> dict:
    """Rank every probed head by SRA and assemble the manifest (design page, schema version 2).

    Args:
        step_score_list: per trace, ``[layer, head, step]``.
        step_lengths: per trace, the K steps' lengths in tokens (for the step-length baseline and the margins).
        uniform_bars: per trace, |F| / |o| (AttnPO's paper baseline at p = 1, for the margins).
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
            raise InputError(f"`top_n` is {config.top_n}, but the sweep ranks only {len(sra)} heads", settings=("top_n",))
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
        "margins": margin_block(flat, labels, step_lengths, uniform_bars, order, ENSEMBLE_SIZES),
    }


def probed_layers(model: nn.Module, layers: list[int] | None) -> list[int]:
    """The sorted layers a sweep covers (``--layers``), checked against the model (:func:`~kfh_probe.layers.check_layers`)."""
    return check_layers(layers, model_shape(model)["num_layers"])


def run_sweep(
    model: str | Path,
    traces: str | Path,
    config: SweepConfig | None = None,
    *,
    out: str | Path | None = None,
    model_name: str | None = None,
    max_traces: int | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    work_dir: str | Path | None = None,
    keep_parts: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = to_stderr,
    rank: int = 0,
    world_size: int = 1,
) -> dict | None:
    """Rank every head of ``model`` by Step Ranking Accuracy on the labeled ``traces`` (design page).

    Traces are read, checked and tokenised before the model is loaded, so a bad file fails in seconds.
    With ``out`` the manifest is written there atomically (sorted keys: equal manifests, equal bytes);
    without it, only returned. Finished batches are kept in ``work_dir`` (default ``OUT.parts`` when
    ``out`` is given; in memory only when neither is) under a key of everything that changes the
    scores, so the same call after an interruption continues where it stopped; the folder is removed
    once the manifest is written unless ``keep_parts``. Batch ``j`` runs on rank ``j % world_size``.

    Args:
        model: a Hugging Face model folder (or what ``kfh_probe.loading.load_model`` accepts).
        traces: labeled trace JSONL (``kfh-probe label``); its labeller and step provenance go into
            the manifest (``sweep.provenance``).
        config: the sweep's settings (defaults of :class:`~kfh_probe.sweep.SweepConfig` when None).
        model_name: the name recorded in the manifest (default: ``model`` as given).
        max_traces: use at most this many usable traces, in file order.
        dtype, device: how the weights are loaded (attention rows are float32 whatever the dtype).
        log: where one-line progress reports go (None: nowhere); ``progress``: the tqdm bar.

    Returns:
        the manifest; None on a rank other than 0, once its share is saved in the work folder.

    Raises:
        kfh_probe.traces.TraceFileError: broken traces and ``config.skip_invalid`` is False.
        kfh_probe.errors.InputError: no usable trace, layers the model lacks, or no trace with an essential/redundant pair.
        KeyboardInterrupt: finished batches stay in the work folder.
    """
    config = SweepConfig() if config is None else config
    folder = work_folder(work_dir, out, rank, world_size)
    if out is not None:
        check_output_path(out)  # fail before the work, not after it
    log = log or (lambda message: None)
    get_backend(config.backend)  # a missing backend package fails here, before any work
    raw, skipped = read_traces(traces, config.marker, config.skip_invalid)
    tokenizer = load_tokenizer(model)
    prepared = prepare_traces(raw, tokenizer, config, source=str(traces))
    skipped += prepared.skipped
    used = slice(None, max_traces)
    kept, tokenized, labels = prepared.traces[used], prepared.tokenized[used], prepared.labels[used]
    if not tokenized:
        raise InputError(f"no usable trace in {traces}")
    origin = provenance(kept, tokenized, str(traces))
    log(f"{len(tokenized)} traces ready ({len(skipped)} skipped); loading {model}")
    loaded = load_model(model, dtype, device)
    config = dataclasses.replace(config, layers=probed_layers(loaded, config.layers))
    trace_sha = file_sha256(traces)
    model_block = model_record(loaded, model_name or str(model))
    run_key = {
        "trace_file_sha256": trace_sha, "fingerprint": model_block["fingerprint"], "layers": config.layers,
        "batch_size": config.batch_size, "marker": config.marker, "backend": config.backend, "dtype": dtype,
        "max_traces": max_traces, "skip_invalid": config.skip_invalid,
    }
    store = None if folder is None else PartStore(folder, run_key, rank, world_size).open()
    scores = collect_step_scores(loaded, tokenized, config, pad_token_id(tokenizer), progress, tokenizer, store, log)
    if scores is None:
        return None
    probe_block = {
        "trace_file": Path(traces).name,
        "trace_file_sha256": trace_sha,
        "traces_skipped": {"count": len(skipped), "reasons": [s.to_dict() for s in skipped]},
        **origin,
        "dtype": dtype,
        "backend": config.backend,
        "max_traces": max_traces,
    }
    step_lengths = [[end - start for start, end in t.step_spans] for t in tokenized]
    uniform_bars = uniform_bar(torch.tensor([t.answer_span[1] - t.answer_span[0] for t in tokenized]),
                               torch.tensor([t.length for t in tokenized])).tolist()
    manifest = build_manifest(scores, labels, config.layers, model_block, probe_block, config, step_lengths,
                              uniform_bars)
    if out is not None:
        atomic_write_json(out, manifest)
    if store is not None and not keep_parts:
        store.remove()
    return manifest
