"""The on-policy policy-gradient loss with token-mean aggregation and an optional KL term.

Method page (docs/method.md), section 5. The reference takes one optimiser step per batch of rollouts
(NieSYsc20/AttnPO ``scripts/attnpo_ds1.5b.sh``: ``ppo_mini_batch_size`` = ``train_batch_size``, verl's
``ppo_epochs: 1``), so the policy being updated is the one that sampled the tokens: the PPO ratio is 1 at the
gradient and its clip (eps 0.2) and dual clip (3) never act. What is left is the policy-gradient surrogate
with the ratio written out, so that its value is the token mean of -A, as PPO's is at its first step. The
optional KL term uses the k3 estimator (Schulman's unbiased, non-negative estimator).
"""

import torch


def policy_gradient_loss(
    logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    num_tokens: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Token-mean policy-gradient loss (to minimise) of a batch of responses sampled by the current policy.

    Per token, with rho = exp(logprobs - logprobs.detach()) (1 in value, gradient that of logprobs):

        loss = sum(mask * -A rho) / num_tokens  [+ kl_coef * sum(mask * k3) / num_tokens]

    with k3 = exp(ref - logprobs) - (ref - logprobs) - 1 >= 0.

    Args:
        logprobs: [batch, token] log-probabilities of the sampled tokens under the policy being trained.
        advantages: [batch, token] per-token advantages.
        mask: [batch, token] 1 for response tokens that count, 0 for padding and prompt.
        ref_logprobs: [batch, token] log-probabilities under the reference policy, needed when kl_coef > 0
            (when given with kl_coef = 0 the KL is only reported).
        kl_coef: coefficient of the KL term (0 in the reference).
        num_tokens: the token-mean's denominator; defaults to mask.sum(). Pass the number of valid
            tokens of the whole batch when it is split into micro-batches for gradient accumulation, so
            that the summed micro-batch losses equal the full batch's token mean.
    Returns:
        (loss: scalar tensor with gradient, stats: floats "pg_loss" (the policy term of the loss) and, when
         ref_logprobs is given, "kl" (the token mean of k3 over this call's mask)).
    """
    shapes = {"advantages": advantages.shape, "mask": mask.shape}
    if ref_logprobs is not None:
        shapes["ref_logprobs"] = ref_logprobs.shape
    wrong = {name: tuple(shape) for name, shape in shapes.items() if shape != logprobs.shape}
    if logprobs.ndim != 2 or wrong:
        raise ValueError(f"all inputs must have the [batch, token] shape of logprobs {tuple(logprobs.shape)}; got {wrong}")
    if kl_coef < 0:
        raise ValueError(f"kl_coef must be >= 0; got {kl_coef}")
    if kl_coef > 0 and ref_logprobs is None:
        raise ValueError("kl_coef > 0 needs ref_logprobs")
    mask = mask.to(logprobs.dtype)
    n_valid = mask.sum()
    denominator = n_valid if num_tokens is None else torch.as_tensor(num_tokens, dtype=logprobs.dtype)
    if not denominator > 0:
        raise ValueError("the token mean needs at least one valid token (mask is all zero or num_tokens <= 0)")

    ratio = torch.exp(logprobs - logprobs.detach())
    pg_loss = (-advantages * ratio * mask).sum() / denominator
    loss = pg_loss
    stats = {"pg_loss": float(pg_loss.detach())}
    if ref_logprobs is not None:
        ref_diff = ref_logprobs - logprobs
        k3 = torch.exp(ref_diff) - ref_diff - 1.0
        loss = loss + kl_coef * (k3 * mask).sum() / denominator
        with torch.no_grad():
            stats["kl"] = float((k3 * mask).sum() / n_valid.clamp(min=1.0))
    return loss, stats
