"""Causal checks of a KFH manifest (``kfh-probe causal``): delete the steps its heads rate highest or
lowest, or silence the heads themselves, and see whether the model still writes the right answer.

For every trace the model writes the final answer again, greedily, after the end-of-thinking marker,
under each condition:

- ``none``: the reasoning as it is;
- ``delete_top`` / ``delete_bottom``: the k steps with the highest / lowest top-N ensemble score (the
  mean step score of the manifest's top-N heads, method page section 3) deleted;
- ``delete_random``: k steps drawn at random (``draws`` seeded draws per trace);
- with labels, ``delete_essential`` / ``delete_redundant``: every truly essential / redundant step deleted;
- ``ablate_top``: the reasoning as it is, the top-N heads mean-ablated while the model writes the answer;
- ``ablate_random``: the same for N random heads of the same layers (never a top-N head; ``draws`` draws).

k is the trace's number of essential steps when it is labeled, else ``round(k_fraction * K)`` (at least 1,
at most K - 1). Each condition reports the answer accuracy (the last ``\\boxed{}`` after the marker
against the trace's ``answer``, else against the original response's own boxed answer; ``kfh_probe.grading``
decides, as it does for the trainer's rewards, so probe and trainer grade alike) and the mean
change, against ``none``, of the teacher-forced log-probability of the original answer span F.

Mean-ablation replaces a head's slice of the attention output (before the output projection) by its mean
over the answer-writing positions of the traces (the token before F and every token of F), at those same
positions only; the other heads' slices are untouched. Everything goes through the transformers attention
interface, as the sweep's capture does, so it works for any causal LM the sweep supports; memory is that
of a forward (plus the KV cache of the answer being written).
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .alignment import AlignmentError, TokenizedTrace, tokenize_trace
from .capture import edit_attention_outputs, model_shape, one_position_logits
from .errors import InputError
from .grading import extract_final_answer, is_correct
from .labelers.ablation import answer_logprobs
from .segmentation import SegmenterConfig, segment_reasoning, split_at_marker
from .settings import Interval, NonEmpty, check_settings, setting
from .sweep import SweepConfig, collect_step_scores
from .traces import SkippedTrace, Step, Trace, TraceFileError, delete_steps

DELETIONS = ("delete_top", "delete_bottom", "delete_random", "delete_essential", "delete_redundant")
CONDITIONS = ("none", *DELETIONS, "ablate_top", "ablate_random")


@dataclass
class CausalConfig:
    """Settings of ``kfh-probe causal`` (recorded in its JSON); each one's help and constraints are declared
    at its field (``kfh_probe.settings``)."""

    k: int | None = setting(
        None, "Steps deleted per trace; None: the trace's essential steps when labeled, else k_fraction.",
        Interval(1, None),
    )
    k_fraction: float = setting(
        0.3, "Fraction of an unlabeled trace's steps deleted (rounded, at least 1).", Interval(0, 1, closed="right")
    )
    top_n: int | None = setting(
        None, "Heads of the ensemble and of the ablation (the manifest's top_n when None).", Interval(1, None)
    )
    draws: int = setting(5, "Seeded draws of delete_random (per trace) and of ablate_random.", Interval(1, None))
    seed: int = setting(0, "Seed of those draws.")
    batch_size: int = setting(
        32, "Sequences per forward (each trace brings one per condition and draw: 16 with labels and 5 draws), "
        "so memory stays that of a forward of this many sequences.", Interval(1, None),
    )
    max_answer_tokens: int | None = setting(
        None, "Answer tokens written at most; None: 2 |F| + 16 of the trace's own answer.", Interval(1, None)
    )
    marker: str = setting("</think>", "End-of-thinking marker.", NonEmpty())
    segmenter: SegmenterConfig = setting(SegmenterConfig(), "Segmentation of traces that carry no steps.")

    def __post_init__(self) -> None:
        check_settings(self)


@dataclass(frozen=True)
class CausalTrace:
    """A trace ready for the causal check: its steps (given or segmented) and the answer to reach.

    Attributes:
        trace: the trace, with ``steps`` always set (labels None where the file has none).
        tokenized: its tokens with step and answer spans.
        reference: the answer the written answer must match.
    """

    trace: Trace
    tokenized: TokenizedTrace
    reference: str

    @property
    def labels(self) -> list[str | None]:
        return [step.label for step in self.trace.steps or ()]


def prepare_causal_traces(
    traces: list[Trace], tokenizer, config: CausalConfig, skip_invalid: bool = False, source: str = "<memory>"
) -> tuple[list[CausalTrace], list[SkippedTrace]]:
    """Segment (where needed), tokenise and choose the traces a causal check can use.

    Used: labeled traces with at least one essential and one redundant step; unlabeled traces with at
    least two steps; either with a reference answer (``answer``, else a ``\\boxed{}`` in the response's
    final answer). The others are returned as skipped, with the reason.

    Raises:
        TraceFileError: a trace cannot be placed on tokens and ``skip_invalid`` is False.
    """
    kept, skipped, broken = [], [], []
    for trace in traces:
        if trace.steps is None:
            reasoning, _ = split_at_marker(trace.response, config.marker)
            trace = dataclasses.replace(trace, steps=tuple(Step(text) for text in segment_reasoning(reasoning, config.segmenter)))
        labels = [step.label for step in trace.steps]
        reference = trace.answer if trace.answer is not None else extract_final_answer(trace.response, config.marker)
        if reference is None:
            skipped.append(SkippedTrace(trace.line, trace.id, "no reference answer: no 'answer' and no \\boxed{} after the marker"))
            continue
        if any(labels) and not ("essential" in labels and "redundant" in labels):
            skipped.append(SkippedTrace(trace.line, trace.id, "labeled, but without both an essential and a redundant step"))
            continue
        if len(labels) < 2:
            skipped.append(SkippedTrace(trace.line, trace.id, "fewer than 2 steps"))
            continue
        try:
            tokenized = tokenize_trace(tokenizer, trace.prompt, trace.response, [s.text for s in trace.steps], config.marker)
        except AlignmentError as err:
            broken.append(SkippedTrace(trace.line, trace.id, str(err)))
            continue
        kept.append(CausalTrace(trace, tokenized, reference))
    if broken and not skip_invalid:
        raise TraceFileError(source, broken)
    return kept, skipped + broken


def steps_to_delete(labels: list[str | None], k: int | None, k_fraction: float) -> int:
    """k for one trace: ``k`` if given, else its essential steps when labeled, else ``round(k_fraction * K)``;
    always between 1 and K - 1."""
    count = len(labels)
    if k is None:
        k = sum(label == "essential" for label in labels) if any(labels) else round(k_fraction * count)
    return min(max(k, 1), count - 1)


def deletion_sets(
    ensemble_scores: np.ndarray, labels: list[str | None], k: int, draws: int, rng: np.random.Generator
) -> dict[str, list[set[int]]]:
    """The steps each deletion condition removes from one trace.

    Args:
        ensemble_scores: ``[K]`` the top-N ensemble's step scores.
        labels: the K labels (all None when unlabeled).
        k: steps deleted by ``delete_top``, ``delete_bottom`` and each ``delete_random`` draw.

    Returns:
        condition -> one set of step indices per draw (one draw except ``delete_random``); ties in
        score go to the earlier step for ``delete_top`` and for ``delete_bottom`` alike.
    """
    count = len(ensemble_scores)
    descending = sorted(range(count), key=lambda s: (-ensemble_scores[s], s))
    ascending = sorted(range(count), key=lambda s: (ensemble_scores[s], s))
    sets = {
        "delete_top": [set(descending[:k])],
        "delete_bottom": [set(ascending[:k])],
        "delete_random": [set(rng.choice(count, size=k, replace=False).tolist()) for _ in range(draws)],
    }
    if any(labels):
        sets["delete_essential"] = [{s for s, label in enumerate(labels) if label == "essential"}]
        sets["delete_redundant"] = [{s for s, label in enumerate(labels) if label == "redundant"}]
    return sets


def random_heads(top: list[tuple[int, int]], num_heads: int, draws: int, seed: int) -> list[list[tuple[int, int]]]:
    """``draws`` sets of random heads, one in the layer of each top head, never a top head, no repeats.

    Raises:
        InputError: a layer holds more top heads than other heads to draw from.
    """
    rng = np.random.default_rng(seed)
    per_layer: dict[int, int] = {}
    for layer, _ in top:
        per_layer[layer] = per_layer.get(layer, 0) + 1
    pools = {layer: [h for h in range(num_heads) if (layer, h) not in top] for layer in per_layer}
    for layer, need in per_layer.items():
        if len(pools[layer]) < need:
            raise InputError(f"layer {layer} has {need} top heads but only {len(pools[layer])} other heads to draw random ones from")
    return [
        [(layer, int(h)) for layer in sorted(per_layer) for h in sorted(rng.choice(pools[layer], size=per_layer[layer], replace=False))]
        for _ in range(draws)
    ]


class HeadAblation:
    """Mean-ablation of heads chosen per sequence, at chosen positions, inside the attention interface.

    Args:
        rows: per batch row, the heads ``(layer, head)`` to ablate in that sequence (empty: none).
        means: per layer, ``[heads, head_dim]`` the value an ablated head's slice is set to.

    ``positions`` (``[batch, T_query]`` bool) says where the current forward ablates; the caller sets it
    before each forward. Every other slice of the attention output passes through unchanged.
    """

    def __init__(self, rows: list[list[tuple[int, int]]], means: dict[int, torch.Tensor]):
        self.means = means
        self.chosen = {layer: torch.zeros((len(rows), mean.shape[0]), dtype=torch.bool) for layer, mean in means.items()}
        for b, heads in enumerate(rows):
            for layer, head in heads:
                self.chosen[layer][b, head] = True
        self.positions: torch.Tensor | None = None

    def __call__(self, module: nn.Module, output: torch.Tensor) -> torch.Tensor:
        chosen = self.chosen.get(module.layer_idx)
        if chosen is None or self.positions is None:
            return output
        where = (self.positions[:, :, None] & chosen[:, None, :]).to(output.device)  # [batch, T_query, heads]
        mean = self.means[module.layer_idx].to(device=output.device, dtype=output.dtype)
        return torch.where(where[..., None], mean[None, None], output)


class _HeadOutputMean:
    """Sums every head's attention output over the marked positions (an editor that changes nothing)."""

    def __init__(self):
        self.positions: torch.Tensor | None = None
        self.sums: dict[int, torch.Tensor] = {}
        self.count = 0

    def __call__(self, module: nn.Module, output: torch.Tensor) -> torch.Tensor:
        picked = output[self.positions.to(output.device)].double()  # [n, heads, head_dim]
        self.sums[module.layer_idx] = self.sums.get(module.layer_idx, 0) + picked.sum(dim=0).cpu()
        return output


def answer_writing_positions(sequences: list[TokenizedTrace], width: int) -> torch.Tensor:
    """``[batch, width]`` bool: the token before F (it predicts F's first token) and every token of F."""
    mask = torch.zeros((len(sequences), width), dtype=torch.bool)
    for b, sequence in enumerate(sequences):
        mask[b, sequence.answer_span[0] - 1 : sequence.answer_span[1]] = True
    return mask


@torch.no_grad()
def head_output_means(model: nn.Module, sequences: list[TokenizedTrace], layers: list[int], pad_id: int,
                      batch_size: int = 8) -> dict[int, torch.Tensor]:
    """Per layer, ``[heads, head_dim]`` mean of every head's attention output over the answer-writing
    positions of ``sequences`` (teacher-forced, the responses as written)."""
    meter = _HeadOutputMean()
    with edit_attention_outputs(model, layers, meter):
        for start in range(0, len(sequences), batch_size):
            chunk = sequences[start : start + batch_size]
            meter.positions = answer_writing_positions(chunk, max(s.length for s in chunk))
            meter.count += int(meter.positions.sum())
            answer_logprobs(model, chunk, pad_id)
    return {layer: (total / meter.count).float() for layer, total in meter.sums.items()}


@torch.no_grad()
def greedy_answers(model: nn.Module, prefixes: list[list[int]], budgets: list[int], eos_id: int, pad_id: int,
                   ablation: HeadAblation | None = None) -> list[list[int]]:
    """Greedy continuation of each prefix, up to its EOS (kept) or its budget of tokens.

    The prefixes are left-padded into one batch and decoded with the KV cache (positions counted from
    each row's first real token). With ``ablation``, the heads are ablated at the last prefix token
    and at every written token: the positions that write the answer.

    Returns:
        the written token ids of each prefix.
    """
    device = next(model.parameters()).device
    width, count = max(len(p) for p in prefixes), len(prefixes)
    ids = torch.full((count, width), pad_id, dtype=torch.long)
    mask = torch.zeros((count, width), dtype=torch.long)
    for b, prefix in enumerate(prefixes):
        ids[b, width - len(prefix):] = torch.tensor(prefix)
        mask[b, width - len(prefix):] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    written: list[list[int]] = [[] for _ in prefixes]
    done = [False] * count
    step_ids, past = ids, None
    cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"  # transformers >= 5.x
    if ablation is not None:
        ablation.positions = torch.zeros((count, width), dtype=torch.bool)
        ablation.positions[:, -1] = True
    while True:
        out = model(input_ids=step_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                    **{cache_name: past}, **one_position_logits(model))
        past = out["cache"] if "cache" in out.keys() else out["past_key_values"]
        tokens = out.logits[:, -1].argmax(dim=-1).tolist()
        for b, token in enumerate(tokens):
            if not done[b]:
                written[b].append(token)
                done[b] = token == eos_id or len(written[b]) >= budgets[b]
        if all(done):
            return written
        step_ids = torch.tensor([[pad_id if d else t] for t, d in zip(tokens, done)], device=device)
        mask = torch.cat([mask, torch.ones((count, 1), dtype=mask.dtype, device=device)], dim=1)
        positions = positions[:, -1:] + 1
        if ablation is not None:
            ablation.positions = torch.ones((count, 1), dtype=torch.bool)


@dataclass(frozen=True)
class _Variant:
    """One sequence to run: which trace, condition and draw, its tokens, the steps it deleted and the
    heads it ablates."""

    trace: int
    condition: str
    draw: int
    tokenized: TokenizedTrace
    deleted: int = 0
    heads: tuple[tuple[int, int], ...] = ()


def _variants(item: CausalTrace, index: int, scores: np.ndarray, config: CausalConfig, tokenizer) -> list[_Variant]:
    """The unablated sequences of one trace: ``none`` and every deletion."""
    k = steps_to_delete(item.labels, config.k, config.k_fraction)
    rng = np.random.default_rng([config.seed, index])
    variants = [_Variant(index, "none", 0, item.tokenized)]
    for condition, sets in deletion_sets(scores, item.labels, k, config.draws, rng).items():
        for draw, drop in enumerate(sets):
            trace = delete_steps(item.trace, drop, config.marker)
            tokenized = tokenize_trace(tokenizer, trace.prompt, trace.response,
                                       [s.text for s in trace.steps or ()], config.marker)
            variants.append(_Variant(index, condition, draw, tokenized, len(drop)))
    return variants


def _answer_budget(item: CausalTrace, config: CausalConfig) -> int:
    span = item.tokenized.answer_span
    return config.max_answer_tokens or 2 * (span[1] - span[0]) + 16


def _run(model, tokenizer, variants: list[_Variant], items: list[CausalTrace], config: CausalConfig, pad_id: int,
         means: dict[int, torch.Tensor]) -> list[tuple[bool, float]]:
    """Write each variant's answer (its heads ablated) and score the original answer teacher-forced:
    ``(correct, log-prob)`` per variant."""
    prefixes = [v.tokenized.input_ids[: v.tokenized.answer_span[0]] for v in variants]
    budgets = [_answer_budget(items[v.trace], config) for v in variants]
    sequences = [v.tokenized for v in variants]
    ablation = HeadAblation([list(v.heads) for v in variants], means)
    with edit_attention_outputs(model, sorted(means), ablation):
        written = greedy_answers(model, prefixes, budgets, tokenizer.eos_token_id, pad_id, ablation)
        ablation.positions = answer_writing_positions(sequences, max(s.length for s in sequences))
        logprobs = answer_logprobs(model, sequences, pad_id).tolist()
    results = []
    for v, ids, logprob in zip(variants, written, logprobs):
        written_answer = config.marker + tokenizer.decode(ids, skip_special_tokens=False)
        results.append((is_correct(written_answer, items[v.trace].reference, config.marker), logprob))
    return results


def ensemble_step_scores(model: nn.Module, items: list[CausalTrace], heads: list[tuple[int, int]], pad_id: int,
                         batch_size: int) -> list[np.ndarray]:
    """Per trace, ``[K]`` mean step score of ``heads`` (the sweep's capture, stopped after their deepest layer)."""
    layers = sorted({layer for layer, _ in heads})
    scores = collect_step_scores(model, [item.tokenized for item in items], SweepConfig(layers=layers, batch_size=batch_size),
                                 pad_id, progress=False)
    rows = [(layers.index(layer), head) for layer, head in heads]
    return [torch.stack([s[l, h] for l, h in rows]).double().mean(dim=0).numpy() for s in scores]


def run_causal(model: nn.Module, tokenizer, items: list[CausalTrace], heads: list[tuple[int, int]], config: CausalConfig,
               pad_id: int, progress: bool = True) -> dict:
    """Every condition on every trace; returns the per-condition summary (see :func:`summarise`).

    Args:
        heads: the top-N heads ``(layer, head)``.
    """
    if model.training:
        raise ValueError("put the model in eval mode (model.eval()) first: dropout would change the answers")
    num_heads = model_shape(model)["num_heads"]
    layers = sorted({layer for layer, _ in heads})
    scores = ensemble_step_scores(model, items, heads, pad_id, config.batch_size)
    means = head_output_means(model, [item.tokenized for item in items], layers, pad_id, config.batch_size)
    controls = random_heads(heads, num_heads, config.draws, config.seed)
    records: list[tuple[_Variant, bool, float]] = []
    pending: list[_Variant] = []
    bar = tqdm(total=len(items), unit="trace", desc="causal", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    try:
        for i, item in enumerate(items):
            pending += _variants(item, i, scores[i], config, tokenizer)
            pending.append(_Variant(i, "ablate_top", 0, item.tokenized, heads=tuple(heads)))
            pending += [_Variant(i, "ablate_random", draw, item.tokenized, heads=tuple(chosen)) for draw, chosen in enumerate(controls)]
            while len(pending) >= config.batch_size or (i == len(items) - 1 and pending):
                part, pending = pending[: config.batch_size], pending[config.batch_size :]
                records += [(v, *r) for v, r in zip(part, _run(model, tokenizer, part, items, config, pad_id, means))]
            bar.update(1)
    finally:
        bar.close()
    return summarise(records, heads, controls)


def summarise(records: list[tuple[_Variant, bool, float]], heads: list[tuple[int, int]],
              controls: list[list[tuple[int, int]]]) -> dict:
    """Per condition: ``accuracy`` (over traces and draws), ``n`` (traces), ``answer_logprob_change``
    (mean, nats, against ``none`` on the same trace), ``steps_deleted`` (mean) and, with several draws,
    ``draws`` and ``accuracy_per_draw``; the ablations name their heads."""
    baseline = {v.trace: logprob for v, _, logprob in records if v.condition == "none"}
    summary = {}
    for condition in CONDITIONS:
        rows = [(v, correct, logprob) for v, correct, logprob in records if v.condition == condition]
        if not rows:
            continue
        draws = sorted({v.draw for v, _, _ in rows})
        entry = {
            "accuracy": round(float(np.mean([c for _, c, _ in rows])), 6),
            "n": len({v.trace for v, _, _ in rows}),
            "answer_logprob_change": round(float(np.mean([lp - baseline[v.trace] for v, _, lp in rows])), 6),
        }
        if condition == "none":
            entry["answer_logprob"] = round(float(np.mean(list(baseline.values()))), 6)
        if condition.startswith("delete"):
            entry["steps_deleted"] = round(float(np.mean([v.deleted for v, _, _ in rows])), 6)
        if len(draws) > 1:
            entry["draws"] = len(draws)
            entry["accuracy_per_draw"] = [round(float(np.mean([c for v, c, _ in rows if v.draw == d])), 6) for d in draws]
        if condition == "ablate_top":
            entry["heads"] = [list(h) for h in heads]
        if condition == "ablate_random":
            entry["heads"] = [[list(h) for h in chosen] for chosen in controls]
        summary[condition] = entry
    return summary


def format_causal_table(summary: dict) -> str:
    """The conditions as a fixed-width table, accuracy change against ``none``."""
    base = summary["none"]["accuracy"]
    lines = [f"{'condition':<17} {'n':>5} {'accuracy':>9} {'vs none':>8} {'answer log-prob change':>23} {'steps deleted':>14}"]
    for condition in CONDITIONS:
        if condition not in summary:
            continue
        entry = summary[condition]
        deleted = f"{entry['steps_deleted']:.2f}" if "steps_deleted" in entry else "-"
        draws = f" ({entry['draws']} draws)" if "draws" in entry else ""
        lines.append(f"{condition:<17} {entry['n']:>5} {entry['accuracy']:>9.3f} {entry['accuracy'] - base:>+8.3f} "
                     f"{entry['answer_logprob_change']:>23.3f} {deleted:>14}{draws}")
    return "\n".join(lines)

