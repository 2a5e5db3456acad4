"""Attention-capture backends: the same answer-row attention, read through different stacks.

- ``hf`` (default): :func:`kfh_probe.capture.capture_answer_attention` wraps the transformers
  attention interface; exact, ``R x T`` per head, no ``T x T`` map.
- ``nnsight``: reads the arguments of the attention-interface call inside an nnsight trace and applies
  the same mathematics (:func:`kfh_probe.capture.interface_call_rows`); the trace can run on a remote
  nnsight server for models one cannot host.
- ``lens``: reads TransformerLens's ``hook_pattern`` (full ``T x T`` maps) and keeps the answer rows.

A backend is a class built once per model, ``backend = get_backend(name)(model, tokenizer)``; calling
``backend(input_ids, attention_mask, answer_mask, layers)`` returns an
:class:`~kfh_probe.capture.AnswerAttention` with ``reduce="sum"`` values ``[batch, layer, head, key]``.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

from ..capture import AnswerAttention, capture_answer_attention
from ..errors import InputError, NotInstalledError
from ..layers import check_layers

# name -> (module in this package, class in it, top-level package it needs, pyproject extra)
_OPTIONAL = {
    "nnsight": ("nnsight_backend", "NNsightCapture", "nnsight", "nnsight"),
    "lens": ("lens_backend", "LensCapture", "transformer_lens", "lens"),
}
BACKENDS = ("hf", *_OPTIONAL)


class BackendNotInstalledError(NotInstalledError):
    """The package an optional backend runs on is not installed."""


class HFCapture:
    """The default backend: the transformers attention interface, wrapped (``kfh_probe.capture``)."""

    name = "hf"

    def __init__(self, model: nn.Module, tokenizer=None):
        self.model = model

    def __call__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        answer_mask: torch.Tensor,
        layers: list[int] | None = None,
    ) -> AnswerAttention:
        """``[batch, position]`` inputs -> answer-row attention summed over the rows, ``[batch, layer, head, key]``."""
        return capture_answer_attention(self.model, input_ids, attention_mask, answer_mask, layers=layers)


def install_hint(name: str) -> str:
    """The command that installs the optional backend ``name``."""
    return f"pip install 'kfh-attnpo[{_OPTIONAL[name][3]}]'"


def get_backend(name: str) -> type:
    """The backend class registered under ``name`` (``hf``, ``nnsight`` or ``lens``).

    Raises:
        InputError: no backend has that name.
        BackendNotInstalledError: the backend's package is missing; the message says how to install it.
    """
    if name == "hf":
        return HFCapture
    if name not in _OPTIONAL:
        raise InputError(f"unknown capture backend {name!r}; choose one of {', '.join(BACKENDS)}")
    module_name, class_name, package, _ = _OPTIONAL[name]
    try:
        module = importlib.import_module(f".{module_name}", __name__)
    except ImportError as err:
        if (err.name or "").split(".")[0] != package:
            raise
        raise BackendNotInstalledError(
            f"capture backend {name!r} needs the {package!r} package, which is not installed: {install_hint(name)}"
        ) from err
    return getattr(module, class_name)


def requested_layers(backend: str, num_layers: int, layers: list[int] | None) -> list[int]:
    """The sorted layers to capture (all when ``layers`` is None), checked against the model.

    Raises:
        InputError: naming the backend and the setting ``layers``, when a layer does not exist.
    """
    try:
        return check_layers(layers, num_layers)
    except InputError as err:
        raise InputError(f"backend {backend!r}: {err}", settings=err.settings) from None
