"""Sampling responses: ``generate_rollouts`` (batched ``model.generate`` with left padding and the KV
cache) and ``decode_responses`` (EOS trimming and decoding); ``Rollouts`` holds the result.

The project's one generation loop: ``kfh-probe generate`` (``kfh_probe.generate.sample_hf``), the
organism's report and labeled traces (``kfh_probe.organism.report.respond``), and the trainer's steps and
evaluation (``attnpo_train.loop``, ``attnpo_train.evaluate``) all sample through it. ``Rollouts`` and
``decode_responses`` are shared with vLLM sampling (``kfh_probe.generate.VLLMSampler``) and the TRL
adapter (``attnpo_train.trl``), which build ``Rollouts`` from ids another engine generated.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import torch
from torch import nn

from kfh_probe.errors import InputError


@dataclass
class Rollouts:
    """The responses of one step; rollout ``i`` answers prompt ``i // group_size``.

    Attributes:
        group_size: G.
        prompt_ids: P*G lists, the prompt's token ids (no padding).
        response_ids: P*G lists, generated ids up to and including the first EOS (all generated ids
            when the response was cut at ``max_new_tokens``).
        texts: P*G decoded responses (special tokens kept so the marker survives, EOS text removed).
        finished: P*G flags, True when the response ended with EOS.
    """

    group_size: int
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    texts: list[str]
    finished: list[bool]

    @property
    def response_lengths(self) -> torch.Tensor:
        """[P*G] float32 response lengths in tokens (EOS included)."""
        return torch.tensor([len(r) for r in self.response_ids], dtype=torch.float32)


@torch.no_grad()
def generate_rollouts(
    model: nn.Module,
    tokenizer,
    prompts: list[str],
    group_size: int,
    max_new_tokens: int,
    temperature: float | None,
    batch_size: int | None = None,
    top_p: float = 1.0,
) -> Rollouts:
    """Sample ``group_size`` responses to each prompt (greedy when ``temperature`` is None; nucleus
    sampling with ``top_p`` < 1).

    Each prompt is repeated G times, left-padded and generated in batches of ``batch_size`` sequences
    (all at once when None) with the KV cache. Sampling draws from torch's global generator, so a run is
    reproducible from ``torch.get_rng_state()``.

    Args:
        prompts: P exact model inputs, tokenised as they are (no special tokens added: the prompt text
            already holds any chat template).
    Returns:
        ``Rollouts`` of the P*G responses, rollout ``i`` answering ``prompts[i // group_size]``.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise InputError("the tokenizer has no EOS token; responses could never finish")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    device = next(model.parameters()).device
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    rows = [list(ids) for ids in encoded for _ in range(group_size)]
    sampling = (
        {"do_sample": False}
        if temperature is None
        else {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": top_p}
    )
    batch_size = batch_size or len(rows)
    responses: list[list[int]] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        width = max(len(r) for r in chunk)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for b, ids in enumerate(chunk):
            input_ids[b, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[b, width - len(ids) :] = 1
        out = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            max_new_tokens=max_new_tokens,
            eos_token_id=eos,
            pad_token_id=pad,
            **sampling,
        )
        responses += out[:, width:].tolist()
    trimmed, texts, finished = decode_responses(tokenizer, responses, {eos})
    return Rollouts(group_size, rows, trimmed, texts, finished)


def decode_responses(
    tokenizer, generated: list[list[int]], eos_ids: Collection[int]
) -> tuple[list[list[int]], list[str], list[bool]]:
    """Trim generated ids at the first end-of-sequence id and decode them, as ``Rollouts`` holds them.

    Args:
        generated: one list of generated ids per response (padding after EOS allowed).
        eos_ids: the ids that end a response (the tokenizer's EOS; an engine may add the generation
            config's other end ids).
    Returns:
        (ids up to and including the first id in ``eos_ids``, all ids when there is none;
         texts decoded with special tokens kept, so the marker survives, and the EOS text removed;
         finished flags, True when the response ended with an EOS id).
    """
    trimmed, texts, finished = [], [], []
    for ids in generated:
        end = next((i for i, token in enumerate(ids) if token in eos_ids), None)
        done = end is not None
        kept = ids[: end + 1] if done else list(ids)
        trimmed.append(kept)
        finished.append(done)
        texts.append(tokenizer.decode(kept[:-1] if done else kept, skip_special_tokens=False))
    return trimmed, texts, finished
