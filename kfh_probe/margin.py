"""The reasoning baseline of AttnPO's step credit, and its margin calibrated on labeled traces.

AttnPO's paper baseline compares a step's score S_k with |F|/|o|, the score of uniform attention over every
key (sink, prompt, answer and reasoning alike). The reasoning baseline compares it instead with the head's
own mean over the reasoning: per head h, b_h = M_R,h / |R|, where M_R,h is the answer rows' total attention
on the reasoning tokens R (the tokens of the steps) and |R| their count, i.e. the token-weighted mean of the
head's step scores. A step's relative score is the mean over the heads of S_k,h / b_h (each head divided
before the heads are averaged, so a head that sends most of its attention to the sink counts as much as
one that reads the reasoning), and a step falls below the bar at p = 1 when its relative score is below a
margin tau. ``margin_block`` picks tau on the sweep's labeled traces (the manifest's ``margins``) and
reports, for the same steps, how the paper's baseline sorts them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

MARGIN_RULE = ("tau maximises the fraction of redundant steps below the bar plus the fraction of essential steps "
               "above it (Youden's J), over the labeled steps of every trace at p = 1, for the top-k heads by SRA")


def uniform_bar(answer_len: torch.Tensor, total_len: torch.Tensor) -> torch.Tensor:
    """The paper's bar at p = 1: |F| / |o|, the score a step would get if the answer rows attended uniformly
    over every key (method page section 6).

    Args:
        answer_len: [N] |F|, tokens after the end-of-thinking marker (EOS included), >= 1.
        total_len: [N] |o|, prompt plus response tokens, >= answer_len.
    Returns:
        float64 tensor [N] (the exact quotient; the trainer's float32 comparison rounds it once).
    """
    answer_len = torch.as_tensor(answer_len, dtype=torch.float64)
    total_len = torch.as_tensor(total_len, dtype=torch.float64)
    if answer_len.shape != total_len.shape or answer_len.ndim != 1:
        raise ValueError(f"answer_len and total_len must both have shape [N]; got {tuple(answer_len.shape)}, "
                         f"{tuple(total_len.shape)}")
    if (answer_len < 1).any() or (total_len < answer_len).any():
        raise ValueError(
            f"need 1 <= answer_len <= total_len; got answer_len={answer_len.tolist()}, total_len={total_len.tolist()}"
        )
    return answer_len / total_len


def relative_step_scores(head_step_scores: torch.Tensor, step_lengths: Sequence[int]) -> torch.Tensor:
    """Each step's score relative to its head's mean over the reasoning tokens, averaged over the heads.

    Args:
        head_step_scores: ``[head, step]`` step scores S_k,h (``kfh_probe.step_scores``: mean over the step's
            tokens of the attention summed over the answer rows).
        step_lengths: the K steps' lengths in tokens (|R| is their sum).
    Returns:
        ``[step]`` float32: mean over heads of S_k,h / b_h with b_h = sum_k len_k S_k,h / sum_k len_k. A head
        that pays the reasoning no attention at all (b_h = 0) counts every step as 1 (no evidence either way).
    """
    scores = torch.as_tensor(head_step_scores, dtype=torch.float64)
    lengths = torch.as_tensor(list(step_lengths), dtype=torch.float64)
    if scores.ndim != 2 or scores.shape[1] != lengths.shape[0]:
        raise ValueError(f"need [head, step] scores and one length per step; got scores {tuple(scores.shape)} "
                         f"and {lengths.shape[0]} lengths")
    if lengths.shape[0] == 0 or (lengths < 1).any():
        raise ValueError(f"need at least one step and positive step lengths; got {lengths.tolist()}")
    head_means = (scores * lengths).sum(dim=1, keepdim=True) / lengths.sum()  # [head, 1]: b_h
    ratios = torch.where(head_means > 0, scores / head_means.clamp_min(1e-300), torch.ones_like(scores))
    return ratios.mean(dim=0).float()


def best_margin(essential: Sequence[float], redundant: Sequence[float]) -> float:
    """The margin tau that best separates two sets of relative scores: a step is below the bar when its score
    is < tau; tau maximises (redundant below) / |redundant| + (essential at or above) / |essential|.

    Candidates are the midpoints between consecutive distinct scores (and one past each end); the smallest
    best one is returned, so equal inputs give equal results.
    """
    if not essential or not redundant:
        raise ValueError("need at least one essential and one redundant step to calibrate a margin")
    values = sorted(set(essential) | set(redundant))
    candidates = [values[0] - 1.0] + [(a + b) / 2 for a, b in zip(values, values[1:])] + [values[-1] + 1.0]
    ess = torch.tensor(sorted(essential), dtype=torch.float64)
    red = torch.tensor(sorted(redundant), dtype=torch.float64)
    best, best_j = candidates[0], -1.0
    for tau in candidates:
        j = float((red < tau).double().mean() + (ess >= tau).double().mean())
        if j > best_j + 1e-12:
            best, best_j = tau, j
    return best


def fractions_below(essential: Sequence[float], redundant: Sequence[float], bars: tuple[Sequence[float], Sequence[float]]
                    ) -> dict[str, float]:
    """The fraction of essential and of redundant steps whose score lies below its bar.

    Args:
        essential, redundant: the steps' scores.
        bars: the bar of each essential step and of each redundant step (same orders).
    """
    below = lambda scores, limits: sum(s < b for s, b in zip(scores, limits)) / len(scores)  # noqa: E731
    return {"essential_below": round(below(essential, bars[0]), 6), "redundant_below": round(below(redundant, bars[1]), 6)}


def margin_block(
    trace_scores: list[torch.Tensor],
    labels: list[list[str | None]],
    step_lengths: list[list[int]],
    uniform_bars: list[float],
    ranked_heads: Sequence[int],
    sizes: int,
) -> dict:
    """The manifest's ``margins``: for k = 1..``sizes`` top heads, the calibrated tau of the reasoning baseline
    and how both baselines sort the labeled steps at p = 1.

    Args:
        trace_scores: per trace ``[head_row, step]`` step scores of every probed head (rows as ``ranked_heads``).
        labels: per trace, each step's label ("essential", "redundant" or None).
        step_lengths: per trace, each step's length in tokens.
        uniform_bars: per trace, the paper's baseline at p = 1, |F| / |o|.
        ranked_heads: head rows, best SRA first.
        sizes: the largest k.
    Returns:
        {"rule", "steps": {"essential", "redundant"}, "by_heads": [{"heads": k, "tau", "reasoning":
        {"essential_below", "redundant_below"}, "uniform": {...}}, ...]}.
    """
    by_heads = []
    counts = {"essential": 0, "redundant": 0}
    for k in range(1, min(sizes, len(ranked_heads)) + 1):
        rows = list(ranked_heads[:k])
        relative = {"essential": [], "redundant": []}
        raw = {"essential": [], "redundant": []}
        uniform = {"essential": [], "redundant": []}
        for scores, trace_labels, lengths, bar in zip(trace_scores, labels, step_lengths, uniform_bars):
            picked = scores[rows].float()
            rel = relative_step_scores(picked, lengths).tolist()
            mean = picked.mean(dim=0).tolist()
            for label, r, s in zip(trace_labels, rel, mean):
                if label in relative:
                    relative[label].append(r)
                    raw[label].append(s)
                    uniform[label].append(bar)
        counts = {label: len(values) for label, values in relative.items()}
        tau = best_margin(relative["essential"], relative["redundant"])
        ones = lambda label: [tau] * counts[label]  # noqa: E731
        by_heads.append({
            "heads": k,
            "tau": round(tau, 6),
            "reasoning": fractions_below(relative["essential"], relative["redundant"], (ones("essential"), ones("redundant"))),
            "uniform": fractions_below(raw["essential"], raw["redundant"], (uniform["essential"], uniform["redundant"])),
        })
    return {"rule": MARGIN_RULE, "steps": counts, "by_heads": by_heads}


def margin_for(manifest: dict, heads: int, source: str = "the manifest") -> float:
    """The calibrated tau of the reasoning baseline for the top ``heads`` heads of a manifest.

    Raises:
        kfh_probe.errors.InputError: the manifest has no ``margins`` (made before they were recorded: re-run
            ``kfh-probe sweep``) or none for that many heads.
    """
    from .errors import InputError

    block = manifest.get("margins")
    if block is None:
        raise InputError(f"{source} records no calibrated margin, which `baseline: reasoning` needs: "
                         "re-run `kfh-probe sweep` to write one, or use `baseline: uniform`")
    for entry in block["by_heads"]:
        if entry["heads"] == heads:
            return float(entry["tau"])
    known = [e["heads"] for e in block["by_heads"]]
    raise InputError(f"{source} calibrates the margin for the top {known[0]}..{known[-1]} heads, not {heads}: "
                     f"set top_n_heads within that range, or use `baseline: uniform`")
