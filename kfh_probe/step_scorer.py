"""Step scores of tokenized traces, read through a capture backend: the sweep's (every head of the probed
layers) and the trainer's (the mean over the top-N Key-Focus Heads) come from this one class.
"""

from __future__ import annotations

import torch
from torch import nn

from .alignment import TokenizedTrace, collate
from .backends import get_backend
from .batch_runner import consecutive_batches
from .scoring import step_scores


class StepScorer:
    """Captures the answer rows of a model's attention with a backend and turns them into step scores.

    Args:
        model: a Hugging Face causal LM in eval mode.
        pad_id: the id used for right padding.
        tokenizer: the model's tokenizer (the ``nnsight`` and ``lens`` backends need it to wrap the model).
        backend: ``hf`` (default), ``nnsight`` or ``lens`` (:mod:`kfh_probe.backends`).

    Raises:
        kfh_probe.errors.InputError: an unknown backend.
        kfh_probe.backends.BackendNotInstalledError: the backend's package is missing.
    """

    def __init__(self, model: nn.Module, pad_id: int, tokenizer=None, backend: str = "hf"):
        self.model = model
        self.pad_id = pad_id
        self.capture = get_backend(backend)(model, tokenizer)

    @torch.no_grad()
    def score_batch(self, traces: list[TokenizedTrace], layers: list[int] | None = None) -> list[torch.Tensor]:
        """Capture one right-padded batch of traces and score their steps.

        Args:
            layers: the layers to capture (all when None); the forward stops after the deepest.

        Returns:
            per trace, ``[layer, head, step]`` float32 step scores (layers as in ``layers``).
        """
        values = self._answer_attention(traces, layers)
        return [step_scores(values[b], trace.step_spans) for b, trace in enumerate(traces)]

    def _answer_attention(self, traces: list[TokenizedTrace], layers: list[int] | None) -> torch.Tensor:
        """``[batch, layer, head, key]`` float32 on the CPU: the attention each position receives from
        the answer rows, summed over the rows (one right-padded forward)."""
        device = next(self.model.parameters()).device
        batch = collate(traces, self.pad_id)
        captured = self.capture(
            batch.input_ids.to(device), batch.attention_mask.to(device), batch.answer_mask.to(device), layers=layers,
        )
        return captured.values.float().cpu()

    @torch.no_grad()
    def head_attention(self, trace: TokenizedTrace, heads: list[tuple[int, int]]) -> torch.Tensor:
        """``[head, key]`` for one trace: per head of ``heads``, the attention each position receives from the
        answer rows, summed over the rows (what its step scores average; the notebooks shade text with it)."""
        layers = sorted({layer for layer, _ in heads})
        values = self._answer_attention([trace], layers)[0]  # [layer, head, key]
        return torch.stack([values[layers.index(layer), head] for layer, head in heads])

    def head_scores(
        self, tokenized: list[TokenizedTrace], heads: list[tuple[int, int]], batch_size: int
    ) -> list[torch.Tensor]:
        """Step scores of each trace: the mean over ``heads`` of their step scores (method page sec. 3).

        One forward per ``batch_size`` consecutive traces, capturing only the heads' layers and stopped
        after the deepest.

        Args:
            heads: ``(layer, query head)`` pairs, e.g. the top-N Key-Focus Heads (``kfh_probe.top_heads``).

        Returns:
            one float32 tensor ``[step]`` per trace.
        """
        layers = sorted({layer for layer, _ in heads})
        rows = [layers.index(layer) for layer, _ in heads]
        columns = [head for _, head in heads]
        return [
            score[rows, columns].mean(dim=0)
            for chunk in consecutive_batches(len(tokenized), batch_size)
            for score in self.score_batch([tokenized[i] for i in chunk], layers)
        ]
