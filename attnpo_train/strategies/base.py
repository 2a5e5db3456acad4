"""The credit-strategy interface and its registry: how a training method turns a step's rollouts into
per-token advantages.

A strategy is a ``CreditStrategy`` subclass registered under a method name (``register``); the single-machine
loop and the TRL adapter each find theirs with one ``strategy_class(config.method)``. Both run it the same way::

    strategy = strategy_class(config.method)(config, ground_truth)  # once per run: reads its files
    strategy.attach(model, tokenizer)                                 # checks them against the policy
    # every step:
    rewards = strategy.rewards(correct, rollouts)                     # [P, G]
    strategy.prepare(CreditBatch(rollouts, correct, group_advantages(rewards), step, truth))
    for indices in micro_batches:                                     # increasing; each rollout exactly once
        with strategy.observe(model, indices, input_ids):             # input_ids [B, T]: prompt + response
            logprobs = forward(model, input_ids)                      # the update's own forward, with grad
        advantages = strategy.token_advantages(indices)               # B float32 tensors [response_len_i]
        loss(logprobs, advantages).backward()
    strategy.metrics()

``observe`` watches the attention calls of ``strategy.layers`` during the forward
(``kfh_probe.attention_calls``) with the strategy's ``recorder`` and keeps what ``read`` makes of them, per
rollout, in ``readings``; ``advantages`` then turns readings into per-token advantages. The update is
on-policy, so its forward's attention is that of the policy that sampled the rollouts. ``read_separately``
runs the same recorder on no-grad forwards of their own before the update (``TrainConfig.fused_scoring``
false, kept for checking; and the TRL adapter when TRL runs no forward the strategy can watch): the one
separate-forward path of every strategy. A strategy that reads no attention leaves ``layers`` empty and
implements ``advantages`` only.
"""

from __future__ import annotations

import abc
import contextlib
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from attnpo_train.config import TrainConfig
from attnpo_train.rewards import tlmre_rewards
from attnpo_train.truth import GroundTruth
from kfh_probe import DEFAULT_ORGANISM, Rollouts, SettingError, attention_calls, capture_layer_calls, right_pad, task_of

NO_RESCALING = {"rescaled_responses": 0.0, "frac_attenuated": 0.0, "mean_gamma": 1.0}
"""AttnPO's step-rescaling counts with nothing rescaled: every method logs them (``CreditStrategy.metrics``), so
the metrics files of all methods share these columns."""


@dataclass(frozen=True)
class CreditBatch:
    """One training step's rollouts and their group advantages: what a strategy prepares from.

    Attributes:
        rollouts: the step's P*G rollouts, the G of each prompt consecutive.
        correct: [P, G] float 0/1.
        advantages: [P, G] float32 outcome advantages.
        step: 0-based training step (optimiser steps done).
        truth: the organism labeler's reading of the responses (``attnpo_train.truth.GroundTruth``); None where
            it cannot read any of them or nobody asked (``attnpo_train.diagnostics.Diagnostics``).
    """

    rollouts: Rollouts
    correct: torch.Tensor
    advantages: torch.Tensor
    step: int
    truth: GroundTruth | None = None


@dataclass(frozen=True)
class StrategyFile:
    """A file a strategy reads, named by the ``TrainConfig`` setting that holds its path.

    Attributes:
        setting: the setting, e.g. "manifest".
        what: what the file is, e.g. "KFH manifest".
        how: how a user passes and makes one, e.g. "pass --manifest M (make one with `kfh-probe sweep`)".
        organism: the embedded organism's own file (of the organism named), read where the setting is None.
    """

    setting: str
    what: str
    how: str
    organism: Callable[[str], Path]

    def path(self, config: TrainConfig) -> str:
        """The path ``config`` sets, or the file of the organism whose folder ``config.model`` is (the
        default organism's when no model is set)."""
        value = getattr(config, self.setting)
        if value is not None:
            return value
        return str(self.organism(DEFAULT_ORGANISM if config.model is None else task_of(config.model)))


class CreditStrategy(abc.ABC):
    """Per-token credit of one training method: subclass it, implement ``advantages``, ``register`` it.

    Class attributes:
        files: the files the strategy reads (``StrategyFile``).
        controls: the values of ``TrainConfig.credit`` it accepts.

    Attributes:
        layers: the attention layers ``observe`` watches (empty: the strategy reads no attention).
        wanted: the rollouts of this step whose attention the strategy reads (set by ``prepare``).
        readings: per rollout index, what ``read`` made of its attention this step.
        handed_out: per rollout index, the per-token advantages ``token_advantages`` returned this step.
        seconds: time spent this step in ``observe``'s recording and in ``token_advantages`` (what the strategy
            adds to the update; on a GPU host time, kernels run asynchronously).
    """

    files: ClassVar[tuple[StrategyFile, ...]] = ()
    controls: ClassVar[tuple[str, ...]] = ("attention",)

    def __init__(self, config: TrainConfig, ground_truth: bool = False) -> None:
        """Read and check the strategy's files (nothing here needs the model).

        Args:
            ground_truth: whether the steps will come with the organism's ground truth (``CreditBatch.truth``).
        """
        self.config = config
        self.tokenizer: Any = None
        self.layers: list[int] = []
        self.batch: CreditBatch | None = None
        self.wanted: set[int] = set()
        self.readings: dict[int, Any] = {}
        self.handed_out: dict[int, torch.Tensor] = {}
        self.seconds = 0.0

    def attach(self, model: nn.Module, tokenizer, gather_params: Callable | None = None) -> None:
        """Check the strategy's files against the policy and keep its tokenizer.

        Args:
            gather_params: how to see full weights of a sharded model (``kfh_probe.check_model_matches``).
        """
        self.tokenizer = tokenizer

    def rewards(self, correct: torch.Tensor, rollouts: Rollouts) -> torch.Tensor:
        """[P, G] float32 rewards the group advantages come from: TLMRE's length-penalised reward."""
        return tlmre_rewards(correct, rollouts, self.config.alpha_len)

    def prepare(self, batch: CreditBatch) -> None:
        """Start a step: keep ``batch`` and forget the previous step's readings (subclasses set ``wanted``)."""
        self.batch = batch
        self.wanted = set()
        self.readings = {}
        self.handed_out = {}
        self.seconds = 0.0

    def wants(self, i: int) -> bool:
        """Whether rollout ``i``'s attention is still to be read."""
        return i in self.wanted and i not in self.readings

    def recorder(self, indices: list[int], shape: torch.Size, offsets: list[int], device: torch.device):
        """An attention observer (``kfh_probe.attention_calls``) for a batch of rollouts ``indices`` of ``shape``
        [B, T], where rollout ``indices[b]`` starts at column ``offsets[b]``; it records the rows ``wants``, and
        has ``check_reported(model)``. Implemented by strategies that read attention."""
        raise NotImplementedError(f"{type(self).__name__} reads no attention")

    def read(self, indices: list[int], offsets: list[int], recorder) -> dict[int, Any]:
        """What ``recorder`` recorded, by rollout index (the rows ``wants``). Implemented by strategies that read
        attention."""
        raise NotImplementedError(f"{type(self).__name__} reads no attention")

    @contextlib.contextmanager
    def observe(
        self, model: nn.Module, indices: list[int], input_ids: torch.Tensor, offsets: list[int] | None = None
    ) -> Iterator[None]:
        """Read the attention of the rollouts among ``indices`` that ``wants`` during the block's forward.

        Args:
            input_ids: [B, T] the batch, prompt + response of ``indices[b]`` from column ``offsets[b]`` (None: 0).
        Raises:
            ValueError: the model is in training mode with attention dropout (the attention would be noisy).
            kfh_probe.capture.UnsupportedModelError: a watched layer did not go through the attention interface.
        """
        if not any(self.wants(i) for i in indices):
            yield
            return
        start = time.perf_counter()
        if model.training and getattr(model.config, "attention_dropout", 0.0):
            raise ValueError("attention dropout is active (model.train()); credit needs the eval-mode attention")
        offsets = [0] * len(indices) if offsets is None else offsets
        recorder = self.recorder(indices, input_ids.shape, offsets, input_ids.device)

        def timed(*args) -> None:
            begin = time.perf_counter()
            recorder(*args)
            self.seconds += time.perf_counter() - begin

        self.seconds += time.perf_counter() - start
        with attention_calls(model, self.layers, timed):
            yield
        start = time.perf_counter()
        recorder.check_reported(model)
        self.readings.update(self.read(indices, offsets, recorder))
        self.seconds += time.perf_counter() - start

    def token_advantages(self, indices: list[int]) -> list[torch.Tensor]:
        """Per-token advantages of ``indices`` (after their ``observe`` block): B float32 tensors [response_len_i]."""
        start = time.perf_counter()
        values = self.advantages(indices)
        self.handed_out.update(zip(indices, values))
        self.seconds += time.perf_counter() - start
        return values

    @abc.abstractmethod
    def advantages(self, indices: list[int]) -> list[torch.Tensor]:
        """Per-token advantages of the rollouts ``indices`` of the prepared batch, from its group advantages and
        the ``readings``: B float32 tensors [response_len_i]."""

    def metrics(self) -> dict[str, float | None]:
        """After every micro-batch: the step's credit metrics (here ``NO_RESCALING``)."""
        return dict(NO_RESCALING)


def read_separately(
    strategy: CreditStrategy, model: nn.Module, pad_id: int, batch_size: int, indices: Iterable[int] | None = None
) -> None:
    """The strategy's readings of the rollouts it ``wants`` from no-grad forwards of their own, before the update.

    The rollouts (``indices``, or all of the prepared batch) are right-padded ``batch_size`` at a time and run
    through ``model`` (in eval mode) up to the deepest layer of ``strategy.layers``, watched by the strategy's
    own ``recorder`` (``kfh_probe.capture_layer_calls``); ``observe`` then finds nothing left to read.
    """
    rollouts = strategy.batch.rollouts
    candidates = range(len(rollouts.response_ids)) if indices is None else indices
    todo = [i for i in candidates if strategy.wants(i)]
    device = next(model.parameters()).device
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        input_ids, attention_mask = right_pad([rollouts.prompt_ids[i] + rollouts.response_ids[i] for i in chunk], pad_id)
        offsets = [0] * len(chunk)
        recorder = strategy.recorder(chunk, input_ids.shape, offsets, device)
        capture_layer_calls(model, input_ids.to(device), attention_mask.to(device), recorder, strategy.layers)
        strategy.readings.update(strategy.read(chunk, offsets, recorder))


_REGISTRY: dict[str, type[CreditStrategy]] = {}


def register(method: str) -> Callable[[type[CreditStrategy]], type[CreditStrategy]]:
    """Class decorator: train ``method`` (``TrainConfig.method``, ``attnpo-train run --method``, the TRL adapter's
    ``attnpo_method``) with this strategy. A name is registered once."""

    def add(cls: type[CreditStrategy]) -> type[CreditStrategy]:
        if method in _REGISTRY and _REGISTRY[method] is not cls:
            raise ValueError(f"method {method!r} is already registered ({_REGISTRY[method].__qualname__})")
        _REGISTRY[method] = cls
        return cls

    return add


def methods() -> tuple[str, ...]:
    """Every registered method name, in registration order."""
    return tuple(_REGISTRY)


def strategy_class(method: str) -> type[CreditStrategy]:
    """The strategy registered under ``method``.

    Raises:
        SettingError: no strategy has that name (the message lists those that do).
    """
    if method not in _REGISTRY:
        raise SettingError("method", f"one of {', '.join(_REGISTRY)}", method)
    return _REGISTRY[method]
