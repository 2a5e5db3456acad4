"""Exact attention probabilities of the final-answer rows, for any causal LM of the transformers
attention interface, without building a T x T map and without switching the model to eager attention.

How it works. Every model that supports the attention interface computes its attention through a
function looked up in ``transformers.AttentionInterface`` under ``config._attn_implementation``
("sdpa", "eager", "flex_attention", "flash_attention_2", ...), and passes it the query and key
*after* rotary embedding, query/key norms and biases, plus the mask (causal, padding, sliding window),
the scaling, and, where the model has them, the logit soft-cap and attention sinks. While a capture is
active, that entry is wrapped: the wrapper calls the model's own function unchanged (so the model's
outputs do not move by a bit) and, for the modules being captured, computes

    a[b, h, r, :] = softmax(softcap(scaling * q[b, h, row_r] . k[b, h // group, :]) + mask[b, row_r, :])

in float32 for the answer rows only: ``R x T`` entries per head, never ``T x T``.

Models that do not call the interface (state-space models, custom attention) are refused by name,
before the forward when the class says so, after it when a requested layer never reported.

The wrapping itself is public as :func:`attention_calls`: any callable can watch the attention calls
of chosen layers during a forward the caller runs (the trainer uses it to rate steps inside the
policy-gradient forward it runs anyway, ``attnpo_train.strategies``).
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AttentionInterface

from .errors import KFHError

_LOCK = threading.Lock()
_ACTIVE: dict[int, "AttentionObserver"] = {}  # id(attention module) -> observer of the capture it belongs to
_WRAPPED: dict[str, object] = {}  # implementation name -> original entry (None where there was none)
_USERS: dict[str, int] = {}  # implementation name -> captures in progress that use it
_EDITORS: dict[int, Callable] = {}  # id(attention module) -> edit of its output (see edit_attention_outputs)


class UnsupportedModelError(KFHError, RuntimeError):
    """The model's attention cannot be captured exactly."""


class _StopForward(Exception):
    """Raised inside the forward once every requested layer is recorded, to skip the rest."""


def model_shape(model: nn.Module) -> dict:
    """``num_layers``, ``num_heads``, ``num_kv_heads``, ``head_dim`` of a causal LM."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    num_heads = config.num_attention_heads
    return {
        "num_layers": config.num_hidden_layers,
        "num_heads": num_heads,
        "num_kv_heads": getattr(config, "num_key_value_heads", None) or num_heads,
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // num_heads,
    }


def attention_modules(model: nn.Module) -> dict[int, list[nn.Module]]:
    """The modules of each decoder layer that may call the attention interface, by layer index.

    Every module with an integer ``layer_idx`` is a candidate; the one that calls the interface
    reports (attention modules are the ones that carry a layer index in transformers).

    Raises:
        UnsupportedModelError: the architecture does not route attention through the interface.
    """
    arch = type(model).__name__
    if not getattr(type(model), "_supports_attention_backend", False):
        raise UnsupportedModelError(
            f"{arch} does not compute attention through the transformers attention interface "
            "(its class does not declare `_supports_attention_backend`), so its answer-row "
            "attention cannot be captured exactly"
        )
    found: dict[int, list[nn.Module]] = {}
    for module in model.modules():
        if isinstance(getattr(module, "layer_idx", None), int):
            found.setdefault(module.layer_idx, []).append(module)
    if not found:
        raise UnsupportedModelError(f"{arch}: no modules with a layer index were found")
    return found


def _implementation(model: nn.Module) -> str:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return config._attn_implementation or "eager"


def _own_eager(module: nn.Module):
    """The eager attention function defined beside the module's class (each model has its own)."""
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        raise UnsupportedModelError(f"{type(module).__name__}: no eager_attention_forward beside it")
    return fn


def _dispatcher(name: str):
    def wrapped(module, query, key, value, attention_mask, *args, **kwargs):
        original = _WRAPPED[name]
        fn = original if original is not None else _own_eager(module)
        result = fn(module, query, key, value, attention_mask, *args, **kwargs)
        observer = _ACTIVE.get(id(module))
        if observer is not None:
            with torch.autocast(query.device.type, enabled=False):  # an observer's float32 stays float32
                observer(module, query, key, attention_mask, kwargs)
        editor = _EDITORS.get(id(module))
        if editor is not None:
            result = (editor(module, result[0]), *result[1:])
        return result

    return wrapped


@contextlib.contextmanager
def _wrap_implementation(name: str):
    """Route ``name`` through the dispatcher while any capture uses it; restore the entry after."""
    with _LOCK:
        if name not in _WRAPPED:
            _WRAPPED[name] = AttentionInterface._global_mapping.get(name)
            _USERS[name] = 0
            AttentionInterface.register(name, _dispatcher(name))
        _USERS[name] += 1
    try:
        yield
    finally:
        with _LOCK:
            _USERS[name] -= 1
            if _USERS[name] == 0:
                original = _WRAPPED.pop(name)
                del _USERS[name]
                if original is None:
                    del AttentionInterface._global_mapping[name]
                else:
                    AttentionInterface._global_mapping[name] = original


@contextlib.contextmanager
def _registered(model: nn.Module, layers: list[int], registry: dict, entry) -> Iterator[None]:
    """Route the model's attention implementation through the dispatcher and file ``entry`` under every
    attention module of ``layers`` in ``registry`` (``_ACTIVE`` or ``_EDITORS``) for the block."""
    modules = attention_modules(model)
    missing = [layer for layer in layers if layer not in modules]
    if missing:
        raise ValueError(f"{type(model).__name__} has no attention layer(s) {missing}; it has layers 0..{max(modules)}")
    chosen = [module for layer in sorted(set(layers)) for module in modules[layer]]
    with _wrap_implementation(_implementation(model)):
        with _LOCK:
            for module in chosen:
                registry[id(module)] = entry
        try:
            yield
        finally:
            with _LOCK:
                for module in chosen:
                    registry.pop(id(module), None)


AttentionObserver = Callable[[nn.Module, torch.Tensor, torch.Tensor, "torch.Tensor | None", dict], None]
"""``observer(module, query, key, attention_mask, kwargs)``: sees what one attention call received."""


@contextlib.contextmanager
def attention_calls(model: nn.Module, layers: list[int], observer: AttentionObserver) -> Iterator[None]:
    """Within the block, call ``observer`` after every attention-interface call of the given layers.

    The model's own attention function runs first and unchanged, so the forward's outputs (and its gradients) do
    not move by a bit; the observer receives the arguments of that call: ``query``
    ``[batch, head, position, head_dim]`` and ``key`` ``[batch, kv_head, position, head_dim]`` after rotary,
    norms and biases, the mask the model passed, and the call's keyword arguments (``scaling``,
    ``sliding_window``, ``softcap``, ...). They may require grad: an observer that keeps anything must detach
    it. The observer runs with autocast off, so under mixed precision it computes in the dtypes it asks for
    (query and key arrive in the autocast dtype). An observer may raise to end the forward early (the exception
    leaves the block). The caller runs the forward; a forward recomputed later (activation checkpointing
    replays layers inside ``backward``) is observed only if the backward runs inside the block.

    Raises:
        UnsupportedModelError: the architecture does not route attention through the interface.
        ValueError: a layer the model does not have.
    """
    with _registered(model, layers, _ACTIVE, observer):
        yield


def answer_row_logits_mask(
    attention_mask: torch.Tensor | None, rows: torch.Tensor, key_len: int, kwargs: dict
) -> torch.Tensor:
    """Additive float32 mask of the answer rows, ``[batch, 1 or head, answer_row, key]``.

    ``attention_mask`` is what the model passed to its attention function: a 4D boolean (True =
    attend) or additive float mask ``[batch or 1, 1 or head, query, key]``, or None when the model relies
    on plain causality; then causality and the sliding window (``kwargs["sliding_window"]``) are
    applied here.
    """
    batch, num_rows = rows.shape
    if attention_mask is not None and attention_mask.dim() == 4:
        source = attention_mask.expand(batch, -1, -1, -1)
        index = rows[:, None, :, None].expand(batch, source.shape[1], num_rows, source.shape[-1])
        picked = source.gather(2, index)[..., :key_len]
        if picked.dtype == torch.bool:
            return torch.zeros(picked.shape, dtype=torch.float32, device=picked.device).masked_fill(~picked, float("-inf"))
        return picked.float()
    if attention_mask is not None:
        raise UnsupportedModelError(
            f"attention mask of shape {tuple(attention_mask.shape)} is not a 4D mask; use the 'sdpa' or "
            "'eager' attention implementation for capture"
        )
    keys = torch.arange(key_len, device=rows.device)
    allowed = keys[None, None, :] <= rows[:, :, None]
    window = kwargs.get("sliding_window")
    if window:
        allowed &= keys[None, None, :] > rows[:, :, None] - window
    return torch.zeros(allowed.shape, dtype=torch.float32, device=rows.device).masked_fill(~allowed, float("-inf"))[:, None]


def answer_row_probabilities(
    query: torch.Tensor,
    key: torch.Tensor,
    rows: torch.Tensor,
    row_mask: torch.Tensor,
    scaling: float,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    position_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention probabilities of the selected query rows, in float32.

    Args:
        query: ``[batch, head, position, head_dim]`` (after rotary, norms, biases).
        key: ``[batch, kv_head, position, head_dim]``; query head h reads key head ``h // (heads // kv_heads)``.
        rows: ``[batch, answer_row]`` long, query positions.
        row_mask: additive ``[batch, 1 or head, answer_row, key]`` from :func:`answer_row_logits_mask`.
        softcap: logit soft-capping ``softcap * tanh(logits / softcap)`` (Gemma 2 style).
        sinks: ``[head]`` attention-sink logits that join the softmax and are dropped after it.
        position_bias: additive ``[batch or 1, head, query, key]`` bias some models pass.

    Returns:
        ``[batch, head, answer_row, key]`` probabilities; each valid row sums to 1 (less the sink's share).
    """
    batch, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    num_rows = rows.shape[1]
    picked = query.gather(2, rows[:, None, :, None].expand(batch, heads, num_rows, dim)).float()
    picked = picked.view(batch, kv_heads, group, num_rows, dim)
    logits = torch.matmul(picked, key.float()[:, :, None].transpose(-1, -2)) * scaling
    logits = logits.view(batch, heads, num_rows, key.shape[2])
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    if position_bias is not None:
        bias = position_bias.expand(batch, heads, -1, -1)
        logits = logits + bias.gather(2, rows[:, None, :, None].expand(batch, heads, num_rows, bias.shape[-1])).float()
    logits = logits + row_mask
    if sinks is not None:
        sink = sinks.float().view(1, heads, 1, 1).expand(batch, heads, num_rows, 1)
        return torch.softmax(torch.cat([logits, sink], dim=-1), dim=-1)[..., :-1]
    return torch.softmax(logits, dim=-1)


def interface_call_rows(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    kwargs: dict,
    rows: torch.Tensor,
    row_valid: torch.Tensor,
    heads: list[int] | None = None,
    row_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Answer-row probabilities of one call of an attention-interface function, from its arguments.

    Args:
        module, query, key, attention_mask, kwargs: what the model passed to its attention function
            (``fn(module, query, key, value, attention_mask, **kwargs)``); query ``[batch, head, position, head_dim]``,
            key ``[batch, kv_head, position, head_dim]``; ``kwargs`` may carry ``scaling``, ``sliding_window``,
            ``softcap``, ``s_aux`` (sinks) and ``position_bias``.
        rows: ``[batch, answer_row]`` long query positions; row_valid: ``[batch, answer_row]`` bool.
        heads: query heads to compute (all when None); the others cost nothing.
        row_mask: this call's ``answer_row_logits_mask`` when already computed (layers that receive the
            same mask share it).

    Returns:
        ``[batch, head, answer_row, key]`` float32 (the heads of ``heads`` when given), zero on padded rows.

    Raises:
        UnsupportedModelError: the call used a KV cache (query and key lengths differ).
    """
    if query.shape[2] != key.shape[2]:
        raise UnsupportedModelError("answer-row capture needs a forward without a KV cache (query and key lengths differ)")
    rows = rows.to(query.device)
    if row_mask is None:
        row_mask = answer_row_logits_mask(attention_mask, rows, key.shape[2], kwargs)
    scaling = kwargs.get("scaling")
    if scaling is None:
        scaling = getattr(module, "scaling", None) or query.shape[-1] ** -0.5
    sinks, position_bias = kwargs.get("s_aux"), kwargs.get("position_bias")
    if heads is not None:  # each picked query head with its own key head: a group of one
        index = torch.tensor(heads, device=query.device)
        key = key.index_select(1, index // (query.shape[1] // key.shape[1]))
        query = query.index_select(1, index)
        row_mask = row_mask if row_mask.shape[1] == 1 else row_mask.index_select(1, index)
        sinks = None if sinks is None else sinks.index_select(0, index)
        if position_bias is not None and position_bias.shape[1] > 1:
            position_bias = position_bias.index_select(1, index)
    probs = answer_row_probabilities(
        query, key, rows, row_mask, scaling,
        softcap=kwargs.get("softcap"), sinks=sinks, position_bias=position_bias,
    )
    return probs * row_valid.to(probs.device)[:, None, :, None]


class AnswerRowRecorder:
    """An ``AttentionObserver`` that keeps, per layer, the answer-row attention of the heads asked for.

    Detached float32 (computed under ``torch.no_grad``, so it may watch a forward that builds a graph).
    A batch run as consecutive row chunks of one padded tensor (as TRL computes log-probs) is recorded
    whole: each call of a layer takes the next rows of ``rows`` and its result is appended.

    Args:
        rows, row_valid: ``[batch, answer_row]`` answer-row positions and their validity (``answer_rows``).
        heads: per layer, the query heads to keep (None: all of them).
        reduce: ``"sum"`` over the answer rows, or ``"rows"``.
        stop_after: end the forward (``_StopForward``) once this layer is recorded; None runs it through.

    Attributes:
        results: per layer, ``[batch, head, key]`` ("sum") or ``[batch, head, answer_row, key]`` ("rows"), heads in the
            order asked for.
    """

    def __init__(
        self,
        rows: torch.Tensor,
        row_valid: torch.Tensor,
        heads: dict[int, list[int] | None],
        reduce: str = "sum",
        stop_after: int | None = None,
    ):
        if reduce not in ("sum", "rows"):
            raise ValueError(f"reduce must be 'sum' or 'rows', got {reduce!r}")
        self.rows = rows
        self.row_valid = row_valid
        self.heads = heads
        self.reduce = reduce
        self.stop_after = stop_after
        self.results: dict[int, torch.Tensor] = {}
        self._row_masks: dict[tuple, tuple] = {}  # (mask id, chunk, T, window) -> (mask, its answer-row mask)

    def __call__(self, module, query, key, attention_mask, kwargs) -> None:
        layer = module.layer_idx
        if layer not in self.heads:
            return
        done = self.results[layer].shape[0] if layer in self.results else 0
        check_batch_rows(layer, done, query.shape[0], self.rows.shape[0])
        chunk = slice(done, done + query.shape[0])
        with torch.no_grad():
            cache_key = (id(attention_mask), done, key.shape[2], kwargs.get("sliding_window"))
            cached = self._row_masks.get(cache_key)
            if cached is None or cached[0] is not attention_mask:
                rows = self.rows[chunk].to(query.device)
                cached = (attention_mask, answer_row_logits_mask(attention_mask, rows, key.shape[2], kwargs))
                self._row_masks[cache_key] = cached
            probs = interface_call_rows(module, query, key, attention_mask, kwargs, self.rows[chunk],
                                        self.row_valid[chunk], self.heads[layer], row_mask=cached[1])
            probs = probs.sum(dim=2) if self.reduce == "sum" else probs
            self.results[layer] = probs if layer not in self.results else torch.cat([self.results[layer], probs])
        if self.stop_after is not None and layer == self.stop_after:
            raise _StopForward

    def check_reported(self, model: nn.Module) -> None:
        """Raise ``UnsupportedModelError`` when a watched layer never called the attention interface."""
        _check_reported(model, sorted(self.heads), self.results)


def check_batch_rows(layer: int, done: int, rows: int, batch: int) -> None:
    """Refuse a call of ``layer`` that brings its recorded batch rows (``done`` so far, ``rows`` more) past the
    ``batch`` the observer was made for: the layer ran twice, e.g. a checkpointed layer recomputed by a backward
    inside the observing block.

    Raises:
        RuntimeError: naming the layer and the counts.
    """
    if done + rows > batch:
        raise RuntimeError(
            f"layer {layer}'s attention was called for {done + rows} batch rows, but the observer was made for {batch}: "
            "the layer ran twice within one observed forward (activation checkpointing recomputes layers in the "
            "backward pass; run backward after the observing block)"
        )


def _check_reported(model: nn.Module, layers: list[int], results: dict) -> None:
    silent = [layer for layer in layers if layer not in results]
    if silent:
        raise UnsupportedModelError(
            f"{type(model).__name__} (attention implementation {_implementation(model)!r}) did not compute "
            f"layer(s) {silent} through the transformers attention interface, so their attention cannot be captured"
        )


@dataclass(frozen=True)
class AnswerAttention:
    """Answer-row attention captured from one forward.

    Attributes:
        layers: the layer indices, in the order of the first dimension of ``values``.
        values: ``reduce="sum"``: ``[batch, layer, head, key]``, the attention each key position
            receives summed over the answer rows (``sum_{m in F} a[m -> n]``).
            ``reduce="rows"``: ``[batch, layer, head, answer_row, key]``, one row per answer token
            (padded rows are zero; ``rows[b, r]`` gives the query position).
        rows: ``[batch, answer_row]`` query positions of the answer rows (padded with 0).
        row_valid: ``[batch, answer_row]`` bool.
    """

    layers: list[int]
    values: torch.Tensor
    rows: torch.Tensor
    row_valid: torch.Tensor


def answer_rows(answer_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[batch, position]`` bool answer mask -> query positions ``[batch, answer_row]`` (padded with 0) and their
    validity ``[batch, answer_row]``."""
    counts = answer_mask.sum(dim=1)
    width = max(int(counts.max().item()), 1)
    rows = torch.zeros((answer_mask.shape[0], width), dtype=torch.long, device=answer_mask.device)
    valid = torch.zeros_like(rows, dtype=torch.bool)
    for b in range(answer_mask.shape[0]):
        positions = answer_mask[b].nonzero().flatten()
        rows[b, : len(positions)] = positions
        valid[b, : len(positions)] = True
    return rows, valid


def one_position_logits(model: nn.Module) -> dict:
    """Ask causal LMs for the logits of one position only: the probe never needs the others."""
    params = inspect.signature(model.forward).parameters
    return {"logits_to_keep": 1} if "logits_to_keep" in params else {}


@torch.no_grad()
def capture_answer_attention(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    answer_mask: torch.Tensor,
    layers: list[int] | None = None,
    reduce: str = "sum",
    stop_early: bool = True,
) -> AnswerAttention:
    """Run one forward and return the attention of the answer rows for the requested layers.

    Args:
        model: a Hugging Face causal LM in eval mode (any attention implementation that passes a 4D
            mask or relies on causality: "sdpa", "eager").
        input_ids: ``[batch, position]`` right-padded token ids.
        attention_mask: ``[batch, position]``, 1 on real tokens.
        answer_mask: ``[batch, position]`` bool, True on the rows to capture (the final-answer span F).
        layers: layer indices to capture (all when None).
        reduce: ``"sum"`` (sum over answer rows; what step scores need) or ``"rows"``.
        stop_early: stop the forward after the last requested layer (the rest is not needed).

    Raises:
        UnsupportedModelError: naming the architecture, when its attention cannot be captured.
    """
    wanted = _wanted_layers(model, layers)
    rows, row_valid = answer_rows(answer_mask.bool())
    recorder = AnswerRowRecorder(rows, row_valid, dict.fromkeys(wanted), reduce, wanted[-1] if stop_early else None)
    _observed_forward(model, input_ids, attention_mask, wanted, recorder, recorder.results)
    values = torch.stack([recorder.results[layer] for layer in wanted], dim=1)
    return AnswerAttention(wanted, values, rows, row_valid)


@torch.no_grad()
def capture_layer_calls(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    compute: Callable,
    layers: list[int] | None = None,
    stop_early: bool = True,
) -> dict[int, object]:
    """Run one no-grad forward and return, per requested layer, ``compute`` applied to its attention call.

    ``compute(module, query, key, attention_mask, kwargs)`` receives what the model passed to its
    attention function (query ``[batch, head, position, head_dim]`` and key ``[batch, kv_head, position, head_dim]``
    after rotary, norms and biases; the 4D mask or None; ``kwargs`` with ``scaling``, ``sliding_window``,
    ``softcap``, ...), so it can compute any reduction of the exact attention rows it needs, in chunks
    (``interface_call_rows``), without a T x T map. The model's own attention runs unchanged. (To read
    the calls of a forward you run yourself, with gradients, use ``attention_calls``.)

    Args:
        model: a Hugging Face causal LM in eval mode.
        input_ids, attention_mask: ``[batch, position]``.
        layers: layer indices (all when None).
        stop_early: stop the forward after the last requested layer.

    Raises:
        UnsupportedModelError: naming the architecture, when its attention cannot be captured.
    """
    wanted = _wanted_layers(model, layers)
    stop_after = wanted[-1] if stop_early else None
    results: dict[int, object] = {}

    def observe(module, query, key, mask, kwargs) -> None:
        results[module.layer_idx] = compute(module, query, key, mask, kwargs)
        if module.layer_idx == stop_after:
            raise _StopForward

    _observed_forward(model, input_ids, attention_mask, wanted, observe, results)
    return results


def _wanted_layers(model: nn.Module, layers: list[int] | None) -> list[int]:
    if model.training:
        raise ValueError("put the model in eval mode (model.eval()) before capturing attention: dropout would change it")
    return sorted(attention_modules(model)) if layers is None else sorted(set(layers))


def _observed_forward(model, input_ids, attention_mask, layers: list[int], observer, results: dict) -> None:
    """One forward with ``observer`` on the attention calls of ``layers``, ended early by ``_StopForward``;
    then every layer must have reported into ``results``."""
    with attention_calls(model, layers, observer):
        try:
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **one_position_logits(model))
        except _StopForward:
            pass
    _check_reported(model, layers, results)


@contextlib.contextmanager
def edit_attention_outputs(model: nn.Module, layers: list[int], edit: Callable[[nn.Module, torch.Tensor], torch.Tensor]):
    """While the block runs, replace the attention output of ``layers`` by ``edit(module, output)``.

    ``output`` is what the model's attention function returned: ``[batch, query_position, head, head_dim]``,
    every head's slice before the output projection mixes the heads. ``edit`` may return a changed
    copy (mean-ablating a head is setting its slice); the model then runs on unchanged. Works with a
    KV cache (``query_position`` is then the new positions only) and with any attention implementation.

    Raises:
        UnsupportedModelError: the architecture does not route attention through the interface.
    """
    with _registered(model, layers, _EDITORS, edit):
        yield
