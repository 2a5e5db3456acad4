"""Step scores and Step Ranking Accuracy (method page, sections 3 and 4). Pure tensor functions.

A step's score for head (l, h) is the attention the final-answer rows pay to it, summed over the
answer rows and averaged over the step's tokens:

    S^{l,h}(s_k) = (1/|s_k|) * sum_{m in F} sum_{n in s_k} a^{l,h}[m -> n]

The SRA of a head is, per trace, the fraction of (essential, redundant) step pairs in which the
essential step scores higher (ties count 1/2) -- a per-trace AUC -- averaged over the traces that
have at least one pair.
"""

from __future__ import annotations

import torch


def step_scores(answer_attention: torch.Tensor, step_spans: list[tuple[int, int]]) -> torch.Tensor:
    """Mean, over each step's tokens, of the attention the answer rows pay to them.

    Args:
        answer_attention: ``[..., T]`` attention summed over the answer rows (any leading dims,
            e.g. ``[layers, heads, T]``).
        step_spans: ``[start, end)`` token span of each of the K steps.

    Returns:
        ``[..., K]`` step scores.
    """
    if not step_spans:
        return answer_attention.new_zeros((*answer_attention.shape[:-1], 0))
    for start, end in step_spans:
        if not 0 <= start < end <= answer_attention.shape[-1]:
            raise ValueError(f"step span [{start}, {end}) is empty or outside the {answer_attention.shape[-1]} positions")
    # A cumulative sum gives every span's total in one pass, however many steps there are.
    cumulative = torch.nn.functional.pad(answer_attention.double().cumsum(-1), (1, 0))
    starts = torch.tensor([s for s, _ in step_spans], device=answer_attention.device)
    ends = torch.tensor([e for _, e in step_spans], device=answer_attention.device)
    totals = cumulative[..., ends] - cumulative[..., starts]
    return (totals / (ends - starts)).to(answer_attention.dtype)


def pair_auc(scores: torch.Tensor, essential: torch.Tensor, redundant: torch.Tensor) -> torch.Tensor | None:
    """Per-trace AUC of essential over redundant steps, for many heads at once.

    Args:
        scores: ``[heads, K]`` step scores of one trace (any number of leading head rows).
        essential, redundant: ``[K]`` bool masks (unlabelled steps are in neither).

    Returns:
        ``[heads]`` fraction of (essential, redundant) pairs ordered correctly, ties 1/2; None when
        the trace has no pair.
    """
    ess = scores[:, essential]
    red = scores[:, redundant]
    if ess.shape[1] == 0 or red.shape[1] == 0:
        return None
    diff = ess[:, :, None] - red[:, None, :]
    wins = (diff > 0).double() + 0.5 * (diff == 0).double()
    return wins.mean(dim=(1, 2))


def per_trace_auc(
    trace_scores: list[torch.Tensor], labels: list[list[str | None]]
) -> tuple[torch.Tensor, list[int], int]:
    """Per-trace AUC of every head, for the traces that have at least one pair.

    Args:
        trace_scores: per trace, ``[heads, K_i]`` step scores (heads flattened, e.g. L*H).
        labels: per trace, K_i labels ("essential", "redundant" or None).

    Returns:
        ``(auc, used, pairs)``: ``auc`` is ``[traces_with_pairs, heads]`` float64, ``used`` the
        indices of those traces, ``pairs`` the number of (essential, redundant) pairs counted.
    """
    rows, used, pairs = [], [], 0
    for i, (scores, trace_labels) in enumerate(zip(trace_scores, labels)):
        if scores.shape[-1] != len(trace_labels):
            raise ValueError(f"trace {i}: {scores.shape[-1]} step scores but {len(trace_labels)} labels")
        essential = torch.tensor([lab == "essential" for lab in trace_labels], dtype=torch.bool)
        redundant = torch.tensor([lab == "redundant" for lab in trace_labels], dtype=torch.bool)
        auc = pair_auc(scores, essential, redundant)
        if auc is not None:
            rows.append(auc)
            used.append(i)
            pairs += int(essential.sum()) * int(redundant.sum())
    if not rows:
        width = trace_scores[0].shape[0] if trace_scores else 0
        return torch.zeros((0, width), dtype=torch.float64), used, 0
    return torch.stack(rows), used, pairs


def bootstrap_ci(auc: torch.Tensor, resamples: int = 1000, seed: int = 0, level: float = 0.95) -> torch.Tensor:
    """Percentile bootstrap interval of the mean over traces, for every head.

    Args:
        auc: ``[traces, heads]`` per-trace AUC.

    Returns:
        ``[heads, 2]`` lower and upper bounds (NaN when there are no traces).
    """
    traces, heads = auc.shape
    if traces == 0:
        return torch.full((heads, 2), float("nan"), dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    index = torch.randint(0, traces, (resamples, traces), generator=generator)
    means = auc[index].mean(dim=1)  # [resamples, heads]
    tail = (1 - level) / 2
    quantiles = torch.tensor([tail, 1 - tail], dtype=torch.float64)
    return torch.quantile(means, quantiles, dim=0).T


def ensemble_sra(trace_scores: list[torch.Tensor], labels: list[list[str | None]], heads: list[int]) -> float:
    """SRA of an ensemble: the step score is the mean over ``heads`` (rows of each ``trace_scores``)."""
    merged = [scores[heads].mean(dim=0, keepdim=True) for scores in trace_scores]
    auc, _, _ = per_trace_auc(merged, labels)
    return float(auc.mean()) if auc.shape[0] else float("nan")


def greedy_ensemble(
    trace_scores: list[torch.Tensor], labels: list[list[str | None]], max_size: int = 10, candidates: list[int] | None = None
) -> list[tuple[int, float]]:
    """Forward selection: add, one at a time, the head that most raises the ensemble's SRA.

    Returns:
        ``[(head_row, ensemble_sra_after_adding), ...]`` of length ``min(max_size, candidates)``.
    """
    pool = list(range(trace_scores[0].shape[0])) if candidates is None else list(candidates)
    chosen: list[int] = []
    sums = [torch.zeros(1, s.shape[1], dtype=torch.float64) for s in trace_scores]
    path: list[tuple[int, float]] = []
    while pool and len(chosen) < max_size:
        size = len(chosen) + 1
        # The mean over chosen+[c] for every candidate c at once: [candidates, K] per trace.
        trial = [(total + scores[pool].double()) / size for total, scores in zip(sums, trace_scores)]
        auc, _, _ = per_trace_auc(trial, labels)
        if auc.shape[0] == 0:
            break
        gains = auc.mean(dim=0)
        best = int(torch.argmax(gains))  # first of equals: deterministic
        head = pool.pop(best)
        chosen.append(head)
        sums = [total + scores[head : head + 1].double() for total, scores in zip(sums, trace_scores)]
        path.append((head, float(gains[best])))
    return path
