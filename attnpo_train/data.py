"""Prompts: JSONL prompt files (``load_prompts``) and where a run draws its prompts from (``PromptSource``:
a fixed list, or the embedded organism's task generator)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from kfh_probe import InputError, jsonl_records, listed


class DataError(InputError):
    """A prompt file with rows that cannot be trained or evaluated on (each row named by line)."""


@dataclass(frozen=True)
class Prompt:
    """One training or evaluation prompt: exact model input text and its reference answer."""

    id: str
    text: str
    answer: str


def organism_prompts(n: int, seed: int, task: str = "v4", name: str = "organism") -> list[Prompt]:
    """``n`` problems of the organism task ``task`` (``kfh_probe.TASKS``), a pure function of ``seed``, as
    prompts with ids ``<name>-0``, ``<name>-1``, ..."""
    from kfh_probe import TASKS, generate_problems

    return [Prompt(f"{name}-{i}", p.prompt(), str(p.answer)) for i, p in enumerate(generate_problems(n, seed, TASKS[task]))]


def load_prompts(path: str | Path) -> list[Prompt]:
    """Read a JSONL file of ``{"prompt": str, "answer": str or number, "id": optional}`` rows.

    Blank lines are skipped. Every row without a checkable answer (missing, empty, not a string or a
    number) or without a non-empty string prompt is collected, and all of them are reported at once.

    Raises:
        DataError: naming the file and each bad row by line number (and id when it has one).
    """
    prompts: list[Prompt] = []
    problems: list[str] = []
    for number, row, problem in jsonl_records(path, "data file", DataError):
        if problem is not None:
            problems.append(f"line {number}: {problem}")
            continue
        where = f"line {number}" + (f" (id {row['id']!r})" if "id" in row else "")
        prompt, answer = row.get("prompt"), row.get("answer")
        if not isinstance(prompt, str) or not prompt:
            problems.append(f"{where}: 'prompt' is missing or not a non-empty string")
            continue
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            problems.append(f"{where}: no checkable answer ('answer' is missing or not a string or number)")
            continue
        if not str(answer).strip():
            problems.append(f"{where}: no checkable answer ('answer' is empty)")
            continue
        prompts.append(Prompt(str(row.get("id", f"line-{number}")), prompt, str(answer).strip()))
    if problems:
        raise DataError(f"{path}: {len(problems)} row(s) cannot be used: {listed(problems)}")
    if not prompts:
        raise DataError(f"{path}: no prompts (the file is empty)")
    return prompts


class PromptSource:
    """Where a run's prompts come from: a fixed list (sampled without replacement within a step) or,
    when ``prompts`` is None, fresh problems from the generator of the organism task ``task``
    (``kfh_probe.organism.task.TASKS``)."""

    def __init__(self, prompts: list[Prompt] | None, task: str = "v4") -> None:
        self.prompts = prompts
        self.task = task

    @property
    def organism_task(self) -> str | None:
        """The organism task whose problems are drawn (None for a fixed list)."""
        return self.task if self.prompts is None else None

    def draw(self, rng: random.Random, k: int) -> list[Prompt]:
        """``k`` prompts, a pure function of ``rng``'s state (which it advances)."""
        if self.prompts is None:
            from kfh_probe import TASKS, generate_problem

            problems = [generate_problem(rng, TASKS[self.task]) for _ in range(k)]
            return [Prompt(f"organism-{i}", p.prompt(), str(p.answer)) for i, p in enumerate(problems)]
        if k <= len(self.prompts):
            return rng.sample(self.prompts, k)
        return [rng.choice(self.prompts) for _ in range(k)]
