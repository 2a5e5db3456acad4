"""Outcome-only credit: every response token gets its response's group advantage.

- "tlmre": the TLMRE length-penalised reward (docs/method.md section 5);
- "rloo": the 0/1 correctness itself as the reward (the control for RL without a length penalty).

The group baseline of both is ``TrainConfig.estimator``'s (RLOO by default). Neither reads attention.
"""

from __future__ import annotations

import torch

from attnpo_train.strategies.base import CreditStrategy, register
from kfh_probe import Rollouts


@register("tlmre")
class Uniform(CreditStrategy):
    """The outcome advantage, spread uniformly over the response's tokens."""

    def advantages(self, indices: list[int]) -> list[torch.Tensor]:
        flat = self.batch.advantages.reshape(-1)
        responses = self.batch.rollouts.response_ids
        return [torch.full((len(responses[i]),), float(flat[i]), dtype=torch.float32) for i in indices]


@register("rloo")
class CorrectnessReward(Uniform):
    """``Uniform`` credit of the 0/1 correctness reward (no length penalty)."""

    def rewards(self, correct: torch.Tensor, rollouts: Rollouts) -> torch.Tensor:
        return correct.clone()
