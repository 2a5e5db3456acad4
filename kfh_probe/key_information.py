"""Stepwise attention on key information: how much each reasoning step attends to each piece of key
information available to it, read with the exact capture (never a T x T map).

For a trace with reasoning steps s_1..s_K, the final-answer span F taken as one more step s_{K+1}, and
key-information spans c_1..c_J (token spans; on the organism, :func:`kfh_probe.organism.key_spans.key_spans`),
the **key mass** of step k on span j for one head is the mean over the step's rows m of the attention
row's mass on the span::

    mass[k, j] = (1 / |s_k|) * sum_{m in s_k} sum_{n in c_j} a[m, n]

Span j is **available** to step k when it ends at or before the step's first token (facts always; a
computed quantity for the steps after the one that computes it). The **key distribution** of step k is
over the available spans plus one "rest" entry that holds every other key's mass (the rest of the
context, and the spans not yet available)::

    p[k, j] = mass[k, j] if available else 0,   p[k, J] = 1 - sum_j p[k, j]

Rows are computed from the query and key the model passes to its attention function
(``kfh_probe.capture.interface_call_rows``: the model's own mask, scaling, soft-cap, grouped heads), in
chunks of ``chunk`` rows, each reduced over keys to the J spans at once: one ``[batch, head, chunk, key]``
block lives at a time. Under ``grad=True`` (a student being trained) each chunk is recomputed in the
backward pass instead of stored (``torch.utils.checkpoint``), so that holds for the backward too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .alignment import AlignmentError, _encode, placed_span, right_pad, tokenize_trace

ROW_CHUNK = 128
"""Query rows per block of the reduction."""


@dataclass(frozen=True)
class KeyTrace:
    """Token ids of one trace, the token spans of its steps (the reasoning steps, then F as the last one)
    and of its key information, and the reasoning steps' labels.

    Attributes:
        input_ids: prompt and response token ids (EOS appended as the probe does).
        prompt_len: how many of them belong to the prompt.
        step_spans: ``[start, end)`` of each reasoning step, then of F.
        key_spans: ``[start, end)`` of each key-information span, in text order.
        labels: the label of each reasoning step (None where unlabelled).
    """

    input_ids: list[int]
    prompt_len: int
    step_spans: list[tuple[int, int]]
    key_spans: list[tuple[int, int]]
    labels: list[str | None]

    def available(self) -> list[list[bool]]:
        """``[step][key]``: whether key span j ends at or before step k's first token."""
        return [[end <= start for _, end in self.key_spans] for start, _ in self.step_spans]


def key_trace(
    tokenizer,
    prompt: str,
    response: str,
    step_texts: list[str],
    labels: list[str | None],
    key_chars: list[tuple[int, int]],
    marker: str = "</think>",
) -> KeyTrace:
    """Place steps, F and key spans (characters ``[start, end)`` of ``prompt + response``) on the tokens.

    A token belongs to a key span when its first non-whitespace character lies in it (the rule that places
    tokens in steps, docs/method.md section 2).

    Raises:
        AlignmentError: a step or key span covers no token, the marker is missing, or F is empty.
    """
    tokenized = tokenize_trace(tokenizer, prompt, response, step_texts, marker)
    _, starts, _ = _encode(tokenizer, prompt, response, True, False)
    key_spans = []
    for c0, c1 in key_chars:
        span = placed_span(starts, c0, c1)
        if span is None:
            raise AlignmentError(f"key span at characters {c0}..{c1} covers no token")
        key_spans.append(span)
    return KeyTrace(tokenized.input_ids, tokenized.prompt_len, [*tokenized.step_spans, tokenized.answer_span], key_spans, list(labels))


@dataclass(frozen=True)
class KeyBatch:
    """Right-padded batch of key traces and the index tensors of the reduction.

    Attributes:
        input_ids, attention_mask: ``[batch, position]``.
        rows: ``[batch, row]`` long, the query positions of every step's tokens (padded with 0);
            row_valid: ``[batch, row]`` bool.
        row_weight: ``[batch, step, row]`` float, 1 / |s_k| where row r lies in step k (0 elsewhere).
        key_member: ``[batch, position, key]`` float, 1 where the token lies in key span j.
        available: ``[batch, step, key]`` bool (False on padding steps and keys).
        step_valid: ``[batch, step]`` bool.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    rows: torch.Tensor
    row_valid: torch.Tensor
    row_weight: torch.Tensor
    key_member: torch.Tensor
    available: torch.Tensor
    step_valid: torch.Tensor


def key_batch(traces: list[KeyTrace], pad_id: int) -> KeyBatch:
    """Pad ``traces`` on the right (``right_pad``) and build the index tensors of the reduction."""
    input_ids, attention_mask = right_pad([t.input_ids for t in traces], pad_id)
    batch, width = input_ids.shape
    num_steps = max(len(t.step_spans) for t in traces)
    num_keys = max(max(len(t.key_spans) for t in traces), 1)
    num_rows = max(sum(b - a for a, b in t.step_spans) for t in traces)
    rows = torch.zeros((batch, num_rows), dtype=torch.long)
    row_valid = torch.zeros((batch, num_rows), dtype=torch.bool)
    row_weight = torch.zeros((batch, num_steps, num_rows))
    key_member = torch.zeros((batch, width, num_keys))
    available = torch.zeros((batch, num_steps, num_keys), dtype=torch.bool)
    step_valid = torch.zeros((batch, num_steps), dtype=torch.bool)
    for b, trace in enumerate(traces):
        r = 0
        for k, (start, end) in enumerate(trace.step_spans):
            rows[b, r:r + end - start] = torch.arange(start, end)
            row_valid[b, r:r + end - start] = True
            row_weight[b, k, r:r + end - start] = 1.0 / (end - start)
            r += end - start
        for j, (start, end) in enumerate(trace.key_spans):
            key_member[b, start:end, j] = 1.0
        if trace.key_spans:
            available[b, : len(trace.step_spans), : len(trace.key_spans)] = torch.tensor(trace.available())
        step_valid[b, : len(trace.step_spans)] = True
    return KeyBatch(input_ids, attention_mask, rows, row_valid, row_weight, key_member, available, step_valid)


def key_mass_of_rows(probs: torch.Tensor, row_weight: torch.Tensor, key_member: torch.Tensor) -> torch.Tensor:
    """Mean key mass per step of a block of attention rows.

    Args:
        probs: ``[batch, head, row, key_position]`` attention probabilities of some query rows.
        row_weight: ``[batch, step, row]``, 1 / |s_k| for the rows of step k.
        key_member: ``[batch, key_position, key]``, 1 where a position lies in key span j.
    Returns:
        ``[batch, head, step, key]``: these rows' share of ``mass[k, j]`` (sum the blocks of a step's rows).
    """
    per_row = torch.matmul(probs, key_member[:, None])  # [batch, head, row, key]
    return torch.einsum("bsr,bhrj->bhsj", row_weight, per_row)


def key_distribution(mass: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
    """The key distribution: available spans' mass, then the rest, ``[..., step, key + 1]``.

    Args:
        mass: ``[..., step, key]`` key mass (any leading dimensions, e.g. ``[batch, head]`` or ``[batch, layer]``).
        available: ``[batch-like, step, key]`` bool, broadcast against ``mass``.
    """
    kept = mass * available.to(mass.dtype)
    rest = (1.0 - kept.sum(dim=-1, keepdim=True)).clamp_min(0.0)
    return torch.cat([kept, rest], dim=-1)


class KeySpanRecorder:
    """An attention-call observer (``kfh_probe.capture.attention_calls``) that keeps, per layer, the key
    mass ``[batch, head, step, key]`` of every step of a :class:`KeyBatch`.

    Args:
        batch: the batch the forward runs on.
        layers: the layers to record.
        grad: keep the result in the autograd graph (each row block is recomputed in the backward
            pass rather than stored); False records detached values under ``torch.no_grad``.
        chunk: query rows per block.

    Attributes:
        results: per layer, ``[batch, head, step, key]`` float32.
    """

    def __init__(self, batch: KeyBatch, layers: list[int], grad: bool = False, chunk: int = ROW_CHUNK):
        self.batch = batch
        self.layers = set(layers)
        self.grad = grad
        self.chunk = chunk
        self.results: dict[int, torch.Tensor] = {}

    def __call__(self, module: nn.Module, query, key, attention_mask, kwargs) -> None:
        from .capture import interface_call_rows

        if module.layer_idx not in self.layers:
            return
        b = self.batch
        device = query.device
        key_member = b.key_member[:, : key.shape[2]].to(device)

        def block(q, k, rows, valid, weight):
            probs = interface_call_rows(module, q, k, attention_mask, kwargs, rows, valid)
            return key_mass_of_rows(probs, weight, key_member)

        total = None
        track = self.grad and torch.is_grad_enabled()
        with torch.set_grad_enabled(track):
            for start in range(0, b.rows.shape[1], self.chunk):
                part = slice(start, start + self.chunk)
                args = (query, key, b.rows[:, part].to(device), b.row_valid[:, part].to(device),
                        b.row_weight[:, :, part].to(device))
                if track:
                    mass = checkpoint(block, *args, use_reentrant=False)
                else:
                    mass = block(*(a.detach() for a in args))
                total = mass if total is None else total + mass
        self.results[module.layer_idx] = total


@torch.no_grad()
def key_attention(model: nn.Module, traces: list[KeyTrace], pad_id: int, batch_size: int = 8) -> list[torch.Tensor]:
    """The key mass of every head of every layer on each trace: per trace ``[layer, head, step, key]`` float32
    (its own steps and keys, F last), from no-grad forwards of ``batch_size`` traces.

    Raises:
        kfh_probe.capture.UnsupportedModelError: the model's attention cannot be captured.
    """
    from .capture import _check_reported, attention_calls, attention_modules, one_position_logits

    if model.training:
        raise ValueError("put the model in eval mode (model.eval()) before reading its attention")
    layers = sorted(attention_modules(model))
    device = next(model.parameters()).device
    out: list[torch.Tensor] = []
    for first in range(0, len(traces), batch_size):
        chunk = traces[first:first + batch_size]
        batch = key_batch(chunk, pad_id)
        recorder = KeySpanRecorder(batch, layers)
        with attention_calls(model, layers, recorder):
            model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                  use_cache=False, **one_position_logits(model))
        _check_reported(model, layers, recorder.results)
        mass = torch.stack([recorder.results[layer] for layer in layers], dim=1).cpu()  # [batch, layer, head, step, key]
        out += [mass[b, :, :, : len(t.step_spans), : len(t.key_spans)] for b, t in enumerate(chunk)]
    return out
