"""Hand-computed checks of attnpo_train.loss.policy_gradient_loss (method page section 5)."""

import math

import pytest
import torch

from attnpo_train.loss import policy_gradient_loss


def _batch():
    # one response, 5 tokens, the last one padding (A = 100, ignored)
    logprobs = torch.tensor([[-0.5, -1.0, -2.0, -0.1, -3.0]], requires_grad=True)
    adv = torch.tensor([[1.0, 1.0, -1.0, -2.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    return logprobs, adv, mask


def test_loss_is_the_token_mean_of_minus_the_advantage_and_its_gradient_minus_a_over_the_tokens():
    # on-policy the ratio is 1 in value: loss = -(1 + 1 - 1 - 2) / 4 = 0.25; d loss / d logp_t = -A_t / 4
    logprobs, adv, mask = _batch()
    loss, stats = policy_gradient_loss(logprobs, adv, mask)
    assert loss.item() == pytest.approx(0.25) and stats == {"pg_loss": pytest.approx(0.25)}
    loss.backward()
    assert logprobs.grad[0].tolist() == pytest.approx([-0.25, -0.25, 0.25, 0.5, 0.0])


def test_token_mean_is_over_all_valid_tokens_of_the_batch():
    # response a: 1 valid token with loss -1 (A = 1) ; response b: 3 valid tokens with loss 0
    # token mean = -1 / 4 = -0.25 (a mean of per-response means would give -0.5)
    zeros = torch.zeros(2, 3)
    adv = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]])
    loss, _ = policy_gradient_loss(zeros, adv, mask)
    assert loss.item() == pytest.approx(-0.25)


def test_micro_batches_with_num_tokens_sum_to_the_full_batch_loss():
    logprobs, adv, mask = _batch()
    full, _ = policy_gradient_loss(logprobs, adv, mask)
    total = int(mask.sum())
    first, _ = policy_gradient_loss(logprobs[:, :2], adv[:, :2], mask[:, :2], num_tokens=total)
    second, _ = policy_gradient_loss(logprobs[:, 2:], adv[:, 2:], mask[:, 2:], num_tokens=total)
    assert (first + second).item() == pytest.approx(full.item(), abs=1e-6)


def test_k3_kl_term():
    # A = 0 so the policy term is 0 ; ref log-probs 0, policy log-probs log 2 and log 0.5:
    #   d = ref - logp = -log 2 -> k3 = 0.5 + log 2 - 1 = 0.193147
    #   d = +log 2             -> k3 = 2 - log 2 - 1   = 0.306853 ; mean 0.25 ; loss = 0.1 * 0.25
    logprobs = torch.tensor([[math.log(2.0), math.log(0.5)]])
    zeros = torch.zeros(1, 2)
    loss, stats = policy_gradient_loss(logprobs, zeros, torch.ones(1, 2), ref_logprobs=zeros, kl_coef=0.1)
    assert stats["kl"] == pytest.approx(0.25, abs=1e-6)
    assert loss.item() == pytest.approx(0.025, abs=1e-7)
    # with kl_coef 0 the KL is reported but not added
    loss, stats = policy_gradient_loss(logprobs, zeros, torch.ones(1, 2), ref_logprobs=zeros)
    assert loss.item() == 0.0
    assert stats["kl"] == pytest.approx(0.25, abs=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(kl_coef=0.1), "ref_logprobs"),
        (dict(kl_coef=-1.0), "kl_coef"),
        (dict(num_tokens=0), "valid token"),
    ],
)
def test_loss_validation(kwargs, message):
    logprobs, adv, mask = _batch()
    with pytest.raises(ValueError, match=message):
        policy_gradient_loss(logprobs, adv, mask, **kwargs)


def test_loss_rejects_empty_mask_and_shape_mismatch():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="valid token"):
        policy_gradient_loss(x, x, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="advantages"):
        policy_gradient_loss(x, torch.zeros(2, 4), torch.ones(2, 3))
