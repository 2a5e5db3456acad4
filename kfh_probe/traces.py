"""Reading and checking trace files (JSONL, one trace per line; format in the design page).

Every broken record is reported with its file, line number and id. By default a file with any broken
record is refused as a whole (:class:`TraceFileError` lists them all); with ``skip_invalid=True`` the
broken records are returned separately as :class:`SkippedTrace` so the caller can count and report them.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError, listed
from .io import jsonl_records
from .segmentation import SegmenterConfig, split_at_marker, think_opener

LABELS = ("essential", "redundant")


@dataclass(frozen=True)
class Step:
    """One reasoning step: its exact text and its label (None: unlabelled, kept out of SRA pairs)."""

    text: str
    label: str | None = None


@dataclass(frozen=True)
class Trace:
    """One model input and its response.

    Attributes:
        id: unique id within the file.
        prompt: the exact model input before the response (chat template already applied).
        response: reasoning, the end-of-thinking marker, the final answer.
        answer: reference final answer, if known.
        steps: the segmentation and labels, if given; texts concatenate to the reasoning part.
        line: 1-based line number in the file it came from (0 when built in memory).
        labeler: what produced the step labels (``kfh-probe label`` writes its labeller's name); None
            when the file does not say (the labels were given).
        segmenter: the settings of the segmenter that cut ``steps`` (``kfh-probe label`` on a trace
            without steps); None when the steps came with the file.
    """

    id: str
    prompt: str
    response: str
    answer: str | None = None
    steps: tuple[Step, ...] | None = None
    line: int = 0
    labeler: str | None = None
    segmenter: SegmenterConfig | None = None

    def to_record(self) -> dict:
        """The trace as a JSON-able record of the design page's format."""
        record: dict = {"id": self.id, "prompt": self.prompt, "response": self.response}
        if self.answer is not None:
            record["answer"] = self.answer
        if self.steps is not None:
            record["steps"] = [{"text": s.text, "label": s.label} for s in self.steps]
        if self.labeler is not None:
            record["labeler"] = self.labeler
        if self.segmenter is not None:
            record["segmenter"] = self.segmenter.to_dict()
        return record


@dataclass(frozen=True)
class SkippedTrace:
    """A record left out, with where it was and why."""

    line: int
    id: str | None
    reason: str

    def to_dict(self) -> dict:
        return {"line": self.line, "id": self.id, "reason": self.reason}


class TraceFileError(InputError):
    """A trace file with broken records; the one-line message lists each (the first 20) by file, line and id."""

    def __init__(self, path: str | Path, problems: list[SkippedTrace]):
        self.path = str(path)
        self.problems = problems
        shown = listed([f"{self.path}:{p.line} (id {p.id!r}): {p.reason}" for p in problems])
        super().__init__(
            f"{len(problems)} invalid trace record(s) in {self.path}: {shown}. "
            "Fix them, or use `skip_invalid` to leave them out (counted, with the reasons).",
            settings=("skip_invalid",),
        )


def parse_record(record: object, line: int, marker: str = "</think>") -> Trace:
    """Check one decoded JSON value against the trace format and return it as a :class:`Trace`.

    Raises:
        ValueError: with a message saying what is wrong (the caller adds file, line and id).
    """
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    for key in ("id", "prompt", "response"):
        if key not in record:
            raise ValueError(f"missing required field {key!r}")
    trace_id = record["id"]
    if not isinstance(trace_id, str) or not trace_id:
        raise ValueError(f"field 'id' must be a non-empty string, got {trace_id!r}")
    for key in ("prompt", "response"):
        if not isinstance(record[key], str):
            raise ValueError(f"field {key!r} must be a string")
    answer = record.get("answer")
    if answer is not None and not isinstance(answer, (str, int)):
        raise ValueError("field 'answer' must be a string")
    truncated = record.get("truncated", False)
    if not isinstance(truncated, bool):
        raise ValueError(f"field 'truncated' must be true or false, got {truncated!r}")
    if truncated:
        raise ValueError("the response is truncated (generation stopped at its token budget before the end of "
                         "the sequence), so its final answer is incomplete")
    response = record["response"]
    reasoning, _ = split_at_marker(response, marker)
    steps = None
    if record.get("steps") is not None:
        steps = _parse_steps(record["steps"], reasoning)
    labeler = record.get("labeler")
    if labeler is not None and not (isinstance(labeler, str) and labeler):
        raise ValueError(f"field 'labeler' must be a non-empty string, got {labeler!r}")
    segmenter = None
    if record.get("segmenter") is not None:
        if steps is None:
            raise ValueError("field 'segmenter' is given but there are no 'steps' it could have cut")
        try:
            segmenter = SegmenterConfig.from_dict(record["segmenter"])
        except ValueError as err:
            raise ValueError(f"field 'segmenter': {err}") from None
    return Trace(
        id=trace_id,
        prompt=record["prompt"],
        response=response,
        answer=None if answer is None else str(answer),
        steps=steps,
        line=line,
        labeler=labeler,
        segmenter=segmenter,
    )


def _parse_steps(raw: object, reasoning: str) -> tuple[Step, ...]:
    if not isinstance(raw, list) or not raw:
        raise ValueError("field 'steps' must be a non-empty list")
    steps = []
    for k, item in enumerate(raw):
        if not isinstance(item, dict) or not isinstance(item.get("text"), str):
            raise ValueError(f"step {k} must be an object with a string 'text'")
        if not item["text"]:
            raise ValueError(f"step {k} has empty text")
        label = item.get("label")
        if label is not None and label not in LABELS:
            raise ValueError(f"step {k} has label {label!r}; expected 'essential', 'redundant' or null")
        steps.append(Step(item["text"], label))
    joined = "".join(s.text for s in steps)
    if joined != reasoning:
        at = next((i for i, (a, b) in enumerate(zip(joined, reasoning)) if a != b), min(len(joined), len(reasoning)))
        raise ValueError(
            "step texts do not concatenate to the reasoning (the response before the marker): "
            f"they differ at character {at} (steps give {joined[at:at + 20]!r}, reasoning has "
            f"{reasoning[at:at + 20]!r})"
        )
    return tuple(steps)


def read_traces(
    path: str | Path, marker: str = "</think>", skip_invalid: bool = False
) -> tuple[list[Trace], list[SkippedTrace]]:
    """Read a JSONL trace file.

    Returns:
        ``(traces, skipped)``. ``skipped`` is empty unless ``skip_invalid``.

    Raises:
        InputError: the file does not exist.
        TraceFileError: some record is broken and ``skip_invalid`` is False.
    """
    traces: list[Trace] = []
    problems: list[SkippedTrace] = []
    seen: dict[str, int] = {}
    for line_no, record, problem in jsonl_records(path, "trace file"):
        trace_id = record["id"] if record is not None and isinstance(record.get("id"), str) else None
        if problem is None:
            try:
                trace = parse_record(record, line_no, marker)
                if trace.id in seen:
                    raise ValueError(f"duplicate id (first seen on line {seen[trace.id]})")
            except ValueError as err:
                problem = str(err)
        if problem is not None:
            problems.append(SkippedTrace(line_no, trace_id, problem))
            continue
        seen[trace.id] = line_no
        traces.append(trace)
    if problems and not skip_invalid:
        raise TraceFileError(path, problems)
    return traces, problems


def delete_steps(trace: Trace, drop: set[int], marker: str = "</think>") -> Trace:
    """``trace`` with the steps at ``drop`` removed from its reasoning; the prompt, the other steps (with
    their labels), the marker and the final answer stay as they were.

    A deleted first step leaves its leading think opener (``<think>`` for the marker ``</think>``) and the
    whitespace after it at the front of the reasoning, so the result keeps the format the model saw;
    the kept steps still concatenate exactly to the new reasoning.

    Raises:
        ValueError: the trace has no steps, or ``drop`` names a step it does not have.
    """
    if trace.steps is None:
        raise ValueError(f"trace {trace.id!r} has no steps to delete")
    if not drop <= set(range(len(trace.steps))):
        raise ValueError(f"trace {trace.id!r} has {len(trace.steps)} steps; cannot delete {sorted(drop)}")
    kept = [step for k, step in enumerate(trace.steps) if k not in drop]
    opener = think_opener(marker)
    head = re.match(re.escape(opener) + r"\s*", trace.steps[0].text) if opener else None
    if 0 in drop and head is not None:
        if kept:
            kept[0] = Step(head.group(0) + kept[0].text, kept[0].label)
        else:
            kept = [Step(head.group(0), None)]
    _, answer = split_at_marker(trace.response, marker)
    reasoning = "".join(step.text for step in kept)
    return dataclasses.replace(trace, response=reasoning + marker + answer, steps=tuple(kept) if kept else None)
