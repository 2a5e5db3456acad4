"""A trace seen through its heads: the step scores of every head a manifest ranks and of its top-N ensemble,
each step's label, and the baseline S_base a step is compared with in training. :func:`view_traces` computes
them with the sweep's own capture and step scores (``kfh_probe.sweep``, batched by length, never a T x T
map); :class:`TraceView` renders them as one self-contained HTML page (:mod:`kfh_probe.html_view`) that a
notebook shows inline (``_repr_html_``) and ``kfh-probe view`` writes to disk.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import InputError
from .io import atomic_write_text
from .loading import load_model, load_tokenizer, pad_token_id
from .manifest import check_model_matches, load_manifest
from .segmentation import split_at_marker
from .sweep import SweepConfig, collect_step_scores, prepare_traces
from .traces import read_traces

P_LABELED = 1.0
"""p of a labeled trace in the view's S_base: a labeled trace is one response with no sampled group, so the
view shows the baseline a prompt every sample solves would set (the highest one; p < 1 lowers it by p^alpha)."""
ALPHA = 2.0
"""The exponent of p in S_base (method page, section 6)."""


def step_baseline(p: float, answer_tokens: int, total_tokens: int, alpha: float = ALPHA) -> float:
    """S_base = p^alpha |F| / |o| of the method page, section 6 (|o|: prompt plus response tokens); the
    trainer's batched form is ``attnpo_train.advantages.difficulty_baseline``."""
    return p**alpha * answer_tokens / total_tokens


@dataclass(frozen=True)
class TraceScores:
    """One trace as the view shows it.

    Attributes:
        steps: the reasoning's steps as text; labels: each step's label (None: unlabeled).
        answer: the final answer F as text (after the end-of-thinking marker).
        head_scores: ``[ranked_head, step]`` step scores of the manifest's heads, in ranking order.
        ensemble: ``[step]`` the mean of the top-N heads' step scores (the trainer's S_k).
        answer_tokens, total_tokens: |F| and |o| in tokens; baseline: S_base with ``p`` and ``alpha``.
    """

    id: str
    prompt: str
    steps: list[str]
    labels: list[str | None]
    marker: str
    answer: str
    head_scores: torch.Tensor
    ensemble: torch.Tensor
    answer_tokens: int
    total_tokens: int
    baseline: float


@dataclass(frozen=True)
class TraceView:
    """Traces with the step scores of a manifest's heads; ``_repr_html_`` shows them in a notebook.

    Attributes:
        model: the model's name as the page shows it; heads: the manifest's ranked ``(layer, head)``;
        sra: each head's SRA; top_n: the ensemble's size; p, alpha: the S_base settings the page states.
    """

    model: str
    heads: list[tuple[int, int]]
    sra: list[float]
    top_n: int
    traces: list[TraceScores]
    p: float = P_LABELED
    alpha: float = ALPHA

    def to_html(self) -> str:
        """The whole page: one HTML document with its CSS, JavaScript and data inline."""
        from .html_view import render_document

        return render_document(self)

    def _repr_html_(self) -> str:
        from .html_view import render_fragment

        return render_fragment(self)

    def save(self, path: str | Path) -> None:
        """Write :meth:`to_html` to ``path`` atomically."""
        atomic_write_text(path, self.to_html())


def select_traces(traces: list, ids: list[str] | None, source: str) -> list:
    """The traces named by ``ids``, in the order given (all when None).

    Raises:
        InputError: an id is not in the file.
    """
    if ids is None:
        return traces
    by_id = {t.id: t for t in traces}
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise InputError(f"`ids` names traces {source} does not have: {', '.join(map(repr, missing))}", settings=("ids",))
    return [by_id[i] for i in ids]


def view_traces(
    model: str | Path,
    traces: str | Path,
    manifest: str | Path,
    *,
    ids: list[str] | None = None,
    max_traces: int | None = None,
    model_name: str | None = None,
    batch_size: int = 8,
    marker: str = "</think>",
    skip_invalid: bool = False,
    allow_finetuned: bool = False,
    dtype: str = "float32",
    device: str = "cpu",
    progress: bool = False,
) -> TraceView:
    """Score the steps of labeled ``traces`` under every head ``manifest`` ranks, as the sweep does.

    Traces are read, checked and tokenised before the model loads. One batched capture of the manifest's
    probed layers (:func:`~kfh_probe.sweep.collect_step_scores`) gives every ranked head's step scores;
    the ensemble is their mean over the manifest's top-N heads.

    Args:
        ids: show only these traces, in this order; max_traces: then at most this many, in file order.
        model_name: how the page names the model (default: the last part of ``model``'s path, so that a
            shared page does not show local folders).

    Raises:
        kfh_probe.traces.TraceFileError: broken traces and ``skip_invalid`` is False.
        kfh_probe.errors.InputError: an unknown id, or no usable trace.
        kfh_probe.manifest.ManifestMismatchError: the manifest was made for another model.
    """
    ranked = load_manifest(manifest)
    config = SweepConfig(layers=ranked["probe"]["layers"], batch_size=batch_size, marker=marker,
                         skip_invalid=skip_invalid)
    raw, _ = read_traces(traces, marker, skip_invalid)
    chosen = select_traces(raw, ids, str(traces))[:max_traces]
    tokenizer = load_tokenizer(model)
    prepared = prepare_traces(chosen, tokenizer, config, source=str(traces))
    if not prepared.traces:
        raise InputError(f"no usable trace in {traces}")
    loaded = load_model(model, dtype, device)
    check_model_matches(ranked, loaded, allow_finetuned=allow_finetuned)
    scores = collect_step_scores(loaded, prepared.tokenized, config, pad_token_id(tokenizer), progress, tokenizer,
                                 log=None)
    heads = [(h["layer"], h["head"]) for h in ranked["heads"]]
    rows = [config.layers.index(layer) for layer, _ in heads]
    columns = [head for _, head in heads]
    top_n = ranked["top_n"]
    shown = []
    for trace, tokenized, score in zip(prepared.traces, prepared.tokenized, scores):
        per_head = score[rows, columns]  # [ranked_head, step]
        answer_tokens = tokenized.answer_span[1] - tokenized.answer_span[0]
        shown.append(TraceScores(
            id=trace.id, prompt=trace.prompt, steps=[s.text for s in trace.steps], labels=[s.label for s in trace.steps],
            marker=marker, answer=split_at_marker(trace.response, marker)[1], head_scores=per_head,
            ensemble=per_head[:top_n].mean(dim=0), answer_tokens=answer_tokens, total_tokens=tokenized.length,
            baseline=step_baseline(P_LABELED, answer_tokens, tokenized.length),
        ))
    return TraceView(model=model_name or Path(model).name, heads=heads, sra=[h["sra"] for h in ranked["heads"]], top_n=top_n,
                     traces=shown)

