"""Preplan-and-Anchor credit (arXiv 2510.13554; docs/method.md): the outcome advantage of a response, spread
over its tokens, is amplified on the tokens the attention rhythm marks as critical.

- "preplan": tokens with the sharpest WAAD rises (the model reaches far back to open a new chunk);
- "anchor": tokens with the largest FAI (tokens the later reasoning keeps attending to);
- "coupled": anchors that coincide with or immediately follow a preplan token, and those preplan tokens.

In each response the top ``top`` share of tokens by the signal (ceil(top m) of the m tokens where it is
defined) is selected; where the response's advantage is non-negative their advantage is multiplied by
``gain`` (1.5 by default); every other token keeps the outcome advantage, and a negative advantage is
left as it is.

``token_mask`` and ``amplify`` are pure (hand-checked in the tests). ``rhythm_token_advantages`` adds
the forward: the signals of the rollouts that need them (positive advantage), computed with the current
policy by ``kfh_probe.rhythm.rhythm_signals`` in a separate no-grad forward. The single-machine loop
and the TRL adapter call the same functions. The signals are reductions of each layer's attention call
(``kfh_probe.capture.capture_layer_calls``), so a fused update forward can produce the same
``RhythmSignals`` from its own attention calls and hand them to ``token_mask`` unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from kfh_probe.rhythm import RhythmHeads, RhythmSignals, heads_from_header, read_rhythm_header, rhythm_signals
from kfh_probe.sampling import Rollouts

STRATEGIES = ("preplan", "anchor", "coupled")


@dataclass(frozen=True)
class RhythmProbe:
    """What the rhythm credit reads from a rhythm file's header: the heads, W and the FAI range."""

    heads: RhythmHeads
    window: int
    fai_range: tuple[int, int]

    @classmethod
    def from_file(cls, path, model: nn.Module) -> "RhythmProbe":
        """Read a ``kfh-probe rhythm`` file's header, checked against ``model``'s shape."""
        from kfh_probe.capture import model_shape

        header = read_rhythm_header(path, model_shape(model))
        return cls(heads_from_header(header), int(header["window"]), (int(header["fai_range"][0]), int(header["fai_range"][1])))


def waad_rise(waad: torch.Tensor) -> torch.Tensor:
    """``[n]`` WAAD_t - WAAD_{t-1}; NaN at the first response token (no previous response token)."""
    rise = torch.full_like(waad, float("nan"))
    rise[1:] = waad[1:] - waad[:-1]
    return rise


def top_share(scores: torch.Tensor, top: float) -> torch.Tensor:
    """``[n]`` bool: the ceil(top m) largest of the m defined (non-NaN) scores; ties by position ascending."""
    defined = (~scores.isnan()).nonzero().flatten().tolist()
    count = math.ceil(top * len(defined))
    chosen = sorted(defined, key=lambda i: (-float(scores[i]), i))[:count]
    mask = torch.zeros(len(scores), dtype=torch.bool)
    mask[chosen] = True
    return mask


def token_mask(strategy: str, waad: torch.Tensor, fai: torch.Tensor, top: float = 0.4) -> torch.Tensor:
    """The tokens a strategy credits, ``[n]`` bool, from one response's WAAD and FAI ``[n]`` (module docstring)."""
    if strategy == "preplan":
        return top_share(waad_rise(waad), top)
    if strategy == "anchor":
        return top_share(fai, top)
    if strategy == "coupled":
        preplan, anchor = top_share(waad_rise(waad), top), top_share(fai, top)
        after_preplan = preplan.clone()
        after_preplan[1:] |= preplan[:-1]  # a preplan token at t or t - 1
        before_anchor = anchor.clone()
        before_anchor[:-1] |= anchor[1:]  # an anchor at t or t + 1
        return (anchor & after_preplan) | (preplan & before_anchor)
    raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}; got {strategy!r}")


def amplify(advantage: float, mask: torch.Tensor, gain: float = 1.5) -> torch.Tensor:
    """``[n]`` float32 token advantages: ``advantage`` everywhere, times ``gain`` on ``mask`` when it is >= 0."""
    out = torch.full((len(mask),), float(advantage), dtype=torch.float32)
    if advantage >= 0:
        out[mask] *= gain
    return out


def rollout_signals(
    model: nn.Module, rollouts: Rollouts, indices: list[int], probe: RhythmProbe, pad_id: int, batch_size: int
) -> dict[int, RhythmSignals]:
    """WAAD and FAI of the responses ``indices`` under ``model`` (the current policy), by rollout index."""
    sequences = [rollouts.prompt_ids[i] + rollouts.response_ids[i] for i in indices]
    starts = [len(rollouts.prompt_ids[i]) for i in indices]
    signals = rhythm_signals(model, sequences, starts, probe.heads, pad_id, batch_size, probe.window, probe.fai_range)
    return dict(zip(indices, signals))


def rhythm_advantages(
    advantages: torch.Tensor, rollouts: Rollouts, signals: dict[int, RhythmSignals], strategy: str, top: float, gain: float
) -> tuple[list[torch.Tensor], dict]:
    """Per-token advantages of one step's rollouts from their signals; pure.

    Args:
        advantages: [P, G] outcome advantages.
        signals: the signals of (at least) every rollout with a positive advantage, by rollout index.
    Returns:
        (P*G float32 tensors [response_len_i], stats: "amplified_frac" (share of the response tokens of
         positive-advantage rollouts that were amplified; 0 without any), "masks" (per rollout the [n]
         bool mask, None where no signals were used)).
    """
    flat = advantages.reshape(-1).tolist()
    outputs: list[torch.Tensor] = []
    masks: list[torch.Tensor | None] = []
    amplified = total = 0
    for i, advantage in enumerate(flat):
        n = len(rollouts.response_ids[i])
        if advantage > 0:
            if i not in signals:
                raise ValueError(f"rollout {i} has a positive advantage but no rhythm signals")
            mask = token_mask(strategy, signals[i].waad, signals[i].fai, top)
            amplified += int(mask.sum())
            total += n
            masks.append(mask)
            outputs.append(amplify(advantage, mask, gain))
        else:
            masks.append(None)
            outputs.append(torch.full((n,), float(advantage), dtype=torch.float32))
    return outputs, {"amplified_frac": amplified / total if total else 0.0, "masks": masks}


def rhythm_token_advantages(
    model: nn.Module, rollouts: Rollouts, advantages: torch.Tensor, probe: RhythmProbe, strategy: str, top: float,
    gain: float, pad_id: int, batch_size: int,
) -> tuple[list[torch.Tensor], dict]:
    """``rollout_signals`` of the positive-advantage rollouts (one no-grad forward per batch), then
    ``rhythm_advantages``."""
    positive = [i for i, a in enumerate(advantages.reshape(-1).tolist()) if a > 0]
    signals = rollout_signals(model, rollouts, positive, probe, pad_id, batch_size) if positive else {}
    return rhythm_advantages(advantages, rollouts, signals, strategy, top, gain)
