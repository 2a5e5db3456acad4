"""The Preplan-and-Anchor credit strategies (arXiv 2510.13554; docs/method.md section 8): the outcome advantage
of a response, spread over its tokens, is amplified on the tokens the attention rhythm marks as critical.

The project's rule (the default):

- "preplan": tokens with the sharpest WAAD rises (the model reaches far back to open a new chunk);
- "anchor": tokens with the largest FAI (tokens the later reasoning keeps attending to);
- "coupled": anchors that coincide with or immediately follow a preplan token, and those preplan tokens.

In each response the top ``top`` share of tokens by the signal (ceil(top m) of the m tokens where it is
defined) is selected; where the response's advantage is non-negative their advantage is multiplied by
``gain`` (1.5 by default); every other token keeps the outcome advantage, and a negative advantage is
left as it is. The paper's own rule (``PaperRule``: preplan by |WAAD_t - WAAD_{t+1}|, coupled credit
back-allocated from locally dominated anchors, both signs scaled) is the option.

``token_mask``, ``token_gamma`` and ``rhythm_advantages`` are pure (hand-checked in the tests). The strategies
(``PreplanAnchor``) read WAAD and FAI of the current policy with ``kfh_probe.SignalRecorder`` (detached
float32, chunks of query rows, never T x T), for the responses whose advantage ``needs_signals``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from attnpo_train.config import TrainConfig
from attnpo_train.strategies.base import CreditBatch, CreditStrategy, StrategyFile, register
from kfh_probe import PreplanAnchorHeads, RhythmSignals, Rollouts, SignalRecorder, default_rhythm_path

STRATEGIES = ("preplan", "anchor", "coupled")


def waad_rise(waad: torch.Tensor) -> torch.Tensor:
    """``[n]`` WAAD_t - WAAD_{t-1}; NaN at the first response token (no previous response token)."""
    rise = torch.full_like(waad, float("nan"))
    rise[1:] = waad[1:] - waad[:-1]
    return rise


def waad_change(waad: torch.Tensor) -> torch.Tensor:
    """``[n]`` the paper's preplan score |WAAD_t - WAAD_{t+1}|; NaN at the last response token (no next one)."""
    change = torch.full_like(waad, float("nan"))
    change[:-1] = (waad[:-1] - waad[1:]).abs()
    return change


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


@dataclass(frozen=True)
class PaperRule:
    """The paper's own token rule (arXiv 2510.13554 v2, section 5.2; docs/method.md section 8), instead of the
    project's default.

    - preplan: the top ``top`` share by |WAAD_t - WAAD_{t+1}|;
    - anchor: the top ``top`` share by FAI (as the default);
    - coupled: every anchor t gets ``gain``, except a *locally dominated* one (WAAD_t at most the response's
      median WAAD, and a change |WAAD_u - WAAD_{u+1}| at least the smallest preplan token's for some u in
      t-k..t-1), which keeps (1 - alpha) of the bonus gain - 1 and hands alpha of it to its introductory
      token, the u in t-k..t-1 with the largest change (the nearest on ties); bonuses add up;
    - the multipliers scale negative advantages too.

    The thresholds, alpha, the choice of the introductory token and k within the paper's {1, 2, 3} are
    the project's choices (the paper leaves them open).
    """

    alpha: float = 0.5
    k: int = 3


def paper_rule(config: TrainConfig) -> PaperRule | None:
    """The ``PaperRule`` of a ``TrainConfig`` whose ``rhythm_rule`` is "paper", else None (the project's rule)."""
    return PaperRule(config.rhythm_alpha, config.rhythm_k) if config.rhythm_rule == "paper" else None


def paper_gamma(strategy: str, waad: torch.Tensor, fai: torch.Tensor, top: float, gain: float,
                rule: PaperRule) -> torch.Tensor:
    """``[n]`` float32 multipliers gamma_t of one response under the paper's rule (``PaperRule``)."""
    bonus = gain - 1.0
    change = waad_change(waad)
    if strategy == "preplan":
        return 1.0 + bonus * top_share(change, top).float()
    anchors = top_share(fai, top)
    if strategy == "anchor":
        return 1.0 + bonus * anchors.float()
    if strategy != "coupled":
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}; got {strategy!r}")
    preplan = top_share(change, top)
    low_waad = float(waad.median()) if len(waad) else 0.0  # torch's median: the lower of the two middle values
    big_change = float(change[preplan].min()) if bool(preplan.any()) else math.inf
    gamma = torch.ones(len(waad), dtype=torch.float32)
    intros: set[int] = set()
    for t in anchors.nonzero().flatten().tolist():
        window = list(range(max(0, t - rule.k), t))
        peak = max(window, key=lambda u: (float(change[u]), u)) if window else None
        if peak is not None and float(waad[t]) <= low_waad and float(change[peak]) >= big_change:
            gamma[t] += (1.0 - rule.alpha) * bonus
            intros.add(peak)
        else:
            gamma[t] += bonus
    for u in intros:
        gamma[u] += rule.alpha * bonus
    return gamma


def token_gamma(strategy: str, waad: torch.Tensor, fai: torch.Tensor, top: float = 0.4, gain: float = 1.5,
                paper: PaperRule | None = None) -> torch.Tensor:
    """``[n]`` float32 multipliers of one response's advantage: ``gain`` on ``token_mask`` and 1 elsewhere
    (the project's rule), or ``paper_gamma`` when ``paper`` is given."""
    if paper is not None:
        return paper_gamma(strategy, waad, fai, top, gain, paper)
    return torch.where(token_mask(strategy, waad, fai, top), torch.tensor(gain, dtype=torch.float32), 1.0)


def amplify(advantage: float, mask: torch.Tensor, gain: float = 1.5) -> torch.Tensor:
    """``[n]`` float32 token advantages: ``advantage`` everywhere, times ``gain`` on ``mask`` when it is >= 0."""
    out = torch.full((len(mask),), float(advantage), dtype=torch.float32)
    if advantage >= 0:
        out[mask] *= gain
    return out


def needs_signals(advantage: float, paper: PaperRule | None) -> bool:
    """Whether a response's advantage changes with its signals: positive (the project's rule leaves negative
    advantages uniform, and 1.5 x 0 = 0) or, under the paper's rule, non-zero."""
    return advantage != 0 if paper is not None else advantage > 0


def rhythm_advantages(
    advantages: torch.Tensor, rollouts: Rollouts, signals: dict[int, RhythmSignals], strategy: str, top: float,
    gain: float, paper: PaperRule | None = None, indices: list[int] | None = None,
) -> tuple[list[torch.Tensor], dict]:
    """Per-token advantages of one step's rollouts from their signals; pure.

    A response's advantages depend on its own outcome advantage and signals only, so any subset of the
    rollouts can be computed on its own (``indices``; the update does one micro-batch at a time).

    Args:
        advantages: [P, G] outcome advantages.
        signals: the signals of (at least) every rollout of ``indices`` that ``needs_signals``, by rollout index.
        paper: the paper's rule (``PaperRule``) instead of the project's.
        indices: rollout indices (None: all P*G).
    Returns:
        (one float32 tensor [response_len_i] per index, stats: "amplified_frac" (share of the response
         tokens of the rollouts that needed signals whose multiplier is not 1; 0 without any),
         "amplified", "credited_tokens" (its numerator and denominator), "masks" (per index the [n] bool
         mask of multipliers other than 1, None where no signals were used)).
    """
    flat = advantages.reshape(-1).tolist()
    indices = list(range(len(flat))) if indices is None else indices
    outputs: list[torch.Tensor] = []
    masks: list[torch.Tensor | None] = []
    amplified = total = 0
    for i in indices:
        advantage = flat[i]
        uniform = torch.full((len(rollouts.response_ids[i]),), float(advantage), dtype=torch.float32)
        if not needs_signals(advantage, paper):
            masks.append(None)
            outputs.append(uniform)
            continue
        if i not in signals:
            raise ValueError(f"rollout {i} has a {'positive' if advantage > 0 else 'non-zero'} advantage but no "
                             "rhythm signals")
        gamma = token_gamma(strategy, signals[i].waad, signals[i].fai, top, gain, paper)
        mask = gamma != 1.0
        amplified += int(mask.sum())
        total += len(gamma)
        masks.append(mask)
        outputs.append(uniform * gamma)
    return outputs, {"amplified_frac": amplified / total if total else 0.0, "amplified": amplified,
                     "credited_tokens": total, "masks": masks}


class PreplanAnchor(CreditStrategy):
    """A Preplan-and-Anchor strategy: TLMRE rewards, the advantage of the critical tokens amplified (``rule``).

    Attributes:
        probe: the rhythm heads, W and FAI range, from the rhythm file (``TrainConfig.rhythm``; the organism's
            when None), read by ``attach``.
    """

    rule: ClassVar[str]
    """"preplan", "anchor" or "coupled" (``token_mask``)."""
    files = (StrategyFile("rhythm", "rhythm heads",
                          "pass --set rhythm=R.jsonl (make one with `kfh-probe rhythm --model DIR --traces F --out R.jsonl`)",
                          default_rhythm_path),)

    def __init__(self, config: TrainConfig, ground_truth: bool = False) -> None:
        super().__init__(config, ground_truth)
        self.paper = paper_rule(config)
        self.probe: PreplanAnchorHeads | None = None

    def attach(self, model: nn.Module, tokenizer, gather_params=None) -> None:
        """Read the rhythm file's header, checked against the policy's shape (InputError naming the file)."""
        super().attach(model, tokenizer, gather_params)
        self.probe = PreplanAnchorHeads.from_file(self.files[0].path(self.config), model)
        self.layers = self.probe.heads.layers

    def prepare(self, batch: CreditBatch) -> None:
        super().prepare(batch)
        self.wanted = {i for i, a in enumerate(batch.advantages.reshape(-1).tolist()) if needs_signals(a, self.paper)}
        self._counts = [0, 0]  # amplified, credited tokens

    def recorder(self, indices, shape, offsets, device) -> SignalRecorder:
        """Reduces the rhythm heads' attention calls to WAAD and FAI of the rows ``wants``."""
        prompts, responses = self.batch.rollouts.prompt_ids, self.batch.rollouts.response_ids
        starts = [offsets[b] + len(prompts[i]) if self.wants(i) else None for b, i in enumerate(indices)]
        ends = [offsets[b] + len(prompts[i]) + len(responses[i]) for b, i in enumerate(indices)]
        return SignalRecorder(self.probe.heads, starts, ends, self.probe.window, self.probe.fai_range, offsets=offsets)

    def read(self, indices, offsets, recorder: SignalRecorder) -> dict[int, RhythmSignals]:
        return {i: signals for i, signals in zip(indices, recorder.signals()) if signals is not None}

    def advantages(self, indices: list[int]) -> list[torch.Tensor]:
        config = self.config
        values, stats = rhythm_advantages(self.batch.advantages, self.batch.rollouts, self.readings, self.rule,
                                          config.rhythm_top, config.rhythm_gain, self.paper, indices=indices)
        self._counts[0] += stats["amplified"]
        self._counts[1] += stats["credited_tokens"]
        return values

    def metrics(self) -> dict[str, float | None]:
        """The step's "amplified_frac", as ``rhythm_advantages`` gives it over all its rollouts."""
        amplified, total = self._counts
        return {**super().metrics(), "amplified_frac": amplified / total if total else 0.0}


@register("preplan")
class Preplan(PreplanAnchor):
    """Amplify the tokens with the sharpest WAAD rises."""

    rule = "preplan"


@register("anchor")
class Anchor(PreplanAnchor):
    """Amplify the tokens with the largest FAI."""

    rule = "anchor"


@register("coupled")
class Coupled(PreplanAnchor):
    """Amplify the anchors next to a preplan token, and those preplan tokens."""

    rule = "coupled"
