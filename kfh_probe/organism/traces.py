"""Write ground-truth labeled organism traces as JSONL in the design page's trace format."""

from __future__ import annotations

import random
from pathlib import Path

from kfh_probe.io import atomic_write_jsonl
from kfh_probe.organism.task import generate_problem, step_texts, teacher_response, teacher_steps

LABELER = "organism"
"""What a trace file's ``labeler`` field says of the organism's labels: its ground truth (the teacher's
own step kinds, or the grammar parse of a model sample by ``kfh_probe.organism.labeler``)."""


def teacher_traces(n: int, seed: int) -> list[dict]:
    """``n`` teacher traces with ground-truth step labels (a pure function of ``seed``)."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        problem = generate_problem(rng)
        steps = teacher_steps(problem, rng)
        labels = ["essential" if s.essential else "redundant" for s in steps]
        records.append({
            "id": f"organism-teacher-{seed}-{i}",
            "prompt": problem.prompt(),
            "response": teacher_response(problem, steps),
            "answer": str(problem.answer),
            "steps": [{"text": t, "label": lab} for t, lab in zip(step_texts(steps), labels)],
            "labeler": LABELER,
        })
    return records


def write_organism_traces(path: str | Path, n: int, seed: int, source: str = "teacher",
                          model_dir: str | Path | None = None) -> int:
    """Write ``n`` labeled traces from the teacher or sampled from the model; return how many were written.

    Model samples without exactly one ``</think>`` are left out, so ``source="model"`` can write fewer.
    """
    if source == "teacher":
        records = teacher_traces(n, seed)
    elif source == "model":
        from kfh_probe.organism import default_model_dir
        from kfh_probe.organism.report import sample_labeled_traces

        records = sample_labeled_traces(model_dir or default_model_dir(), n, seed)
    else:
        raise ValueError(f"source must be 'teacher' or 'model', got {source!r}")
    atomic_write_jsonl(path, records)
    return len(records)
