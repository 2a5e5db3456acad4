"""LLM judges: a prompt per trace, a JSON verdict per step from each judge, and their consensus.

The prompt template (``kfh_probe/data/judge_prompt.txt`` by default) is a :class:`string.Template`
with ``$question`` (the trace's prompt), ``$steps`` (the steps numbered ``[1] ...`` from 1),
``$num_steps`` and ``$answer`` (the response after the marker); ``$steps`` is required. It is sent
as the single user message.

A judge must reply ``{"steps": [{"step": 1, "label": "essential"}, ...]}`` with one entry per step
(surrounding text and code fences are tolerated). A reply that does not parse is asked again, up to
``malformed_retries`` times, bypassing the cache and sampling (a greedy re-ask would repeat the
reply); if it still does not parse the trace fails with
the judge's name and the parse error (an error, or a counted skip with ``--skip-invalid``).

Consensus over J judges, per step:

- ``all``: the label when every judge gives it; otherwise None (disputed).
- ``majority``: the label more than half of the judges give; otherwise None (a tie is disputed).

Disputed steps are counted (``disputed_steps``) and stay in the file with label null, so a sweep
keeps them out of SRA pairs.
"""

from __future__ import annotations

import json
import re
import string
import sys
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from importlib import resources
from pathlib import Path

from tqdm.auto import tqdm

from ..errors import InputError, KFHError
from ..segmentation import split_at_marker
from ..traces import LABELS, Trace
from .base import Labeling, Labels
from .judge_client import ChatJudge, LocalJudge, Messages

Judge = ChatJudge | LocalJudge
CONSENSUS = ("all", "majority")
_PLACEHOLDERS = {"question", "steps", "num_steps", "answer"}


class VerdictError(KFHError, ValueError):
    """A judge reply that is not a verdict for every step."""


def load_template(path: str | Path | None = None) -> string.Template:
    """The prompt template from ``path``, or the packaged default.

    Raises:
        InputError: ``path`` does not exist, or the template lacks ``$steps`` or uses an unknown ``$name``.
    """
    if path is None:
        text = resources.files("kfh_probe").joinpath("data/judge_prompt.txt").read_text(encoding="utf-8")
        where = "the packaged judge prompt"
    else:
        if not Path(path).is_file():
            raise InputError(f"prompt template not found: {path}")
        text, where = Path(path).read_text(encoding="utf-8"), str(path)
    template = string.Template(text)
    names = {m.group("named") or m.group("braced") for m in template.pattern.finditer(text)} - {None}
    unknown = names - _PLACEHOLDERS
    if unknown:
        raise InputError(f"{where}: unknown placeholder(s) {sorted('$' + n for n in unknown)}; "
                         f"available: {sorted('$' + n for n in _PLACEHOLDERS)} (write $$ for a literal $)")
    if "steps" not in names:
        raise InputError(f"{where}: the template must contain $steps (the numbered reasoning steps)")
    return template


def numbered_steps(steps: list[str]) -> str:
    """``"[1] first step\\n\\n[2] second step ..."`` with each step's surrounding whitespace trimmed."""
    return "\n\n".join(f"[{k}] {text.strip()}" for k, text in enumerate(steps, start=1))


def judge_messages(template: string.Template, trace: Trace, marker: str = "</think>") -> Messages:
    """The chat messages that ask a judge about ``trace``'s steps."""
    steps = [s.text for s in trace.steps or ()]
    content = template.substitute(
        question=trace.prompt.strip(), steps=numbered_steps(steps), num_steps=len(steps),
        answer=split_at_marker(trace.response, marker)[1].strip(),
    )
    return [{"role": "user", "content": content}]


def parse_verdict(content: str, num_steps: int) -> Labels:
    """The labels of a judge reply, in step order.

    Raises:
        VerdictError: no JSON object, wrong step numbers, or a label other than essential/redundant.
    """
    text = re.sub(r"```(?:json)?", "", content)
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end < start:
        raise VerdictError(f"no JSON object in the reply {content[:80]!r}")
    try:
        verdict = json.loads(text[start:end + 1])
    except json.JSONDecodeError as err:
        raise VerdictError(f"reply is not valid JSON ({err.msg}): {content[:80]!r}") from None
    entries = verdict.get("steps") if isinstance(verdict, dict) else None
    if not isinstance(entries, list):
        raise VerdictError("reply has no 'steps' list")
    labels: dict[int, str] = {}
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("step"), int):
            raise VerdictError(f"entry {entry!r} has no integer 'step'")
        label = str(entry.get("label", "")).strip().lower()
        if label not in LABELS:
            raise VerdictError(f"step {entry['step']} has label {entry.get('label')!r}; expected essential or redundant")
        labels[entry["step"]] = label
    if sorted(labels) != list(range(1, num_steps + 1)) or len(entries) != num_steps:
        raise VerdictError(f"reply labels steps {sorted(labels)}; expected each of 1..{num_steps} once")
    return [labels[k] for k in range(1, num_steps + 1)]


def consensus(votes: list[Labels], mode: str) -> tuple[Labels, int]:
    """Combine the judges' labels per step.

    Args:
        votes: per judge, one label per step.
        mode: ``"all"`` or ``"majority"`` (module docstring).

    Returns:
        ``(labels, disputed)``: the combined labels (None where disputed) and how many are disputed.
    """
    if mode not in CONSENSUS:
        raise ValueError(f"consensus must be one of {CONSENSUS}, got {mode!r}")
    need = len(votes) if mode == "all" else len(votes) // 2 + 1
    labels: Labels = []
    for step_votes in zip(*votes):
        label, count = Counter(step_votes).most_common(1)[0]
        labels.append(label if count >= need else None)
    return labels, sum(lab is None for lab in labels)


class JudgeLabeler:
    """Labels from one or more judges, asked concurrently (``workers`` requests in flight at most)."""

    name = "judge"

    def __init__(self, judges: list[Judge], template: string.Template, mode: str = "all", workers: int = 4,
                 malformed_retries: int = 2, marker: str = "</think>", progress: bool = True):
        if not judges:
            raise ValueError("JudgeLabeler needs at least one judge")
        if mode not in CONSENSUS:
            raise ValueError(f"consensus must be one of {CONSENSUS}, got {mode!r}")
        self.judges, self.template, self.mode = judges, template, mode
        self.workers, self.malformed_retries = max(1, workers), max(0, malformed_retries)
        self.marker, self.progress = marker, progress

    def verdict(self, judge: Judge, messages: Messages, num_steps: int) -> tuple[Labels | None, str, int]:
        """``(labels or None, last parse error, malformed replies)`` of one judge on one trace."""
        error, malformed = "", 0
        for attempt in range(self.malformed_retries + 1):
            content = judge.ask(messages, attempt)
            try:
                labels = parse_verdict(content, num_steps)
            except VerdictError as err:
                error, malformed = str(err), malformed + 1
                continue
            judge.remember(messages, content)
            return labels, "", malformed
        return None, error, malformed

    def label(self, traces: list[Trace]) -> Labeling:
        result = Labeling.empty(len(traces))
        requests_before = sum(j.requests for j in self.judges)
        messages = [judge_messages(self.template, t, self.marker) for t in traces]
        votes: dict[tuple[int, int], tuple[Labels | None, str, int]] = {}
        bar = tqdm(total=len(traces) * len(self.judges), unit="verdict", desc="judge", disable=not self.progress,
                   file=sys.stderr, dynamic_ncols=True)
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            futures = {
                pool.submit(self.verdict, judge, messages[i], len(trace.steps or ())): (i, j)
                for i, trace in enumerate(traces) for j, judge in enumerate(self.judges)
            }
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    if future.exception() is not None:
                        pool.shutdown(wait=True, cancel_futures=True)
                        raise future.exception()  # JudgeUnavailable: the whole run fails
                    votes[futures[future]] = future.result()
                    bar.update(1)
        bar.close()
        for i in range(len(traces)):
            per_judge = [votes[(i, j)] for j in range(len(self.judges))]
            result.counts["malformed_replies"] += sum(v[2] for v in per_judge)
            failed = [(self.judges[j].label, v[1]) for j, v in enumerate(per_judge) if v[0] is None]
            if failed:
                result.fail(i, "; ".join(f"judge {name} gave no usable verdict after "
                                         f"{self.malformed_retries + 1} tries: {err}" for name, err in failed))
                continue
            labels, disputed = consensus([v[0] for v in per_judge], self.mode)
            result.labels[i] = labels
            result.counts["disputed_steps"] += disputed
        result.counts["judge_requests"] += sum(j.requests for j in self.judges) - requests_before
        return result
