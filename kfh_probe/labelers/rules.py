"""Labellers that need no model: the file's own labels, the organism's ground truth, and the
post-answer rule."""

from __future__ import annotations

import re
from bisect import bisect_right
from itertools import accumulate

from ..grading import extract_final_answer
from ..segmentation import split_at_marker
from ..traces import Trace
from .base import Labeling, Labels


class GivenLabeler:
    """The labels already in the file; a trace without any step label is a failure."""

    name = "given"

    def label(self, traces: list[Trace]) -> Labeling:
        result = Labeling.empty(len(traces))
        for i, trace in enumerate(traces):
            labels = [s.label for s in trace.steps or ()]
            if not any(labels):
                result.fail(i, "no step has a label in the file (choose another labeller)")
            else:
                result.labels[i] = labels
        return result


def project_labels(source: list[tuple[str, str]], steps: list[str]) -> Labels:
    """Carry labels from one segmentation of a text onto another of the same text.

    Each source piece gives its label to the target step that holds most of its characters (the
    earlier one on a tie). A target step is essential when it receives an essential piece, redundant
    when it receives only redundant ones, and None when it receives none (a fragment of a piece that
    mostly lies elsewhere).

    Args:
        source: ``[(text, label), ...]`` whose texts concatenate to the same string as ``steps``.
        steps: the target segmentation.
    """
    bounds = [0, *accumulate(len(t) for t in steps)]
    received: list[set[str]] = [set() for _ in steps]
    pos = 0
    for text, label in source:
        start, end = pos, pos + len(text)
        pos = end
        if start == end:
            continue
        first = bisect_right(bounds, start) - 1
        last = bisect_right(bounds, end - 1) - 1
        overlap = [min(end, bounds[k + 1]) - max(start, bounds[k]) for k in range(first, last + 1)]
        received[first + overlap.index(max(overlap))].add(label)
    return ["essential" if "essential" in got else "redundant" if got else None for got in received]


class OrganismLabeler:
    """The organism task's ground truth (:func:`kfh_probe.organism.labeler.label_trace`), carried onto
    the trace's steps with :func:`project_labels` when they differ from the task's line steps.

    Counts ``unknown_steps`` (task lines that match no step form) and ``wrong_claims``.
    """

    name = "organism"

    def label(self, traces: list[Trace]) -> Labeling:
        from ..organism.labeler import TraceFormatError, label_trace

        result = Labeling.empty(len(traces))
        for i, trace in enumerate(traces):
            try:
                truth = label_trace(trace.prompt, trace.response)
            except TraceFormatError as err:
                result.fail(i, f"not a trace of the organism's task: {err}")
                continue
            result.counts["unknown_steps"] += truth.unknown_steps
            result.counts["wrong_claims"] += truth.wrong_claims
            steps = [s.text for s in trace.steps or ()]
            result.labels[i] = project_labels([(s["text"], s["label"]) for s in truth.steps], steps)
        return result


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def final_answer(trace: Trace, marker: str = "</think>") -> str | None:
    """The answer a step must state: the reference ``answer`` when given, else the model's own (the
    last ``\\boxed{}`` after the marker, ``kfh_probe.grading.extract_final_answer``, else the last number
    there)."""
    if trace.answer is not None and trace.answer.strip():
        return trace.answer.strip()
    boxed = extract_final_answer(trace.response, marker)
    if boxed is not None:
        return boxed
    numbers = _NUMBER.findall(split_at_marker(trace.response, marker)[1])
    return numbers[-1] if numbers else None


_SMALL_NUMBER_WORDS = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
    "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty",
)


def states_answer(text: str, answer: str) -> bool:
    """Whether ``answer`` occurs in ``text`` as a whole token (``55`` is not in ``155`` or ``5.55``).

    An integer answer from 0 to 20 also counts when written as an English word (``5`` and ``five``).
    """
    pattern = r"(?<![\w.])" + re.escape(answer) + r"(?![\w]|\.\d)"
    if re.search(pattern, text):
        return True
    if answer.isdigit() and int(answer) < len(_SMALL_NUMBER_WORDS):
        return re.search(rf"\b{_SMALL_NUMBER_WORDS[int(answer)]}\b", text, re.IGNORECASE) is not None
    return False


class PostAnswerLabeler:
    """Steps up to and including the first one that states the final answer are essential, the rest
    redundant. Cheap and crude: a step that mentions the answer's value by coincidence ends the
    essential part early, and anything after the answer counts as redundant even if it is needed."""

    name = "post-answer"

    def __init__(self, marker: str = "</think>"):
        self.marker = marker

    def label(self, traces: list[Trace]) -> Labeling:
        result = Labeling.empty(len(traces))
        for i, trace in enumerate(traces):
            answer = final_answer(trace, self.marker)
            steps = [s.text for s in trace.steps or ()]
            if answer is None:
                result.fail(i, "no reference 'answer' and no final answer after the marker")
                continue
            first = next((k for k, text in enumerate(steps) if states_answer(text, answer)), None)
            if first is None:
                result.fail(i, f"no step states the final answer {answer!r}")
                continue
            result.labels[i] = ["essential" if k <= first else "redundant" for k in range(len(steps))]
        return result
