"""The Preplan-and-Anchor signals (arXiv 2510.13554; docs/method.md): WAAD and FAI of response tokens.

For a head, a[t, s] is the attention probability from query t to key s.

- Mean backward distance of a head: over the traces, the mean of (mean over response rows t of
  sum_s a[t, s] (t - s)).
- Local heads: the ceil(0.3 L H) heads with the smallest mean backward distance; global heads: the
  ceil(0.3 L H) with the largest (ties by (layer, head) ascending).
- WAAD_t = sum_s A_loc[t, s] min(t - s, W), A_loc the mean map of the local heads (W = 10).
- FAI_s = mean over t in [s + 10, min(s + 50, T - 1)] of A_glob[t, s], A_glob the mean map of the
  global heads; None when s + 10 > T - 1.

Everything is a reduction over keys of the exact attention rows the model computes (the capture's
``interface_call_rows``: the model's own q, k, mask, scaling and soft-cap, float32), taken in chunks of
``chunk`` query rows: at most ``batch x heads x chunk x T`` probabilities exist at a time, never a
T x T map. WAAD and FAI are linear in the map, so the mean over heads is taken after the reduction.
FAI needs only the band a[t, t - d] for d in [10, 50] of each row. The reduction is an observer of the
attention calls (``SignalRecorder``), so it runs in a forward of its own (``rhythm_signals``) or in one
the caller runs anyway (the trainer's update forward, ``attnpo_train.strategies.preplan_anchor``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .alignment import right_pad
from .capture import UnsupportedModelError, capture_layer_calls, check_batch_rows, interface_call_rows, model_shape
from .errors import InputError
from .layers import check_layers

WINDOW = 10
FAI_RANGE = (10, 50)
HEAD_FRACTION = 0.3
CHUNK = 128


@dataclass(frozen=True)
class LocalGlobalHeads:
    """The heads whose mean maps give WAAD (local) and FAI (global), as (layer, query head)."""

    local: list[tuple[int, int]]
    global_: list[tuple[int, int]]

    @property
    def layers(self) -> list[int]:
        return sorted({layer for layer, _ in self.local + self.global_})


@dataclass(frozen=True)
class RhythmSignals:
    """WAAD and FAI of one trace's response positions.

    Attributes:
        response_start: token index of the first response token.
        waad: ``[response_token]`` float32.
        fai: ``[response_token]`` float32, NaN where s + fai_range[0] > T - 1 (no future rows in range).
    """

    response_start: int
    waad: torch.Tensor
    fai: torch.Tensor

    def stacked(self) -> torch.Tensor:
        """``[2, response_token]``: WAAD, then FAI (for saving a batch of a resumable run)."""
        return torch.stack([self.waad, self.fai])

    @classmethod
    def from_stacked(cls, response_start: int, stacked: torch.Tensor) -> "RhythmSignals":
        return cls(response_start, stacked[0], stacked[1])


def check_head_fraction(fraction: float) -> None:
    """Refuse a share of heads per set outside (0, 0.5], where the local and global sets could overlap."""
    if not 0.0 < fraction <= 0.5:
        raise InputError(f"`head_fraction` must be in (0, 0.5] so the two sets do not overlap; got {fraction}",
                         settings=("head_fraction",))


def check_windows(window: int, fai_range: tuple[int, int]) -> None:
    """Refuse a W of WAAD below 1, or an FAI range ``(lo, hi)`` other than 0 < lo <= hi."""
    if window < 1:
        raise InputError(f"`window` must be >= 1; got {window}", settings=("window",))
    if not 0 < fai_range[0] <= fai_range[1]:
        raise InputError(f"`fai_range` must satisfy 0 < lo <= hi; got {list(fai_range)}", settings=("fai_range",))


def middle_third_layers(num_layers: int, count: int = 5) -> list[int]:
    """The paper's layers for its RL runs (arXiv 2510.13554 v2, appendix B.2): ``count`` evenly spaced
    layers from floor(L/3) to floor(2L/3), rounded to the nearest layer (fewer when the third is shorter).
    """
    lo, hi = num_layers // 3, (2 * num_layers) // 3
    if count == 1 or lo == hi:
        return [lo]
    return sorted({round(lo + k * (hi - lo) / (count - 1)) for k in range(count)})


def select_heads(
    mean_distance: torch.Tensor, fraction: float = HEAD_FRACTION, layers: list[int] | None = None
) -> LocalGlobalHeads:
    """Local and global heads from each head's mean backward distance.

    Args:
        mean_distance: ``[layer, head]``.
        fraction: share of the candidate heads in each set (ceil(fraction n) of n candidates).
        layers: rank only these layers' heads (default: all L layers; the paper's RL runs use
            :func:`middle_third_layers`).
    Returns:
        the ceil(fraction n) candidate heads with the smallest distance (local) and with the largest
        (global), each sorted by distance (closest / farthest first), ties by (layer, head) ascending.
    """
    check_head_fraction(fraction)
    num_layers, num_heads = mean_distance.shape
    layers = check_layers(layers, num_layers, "head_layers")
    heads = [(layer, head) for layer in layers for head in range(num_heads)]
    count = math.ceil(fraction * len(heads))
    values = {h: float(mean_distance[h]) for h in heads}
    local = sorted(heads, key=lambda h: (values[h], h))[:count]
    global_ = sorted(heads, key=lambda h: (-values[h], h))[:count]
    return LocalGlobalHeads(local, global_)


def row_reductions(
    probs: torch.Tensor, rows: torch.Tensor, window: int = WINDOW, fai_range: tuple[int, int] = FAI_RANGE
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Distance, windowed distance and FAI band of attention rows.

    Args:
        probs: ``[batch, head, response_row, key]`` probabilities of the query rows ``rows`` (zero on masked keys).
        rows: ``[batch, response_row]`` query positions.
    Returns:
        distance ``[batch, head, response_row]`` = sum_s a[t, s] (t - s);
        waad ``[batch, head, response_row]`` = sum_s a[t, s] min(t - s, window);
        band ``[batch, head, response_row, offset]`` = a[t, t - d] for the offsets d = lo..hi (0 where t - d < 0).
    """
    distance = torch.einsum("bhrt,brt->bhr", probs, _gaps(probs, rows))
    return (distance, *window_and_band(probs, rows, window, fai_range))


def _gaps(probs: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``[batch, response_row, key]`` t - s, 0 for keys after the row (masked keys have a = 0 anyway)."""
    keys = torch.arange(probs.shape[-1], device=probs.device)
    return (rows[:, :, None] - keys).clamp(min=0).float()


def window_and_band(
    probs: torch.Tensor, rows: torch.Tensor, window: int = WINDOW, fai_range: tuple[int, int] = FAI_RANGE
) -> tuple[torch.Tensor, torch.Tensor]:
    """The windowed distance ``[batch, head, response_row]`` and the FAI band ``[batch, head, response_row, offset]``
    of ``row_reductions`` (what the signals need; the head ranking also needs the distance)."""
    waad = torch.einsum("bhrt,brt->bhr", probs, _gaps(probs, rows).clamp(max=window))
    offsets = torch.arange(fai_range[0], fai_range[1] + 1, device=probs.device)
    index = rows[:, :, None] - offsets  # [batch, response_row, offset]
    inside = index >= 0
    picked = probs.gather(3, index.clamp(min=0)[:, None].expand(-1, probs.shape[1], -1, -1))
    return waad, picked * inside[:, None]


def _response_rows(starts: list[int], lengths: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Query positions ``[batch, response_row]`` of every response token (padded with 0) and their validity."""
    width = max(max(n - s for s, n in zip(starts, lengths)), 1)
    offsets = torch.arange(width)
    counts = torch.tensor([n - s for s, n in zip(starts, lengths)])
    valid = offsets[None] < counts[:, None]
    rows = (torch.tensor(starts)[:, None] + offsets[None]) * valid
    return rows.to(device), valid.to(device)


def _chunked(module, query, key, mask, kwargs, rows, valid, chunk, reduce, heads=None):
    """``reduce(probs [batch, head, response_row, key], rows [batch, response_row], valid [batch, response_row])`` over
    chunks of response rows, concatenated on dim 2
    (``heads``: only these query heads, in this order; None: all)."""
    parts = []
    for start in range(0, rows.shape[1], chunk):
        r, v = rows[:, start : start + chunk], valid[:, start : start + chunk]
        probs = interface_call_rows(module, query, key, mask, kwargs, r, v, heads)
        parts.append(reduce(probs, r, v))
    return torch.cat(parts, dim=2)


@torch.no_grad()
def trace_distances(
    model: nn.Module, sequences: list[list[int]], response_starts: list[int], pad_id: int, chunk: int = CHUNK
) -> torch.Tensor:
    """Each head's backward distance averaged over each trace's response rows (module docstring), from one
    right-padded forward of the batch.

    Args:
        sequences: token ids (prompt + response) of each trace.
        response_starts: index of the first response token of each.
    Returns:
        ``[batch, layer, head]`` float32 on the CPU.
    """
    device = next(model.parameters()).device
    ids, mask = right_pad(sequences, pad_id)
    rows, valid = _response_rows(response_starts, [len(s) for s in sequences], device)
    counts = valid.sum(dim=1).clamp(min=1).float()

    def compute(module, query, key, attn_mask, kwargs) -> torch.Tensor:
        distance = _chunked(module, query, key, attn_mask, kwargs, rows, valid, chunk,
                            lambda p, r, v: row_reductions(p, r)[0])
        return distance.sum(dim=2) / counts[:, None]  # [batch, head]: mean over response rows

    results = capture_layer_calls(model, ids.to(device), mask.to(device), compute)
    return torch.stack([results[layer] for layer in sorted(results)], dim=1).cpu()


def mean_distance(per_trace: list[torch.Tensor], batches: list[list[int]]) -> torch.Tensor:
    """``[layer, head]`` float32: the mean over the traces of their ``[layer, head]`` distances
    (:func:`trace_distances`), summed in float64 one batch at a time, in the order of ``batches``."""
    total = torch.zeros(per_trace[0].shape, dtype=torch.float64)
    for chunk in batches:
        total += torch.stack([per_trace[i] for i in chunk]).double().sum(dim=0)
    return (total / len(per_trace)).float()


class SignalRecorder:
    """An ``AttentionObserver`` that reduces the rhythm heads' attention calls to WAAD and FAI of chosen rows.

    Watch a forward with it (``kfh_probe.capture.attention_calls``, or ``capture_layer_calls``): every call
    of a layer of ``heads`` is reduced, under ``torch.no_grad`` and in float32, to the local heads' summed
    windowed distances and the global heads' summed FAI band of the response rows of the batch rows that
    have a ``start``, in chunks of ``chunk`` query rows from the call's own q, k, mask, scaling and soft-cap
    (``interface_call_rows``; at most ``kept x heads x chunk x T`` probabilities at a time, never T x T).
    The rows without a ``start`` cost nothing. A batch run as consecutive row chunks of one padded tensor
    (as TRL computes log-probs) is recorded whole. ``rhythm_signals`` (a no-grad forward of its own) and
    the trainer's update forward (``attnpo_train.strategies.preplan_anchor``) use this same code.

    Args:
        heads: the local and global heads.
        starts: per batch row, the column of its first response token, or None to skip the row.
        ends: per batch row, the column after its last token.
        offsets: per batch row, the column of its first token (its left padding; None: all 0).
    """

    def __init__(
        self,
        heads: LocalGlobalHeads,
        starts: list[int | None],
        ends: list[int],
        window: int = WINDOW,
        fai_range: tuple[int, int] = FAI_RANGE,
        chunk: int = CHUNK,
        offsets: list[int] | None = None,
    ) -> None:
        check_windows(window, fai_range)
        self.heads, self.starts, self.ends = heads, starts, ends
        self.offsets = offsets if offsets is not None else [0] * len(starts)
        self.window, self.fai_range, self.chunk = window, fai_range, chunk
        self._local = {layer: [h for l, h in heads.local if l == layer] for layer in heads.layers}
        self._global = {layer: [h for l, h in heads.global_ if l == layer] for layer in heads.layers}
        self._done: dict[int, int] = {}  # layer -> batch rows recorded
        self._sums: dict[int, torch.Tensor] = {}  # batch row -> [response_token, 1 + offset], summed over layers

    def __call__(self, module, query, key, attention_mask, kwargs) -> None:
        layer = module.layer_idx
        if layer not in self._local:
            return
        first = self._done.get(layer, 0)
        check_batch_rows(layer, first, query.shape[0], len(self.starts))
        self._done[layer] = first + query.shape[0]
        kept = [b for b in range(first, first + query.shape[0]) if self.starts[b] is not None]
        if not kept:
            return
        with torch.no_grad():
            index = torch.tensor([b - first for b in kept], device=query.device)
            query, key = query.index_select(0, index), key.index_select(0, index)
            if attention_mask is not None and attention_mask.dim() == 4 and attention_mask.shape[0] > 1:
                attention_mask = attention_mask.index_select(0, index)
            bias = kwargs.get("position_bias")
            if bias is not None and bias.shape[0] > 1:
                kwargs = {**kwargs, "position_bias": bias.index_select(0, index)}
            rows, valid = _response_rows([self.starts[b] for b in kept], [self.ends[b] for b in kept], query.device)
            wanted = sorted(set(self._local[layer]) | set(self._global[layer]))  # the other heads cost nothing
            local = [wanted.index(h) for h in self._local[layer]]
            glob = [wanted.index(h) for h in self._global[layer]]

            def reduce(probs, r, v):
                waad, band = window_and_band(probs, r, self.window, self.fai_range)
                return torch.cat([waad[:, local].sum(dim=1)[:, None, :, None], band[:, glob].sum(dim=1)[:, None]], dim=3)

            summed = _chunked(module, query, key, attention_mask, kwargs, rows, valid, self.chunk, reduce, wanted)[:, 0]
            for j, b in enumerate(kept):  # [response_row, 1 + offset] of row b, its response rows first
                value = summed[j, : self.ends[b] - self.starts[b]].float().cpu()
                self._sums[b] = value if b not in self._sums else self._sums[b] + value

    def check_reported(self, model: nn.Module) -> None:
        """Raise ``UnsupportedModelError`` when a layer of the heads never called the attention interface."""
        silent = [layer for layer in self.heads.layers if layer not in self._done]
        if silent:
            raise UnsupportedModelError(
                f"{type(model).__name__} did not compute layer(s) {silent} through the transformers attention "
                "interface, so their attention cannot be captured"
            )

    def signals(self) -> list[RhythmSignals | None]:
        """Per batch row, its WAAD and FAI (None for a row without a start); call after the forward."""
        lo, hi = self.fai_range
        out: list[RhythmSignals | None] = []
        for b, start in enumerate(self.starts):
            if start is None:
                out.append(None)
                continue
            summed = self._sums[b]
            waad = summed[:, 0] / len(self.heads.local)
            band = summed[:, 1:] / len(self.heads.global_)  # band[r, j] = A_glob[t_r, t_r - (lo + j)]
            n = self.ends[b] - start
            sums, counts = torch.zeros(n), torch.zeros(n)
            for j, d in enumerate(range(lo, min(hi, n - 1) + 1)):  # rows t = s + d <= T - 1
                sums[: n - d] += band[d:n, j]
                counts[: n - d] += 1
            fai = torch.where(counts > 0, sums / counts.clamp(min=1), torch.full((n,), float("nan")))
            out.append(RhythmSignals(start - self.offsets[b], waad.clone(), fai))
        return out


@torch.no_grad()
def rhythm_signals(
    model: nn.Module,
    sequences: list[list[int]],
    response_starts: list[int],
    heads: LocalGlobalHeads,
    pad_id: int,
    batch_size: int = 8,
    window: int = WINDOW,
    fai_range: tuple[int, int] = FAI_RANGE,
    chunk: int = CHUNK,
) -> list[RhythmSignals]:
    """WAAD (local heads) and FAI (global heads) of every response position of every trace.

    One forward per batch of ``batch_size`` right-padded traces, stopped after the deepest layer of
    the heads; each layer's call is reduced in chunks of ``chunk`` response rows (``SignalRecorder``).

    Args:
        sequences: token ids (prompt + response) of each trace.
        response_starts: index of the first response token of each (the rows are the response).
    Returns:
        one ``RhythmSignals`` per trace, in order.
    """
    device = next(model.parameters()).device
    out: list[RhythmSignals] = []
    for first in range(0, len(sequences), batch_size):
        seqs, starts = sequences[first : first + batch_size], response_starts[first : first + batch_size]
        ids, mask = right_pad(seqs, pad_id)
        recorder = SignalRecorder(heads, list(starts), [len(s) for s in seqs], window, fai_range, chunk)
        capture_layer_calls(model, ids.to(device), mask.to(device), recorder, heads.layers)
        out.extend(recorder.signals())
    return out


# ---------------------------------------------------------------------------------------------------
# The rhythm file (JSONL: a header line, then one line per trace; design page)
# ---------------------------------------------------------------------------------------------------

FORMAT = "kfh-rhythm"
VERSION = 1


def rhythm_header(heads: LocalGlobalHeads, window: int, fai_range: tuple[int, int], model_block: dict) -> dict:
    """The header line of a rhythm file."""
    return {
        "format": FORMAT, "version": VERSION,
        "local_heads": [list(h) for h in heads.local], "global_heads": [list(h) for h in heads.global_],
        "window": window, "fai_range": list(fai_range), "model": model_block,
    }


def rhythm_record(trace_id: str, signals: RhythmSignals, digits: int = 6) -> dict:
    """One trace's line: WAAD and FAI over its response positions (FAI null where it is undefined)."""
    return {
        "id": trace_id,
        "response_start": signals.response_start,
        "waad": [round(float(v), digits) for v in signals.waad],
        "fai": [None if math.isnan(v) else round(float(v), digits) for v in signals.fai.tolist()],
    }


def read_rhythm_header(path, model_shape_block: dict | None = None) -> dict:
    """The checked header of a rhythm file.

    Args:
        model_shape_block: when given (``model_shape`` of a model), the header's model must have this
            shape and its heads must exist in it.
    Raises:
        InputError: naming the file and what is wrong.
    """
    import json

    try:
        with open(path, encoding="utf-8") as handle:
            first = handle.readline()
    except OSError as err:
        raise InputError(f"{path}: cannot read the rhythm file ({err.strerror})") from None
    try:
        header = json.loads(first)
    except json.JSONDecodeError as err:
        raise InputError(f"{path}:1: not a JSON header line ({err.msg})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT or header.get("version") != VERSION:
        raise InputError(f"{path}:1: not a {FORMAT} version {VERSION} header")
    for key in ("local_heads", "global_heads"):
        heads = header.get(key)
        if not isinstance(heads, list) or not heads or not all(
            isinstance(h, list) and len(h) == 2 and all(isinstance(x, int) for x in h) for h in heads
        ):
            raise InputError(f"{path}:1: '{key}' must be a non-empty list of [layer, head]")
    if model_shape_block is not None:
        model = header.get("model", {})
        wrong = [k for k in ("num_layers", "num_heads") if model.get(k) != model_shape_block[k]]
        if wrong:
            raise InputError(
                f"{path}: made for a model with " + ", ".join(f"{k} = {model.get(k)}" for k in wrong)
                + "; this model has " + ", ".join(f"{k} = {model_shape_block[k]}" for k in wrong)
            )
    return header


def heads_from_header(header: dict) -> LocalGlobalHeads:
    return LocalGlobalHeads([tuple(h) for h in header["local_heads"]], [tuple(h) for h in header["global_heads"]])


@dataclass(frozen=True)
class PreplanAnchorHeads:
    """The local and global heads and the windows their signals are read through: a rhythm file's header,
    which the trainer's Preplan-and-Anchor credit reads (``window`` is W of WAAD, ``fai_range`` FAI's rows)."""

    heads: LocalGlobalHeads
    window: int
    fai_range: tuple[int, int]

    @classmethod
    def from_file(cls, path, model: nn.Module) -> "PreplanAnchorHeads":
        """Read a ``kfh-probe rhythm`` file's header, checked against ``model``'s shape (:func:`read_rhythm_header`)."""
        header = read_rhythm_header(path, model_shape(model))
        return cls(heads_from_header(header), int(header["window"]), (int(header["fai_range"][0]), int(header["fai_range"][1])))
