"""Group advantages and AttnPO's stepwise advantage rescaling.

Method page (docs/method.md), sections 5 and 6; paper: "AttnPO" (arXiv 2602.09953); where the
paper and the authors' verl fork differ, the fork's behaviour is implemented and the difference noted.

Every function here is pure: tensors and numbers in, tensors and numbers out. The single-machine
trainer and the distributed-engine adapter both call them.
"""

from collections.abc import Sequence

import torch

from attnpo_train.config import ESTIMATORS, TrainConfig


def group_advantages(rewards: torch.Tensor, estimator: str = "rloo", eps: float = 1e-6) -> torch.Tensor:
    """Outcome advantage of every rollout from its group's rewards (method page section 5).

    - "rloo" (the authors' code; the paper frames its estimator as GRPO): A_i = r_i - mean_{j != i} r_j,
      i.e. G/(G-1) (r_i - mean_j r_j).
    - "grpo": A_i = (r_i - mean) / (std + eps) with the *sample* standard deviation (divide by G - 1).
      That is what TRL's GRPOTrainer (``rewards.view(-1, G).std(dim=1)``, torch's default correction=1)
      and verl's GRPO estimator compute, so runs are comparable with theirs.

    Args:
        rewards: [P, G] (any leading shape works) rewards, G rollouts per prompt on the last axis.
        estimator: "rloo" or "grpo".
        eps: added to the std (grpo only); a group with equal rewards gets advantage 0.
    Returns:
        float32 tensor of the shape of ``rewards``. The arithmetic runs in float64: in float32 a group of
        equal rewards such as 0.9 leaves a rounding residue r - mean ~ 6e-8 that grpo's division by
        (0 + eps) would blow up to ~0.06.
    """
    rewards = torch.as_tensor(rewards).to(torch.float64)
    if rewards.ndim < 1 or rewards.shape[-1] < 2:
        raise ValueError(f"rewards must have a group axis of size >= 2 last; got shape {tuple(rewards.shape)}")
    group_size = rewards.shape[-1]
    if estimator == "rloo":
        others_mean = (rewards.sum(dim=-1, keepdim=True) - rewards) / (group_size - 1)
        return (rewards - others_mean).float()
    if estimator == "grpo":
        mean = rewards.mean(dim=-1, keepdim=True)
        std = rewards.std(dim=-1, keepdim=True, correction=1)
        return ((rewards - mean) / (std + eps)).float()
    raise ValueError(f"estimator must be one of {', '.join(ESTIMATORS)}; got {estimator!r}")


def group_accuracy(correct: torch.Tensor) -> torch.Tensor:
    """p, the fraction of each group's rollouts that are correct (method page section 5).

    Args:
        correct: [P, G] bool or 0/1 float.
    Returns:
        float tensor [P] in [0, 1].
    """
    correct = torch.as_tensor(correct)
    if correct.ndim != 2:
        raise ValueError(f"correct must have shape [P, G]; got {tuple(correct.shape)}")
    return correct.float().mean(dim=-1)


def difficulty_baseline(p: torch.Tensor, bar: torch.Tensor, alpha: float = 2.0, use_difficulty: bool = True) -> torch.Tensor:
    """Difficulty-aware baseline S_base = p^alpha * bar (method page section 6).

    The bar is the baseline at p = 1: the paper's |F| / |o| (``kfh_probe.uniform_bar``), or with the reasoning
    baseline the calibrated margin tau on relative step scores (``kfh_probe.relative_step_scores``).
    p^alpha lowers it on hard prompts so that fewer of their steps count as low-score.

    Args:
        p: [N] group accuracy of each response's prompt.
        bar: [N] the baseline at p = 1, > 0.
        alpha: exponent of p (2 in the reference).
        use_difficulty: False takes p = 1 (the "w/o difficulty" ablation): S_base = bar.
    Returns:
        float tensor [N].
    """
    p = torch.as_tensor(p, dtype=torch.float32)
    bar = torch.as_tensor(bar, dtype=torch.float32)
    if p.shape != bar.shape or p.ndim != 1:
        raise ValueError(f"p and bar must both have shape [N]; got {tuple(p.shape)}, {tuple(bar.shape)}")
    if ((p < 0) | (p > 1)).any():
        raise ValueError(f"p must lie in [0, 1]; got {p.tolist()}")
    if not (bar > 0).all():
        raise ValueError(f"bar must be > 0; got {bar.tolist()}")
    return p.pow(alpha) * bar if use_difficulty else bar


def attenuation_active(p: torch.Tensor, step: int, horizon: int = 1000) -> torch.Tensor:
    """Whether the schedule lets Pos-Adv Attenuation act on each prompt at this training step.

    Active when step >= horizon * (1 - p): fully solved prompts (p = 1) from the start, a prompt solved
    half the time from step horizon / 2, never-solved prompts never (they have no correct response to
    rescale anyway). This is the authors' code (horizon hard-coded to 1000 there); third-party summaries
    of the paper write the threshold as T * p, which would attenuate hard prompts first (method page
    section 6). A tolerance of 1e-6 * horizon absorbs float error in p (p = 0.7 in float32 gives
    1000 * (1 - p) = 300.00001, and step 300 must count as reached).

    Args:
        p: [N] group accuracies in [0, 1].
        step: the current training step (0-based).
        horizon: T; 0 makes attenuation active everywhere from step 0.
    Returns:
        bool tensor [N].
    """
    p = torch.as_tensor(p, dtype=torch.float64)
    if step < 0 or horizon < 0:
        raise ValueError(f"step and horizon must be >= 0; got step={step}, horizon={horizon}")
    if ((p < 0) | (p > 1)).any():
        raise ValueError(f"p must lie in [0, 1]; got {p.tolist()}")
    threshold = horizon * (1.0 - p)
    return step >= threshold - 1e-6 * horizon


def step_gammas(
    step_scores: torch.Tensor,
    baseline: float,
    advantage: float,
    p: float,
    active: bool,
    beta: float = 2.0,
    delta: float = 0.0,
    pos_attenuation: bool = True,
    neg_attenuation: bool = True,
    use_difficulty: bool = True,
) -> torch.Tensor:
    """Per-step advantage multipliers gamma_k of one correct response (method page section 6).

    - Pos-Adv Attenuation (A > 0, ``active`` by the schedule, S_k < S_base):
          gamma_k = (1 - delta) * [p^beta * S_k / S_base + (1 - p^beta)] + delta
      so a low-score (likely redundant) step keeps less of a positive advantage, strongly on easy prompts
      (p near 1), barely on hard ones. gamma_k lies in [delta, 1] because 0 <= S_k < S_base.
    - Neg-Adv Attenuation (A < 0, S_k > S_base): gamma_k = 0, so the essential steps of a correct but
      over-long response are not penalised. The method page describes only the positive branch as
      scheduled, so this one acts from step 0 (``active`` is ignored for A < 0).
    - Every other step: gamma_k = 1 (including A = 0).

    Args:
        step_scores: [K] attention scores S_k of the response's steps (mean over the top-N heads).
        baseline: S_base of the response (``difficulty_baseline``), > 0.
        advantage: the response's outcome advantage A_i.
        p: its group's accuracy.
        active: the schedule's verdict for its prompt (``attenuation_active``).
        beta: exponent of p in the magnitude (2 in the reference).
        delta: floor of gamma in [0, 1] (0 in the reference).
        pos_attenuation, neg_attenuation: switch either branch off (ablations).
        use_difficulty: False takes p = 1 in the magnitude, gamma_k = (1 - delta) S_k / S_base + delta;
            the caller passes the matching p-free baseline.
    Returns:
        float32 tensor [K].
    """
    scores = torch.as_tensor(step_scores, dtype=torch.float32)
    if scores.ndim != 1:
        raise ValueError(f"step_scores must have shape [K]; got {tuple(scores.shape)}")
    if not baseline > 0:
        raise ValueError(f"baseline must be > 0 (a correct response has p > 0 and |F| >= 1); got {baseline}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must lie in [0, 1]; got {p}")
    if not 0.0 <= delta <= 1.0:
        raise ValueError(f"delta must lie in [0, 1]; got {delta}")
    if beta < 0:
        raise ValueError(f"beta must be >= 0; got {beta}")
    gammas = torch.ones_like(scores)
    if advantage > 0 and active and pos_attenuation:
        weight = (p if use_difficulty else 1.0) ** beta
        attenuated = (1.0 - delta) * (weight * scores / baseline + (1.0 - weight)) + delta
        gammas = torch.where(scores < baseline, attenuated, gammas)
    elif advantage < 0 and neg_attenuation:
        gammas = torch.where(scores > baseline, torch.zeros_like(scores), gammas)
    return gammas


def per_token_advantages(
    advantage: float,
    response_len: int,
    step_token_spans: Sequence[tuple[int, int]],
    gammas: torch.Tensor,
) -> torch.Tensor:
    """Spread the step multipliers over the response's tokens and scale the advantage.

    Token t of step k gets gamma_k * A; every token in no step (the end-of-thinking marker, the final
    answer F after it, and any gap) gets 1 * A (method page section 6).

    Args:
        advantage: A_i.
        response_len: number of response tokens.
        step_token_spans: K response-relative token spans [start, end), non-empty, non-overlapping,
            within [0, response_len).
        gammas: [K] multipliers (``step_gammas``).
    Returns:
        float32 tensor [response_len].
    """
    gammas = torch.as_tensor(gammas, dtype=torch.float32)
    if gammas.ndim != 1 or len(step_token_spans) != gammas.shape[0]:
        raise ValueError(
            f"need one gamma per step span; got {len(step_token_spans)} spans and gammas of shape {tuple(gammas.shape)}"
        )
    if response_len < 0:
        raise ValueError(f"response_len must be >= 0; got {response_len}")
    token_gammas = torch.ones(response_len, dtype=torch.float32)
    covered = torch.zeros(response_len, dtype=torch.bool)
    for k, (start, end) in enumerate(step_token_spans):
        if not 0 <= start < end <= response_len:
            raise ValueError(f"step {k} span [{start}, {end}) is empty or outside the response [0, {response_len})")
        if covered[start:end].any():
            raise ValueError(f"step {k} span [{start}, {end}) overlaps an earlier step")
        covered[start:end] = True
        token_gammas[start:end] = gammas[k]
    return token_gammas * advantage


def rescale_group(
    correct: Sequence[bool] | torch.Tensor,
    advantages: Sequence[float] | torch.Tensor,
    *,
    step_scores: Sequence[torch.Tensor | None],
    step_spans: Sequence[Sequence[tuple[int, int]] | None],
    bars: Sequence[float],
    response_lens: Sequence[int],
    p: float,
    step: int,
    config: TrainConfig,
) -> tuple[list[torch.Tensor], dict]:
    """AttnPO per-token advantages of one prompt group (method page section 6).

    Only correct responses with at least two steps are rescaled; an incorrect response, or a correct one
    with fewer than two steps, keeps its uniform advantage A_i on every token. Entries of ``step_scores``
    and ``step_spans`` for responses that are not rescaled may be None.

    Args:
        correct: [G] correctness of each response.
        advantages: [G] outcome advantages A_i (``group_advantages``).
        step_scores: G entries, each [K_i] step scores or None.
        step_spans: G entries, each K_i response-relative token spans [start, end) or None.
        bars: G values, each response's baseline at p = 1 (``difficulty_baseline``; read for rescaled ones only).
        response_lens: G response lengths in tokens.
        p: the group's accuracy.
        step: the current training step (for the schedule).
        config: uses alpha, beta, delta, horizon, pos_attenuation, neg_attenuation, use_difficulty.
    Returns:
        (per-token advantages: G float32 tensors [response_len_i],
         stats: "rescaled_responses", "steps" (steps of rescaled responses), "attenuated_steps"
         (gamma != 1), "frac_attenuated" (0.0 when there are no steps) and "mean_gamma" (1.0 when there
         are no steps); the counts let a caller aggregate over groups exactly; "gammas": G entries,
         the [K_i] step multipliers of a rescaled response, None for the others).
    """
    correct = torch.as_tensor(correct).bool()
    advantages = torch.as_tensor(advantages, dtype=torch.float32)
    group_size = correct.shape[0]
    lengths = {
        "advantages": advantages.shape[0],
        "step_scores": len(step_scores),
        "step_spans": len(step_spans),
        "bars": len(bars),
        "response_lens": len(response_lens),
    }
    wrong = {name: n for name, n in lengths.items() if n != group_size}
    if correct.ndim != 1 or wrong:
        raise ValueError(f"every per-response input must have G = {group_size} entries; got {wrong}")
    if correct.any() and not 0.0 < p <= 1.0:
        raise ValueError(f"the group has a correct response, so p must lie in (0, 1]; got {p}")

    active = bool(attenuation_active(torch.tensor([p]), step, config.horizon)[0])
    outputs: list[torch.Tensor] = []
    all_gammas: list[torch.Tensor | None] = []
    n_rescaled, n_steps, n_attenuated, gamma_sum = 0, 0, 0, 0.0
    for i in range(group_size):
        advantage = float(advantages[i])
        spans = step_spans[i]
        if not correct[i] or spans is None or len(spans) < 2:
            outputs.append(torch.full((response_lens[i],), advantage, dtype=torch.float32))
            all_gammas.append(None)
            continue
        scores = step_scores[i]
        if scores is None or len(scores) != len(spans):
            got = "None" if scores is None else f"{len(scores)} scores"
            raise ValueError(f"response {i} is correct with {len(spans)} steps but has {got}")
        baseline = difficulty_baseline(
            torch.tensor([p]), torch.tensor([bars[i]]), alpha=config.alpha, use_difficulty=config.use_difficulty
        )
        gammas = step_gammas(
            scores,
            float(baseline[0]),
            advantage,
            p,
            active,
            beta=config.beta,
            delta=config.delta,
            pos_attenuation=config.pos_attenuation,
            neg_attenuation=config.neg_attenuation,
            use_difficulty=config.use_difficulty,
        )
        outputs.append(per_token_advantages(advantage, response_lens[i], spans, gammas))
        all_gammas.append(gammas)
        n_rescaled += 1
        n_steps += len(spans)
        n_attenuated += int((gammas != 1.0).sum())
        gamma_sum += float(gammas.sum())
    stats = {
        "rescaled_responses": float(n_rescaled),
        "steps": float(n_steps),
        "attenuated_steps": float(n_attenuated),
        "frac_attenuated": n_attenuated / n_steps if n_steps else 0.0,
        "mean_gamma": gamma_sum / n_steps if n_steps else 1.0,
        "gammas": all_gammas,
    }
    return outputs, stats


def tlmre_rloo_advantages(correct: Sequence[bool], lengths: Sequence[int]) -> list[float]:
    """RLOO advantages of one group's TLMRE rewards at the default settings (``TrainConfig``'s
    ``alpha_len``), from correctness and token lengths: what the trainer's ``tlmre`` method gives each
    response. The ``kfh_probe.group_credit`` entry point, through which ``kfh-probe organism report``
    measures where redundant and essential steps sit under group RL."""
    from attnpo_train.rewards import length_penalised_rewards

    rewards = length_penalised_rewards(torch.tensor(correct), torch.tensor(lengths), TrainConfig.alpha_len)
    return group_advantages(rewards, "rloo").tolist()
