"""PPO clipped policy loss with dual clip and token-mean aggregation.

Method page (docs/method.md), section 5: PPO clip (eps 0.2, dual clip 3), token-mean, no KL and
no entropy bonus in the reference. The dual clip and the aggregation follow verl, on which the authors'
code is built; the optional KL term uses the k3 estimator (Schulman's unbiased, non-negative estimator).
"""

import torch

# verl clamps the log-ratio before exponentiating; a ratio beyond e^20 only arises from broken inputs.
_MAX_LOG_RATIO = 20.0


def ppo_clip_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    dual_clip: float | None = 3.0,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    num_tokens: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Token-mean PPO-clip loss (to minimise) of a batch of responses.

    Per token, with ratio rho = exp(logprobs - old_logprobs):

        l = max(-A rho, -A clip(rho, 1 - eps, 1 + eps))
        l = min(l, -dual_clip * A)          where A < 0   (dual clip, as verl's clip_ratio_c)
        loss = sum(mask * l) / num_tokens  [+ kl_coef * sum(mask * k3) / num_tokens]

    with k3 = exp(ref - logprobs) - (ref - logprobs) - 1 >= 0.

    Args:
        logprobs: [B, T] log-probabilities of the sampled tokens under the policy being trained.
        old_logprobs: [B, T] the same under the policy that sampled them.
        advantages: [B, T] per-token advantages.
        mask: [B, T] 1 for response tokens that count, 0 for padding and prompt.
        clip_eps: clip range eps in (0, 1).
        dual_clip: c > 1, or None for no dual clip.
        ref_logprobs: [B, T] log-probabilities under the reference policy, needed when kl_coef > 0
            (when given with kl_coef = 0 the KL is only reported).
        kl_coef: coefficient of the KL term (0 in the reference).
        num_tokens: the token-mean's denominator; defaults to mask.sum(). Pass the number of valid
            tokens of the whole batch when it is split into micro-batches for gradient accumulation, so
            that the summed micro-batch losses equal the full batch's token mean.
    Returns:
        (loss: scalar tensor with gradient,
         stats: floats "pg_loss" (the policy term of the loss), "clip_frac" (tokens where the clipped
         branch is taken), "dual_clip_frac" (tokens capped by the dual clip), "approx_kl" (mean of
         old - new log-probs), "ratio_mean", and "kl" when ref_logprobs is given; all but pg_loss are
         token means over this call's mask).
    """
    shapes = {"old_logprobs": old_logprobs.shape, "advantages": advantages.shape, "mask": mask.shape}
    if ref_logprobs is not None:
        shapes["ref_logprobs"] = ref_logprobs.shape
    wrong = {name: tuple(shape) for name, shape in shapes.items() if shape != logprobs.shape}
    if logprobs.ndim != 2 or wrong:
        raise ValueError(f"all inputs must have the [B, T] shape of logprobs {tuple(logprobs.shape)}; got {wrong}")
    if not 0.0 < clip_eps < 1.0:
        raise ValueError(f"clip_eps must lie in (0, 1); got {clip_eps}")
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"dual_clip must be > 1 or None; got {dual_clip}")
    if kl_coef < 0:
        raise ValueError(f"kl_coef must be >= 0; got {kl_coef}")
    if kl_coef > 0 and ref_logprobs is None:
        raise ValueError("kl_coef > 0 needs ref_logprobs")
    mask = mask.to(logprobs.dtype)
    n_valid = mask.sum()
    denominator = n_valid if num_tokens is None else torch.as_tensor(num_tokens, dtype=logprobs.dtype)
    if not denominator > 0:
        raise ValueError("the token mean needs at least one valid token (mask is all zero or num_tokens <= 0)")

    log_ratio = torch.clamp(logprobs - old_logprobs, -_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    per_token = torch.maximum(unclipped, clipped)
    capped = torch.zeros_like(mask, dtype=torch.bool)
    if dual_clip is not None:
        cap = -advantages * dual_clip
        capped = (advantages < 0) & (per_token > cap)
        per_token = torch.where(capped, cap, per_token)
    pg_loss = (per_token * mask).sum() / denominator
    loss = pg_loss

    if ref_logprobs is not None:
        ref_diff = ref_logprobs - logprobs
        k3 = torch.exp(ref_diff) - ref_diff - 1.0
        loss = loss + kl_coef * (k3 * mask).sum() / denominator

    with torch.no_grad():
        valid = n_valid.clamp(min=1.0)

        def token_mean(values: torch.Tensor) -> float:
            return float((values.to(mask.dtype) * mask).sum() / valid)

        stats = {
            "pg_loss": float(pg_loss),
            "clip_frac": token_mean(clipped > unclipped),
            "dual_clip_frac": token_mean(capped),
            "approx_kl": token_mean(-log_ratio),
            "ratio_mean": token_mean(ratio),
        }
        if ref_logprobs is not None:
            stats["kl"] = token_mean(k3)
    return loss, stats
