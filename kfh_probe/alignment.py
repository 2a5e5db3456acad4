"""From characters to tokens: where each step and the final-answer span F sit in the model's input.

Two entry points, both aligned on the token ids the model really sees (no re-tokenising of decoded
text, a defect of the reference):

- :func:`tokenize_trace` for trace files: the text ``prompt + response`` is tokenised once with
  offsets.
- :func:`align_generated` for responses the policy just generated: the character offsets of the
  generated ids come from decoding them incrementally.

A token belongs to the step that holds its first non-whitespace character (a token of whitespace only:
its first character). BPE tokenizers write a word with the space before it (`` Wait``), so a step cut
in front of a mid-line "Wait" gets the token `` Wait`` that opens it, instead of leaving it at the end
of the step before.

A token that overlaps the end-of-thinking marker belongs to neither a step nor F. F runs from the
first token after the marker to the end of the sequence, EOS included (method page, section 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import torch

from .errors import KFHError
from .segmentation import SegmenterConfig, segment_spans, split_at_marker, split_response


@dataclass(frozen=True)
class TokenizedTrace:
    """Token ids of one trace and the token spans of its steps and final answer.

    Attributes:
        input_ids: prompt and response token ids, length T.
        step_spans: ``[start, end)`` token span of each step (non-empty, in order).
        answer_span: ``[start, end)`` token span of F.
        prompt_len: number of tokens that belong to the prompt.
        eos_appended: whether the EOS id was added to F because the response text lacked it
            (``tokenize_trace``; the sweep counts these traces in its manifest).
    """

    input_ids: list[int]
    step_spans: list[tuple[int, int]]
    answer_span: tuple[int, int]
    prompt_len: int
    eos_appended: bool = False

    @property
    def length(self) -> int:
        return len(self.input_ids)


class AlignmentError(KFHError, ValueError):
    """A trace whose steps or answer cannot be placed on tokens."""


def visible_starts(text: str, spans: list[tuple[int, int]]) -> list[int]:
    """The character each token is placed by: its first non-whitespace character in ``text``.

    Args:
        spans: ``[start, end)`` characters of each token; ``start == end`` (no text) gives ``-1``.
    Returns:
        one offset per token: ``start`` plus the token's leading whitespace, or ``start`` for a token
        of whitespace only, or ``-1``.
    """
    starts = []
    for start, end in spans:
        piece = text[start:end]
        stripped = piece.lstrip()
        starts.append(-1 if end <= start else start + (len(piece) - len(stripped) if stripped else 0))
    return starts


def placed_span(starts: list[int], c0: int, c1: int) -> tuple[int, int] | None:
    """The token span ``[first, last + 1)`` of the tokens placed in characters ``[c0, c1)`` (a token is placed by
    its first visible character, ``starts``), or None when no token is."""
    tokens = [i for i, s in enumerate(starts) if c0 <= s < c1]
    return (tokens[0], tokens[-1] + 1) if tokens else None


def _spans_from_offsets(
    starts: list[int], step_chars: list[tuple[int, int]], marker_chars: tuple[int, int]
) -> tuple[list[tuple[int, int]], tuple[int, int]]:
    """Token spans of steps and F, given the character each token is placed by (``-1`` for none)."""
    marker_start, marker_end = marker_chars
    n = len(starts)
    step_spans = []
    for k, (c0, c1) in enumerate(step_chars):
        span = placed_span(starts, c0, min(c1, marker_start))
        if span is None:
            raise AlignmentError(
                f"step {k} (characters {c0}..{c1}) maps to no token: every token that covers it starts "
                "in a neighbouring step; merge it with a neighbour"
            )
        step_spans.append(span)
    answer_start = next((i for i, s in enumerate(starts) if s >= marker_end), n)
    if answer_start >= n:
        raise AlignmentError("no final-answer tokens after the end-of-thinking marker")
    return step_spans, (answer_start, n)


def tokenize_trace(
    tokenizer,
    prompt: str,
    response: str,
    step_texts: list[str] | None = None,
    marker: str = "</think>",
    segmenter: SegmenterConfig | None = None,
    append_eos: bool = True,
    add_special_tokens: bool = False,
) -> TokenizedTrace:
    """Tokenise ``prompt + response`` once and place the steps and F on the tokens.

    Args:
        tokenizer: a Hugging Face tokenizer that returns offsets (``return_offsets_mapping``).
        step_texts: the steps as text (must concatenate to the reasoning); segmented with
            ``segmenter`` when None.
        append_eos: add the EOS id when the response text does not already end with the EOS text
            (generated responses end in EOS; F includes it).
        add_special_tokens: whether the tokenizer adds BOS etc. (False: the prompt already holds
            the chat template's special text).

    Raises:
        AlignmentError: the marker is missing or repeated, a step covers no token, F is empty.
    """
    try:
        reasoning, _ = split_at_marker(response, marker)
    except ValueError as err:
        raise AlignmentError(str(err)) from None
    if step_texts is None:
        local = segment_spans(reasoning, segmenter)
    else:
        if "".join(step_texts) != reasoning:
            raise AlignmentError("step texts do not concatenate to the reasoning")
        local, pos = [], 0
        for text in step_texts:
            local.append((pos, pos + len(text)))
            pos += len(text)
    base = len(prompt)
    ids, starts, eos_appended = _encode(tokenizer, prompt, response, append_eos, add_special_tokens)
    marker_start = base + len(reasoning)
    step_chars = [(base + a, base + b) for a, b in local]
    step_spans, answer_span = _spans_from_offsets(starts, step_chars, (marker_start, marker_start + len(marker)))
    prompt_len = sum(1 for s in starts if 0 <= s < base)
    return TokenizedTrace(ids, step_spans, answer_span, prompt_len, eos_appended)


def _encode(
    tokenizer, prompt: str, response: str, append_eos: bool, add_special_tokens: bool
) -> tuple[list[int], list[int], bool]:
    """Token ids of ``prompt + response`` (EOS appended as in ``tokenize_trace``), each token's first
    character (``-1`` for none), and whether EOS was appended."""
    text = prompt + response
    try:
        encoded = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    except NotImplementedError as err:
        raise AlignmentError(f"tokenizer {type(tokenizer).__name__} cannot return offsets: {err}") from err
    ids = list(encoded["input_ids"])
    starts = visible_starts(text, [tuple(span) for span in encoded["offset_mapping"]])
    eos_text = tokenizer.eos_token
    appended = append_eos and tokenizer.eos_token_id is not None and not (eos_text and response.endswith(eos_text))
    if appended:
        ids.append(tokenizer.eos_token_id)
        starts.append(len(text))
    return ids, starts, appended


def tokenize_response(tokenizer, prompt: str, response: str, append_eos: bool = True) -> tuple[list[int], int]:
    """Token ids of ``prompt + response`` as ``tokenize_trace`` makes them (EOS appended when the response
    text lacks it) and the index of the first response token (the tokens that start in the prompt come
    before it). No segmentation: any response works.

    Raises:
        AlignmentError: the tokenizer cannot return offsets, or the response has no token.
    """
    ids, starts, _ = _encode(tokenizer, prompt, response, append_eos, add_special_tokens=False)
    prompt_len = sum(1 for s in starts if 0 <= s < len(prompt))
    if prompt_len >= len(ids):
        raise AlignmentError("the response maps to no token")
    return ids, prompt_len


def generated_char_offsets(tokenizer, ids: list[int]) -> tuple[str, list[int]]:
    """Decode ``ids`` and give the character where each token's text starts.

    When every token decodes on its own to a whole piece of text and the pieces concatenate to the
    decoded text (byte-level BPE on text without multi-byte characters, say), the starts are the
    pieces' running lengths (one batched decode). Otherwise decoding runs incrementally over a short
    window, so tokens that only form characters together (a byte-level piece of a multi-byte
    character) get the offset of the character they complete.

    Returns:
        ``(text, starts)`` with ``len(starts) == len(ids)``; a token that adds no text gets the
        offset of the next character.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)  # a fast tokenizer's Rust core: one call for all
    single = [[i] for i in ids]
    pieces = backend.decode_batch(single, skip_special_tokens=False) if backend is not None else \
        tokenizer.batch_decode(single, skip_special_tokens=False)
    joined = "".join(pieces)
    if "\ufffd" not in joined and joined == tokenizer.decode(ids, skip_special_tokens=False):
        return joined, list(accumulate(map(len, pieces), initial=0))[:-1]
    starts: list[int] = []
    text = ""
    prefix_offset = read_offset = 0  # decode ids[prefix_offset:] for context; ids[:read_offset] are in text
    for i in range(len(ids)):
        starts.append(len(text))
        prefix = tokenizer.decode(ids[prefix_offset:read_offset], skip_special_tokens=False)
        full = tokenizer.decode(ids[prefix_offset:i + 1], skip_special_tokens=False)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            text += full[len(prefix):]
            prefix_offset, read_offset = read_offset, i + 1
    return text, starts


def align_generated(
    tokenizer,
    prompt_ids: list[int],
    response_ids: list[int],
    marker: str = "</think>",
    segmenter: SegmenterConfig | None = None,
) -> TokenizedTrace | None:
    """Steps and F of a generated response, on its generated ids.

    Returns None when the response does not contain the marker exactly once, or when its steps or
    F cannot be placed (such responses keep a uniform advantage in training).
    """
    text, starts = generated_char_offsets(tokenizer, response_ids)
    parts = split_response(text, marker)
    if parts is None:
        return None
    visible = visible_starts(text, list(zip(starts, starts[1:] + [len(text)])))
    starts = [v if v >= 0 else s for v, s in zip(visible, starts)]  # a token that adds no text: where it is
    reasoning = parts[0]
    local = segment_spans(reasoning, segmenter)
    marker_start = len(reasoning)
    try:
        step_spans, answer_span = _spans_from_offsets(starts, local, (marker_start, marker_start + len(marker)))
    except AlignmentError:
        return None
    p = len(prompt_ids)
    return TokenizedTrace(
        list(prompt_ids) + list(response_ids),
        [(a + p, b + p) for a, b in step_spans],
        (answer_span[0] + p, answer_span[1] + p),
        p,
    )


@dataclass(frozen=True)
class Batch:
    """Right-padded batch of tokenized traces.

    Attributes:
        input_ids: ``[batch, position]`` long.
        attention_mask: ``[batch, position]`` long, 1 on real tokens.
        answer_mask: ``[batch, position]`` bool, True on the rows of F.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    answer_mask: torch.Tensor


def right_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids [batch, position]`` and ``attention_mask [batch, position]`` of ``sequences`` padded on
    the right with ``pad_id`` to the longest, so every sequence keeps its positions (padding never
    shifts rotary phases). The one padding rule of both packages."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for b, seq in enumerate(sequences):
        input_ids[b, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[b, : len(seq)] = 1
    return input_ids, attention_mask


def collate(traces: list[TokenizedTrace], pad_id: int) -> Batch:
    """Pad on the right (:func:`right_pad`), with the answer span F marked."""
    input_ids, attention_mask = right_pad([t.input_ids for t in traces], pad_id)
    answer_mask = torch.zeros(input_ids.shape, dtype=torch.bool)
    for b, t in enumerate(traces):
        answer_mask[b, t.answer_span[0] : t.answer_span[1]] = True
    return Batch(input_ids, attention_mask, answer_mask)
