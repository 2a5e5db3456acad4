"""Measure a built organism: accuracy, response lengths, redundant steps, and (``groups_t1``) how its
groups of samples look to group RL.

Answers are parsed from the generated text (the last ``\\boxed{}`` after exactly one ``</think>``,
``kfh_probe.grading``), never teacher-forced; steps are labeled by the task's grammar.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from kfh_probe.alignment import right_pad
from kfh_probe.io import shown_path
from kfh_probe.loading import load_model, load_tokenizer
from kfh_probe.organism import task_of
from kfh_probe.organism.labeler import credit_shares
from kfh_probe.organism.task import RECHECK_OPENERS, TASKS, THINK_CLOSE, generate_problems
from kfh_probe.organism.traces import Sample, respond, sample_records

REPORT_SEED = 20_250_101  # far from the build seeds, so report problems are fresh

GroupCredit = Callable[[Sequence[bool], Sequence[int]], Sequence[float]]
"""Advantages of one group from its responses' correctness and token lengths (the trainer's TLMRE
rewards with RLOO advantages, plugged in through the ``kfh_probe.group_credit`` entry point)."""


def group_credit() -> GroupCredit | None:
    """The group credit an installed trainer registers under the ``kfh_probe.group_credit`` entry point
    (``tlmre-rloo``: ``attnpo_train``'s TLMRE rewards with RLOO advantages), or None without one."""
    from importlib.metadata import entry_points

    found = entry_points(group="kfh_probe.group_credit", name="tlmre-rloo")
    return next(iter(found)).load() if found else None


def labeled_samples(model_dir: str | Path, n: int, seed: int, temperature: float | None = 1.0) -> tuple[list[dict], dict]:
    """Labeled trace dicts plus statistics over all ``n`` samples of the organism in ``model_dir`` on
    problems of its task (:func:`sample_stats`)."""
    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    spec = TASKS[task_of(model_dir)]
    samples = respond(model, tok, generate_problems(n, seed, spec), seed, temperature)
    stats = sample_stats(samples)
    stats["recheck_open_p"] = recheck_open_probability(model, tok, samples)
    return sample_records(samples, seed, spec), stats


def sample_stats(samples: list[Sample]) -> dict:
    """Accuracy, lengths, parse counts, redundancy by kind and (v5) re-reads over ``samples``."""
    accounts = [s.labeled.accounting() for s in samples if s.labeled is not None]
    labeled = [s.labeled for s in samples if s.labeled is not None]
    lengths = [s.n_tokens for s in samples]
    corrected = [s for s in samples if s.problem.correction is not None and s.labeled is not None]

    def mean_of(key: str) -> float:
        return statistics.fmean(a[key] for a in accounts) if accounts else 0.0

    return {
        "n": len(samples),
        "accuracy": statistics.fmean(s.correct for s in samples),
        "tokens_mean": statistics.fmean(lengths),
        "tokens_std": statistics.pstdev(lengths),
        "tokens_min": min(lengths),
        "tokens_max": max(lengths),
        "redundant_steps_mean": mean_of("redundant_steps"),
        "essential_steps_mean": mean_of("essential_steps"),
        "missing_essential_mean": mean_of("missing_essential"),
        "other_block_fraction": statistics.fmean(a["other"] > 0 for a in accounts) if accounts else 0.0,
        "minimal_fraction": statistics.fmean(a["redundant_steps"] == 0 for a in accounts) if accounts else 0.0,
        "rechecks_mean": mean_of("recheck"),
        "restates_mean": mean_of("restate"),
        "rereads_mean": statistics.fmean(t.kinds.count("reread") for t in labeled) if labeled else 0.0,
        "corrected_fraction": statistics.fmean(s.problem.correction is not None for s in samples),
        "skip_fraction": statistics.fmean(s.labeled.skipped_reread for s in corrected) if corrected else None,
        "parseable_fraction": len(accounts) / len(samples),
        "unlabelable_traces": len(samples) - len(accounts),
        "unknown_steps": sum(t.unknown_steps for t in labeled),
        "wrong_claims": sum(t.wrong_claims for t in labeled),
    }


@torch.no_grad()
def recheck_open_probability(model, tok, samples: list[Sample], batch_size: int = 50) -> float:
    """The model's mean probability of opening a re-check at a line start of the reasoning.

    At every position of a response's reasoning whose token ends a line (``<think>\\n`` included,
    ``</think>`` excluded), the next-token probability of the first token of any re-check opener
    (:data:`kfh_probe.organism.task.RECHECK_OPENERS`; no other step form starts with those tokens),
    teacher-forced on the response itself, averaged over all such line starts of all ``samples``.
    """
    first_ids = sorted({tok(opener, add_special_tokens=False)["input_ids"][0] for opener in RECHECK_OPENERS})
    close_id = tok.convert_tokens_to_ids(THINK_CLOSE)
    ends_line = {i for i in range(len(tok)) if tok.decode([i]).endswith("\n")}
    total, count = 0.0, 0
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        rows = [tok(s.prompt, add_special_tokens=False)["input_ids"] for s in chunk]
        responses = [tok(s.response, add_special_tokens=False)["input_ids"] for s in chunk]
        ids, mask = right_pad([p + r for p, r in zip(rows, responses)], tok.pad_token_id)
        probs = model(input_ids=ids, attention_mask=mask).logits.float().softmax(-1)[..., first_ids].sum(-1)
        for b, (p, r) in enumerate(zip(rows, responses)):
            reasoning = r[:r.index(close_id)] if close_id in r else r
            for k, token in enumerate(reasoning):
                if token in ends_line:
                    total += float(probs[b, len(p) + k])
                    count += 1
    return total / count if count else 0.0


def essential_tokens(tok, sample: Sample) -> int:
    """Response tokens whose first character lies in an essential step of ``sample`` (0 when unlabeled)."""
    if sample.labeled is None:
        return 0
    ends, essential, at = [], [], 0
    for step in sample.labeled.steps:
        at += len(step["text"])
        ends.append(at)
        essential.append(step["label"] == "essential")
    offsets = tok(sample.response, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    count = 0
    for start, _ in offsets:
        step = next((k for k, end in enumerate(ends) if start < end), None)
        count += step is not None and essential[step]
    return count


def groups_report(groups: list[list[Sample]], essential: list[list[int]], credit: GroupCredit | None) -> dict:
    """Statistics of groups of samples of one prompt each, as group RL sees them.

    Args:
        groups: the G samples of each prompt.
        essential: the essential-token count of each sample (:func:`essential_tokens`), by group.
        credit: advantages of a group from correctness and token lengths; ``None`` leaves the two credit
            shares out (``null``).

    Returns:
        ``accuracy``; ``mixed_prompt_fraction`` (prompts with 0 < p < 1); ``redundancy_correct_corr``
        (Pearson correlation of a response's redundant-step count and its correctness, both centred on
        their group's mean, pooled over groups); ``essential_token_var_share`` (the sum over groups of the
        within-group variance of essential tokens over that of response tokens); ``skip_fraction`` (of the
        responses to corrected questions, those that never re-read the question) and
        ``skip_accuracy_cost`` (accuracy of those that re-read minus those that skip, on corrected
        questions); ``redundant_in_positive_share`` (of all redundant steps, those in responses with a
        positive advantage under ``credit``) and ``essential_in_negative_share`` (of all essential steps,
        those in responses with a negative one).
    """
    correct = [[float(s.correct) for s in g] for g in groups]
    accounts = [[s.labeled.accounting() if s.labeled else {"redundant_steps": 0, "essential_steps": 0} for s in g]
                for g in groups]
    redundant = [[a["redundant_steps"] for a in row] for row in accounts]
    essential_steps = [[a["essential_steps"] for a in row] for row in accounts]
    tokens = [[s.n_tokens for s in g] for g in groups]
    centred_r = [x - statistics.fmean(row) for row in redundant for x in row]
    centred_c = [y - statistics.fmean(row) for row in correct for y in row]
    spread = (sum(x * x for x in centred_r) * sum(y * y for y in centred_c)) ** 0.5
    response_var = sum(statistics.pvariance(row) for row in tokens)
    corrected = [s for g in groups for s in g if s.problem.correction is not None and s.labeled is not None]
    read = [s.correct for s in corrected if not s.labeled.skipped_reread]
    skipped = [s.correct for s in corrected if s.labeled.skipped_reread]
    report = {
        "groups": len(groups),
        "group_size": len(groups[0]) if groups else 0,
        "accuracy": statistics.fmean(y for row in correct for y in row),
        "mixed_prompt_fraction": statistics.fmean(0 < statistics.fmean(row) < 1 for row in correct),
        "redundancy_correct_corr": sum(x * y for x, y in zip(centred_r, centred_c)) / spread if spread else 0.0,
        "essential_token_var_share": (sum(statistics.pvariance(row) for row in essential) / response_var
                                      if response_var else 0.0),
        "skip_fraction": len(skipped) / len(corrected) if corrected else None,
        "skip_accuracy_cost": (statistics.fmean(read) - statistics.fmean(skipped)) if read and skipped else None,
        "redundant_in_positive_share": None,
        "essential_in_negative_share": None,
    }
    if credit is not None:
        advantages = [a for c, t in zip(correct, tokens) for a in credit([bool(y) for y in c], t)]
        report.update(credit_shares(advantages, [r for row in redundant for r in row],
                                    [e for row in essential_steps for e in row]))
    return report


def sampled_groups(model_dir: str | Path, n: int, group_size: int, seed: int) -> tuple[list[list[Sample]], list[list[int]]]:
    """``group_size`` samples at temperature 1 of each of ``n`` fresh problems of the organism's task, and
    each sample's essential-token count."""
    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    problems = generate_problems(n, seed, TASKS[task_of(model_dir)])
    samples = respond(model, tok, [p for p in problems for _ in range(group_size)], seed, 1.0)
    groups = [samples[i:i + group_size] for i in range(0, len(samples), group_size)]
    return groups, [[essential_tokens(tok, s) for s in g] for g in groups]


def organism_report(model_dir: str | Path, n: int = 500, seed: int = REPORT_SEED, group_size: int | None = None,
                    credit: GroupCredit | None = None) -> dict:
    """Greedy and temperature-1.0 statistics on ``n`` fresh problems each; with ``group_size``, also
    ``groups_t1``: :func:`groups_report` of ``group_size`` samples of each of ``n // group_size`` problems."""
    report = {
        "model_dir": shown_path(model_dir),
        "task": task_of(model_dir),
        "seed": seed,
        "greedy": labeled_samples(model_dir, n, seed, None)[1],
        "sampled_t1": labeled_samples(model_dir, n, seed + 1, 1.0)[1],
    }
    if group_size is not None:
        groups, essential = sampled_groups(model_dir, max(1, n // group_size), group_size, seed + 2)
        report["groups_t1"] = groups_report(groups, essential, credit)
    return report
