"""What every labeller shares: the result type, segmentation of unsegmented traces, and the driver
that applies a labeller to a trace file's records and reports the traces it could not label.

A labeller is any object with a ``name`` and a ``label(traces) -> Labeling`` method. It receives
traces whose ``steps`` are set (from the file, or from the segmenter with ``label=None``) and
returns one label list per trace, or a reason why that trace cannot be labelled. A labeller raises
:class:`LabelerError` only for a failure that concerns the whole run (an unreachable judge, a
missing model), never for one trace.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Protocol

from ..errors import KFHError
from ..segmentation import SegmenterConfig, segment_reasoning, split_at_marker
from ..traces import SkippedTrace, Step, Trace, TraceFileError

Labels = list[str | None]


class LabelerError(KFHError, RuntimeError):
    """A failure of the whole labelling run (not of one trace), with a message the user can act on."""


@dataclass
class Labeling:
    """What a labeller made of a list of traces.

    Attributes:
        labels: per trace, one label per step (``"essential"``, ``"redundant"`` or None), or None
            when the trace could not be labelled.
        failures: trace index -> why it could not be labelled (exactly the indices whose labels are None).
        counts: labeller-specific counters for the summary (e.g. ``disputed_steps``).
    """

    labels: list[Labels | None]
    failures: dict[int, str] = field(default_factory=dict)
    counts: Counter = field(default_factory=Counter)

    @classmethod
    def empty(cls, n: int) -> "Labeling":
        return cls([None] * n)

    def fail(self, index: int, reason: str) -> None:
        self.labels[index] = None
        self.failures[index] = reason


class Labeler(Protocol):
    """Labels the steps of traces whose ``steps`` are set."""

    name: str

    def label(self, traces: list[Trace]) -> Labeling: ...


def with_steps(trace: Trace, segmenter: SegmenterConfig, marker: str = "</think>") -> Trace:
    """``trace`` with ``steps`` set: its own when it has them, else the segmenter's pieces unlabelled
    (and ``segmenter`` recorded in the trace, so a sweep can say where its steps came from).

    Raises:
        ValueError: the response lacks the marker or its reasoning is empty.
    """
    if trace.steps is not None:
        return trace
    reasoning, _ = split_at_marker(trace.response, marker)
    pieces = segment_reasoning(reasoning, segmenter)
    if not pieces:
        raise ValueError("the reasoning before the marker is empty: there is no step to label")
    return replace(trace, steps=tuple(Step(text) for text in pieces), segmenter=segmenter)


@dataclass
class LabelRun:
    """The labelled traces of a run and what was left out.

    Attributes:
        traces: the labelled traces, in file order.
        skipped: traces left out (segmentation or labelling failed), with line, id and reason.
        counts: labeller counters plus ``essential``, ``redundant`` and ``unlabelled`` step counts.
    """

    traces: list[Trace]
    skipped: list[SkippedTrace]
    counts: Counter

    def summary(self) -> str:
        c = self.counts
        extra = "".join(f", {k.replace('_', ' ')} {v}" for k, v in sorted(c.items())
                        if k not in ("essential", "redundant", "unlabelled"))
        return (f"{len(self.traces)} traces, {c['essential'] + c['redundant'] + c['unlabelled']} steps "
                f"({c['essential']} essential, {c['redundant']} redundant, {c['unlabelled']} null{extra}); "
                f"{len(self.skipped)} trace(s) skipped")


def run_labeler(
    traces: list[Trace],
    labeler: Labeler,
    segmenter: SegmenterConfig | None = None,
    marker: str = "</think>",
    skip_invalid: bool = False,
    source: str = "<memory>",
) -> LabelRun:
    """Segment where needed, label, and gather failures.

    Every labelled trace records what produced its labels (``Trace.labeler``): the labeller's name; the
    ``given`` labeller only checks the file's labels and keeps what the file said (nothing: unknown).

    Raises:
        TraceFileError: some trace could not be segmented or labelled and ``skip_invalid`` is False
            (the message names file, line and id of each).
        LabelerError: the labeller failed as a whole.
    """
    segmenter = segmenter or SegmenterConfig()
    ready: list[Trace] = []
    problems: list[SkippedTrace] = []
    for trace in traces:
        try:
            ready.append(with_steps(trace, segmenter, marker))
        except ValueError as err:
            problems.append(SkippedTrace(trace.line, trace.id, str(err)))
    labeling = labeler.label(ready) if ready else Labeling.empty(0)
    out: list[Trace] = []
    counts: Counter = Counter(labeling.counts)
    for i, trace in enumerate(ready):
        labels = labeling.labels[i]
        if labels is None:
            problems.append(SkippedTrace(trace.line, trace.id, f"{labeler.name} labeller: {labeling.failures.get(i, 'no labels')}"))
            continue
        assert trace.steps is not None and len(labels) == len(trace.steps), "a labeller returned the wrong number of labels"
        producer = trace.labeler if labeler.name == "given" else labeler.name
        out.append(replace(trace, steps=tuple(Step(s.text, lab) for s, lab in zip(trace.steps, labels)), labeler=producer))
        for lab in labels:
            counts[lab or "unlabelled"] += 1
    problems.sort(key=lambda p: p.line)
    if problems and not skip_invalid:
        raise TraceFileError(source, problems)
    for key in ("essential", "redundant", "unlabelled"):
        counts.setdefault(key, 0)
    return LabelRun(out, problems, counts)
