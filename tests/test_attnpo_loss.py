"""Hand-computed checks of attnpo_train.loss.ppo_clip_loss (method page section 5)."""

import math

import pytest
import torch

from attnpo_train.loss import ppo_clip_loss


def _batch():
    # one response, 5 tokens, the last one padding; old log-probs 0, so ratio = exp(logprobs)
    #   token 0: A =  1, ratio 1.5 -> max(-1.5, -1.2) = -1.2   (clipped branch)
    #   token 1: A =  1, ratio 0.5 -> max(-0.5, -0.8) = -0.5   (unclipped)
    #   token 2: A = -1, ratio 5.0 -> max( 5.0,  1.2) =  5.0 -> dual cap -A*3 = 3 -> 3.0
    #   token 3: A = -2, ratio 0.5 -> max( 1.0,  1.6) =  1.6   (clipped; below the cap 6)
    #   token 4: padding (A = 100) -> ignored
    # token mean = (-1.2 - 0.5 + 3.0 + 1.6) / 4 = 2.9 / 4 = 0.725
    ratios = torch.tensor([[1.5, 0.5, 5.0, 0.5, 1.0]])
    logprobs = ratios.log().requires_grad_(True)
    old = torch.zeros(1, 5)
    adv = torch.tensor([[1.0, 1.0, -1.0, -2.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    return logprobs, old, adv, mask


def test_ppo_loss_hand_computed_with_dual_clip():
    logprobs, old, adv, mask = _batch()
    loss, stats = ppo_clip_loss(logprobs, old, adv, mask, clip_eps=0.2, dual_clip=3.0)
    assert loss.item() == pytest.approx(0.725, abs=1e-6)
    assert stats["pg_loss"] == pytest.approx(0.725, abs=1e-6)
    # clipped branch taken at tokens 0 and 3 -> 2/4 ; dual cap at token 2 -> 1/4
    assert stats["clip_frac"] == pytest.approx(0.5)
    assert stats["dual_clip_frac"] == pytest.approx(0.25)
    # approx_kl = mean(old - new) = -(log 1.5 + log 0.5 + log 5 + log 0.5) / 4 = -0.157152
    assert stats["approx_kl"] == pytest.approx(-0.157152, abs=1e-6)
    assert stats["ratio_mean"] == pytest.approx((1.5 + 0.5 + 5.0 + 0.5) / 4)
    assert "kl" not in stats


def test_ppo_loss_gradient_flows_only_through_unclipped_tokens():
    # d/dlogp of -A * ratio = -A * ratio ; only token 1 is unclipped: -1 * 0.5 / 4 = -0.125
    logprobs, old, adv, mask = _batch()
    loss, _ = ppo_clip_loss(logprobs, old, adv, mask)
    loss.backward()
    assert logprobs.grad[0].tolist() == pytest.approx([0.0, -0.125, 0.0, 0.0, 0.0], abs=1e-7)


def test_ppo_loss_without_dual_clip():
    # token 2 keeps 5.0: (-1.2 - 0.5 + 5.0 + 1.6) / 4 = 4.9 / 4 = 1.225
    logprobs, old, adv, mask = _batch()
    loss, stats = ppo_clip_loss(logprobs, old, adv, mask, dual_clip=None)
    assert loss.item() == pytest.approx(1.225, abs=1e-6)
    assert stats["dual_clip_frac"] == 0.0


def test_token_mean_is_over_all_valid_tokens_of_the_batch():
    # response a: 1 valid token with loss -1 (A = 1, ratio 1) ; response b: 3 valid tokens with loss 0
    # token mean = -1 / 4 = -0.25 (a mean of per-response means would give -0.5)
    zeros = torch.zeros(2, 3)
    adv = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]])
    loss, _ = ppo_clip_loss(zeros, zeros, adv, mask)
    assert loss.item() == pytest.approx(-0.25)


def test_micro_batches_with_num_tokens_sum_to_the_full_batch_loss():
    logprobs, old, adv, mask = _batch()
    full, _ = ppo_clip_loss(logprobs, old, adv, mask)
    total = int(mask.sum())
    first, _ = ppo_clip_loss(logprobs[:, :2], old[:, :2], adv[:, :2], mask[:, :2], num_tokens=total)
    second, _ = ppo_clip_loss(logprobs[:, 2:], old[:, 2:], adv[:, 2:], mask[:, 2:], num_tokens=total)
    assert (first + second).item() == pytest.approx(full.item(), abs=1e-6)


def test_k3_kl_term():
    # A = 0 so the policy term is 0 ; ref log-probs 0, policy log-probs log 2 and log 0.5:
    #   d = ref - logp = -log 2 -> k3 = 0.5 + log 2 - 1 = 0.193147
    #   d = +log 2             -> k3 = 2 - log 2 - 1   = 0.306853 ; mean 0.25 ; loss = 0.1 * 0.25
    logprobs = torch.tensor([[math.log(2.0), math.log(0.5)]])
    zeros = torch.zeros(1, 2)
    loss, stats = ppo_clip_loss(logprobs, logprobs.detach(), zeros, torch.ones(1, 2), ref_logprobs=zeros, kl_coef=0.1)
    assert stats["kl"] == pytest.approx(0.25, abs=1e-6)
    assert loss.item() == pytest.approx(0.025, abs=1e-7)
    # with kl_coef 0 the KL is reported but not added
    loss, stats = ppo_clip_loss(logprobs, logprobs.detach(), zeros, torch.ones(1, 2), ref_logprobs=zeros)
    assert loss.item() == 0.0
    assert stats["kl"] == pytest.approx(0.25, abs=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(kl_coef=0.1), "ref_logprobs"),
        (dict(clip_eps=1.5), "clip_eps"),
        (dict(dual_clip=0.5), "dual_clip"),
        (dict(num_tokens=0), "valid token"),
    ],
)
def test_ppo_loss_validation(kwargs, message):
    logprobs, old, adv, mask = _batch()
    with pytest.raises(ValueError, match=message):
        ppo_clip_loss(logprobs, old, adv, mask, **kwargs)


def test_ppo_loss_rejects_empty_mask_and_shape_mismatch():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="valid token"):
        ppo_clip_loss(x, x, x, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="advantages"):
        ppo_clip_loss(x, x, torch.zeros(2, 4), torch.ones(2, 3))
