"""What a distillation run trains on: the teacher's traces as :class:`~kfh_probe.KeyTrace` (steps, F and key
spans on tokens), their cross-entropy labels, and the teacher's stepwise key mass on each."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from kfh_probe import InputError, KeyTrace, TraceFormatError, key_attention, key_spans, key_trace, listed, read_traces

MARKER = "</think>"


def load_key_traces(path: str | Path, tokenizer, with_keys: bool) -> list[KeyTrace]:
    """The traces of ``path`` on the tokenizer's tokens. Steps come from the file (a trace without steps is
    one step); key spans, only ``with_keys``, from the organism's grammar (``kfh_probe.key_spans``).

    Raises:
        kfh_probe.InputError: the file cannot be read, or (``with_keys``) some trace is not in the organism's
            grammar, or a step or key span covers no token: every such trace named by line and id.
    """
    traces, _ = read_traces(path, MARKER)
    if not traces:
        raise InputError(f"{path}: no traces")
    out, problems = [], []
    for trace in traces:
        reasoning = trace.response.split(MARKER)[0]
        steps = [s.text for s in trace.steps] if trace.steps else [reasoning]
        labels = [s.label for s in trace.steps] if trace.steps else [None]
        try:
            keys = [(s.start, s.end) for s in key_spans(trace.prompt, trace.response)] if with_keys else []
            out.append(key_trace(tokenizer, trace.prompt, trace.response, steps, labels, keys, MARKER))
        except (TraceFormatError, ValueError) as err:
            problems.append(f"line {trace.line} (id {trace.id!r}): {err}")
    if problems:
        hint = (" (key information is read from the organism's grammar; transfer_weight 0 trains on any traces)"
                if with_keys else "")
        raise InputError(f"{path}: {len(problems)} trace(s) cannot be used{hint}: {listed(problems)}")
    return out


def lm_labels(traces: list[KeyTrace], width: int) -> torch.Tensor:
    """``[batch, position]`` next-token targets: the response tokens, -100 on prompt and padding."""
    labels = torch.full((len(traces), width), -100, dtype=torch.long)
    for b, t in enumerate(traces):
        labels[b, t.prompt_len:len(t.input_ids)] = torch.tensor(t.input_ids[t.prompt_len:])
    return labels


def teacher_mass(teacher: nn.Module, traces: list[KeyTrace], pad_id: int, batch_size: int = 16) -> list[torch.Tensor]:
    """Per trace, the teacher's key mass averaged over each layer's heads: ``[teacher_layer, step, key]``."""
    return [mass.mean(dim=1) for mass in key_attention(teacher.eval(), traces, pad_id, batch_size)]


def padded_mass(masses: list[torch.Tensor], steps: int, keys: int) -> torch.Tensor:
    """``[batch, layer, step, key]`` of per-trace ``[layer, step, key]`` masses, zero-padded."""
    out = torch.zeros(len(masses), masses[0].shape[0], steps, keys)
    for b, mass in enumerate(masses):
        out[b, :, : mass.shape[1], : mass.shape[2]] = mass
    return out
