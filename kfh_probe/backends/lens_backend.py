"""The ``lens`` backend: answer-row attention from TransformerLens 4's ``hook_pattern``.

``TransformerBridge.boot_transformers(..., hf_model=model, tokenizer=tokenizer)`` wraps the loaded model
offline (no download: the model and tokenizer are given). The bridge runs attention eagerly and fires
``blocks.{layer}.attn.hook_pattern`` with the post-softmax pattern ``[batch, head, query, key]``: this backend
therefore builds every full ``T x T`` map (the cost of TransformerLens's pattern hook, accepted here),
keeps only the answer rows at once inside the hook and sums them; the forward stops after the last
requested layer (``stop_at_layer``).

The bridge takes the model over: it replaces the model's submodules with bridge components in place and
switches it to eager attention, so build this backend on a model used for nothing else.
"""

from __future__ import annotations

import copy
from functools import partial

import torch
from torch import nn
from transformer_lens.model_bridge import TransformerBridge

from ..capture import AnswerAttention, UnsupportedModelError, answer_rows
from . import requested_layers

NAME = "lens"


def _boot(model: nn.Module, tokenizer) -> TransformerBridge:
    """Wrap ``model`` in a TransformerBridge without touching the network.

    Raises:
        UnsupportedModelError: naming the backend, when TransformerLens has no adapter for the model.
    """
    arch = type(model).__name__
    name = getattr(model.config, "name_or_path", None) or arch
    try:
        return TransformerBridge.boot_transformers(
            name,
            hf_model=model,
            tokenizer=copy.deepcopy(tokenizer),  # the bridge reconfigures the tokenizer it is given
            device=str(next(model.parameters()).device),
            dtype=next(model.parameters()).dtype,
        )
    except (ValueError, NotImplementedError, KeyError) as err:
        raise UnsupportedModelError(f"backend {NAME!r}: TransformerLens cannot wrap {arch}: {err}") from err


class LensCapture:
    """Answer-row attention through a TransformerLens ``TransformerBridge``.

    Args:
        model: a loaded Hugging Face causal LM in eval mode (taken over by the bridge, see the module).
        tokenizer: the model's tokenizer (the bridge needs one; a copy is given, so it is not changed).
    """

    name = NAME

    def __init__(self, model: nn.Module, tokenizer=None):
        if model.training:
            raise ValueError(f"backend {NAME!r}: put the model in eval mode (model.eval()) first: dropout would change attention")
        if tokenizer is None:
            raise ValueError(f"backend {NAME!r} needs the model's tokenizer to boot a TransformerBridge offline")
        self.bridge = _boot(model, tokenizer)
        self.num_layers = self.bridge.cfg.n_layers
        missing = [layer for layer in range(self.num_layers) if f"blocks.{layer}.attn.hook_pattern" not in self.bridge.hook_dict]
        if missing:
            raise UnsupportedModelError(
                f"backend {NAME!r}: the TransformerLens bridge of {type(model).__name__} has no hook_pattern in layer(s) {missing}"
            )

    def __call__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        answer_mask: torch.Tensor,
        layers: list[int] | None = None,
    ) -> AnswerAttention:
        """One forward with a ``hook_pattern`` hook on each requested layer.

        Args:
            input_ids: ``[batch, position]`` right-padded token ids.
            attention_mask: ``[batch, position]``, 1 on real tokens.
            answer_mask: ``[batch, position]`` bool, True on the answer rows.
            layers: layer indices (all when None).

        Returns:
            ``reduce="sum"`` answer attention, values ``[batch, layer, head, key]`` float32.
        """
        wanted = requested_layers(NAME, self.num_layers, layers)
        rows, row_valid = answer_rows(answer_mask.bool())
        results: dict[int, torch.Tensor] = {}

        def keep_answer_rows(pattern: torch.Tensor, hook, layer: int) -> None:
            """``pattern [batch, head, query, key]`` -> answer rows summed, ``[batch, head, key]``."""
            index = rows.to(pattern.device)[:, None, :, None].expand(-1, pattern.shape[1], -1, pattern.shape[-1])
            picked = pattern.gather(2, index).float() * row_valid.to(pattern.device)[:, None, :, None]
            results[layer] = picked.sum(dim=2)

        hooks = [(f"blocks.{layer}.attn.hook_pattern", partial(keep_answer_rows, layer=layer)) for layer in wanted]
        with torch.no_grad():
            self.bridge.run_with_hooks(
                input_ids, attention_mask=attention_mask, fwd_hooks=hooks, return_type=None,
                stop_at_layer=wanted[-1] + 1, use_cache=False,
            )
        silent = [layer for layer in wanted if layer not in results]
        if silent:
            raise UnsupportedModelError(f"backend {NAME!r}: hook_pattern of layer(s) {silent} did not fire during the forward")
        values = torch.stack([results[layer].to(rows.device) for layer in wanted], dim=1)
        return AnswerAttention(wanted, values, rows, row_valid)
