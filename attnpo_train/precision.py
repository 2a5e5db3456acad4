"""Mixed precision and activation checkpointing of the policy (``TrainConfig.dtype``, ``weights_dtype``,
``gradient_checkpointing``).

Mixed precision is torch's own: the policy's forwards run under ``torch.autocast`` in ``dtype`` (matrix
products in bfloat16 or float16, reductions such as softmax and log-sum-exp in float32), while the weights,
their gradients and AdamW's states keep ``weights_dtype`` (float32 unless memory demands bfloat16). float16
also scales the loss (``LossScaler``: ``torch.amp.GradScaler``), so that small gradients survive its
range; bfloat16 has float32's range and needs none. What the credit strategies read stays float32:
attention observers run with autocast off (``kfh_probe.attention_calls``), and the log-probabilities and
the loss are computed in float32.

Activation checkpointing is transformers' (non-reentrant ``torch.utils.checkpoint`` around each decoder
layer): a layer's activations are recomputed in the backward pass instead of kept. transformers checkpoints
only modules in training mode, so with it on the update's forward runs in training mode (``update_forward``)
and a policy with active dropout is refused (``enable_checkpointing``): the trainer's credit and gradients
are those of the eval-mode forward. The recomputation runs inside ``loss.backward()``, after the strategy's
``observe`` block has closed, so every attention call is observed exactly once per micro-batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from attnpo_train.config import TrainConfig
from kfh_probe import InputError


def autocast(config: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """``torch.autocast`` in ``config.dtype`` on ``device``'s type; disabled for "float32"."""
    return torch.autocast(device.type, dtype=getattr(torch, config.dtype), enabled=config.dtype != "float32")


def enable_checkpointing(model: nn.Module) -> None:
    """Turn on transformers' non-reentrant activation checkpointing of every decoder layer of ``model``.

    Raises:
        InputError: the model has active dropout (``nn.Dropout`` with p > 0, or ``attention_dropout`` > 0), which
            training mode would switch on; or its class does not support checkpointing.
    """
    name = type(model).__name__
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise InputError(f"setting 'gradient_checkpointing': {name} does not support activation checkpointing",
                         settings=("gradient_checkpointing",))
    active = [n for n, m in model.named_modules() if isinstance(m, nn.Dropout) and m.p > 0]
    if getattr(model.config, "attention_dropout", 0.0):
        active.append(f"attention_dropout={model.config.attention_dropout}")
    if active:
        raise InputError(
            f"setting 'gradient_checkpointing': {name} has active dropout ({', '.join(active[:3])}); checkpointing runs "
            "the update's forward in training mode, where dropout would change the gradients and the attention read",
            settings=("gradient_checkpointing",),
        )
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.25; older: the old name
    kwargs = {"use_reentrant": False}
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


@contextlib.contextmanager
def update_forward(model: nn.Module, config: TrainConfig) -> Iterator[None]:
    """The policy-gradient forward's context: autocast in ``config.dtype``, and training mode when
    ``config.gradient_checkpointing`` (the model returns to eval mode after the block)."""
    device = next(model.parameters()).device
    with autocast(config, device):
        if not config.gradient_checkpointing:
            yield
            return
        model.train()
        try:
            yield
        finally:
            model.eval()


class LossScaler:
    """Loss scaling for one optimiser: float16's dynamic scaling (``torch.amp.GradScaler``), a no-op otherwise.

    Use: ``backward(loss)`` for every micro-batch, ``unscale()`` before clipping the gradient, ``step()`` in
    place of ``optimizer.step()`` (it skips a step whose gradient is not finite and lowers the scale).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, config: TrainConfig, device: torch.device) -> None:
        self.optimizer = optimizer
        self.scaler = torch.amp.GradScaler(device.type, enabled=config.dtype == "float16")

    @property
    def enabled(self) -> bool:
        return self.scaler.is_enabled()

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def unscale(self) -> None:
        self.scaler.unscale_(self.optimizer)

    def step(self) -> None:
        self.scaler.step(self.optimizer)
        self.scaler.update()
