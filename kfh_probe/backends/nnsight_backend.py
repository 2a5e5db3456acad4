"""The ``nnsight`` backend: answer-row attention read inside an nnsight trace.

nnsight's source tracing (``envoy.source``) exposes every call an attention module's ``forward`` makes.
The call of the attention-interface function (``attention_interface_N`` in the module's source, as in
``attn_output, attn_weights = attention_interface(self, query, key, value, attention_mask, ...)``)
hands over the query and key *after* rotary embedding, norms and biases, the mask and the scaling. The
trace reads those arguments (``.inputs``) and computes the answer rows with the same function as the
``hf`` backend (:func:`kfh_probe.capture.interface_call_rows`): ``R x T`` per head, float32, never
``T x T``. The model's own attention runs unchanged, and the trace stops after the last requested layer.

Because everything happens in the trace body, the same code runs with nnsight's remote execution
(``remote=True`` on an NDIF-hosted ``TransformersModel``); ``kfh_probe.capture`` and the error classes it
derives from (``kfh_probe.errors``) are then registered to travel with the request by value.
"""

from __future__ import annotations

import copy
import re

import nnsight
import torch
from nnsight.intervention.source import SourceNotAvailable
from nnsight.modeling.transformers import TransformersModel
from torch import nn

from .. import capture, errors
from ..capture import (
    AnswerAttention,
    UnsupportedModelError,
    answer_rows,
    attention_modules,
    interface_call_rows,
    model_shape,
)
from . import requested_layers

NAME = "nnsight"
_INTERFACE_OP = re.compile(r"attention_interface_\d+")


def _interface_calls(wrapped: TransformersModel) -> dict[int, tuple[str, str]]:
    """Per layer, the path of its attention module and the name of its attention-interface call.

    The last ``attention_interface_N`` operation of a forward is the call; earlier ones are the
    assignments that pick the function.

    Raises:
        UnsupportedModelError: naming the backend, when a layer has no such call.
    """
    model = wrapped.pipeline.model
    try:
        candidates = attention_modules(model)
    except UnsupportedModelError as err:
        raise UnsupportedModelError(f"backend {NAME!r}: {err}") from None
    paths = {id(module): path for path, module in model.named_modules()}
    calls: dict[int, tuple[str, str]] = {}
    for layer, modules in candidates.items():
        for module in modules:
            path = paths[id(module)]
            try:
                names = wrapped.get(path).source.names
            except SourceNotAvailable:
                continue
            ops = [name for name in names if _INTERFACE_OP.fullmatch(name)]
            if ops:
                calls[layer] = (path, ops[-1])
                break
    silent = sorted(set(candidates) - set(calls))
    if silent:
        raise UnsupportedModelError(
            f"backend {NAME!r}: {type(model).__name__} layer(s) {silent} have no call of the transformers attention "
            "interface in their attention module's source, so nnsight cannot read their query and key; use `backend` 'hf'",
            settings=("backend",),
        )
    return calls


class NNsightCapture:
    """Answer-row attention through nnsight (``nnsight.modeling.transformers.TransformersModel``).

    Args:
        model: a loaded Hugging Face causal LM in eval mode, wrapped here; or an nnsight
            ``TransformersModel`` already built (for example on a model hosted remotely).
        tokenizer: the model's tokenizer (nnsight's text-generation pipeline wants one; a copy is
            used, so nnsight's padding settings do not leak out). Ignored when ``model`` is wrapped.
        remote: passed to ``trace``: ``True`` runs on the NDIF server, ``"local"`` simulates the remote
            path in this process (serialising the trace), ``False`` runs locally.
    """

    name = NAME

    def __init__(self, model: nn.Module | TransformersModel, tokenizer=None, remote: bool | str = False):
        if isinstance(model, TransformersModel):
            self.wrapped = model
        else:
            if model.training:
                raise ValueError(f"backend {NAME!r}: put the model in eval mode (model.eval()) first: dropout would change attention")
            if tokenizer is None:
                raise ValueError(f"backend {NAME!r} needs the model's tokenizer to wrap it in nnsight's TransformersModel")
            self.wrapped = TransformersModel(model, tokenizer=copy.deepcopy(tokenizer), task="text-generation")
        self.remote = remote
        if remote:
            for module in (capture, errors):  # the server may not have kfh_probe: ship the mathematics by value
                nnsight.register(module)
        self.calls = _interface_calls(self.wrapped)
        self.num_layers = model_shape(self.wrapped.pipeline.model)["num_layers"]

    def __call__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        answer_mask: torch.Tensor,
        layers: list[int] | None = None,
    ) -> AnswerAttention:
        """One traced forward.

        Args:
            input_ids: ``[batch, position]`` right-padded token ids.
            attention_mask: ``[batch, position]``, 1 on real tokens.
            answer_mask: ``[batch, position]`` bool, True on the answer rows.
            layers: layer indices (all when None).

        Returns:
            ``reduce="sum"`` answer attention, values ``[batch, layer, head, key]`` float32.
        """
        wanted = requested_layers(NAME, self.num_layers, layers)
        rows, row_valid = answer_rows(answer_mask.bool())
        saved = []
        with torch.no_grad(), self.wrapped.trace(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False, remote=self.remote
        ) as tracer:
            for layer in wanted:
                path, op = self.calls[layer]
                args, kwargs = getattr(self.wrapped.get(path).source, op).inputs
                if len(args) < 5:
                    raise UnsupportedModelError(
                        f"backend {NAME!r}: {path} calls its attention function with {len(args)} positional "
                        "arguments, not (module, query, key, value, attention_mask); use `backend` 'hf'",
                        settings=("backend",),
                    )
                module, query, key, _, mask = args[:5]
                probs = interface_call_rows(module, query, key, mask, kwargs, rows, row_valid)
                saved.append(nnsight.save(probs.sum(dim=2)))
            tracer.stop()
        values = torch.stack([s.to(rows.device) for s in saved], dim=1)
        return AnswerAttention(wanted, values, rows, row_valid)
