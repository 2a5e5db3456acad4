"""Counterfactual labels from the model itself: delete one step, re-score the final answer.

For a trace with steps s_1..s_K and final-answer span F (every token after the marker, EOS
included), the score of step k is the drop in the teacher-forced log-probability of F when s_k is
deleted from the reasoning:

    drop_k = log p(F | prompt, s_1..s_K, marker) - log p(F | prompt, s_1..s_K without s_k, marker)

(nats, summed over F's tokens). A step is essential when ``drop_k >= threshold``, or, with
``top_fraction``, when it is among the ``ceil(top_fraction * K)`` largest drops. The full reasoning
and its K deletions are K+1 right-padded sequences scored in one batched forward (split into
forwards of at most ``batch_size`` sequences). Deleting the first step keeps a leading think opener
(``<think>`` for the marker ``</think>``), so the deletion removes the step and not the format.

Only the rows that predict F go through the output layer: ``[batch, |F|, vocab]`` logits, never
``[batch, T, vocab]``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..alignment import AlignmentError, TokenizedTrace, collate, tokenize_trace
from ..errors import InputError
from ..segmentation import split_at_marker, think_opener
from ..traces import Trace
from .base import Labeling, Labels, LabelerError


def deletions(steps: list[str], opener: str) -> list[list[str]]:
    """The step lists with step k deleted, for k = 0..K-1 (a leading ``opener`` of step 0 stays)."""
    variants = []
    for k in range(len(steps)):
        rest = steps[:k] + steps[k + 1:]
        if k == 0 and opener and steps[0].startswith(opener):
            rest = [opener + (rest[0] if rest else "")] + rest[1:]
        variants.append([t for t in rest if t])
    return variants


def _final_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The causal LM's logits from its decoder's last hidden states (soft-capped where the model is)."""
    logits = model.get_output_embeddings()(hidden).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


@torch.no_grad()
def answer_logprobs(model: nn.Module, sequences: list[TokenizedTrace], pad_id: int) -> torch.Tensor:
    """Teacher-forced log-probability of each sequence's final-answer span F, summed over F.

    Args:
        sequences: B tokenized traces (each with its ``answer_span``).

    Returns:
        ``[B]`` float64 log-probabilities.
    """
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None or model.get_output_embeddings() is None:
        raise LabelerError(f"{type(model).__name__} has no separate decoder and output layer, so answer tokens cannot be re-scored")
    device = next(model.parameters()).device
    batch = collate(sequences, pad_id)
    hidden = decoder(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                     use_cache=False).last_hidden_state  # [B, T, d]
    width = max(s.answer_span[1] - s.answer_span[0] for s in sequences)
    # Row j of sequence b predicts token answer_start + j from position answer_start + j - 1.
    offsets = torch.arange(width, device=device)
    starts = torch.tensor([s.answer_span[0] for s in sequences], device=device)
    ends = torch.tensor([s.answer_span[1] for s in sequences], device=device)
    targets = starts[:, None] + offsets[None, :]  # [B, |F|max]
    valid = targets < ends[:, None]
    targets = torch.where(valid, targets, starts[:, None])
    rows = hidden.gather(1, (targets - 1)[..., None].expand(-1, -1, hidden.shape[-1]))  # [B, |F|max, d]
    logprobs = torch.log_softmax(_final_logits(model, rows), dim=-1)
    tokens = batch.input_ids.to(device).gather(1, targets)
    picked = logprobs.gather(2, tokens[..., None])[..., 0].double()
    return (picked * valid).sum(dim=1).cpu()


def label_from_drops(drops: list[float], threshold: float | None, top_fraction: float | None) -> Labels:
    """Essential where the drop reaches ``threshold``, or for the top ``ceil(top_fraction * K)`` drops."""
    if top_fraction is not None:
        keep = math.ceil(top_fraction * len(drops))
        order = sorted(range(len(drops)), key=lambda k: (-drops[k], k))
        chosen = set(order[:keep])
        return ["essential" if k in chosen else "redundant" for k in range(len(drops))]
    assert threshold is not None
    return ["essential" if d >= threshold else "redundant" for d in drops]


class AblationLabeler:
    """Model-intrinsic counterfactual labels (module docstring). ``drops`` keeps, per trace id, the
    drop of every step in nats, for reports and inspection."""

    name = "ablation"

    def __init__(self, model: nn.Module, tokenizer, pad_id: int, threshold: float | None = 1.0,
                 top_fraction: float | None = None, batch_size: int = 64, marker: str = "</think>"):
        if (threshold is None) == (top_fraction is None):
            raise InputError("give exactly one of threshold and top_fraction")
        if top_fraction is not None and not 0 < top_fraction <= 1:
            raise InputError(f"top_fraction must be in (0, 1], got {top_fraction}")
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.tokenizer, self.pad_id = model, tokenizer, pad_id
        self.threshold, self.top_fraction, self.batch_size = threshold, top_fraction, batch_size
        self.marker = marker
        self.opener = think_opener(marker)
        self.drops: dict[str, list[float]] = {}

    def step_drops(self, trace: Trace) -> list[float]:
        """``drop_k`` of every step of ``trace`` (nats).

        Raises:
            AlignmentError: the trace or one of its deletions cannot be placed on tokens.
        """
        steps = [s.text for s in trace.steps or ()]
        _, answer = split_at_marker(trace.response, self.marker)
        sequences = []
        for variant in [steps, *deletions(steps, self.opener)]:
            reasoning = "".join(variant)  # one span: only F's position matters here
            response = reasoning + self.marker + answer
            sequences.append(tokenize_trace(self.tokenizer, trace.prompt, response, [reasoning] if reasoning else [], self.marker))
        scores = torch.cat([answer_logprobs(self.model, sequences[i:i + self.batch_size], self.pad_id)
                            for i in range(0, len(sequences), self.batch_size)])
        return [float(scores[0] - scores[k + 1]) for k in range(len(steps))]

    def label(self, traces: list[Trace]) -> Labeling:
        result = Labeling.empty(len(traces))
        for i, trace in enumerate(traces):
            try:
                drops = self.step_drops(trace)
            except AlignmentError as err:
                result.fail(i, f"cannot place the trace or a deletion on tokens: {err}")
                continue
            self.drops[trace.id] = drops
            result.labels[i] = label_from_drops(drops, self.threshold, self.top_fraction)
        return result
