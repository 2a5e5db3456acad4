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
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AttentionInterface

_LOCK = threading.Lock()
_ACTIVE: dict[int, "_Recorder"] = {}  # id(attention module) -> recorder of the capture it belongs to
_WRAPPED: dict[str, object] = {}  # implementation name -> original entry (None where there was none)
_USERS: dict[str, int] = {}  # implementation name -> captures in progress that use it


class UnsupportedModelError(RuntimeError):
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
        recorder = _ACTIVE.get(id(module))
        if recorder is not None:
            recorder.record(module, query, key, attention_mask, kwargs)
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


def answer_row_logits_mask(
    attention_mask: torch.Tensor | None, rows: torch.Tensor, key_len: int, kwargs: dict
) -> torch.Tensor:
    """Additive float32 mask of the answer rows, ``[batch, 1 or heads, R, T]``.

    ``attention_mask`` is what the model passed to its attention function: a 4D boolean (True =
    attend) or additive float mask ``[batch or 1, 1 or heads, T, T]``, or None when the model relies
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
        query: ``[batch, heads, T, head_dim]`` (after rotary, norms, biases).
        key: ``[batch, kv_heads, T, head_dim]``; query head h reads key head ``h // (heads // kv_heads)``.
        rows: ``[batch, R]`` long, query positions.
        row_mask: additive ``[batch, 1 or heads, R, T]`` from :func:`answer_row_logits_mask`.
        softcap: logit soft-capping ``softcap * tanh(logits / softcap)`` (Gemma 2 style).
        sinks: ``[heads]`` attention-sink logits that join the softmax and are dropped after it.
        position_bias: additive ``[batch or 1, heads, T, T]`` bias some models pass.

    Returns:
        ``[batch, heads, R, T]`` probabilities; each valid row sums to 1 (less the sink's share).
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
) -> torch.Tensor:
    """Answer-row probabilities of one call of an attention-interface function, from its arguments.

    Args:
        module, query, key, attention_mask, kwargs: what the model passed to its attention function
            (``fn(module, query, key, value, attention_mask, **kwargs)``); query ``[batch, heads, T, head_dim]``,
            key ``[batch, kv_heads, T, head_dim]``; ``kwargs`` may carry ``scaling``, ``sliding_window``,
            ``softcap``, ``s_aux`` (sinks) and ``position_bias``.
        rows: ``[batch, R]`` long query positions; row_valid: ``[batch, R]`` bool.

    Returns:
        ``[batch, heads, R, T]`` float32, zero on padded rows.

    Raises:
        UnsupportedModelError: the call used a KV cache (query and key lengths differ).
    """
    if query.shape[2] != key.shape[2]:
        raise UnsupportedModelError("answer-row capture needs a forward without a KV cache (query and key lengths differ)")
    rows = rows.to(query.device)
    row_mask = answer_row_logits_mask(attention_mask, rows, key.shape[2], kwargs)
    scaling = kwargs.get("scaling")
    if scaling is None:
        scaling = getattr(module, "scaling", None) or query.shape[-1] ** -0.5
    probs = answer_row_probabilities(
        query, key, rows, row_mask, scaling,
        softcap=kwargs.get("softcap"), sinks=kwargs.get("s_aux"), position_bias=kwargs.get("position_bias"),
    )
    return probs * row_valid.to(probs.device)[:, None, :, None]


class _Recorder:
    """Runs ``compute(module, query, key, attention_mask, kwargs)`` on each requested layer's call and
    keeps its result by layer; stops the forward after ``stop_after``."""

    def __init__(self, layers: list[int], compute: Callable, stop_after: int | None):
        self.layers = set(layers)
        self.compute = compute
        self.stop_after = stop_after
        self.results: dict[int, object] = {}

    def record(self, module, query, key, attention_mask, kwargs) -> None:
        layer = module.layer_idx
        if layer not in self.layers:
            return
        self.results[layer] = self.compute(module, query, key, attention_mask, kwargs)
        if self.stop_after is not None and layer == self.stop_after:
            raise _StopForward


@dataclass(frozen=True)
class AnswerAttention:
    """Answer-row attention captured from one forward.

    Attributes:
        layers: the layer indices, in the order of the first dimension of ``values``.
        values: ``reduce="sum"``: ``[batch, layers, heads, T]``, the attention each key position
            receives summed over the answer rows (``sum_{m in F} a[m -> n]``).
            ``reduce="rows"``: ``[batch, layers, heads, R, T]``, one row per answer token
            (padded rows are zero; ``rows[b, r]`` gives the query position).
        rows: ``[batch, R]`` query positions of the answer rows (padded with 0).
        row_valid: ``[batch, R]`` bool.
    """

    layers: list[int]
    values: torch.Tensor
    rows: torch.Tensor
    row_valid: torch.Tensor


def answer_rows(answer_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[batch, T]`` bool answer mask -> query positions ``[batch, R]`` (padded with 0) and their validity ``[batch, R]``."""
    counts = answer_mask.sum(dim=1)
    width = max(int(counts.max().item()), 1)
    rows = torch.zeros((answer_mask.shape[0], width), dtype=torch.long, device=answer_mask.device)
    valid = torch.zeros_like(rows, dtype=torch.bool)
    for b in range(answer_mask.shape[0]):
        positions = answer_mask[b].nonzero().flatten()
        rows[b, : len(positions)] = positions
        valid[b, : len(positions)] = True
    return rows, valid


def _forward_kwargs(model: nn.Module) -> dict:
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
        input_ids: ``[batch, T]`` right-padded token ids.
        attention_mask: ``[batch, T]``, 1 on real tokens.
        answer_mask: ``[batch, T]`` bool, True on the rows to capture (the final-answer span F).
        layers: layer indices to capture (all when None).
        reduce: ``"sum"`` (sum over answer rows; what step scores need) or ``"rows"``.
        stop_early: stop the forward after the last requested layer (the rest is not needed).

    Raises:
        UnsupportedModelError: naming the architecture, when its attention cannot be captured.
    """
    if reduce not in ("sum", "rows"):
        raise ValueError(f"reduce must be 'sum' or 'rows', got {reduce!r}")
    rows, row_valid = answer_rows(answer_mask.bool())

    def compute(module, query, key, mask, kwargs) -> torch.Tensor:
        probs = interface_call_rows(module, query, key, mask, kwargs, rows, row_valid)
        return probs.sum(dim=2) if reduce == "sum" else probs

    results = capture_layer_calls(model, input_ids, attention_mask, compute, layers, stop_early)
    return AnswerAttention(sorted(results), torch.stack([results[layer] for layer in sorted(results)], dim=1), rows, row_valid)


@torch.no_grad()
def capture_layer_calls(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    compute: Callable,
    layers: list[int] | None = None,
    stop_early: bool = True,
) -> dict[int, object]:
    """Run one forward and return, per requested layer, ``compute`` applied to its attention call.

    ``compute(module, query, key, attention_mask, kwargs)`` receives what the model passed to its
    attention function (query ``[batch, heads, T, head_dim]`` and key ``[batch, kv_heads, T, head_dim]``
    after rotary, norms and biases; the 4D mask or None; ``kwargs`` with ``scaling``, ``sliding_window``,
    ``softcap``, ...), so it can compute any reduction of the exact attention rows it needs, in chunks
    (``interface_call_rows``), without a T x T map. The model's own attention runs unchanged.

    Args:
        model: a Hugging Face causal LM in eval mode.
        input_ids, attention_mask: ``[batch, T]``.
        layers: layer indices (all when None).
        stop_early: stop the forward after the last requested layer.

    Raises:
        UnsupportedModelError: naming the architecture, when its attention cannot be captured.
    """
    if model.training:
        raise ValueError("put the model in eval mode (model.eval()) before capturing attention: dropout would change it")
    modules = attention_modules(model)
    wanted = sorted(modules) if layers is None else sorted(set(layers))
    missing = [layer for layer in wanted if layer not in modules]
    if missing:
        raise ValueError(f"{type(model).__name__} has no attention layer(s) {missing}; it has layers 0..{max(modules)}")
    recorder = _Recorder(wanted, compute, wanted[-1] if stop_early else None)
    name = _implementation(model)
    with _wrap_implementation(name):
        with _LOCK:
            for layer in wanted:
                for module in modules[layer]:
                    _ACTIVE[id(module)] = recorder
        try:
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **_forward_kwargs(model))
        except _StopForward:
            pass
        finally:
            with _LOCK:
                for layer in wanted:
                    for module in modules[layer]:
                        _ACTIVE.pop(id(module), None)
    silent = [layer for layer in wanted if layer not in recorder.results]
    if silent:
        raise UnsupportedModelError(
            f"{type(model).__name__} (attention implementation {name!r}) did not compute layer(s) {silent} "
            "through the transformers attention interface, so their attention cannot be captured"
        )
    return recorder.results
