"""Step scores and Step Ranking Accuracy (method page, sections 3 and 4). Pure tensor functions.

A step's score for head (l, h) is the attention the final-answer rows pay to it, summed over the
answer rows and averaged over the step's tokens:

    S^{l,h}(s_k) = (1/|s_k|) * sum_{m in F} sum_{n in s_k} a^{l,h}[m -> n]

The SRA of a head is, per trace, the fraction of (essential, redundant) step pairs in which the
essential step scores higher (ties count 1/2) -- a per-trace AUC -- averaged over the traces that
have at least one pair.

Controls (manifest version 2): the same AUC over only the pairs whose redundant step comes after
(or before) the essential one, a permutation null, and the split-half reliability of the ranking.
"""

from __future__ import annotations

import numpy as np
import torch

DIRECTIONS = ("after", "before")


def step_scores(answer_attention: torch.Tensor, step_spans: list[tuple[int, int]]) -> torch.Tensor:
    """Mean, over each step's tokens, of the attention the answer rows pay to them.

    Args:
        answer_attention: ``[..., key]`` attention summed over the answer rows (any leading dims,
            e.g. ``[layer, head, key]``).
        step_spans: ``[start, end)`` token span of each of the K steps.

    Returns:
        ``[..., step]`` step scores.
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


def _pair_mask(essential: torch.Tensor, redundant: torch.Tensor, direction: str | None) -> torch.Tensor:
    """``[essential, redundant]`` bool: which (essential, redundant) step pairs count (all; or redundant after /
    before)."""
    ess_at = essential.nonzero().flatten()
    red_at = redundant.nonzero().flatten()
    if direction is None:
        return torch.ones((len(ess_at), len(red_at)), dtype=torch.bool)
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be None, 'after' or 'before', got {direction!r}")
    later = red_at[None, :] > ess_at[:, None]
    return later if direction == "after" else ~later


def pair_auc(
    scores: torch.Tensor, essential: torch.Tensor, redundant: torch.Tensor, direction: str | None = None
) -> torch.Tensor | None:
    """Per-trace AUC of essential over redundant steps, for many heads at once.

    Args:
        scores: ``[head, step]`` step scores of one trace (any number of leading head rows).
        essential, redundant: ``[step]`` bool masks (unlabelled steps are in neither).
        direction: None counts every pair; ``"after"`` only the pairs whose redundant step comes
            later in the trace than the essential one, ``"before"`` only those where it comes earlier.

    Returns:
        ``[head]`` fraction of the counted pairs ordered correctly, ties 1/2; None when the trace
        has no such pair.
    """
    mask = _pair_mask(essential, redundant, direction)
    if not bool(mask.any()):
        return None
    diff = scores[:, essential][:, :, None] - scores[:, redundant][:, None, :]
    wins = (diff > 0).double() + 0.5 * (diff == 0).double()
    return (wins * mask).sum(dim=(1, 2)) / mask.sum()


def per_trace_auc(
    trace_scores: list[torch.Tensor], labels: list[list[str | None]], direction: str | None = None
) -> tuple[torch.Tensor, list[int], int]:
    """Per-trace AUC of every head, for the traces that have at least one pair.

    Args:
        trace_scores: per trace, ``[head, step]`` step scores (heads flattened, e.g. layer * num_heads + head).
        labels: per trace, K_i labels ("essential", "redundant" or None).
        direction: which pairs count (see :func:`pair_auc`).

    Returns:
        ``(auc, used, pairs)``: ``auc`` is ``[trace, head]`` float64 (the traces with pairs), ``used`` the
        indices of those traces, ``pairs`` the number of (essential, redundant) pairs counted.
    """
    rows, used, pairs = [], [], 0
    for i, (scores, trace_labels) in enumerate(zip(trace_scores, labels)):
        if scores.shape[-1] != len(trace_labels):
            raise ValueError(f"trace {i}: {scores.shape[-1]} step scores but {len(trace_labels)} labels")
        essential = torch.tensor([lab == "essential" for lab in trace_labels], dtype=torch.bool)
        redundant = torch.tensor([lab == "redundant" for lab in trace_labels], dtype=torch.bool)
        auc = pair_auc(scores, essential, redundant, direction)
        if auc is not None:
            rows.append(auc)
            used.append(i)
            pairs += int(_pair_mask(essential, redundant, direction).sum())
    if not rows:
        width = trace_scores[0].shape[0] if trace_scores else 0
        return torch.zeros((0, width), dtype=torch.float64), used, 0
    return torch.stack(rows), used, pairs


def bootstrap_ci(auc: torch.Tensor, resamples: int = 1000, seed: int = 0, level: float = 0.95) -> torch.Tensor:
    """Percentile bootstrap interval of the mean over traces, for every head.

    Args:
        auc: ``[trace, head]`` per-trace AUC.

    Returns:
        ``[head, 2]`` lower and upper bounds (NaN when there are no traces).
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
        # The mean over chosen+[c] for every candidate c at once: [candidate, step] per trace.
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


def permutation_null(
    trace_scores: list[torch.Tensor], labels: list[list[str | None]], draws: int = 1000, seed: int = 0
) -> np.ndarray:
    """SRA of every head when each trace's step scores are permuted among its labelled steps, ``draws`` times.

    One permutation per trace and draw serves every head (it is a shuffle of the trace's labels), so
    the maximum over heads of a draw is a null for the best head too. Each AUC comes from midranks
    (Mann-Whitney): for a trace whose essential steps are S among its labelled steps,

        AUC = (sum_{k in S} rank_k - n_E (n_E + 1) / 2) / (n_E n_R),

    ranks among the labelled steps with ties averaged, which equals :func:`pair_auc` (ties 1/2). Rank
    sums are half-integers, so they are exact however the matrix products are split.

    Args:
        trace_scores: per trace, ``[head, step]`` step scores.
        labels: per trace, K_i labels; traces without an (essential, redundant) pair are left out.
        draws: permutations.
        seed: seed of ``numpy.random.default_rng``.

    Returns:
        ``[draw, head]`` float64 SRA under the null (zeros when no trace has a pair).
    """
    from scipy.stats import rankdata

    ranks, n_ess, n_red = [], [], []
    for scores, trace_labels in zip(trace_scores, labels):
        labelled = [k for k, lab in enumerate(trace_labels) if lab in ("essential", "redundant")]
        e = sum(lab == "essential" for lab in trace_labels)
        if e == 0 or e == len(labelled):
            continue
        ranks.append(rankdata(scores[:, labelled].double().numpy(), axis=-1))  # [head, labelled_step]
        n_ess.append(e)
        n_red.append(len(labelled) - e)
    heads = trace_scores[0].shape[0] if trace_scores else 0
    if not ranks:
        return np.zeros((draws, heads))
    traces, width = len(ranks), max(r.shape[1] for r in ranks)
    padded = np.zeros((traces, width, heads))
    lengths = np.array([r.shape[1] for r in ranks])
    for i, r in enumerate(ranks):
        padded[i, : r.shape[1]] = r.T
    e, w = np.array(n_ess, dtype=np.float64), np.array(n_ess, dtype=np.float64) * np.array(n_red)
    offset = (e * (e + 1) / 2)[:, None, None]
    rng = np.random.default_rng(seed)
    out = np.empty((draws, heads))
    chunk = max(1, (1 << 20) // (traces * max(width, heads)))  # about 8 MB per array: stays in cache
    for start in range(0, draws, chunk):
        d = min(chunk, draws - start)
        keys = rng.random((d, traces, width))
        keys[:, np.arange(width)[None, :] >= lengths[:, None]] = np.inf  # padding never drawn
        order = keys.argsort(axis=-1)  # a uniform permutation of each trace's steps
        chosen = np.zeros_like(keys)  # [d, traces, width]: the shuffled essential set, its first n_E steps
        np.put_along_axis(chosen, order, np.broadcast_to(np.arange(width) < e[:, None], keys.shape).astype(np.float64), axis=-1)
        sums = np.matmul(chosen.transpose(1, 0, 2), padded)  # [traces, d, heads] rank sums
        out[start : start + d] = ((sums - offset) / w[:, None, None]).mean(axis=0)
    return out


def split_half_reliability(auc: torch.Tensor, top_n: int, seed: int = 0) -> dict | None:
    """Agreement of the head ranking between two seeded random halves of the traces.

    Args:
        auc: ``[trace, head]`` per-trace AUC (traces with at least one pair).
        top_n: size of the top set compared.

    Returns:
        ``spearman`` (rank correlation of every head's SRA on one half with the other; None when a
        half ranks no head above another), ``top_n``, ``top_n_overlap`` (heads in both halves' top N,
        ties by head index), ``traces`` (the two halves' sizes) and ``seed``; None with fewer than 2 traces.
    """
    from scipy.stats import spearmanr

    traces, heads = auc.shape
    if traces < 2:
        return None
    order = torch.randperm(traces, generator=torch.Generator().manual_seed(seed))
    half = traces // 2
    first, second = auc[order[:half]].mean(dim=0), auc[order[half:]].mean(dim=0)

    def best(sra: torch.Tensor) -> set[int]:
        return set(sorted(range(heads), key=lambda r: (-float(sra[r]), r))[:top_n])

    rho = float(spearmanr(first.numpy(), second.numpy()).statistic) if heads > 1 else float("nan")
    return {
        "spearman": None if np.isnan(rho) else rho,
        "top_n": top_n,
        "top_n_overlap": len(best(first) & best(second)),
        "traces": [half, traces - half],
        "seed": seed,
    }
