"""Ground-truth labeled organism traces in the design page's trace format: from the teacher, or
sampled from a built organism and labeled by the task's grammar (:mod:`kfh_probe.organism.labeler`).

Generation is the project's sampler (``kfh_probe.sampling.generate_rollouts``: batched ``model.generate``
with left padding and the KV cache). A model folder's task version (:func:`kfh_probe.organism.task_of`)
decides which problems it is given.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from kfh_probe.io import atomic_write_jsonl
from kfh_probe.loading import load_model, load_tokenizer
from kfh_probe.organism import task_of
from kfh_probe.organism.labeler import LabeledTrace, TraceFormatError, label_trace
from kfh_probe.organism.task import TASKS, Problem, TaskSpec, generate_problem, generate_problems, teacher_response, teacher_steps
from kfh_probe.sampling import generate_rollouts

LABELER = "organism"
"""What a trace file's ``labeler`` field says of the organism's labels: its ground truth (the teacher's
own step kinds, or the grammar parse of a model sample by ``kfh_probe.organism.labeler``)."""
MAX_NEW_TOKENS = 448


def trace_record(trace_id: str, problem: Problem, response: str, labeled: LabeledTrace, spec: TaskSpec) -> dict:
    """One design-format trace record with the organism's ground-truth steps; a task with re-reads (v5)
    adds ``reread``: ``null`` when the response never re-reads the question, else whether the re-read
    was ``essential`` (the question has a correction) and whether it ``changed_answer``."""
    record = {"id": trace_id, "prompt": problem.prompt(), "response": response, "answer": str(problem.answer),
              "steps": labeled.steps, "labeler": LABELER}
    if spec.reread_p:
        record["reread"] = labeled.reread()
    return record


def teacher_traces(n: int, seed: int, task: str = "v4") -> list[dict]:
    """``n`` teacher traces of task version ``task`` with ground-truth step labels (a pure function of ``seed``)."""
    rng = random.Random(seed)
    spec = TASKS[task]
    records = []
    for i in range(n):
        problem = generate_problem(rng, spec)
        response = teacher_response(problem, teacher_steps(problem, rng, spec))
        records.append(trace_record(f"organism-teacher-{seed}-{i}", problem, response,
                                    label_trace(problem.prompt(), response), spec))
    return records


@dataclass
class Sample:
    """One generated response: its problem, text (EOS text included when it stopped), token count, and
    its ground-truth labels (``None`` when the response has no single ``</think>``)."""

    problem: Problem
    response: str
    n_tokens: int
    labeled: LabeledTrace | None

    @property
    def prompt(self) -> str:
        return self.problem.prompt()

    @property
    def answer(self) -> int:
        return self.problem.answer

    @property
    def correct(self) -> bool:
        return self.labeled is not None and self.labeled.predicted == self.problem.answer


def respond(model, tok, problems: list[Problem], seed: int, temperature: float | None = None,
            batch_size: int = 125) -> list[Sample]:
    """The model's labeled responses to ``problems`` (``generate_rollouts`` in batches of ``batch_size``,
    sampling seeded with ``seed``; greedy when ``temperature`` is None). A response that stopped keeps its
    EOS text, as the organism's traces do."""
    torch.manual_seed(seed)
    prompts = [p.prompt() for p in problems]
    rollouts = generate_rollouts(model, tok, prompts, 1, MAX_NEW_TOKENS, temperature, batch_size=batch_size)
    samples = []
    for problem, prompt, text, done, ids in zip(problems, prompts, rollouts.texts, rollouts.finished,
                                                rollouts.response_ids, strict=True):
        response = text + tok.eos_token if done else text
        try:
            labeled = label_trace(prompt, response)
        except TraceFormatError:
            labeled = None
        samples.append(Sample(problem, response, len(ids), labeled))
    return samples


def sample_records(samples: list[Sample], seed: int, spec: TaskSpec) -> list[dict]:
    """The trace records of the labeled ``samples`` of task ``spec`` (ids ``organism-model-SEED-I`` by
    position; samples without exactly one ``</think>`` cannot carry steps and are left out)."""
    return [trace_record(f"organism-model-{seed}-{i}", s.problem, s.response, s.labeled, spec)
            for i, s in enumerate(samples) if s.labeled is not None]


def sample_labeled_traces(model_dir: str | Path, n: int, seed: int, temperature: float = 1.0) -> list[dict]:
    """Design-format trace dicts (``id``, ``prompt``, ``response``, ``answer``, ``steps``, ...) sampled from
    the organism in ``model_dir`` on ``n`` problems of its task (a pure function of ``seed``)."""
    spec = TASKS[task_of(model_dir)]
    problems = generate_problems(n, seed, spec)
    samples = respond(load_model(model_dir), load_tokenizer(model_dir), problems, seed, temperature)
    return sample_records(samples, seed, spec)


def write_organism_traces(path: str | Path, n: int, seed: int, source: str = "teacher",
                          model_dir: str | Path | None = None, organism: str = "v4") -> int:
    """Write ``n`` labeled traces from the teacher of ``organism``'s task or sampled from the model (the
    shipped ``organism`` when ``model_dir`` is None); return how many were written.

    Model samples without exactly one ``</think>`` are left out, so ``source="model"`` can write fewer.
    """
    if source == "teacher":
        records = teacher_traces(n, seed, organism)
    elif source == "model":
        from kfh_probe.organism import default_model_dir

        records = sample_labeled_traces(model_dir or default_model_dir(organism), n, seed)
    else:
        raise ValueError(f"source must be 'teacher' or 'model', got {source!r}")
    atomic_write_jsonl(path, records)
    return len(records)
