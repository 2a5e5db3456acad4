"""Steps and the answer span land on the right tokens, for file traces and for generated ids."""

from __future__ import annotations

import pytest
from conftest import R1_TRACES

from kfh_probe.alignment import AlignmentError, align_generated, collate, generated_char_offsets, tokenize_trace
from kfh_probe.segmentation import segment_reasoning


def _decode(tokenizer, ids, span):
    return tokenizer.decode(ids[span[0]:span[1]])


def test_steps_and_answer_map_to_their_own_tokens(byte_tokenizer):
    record = R1_TRACES[1]
    steps = segment_reasoning(record["response"].split("</think>")[0])
    tok = tokenize_trace(byte_tokenizer, record["prompt"], record["response"], steps)
    assert len(tok.step_spans) == 4
    assert all(a[1] <= b[0] for a, b in zip(tok.step_spans, tok.step_spans[1:]))
    assert tok.step_spans[0][0] == tok.prompt_len
    decoded = [_decode(byte_tokenizer, tok.input_ids, s) for s in tok.step_spans]
    assert decoded[1].startswith("Then I should") and "2·(7+3)" in decoded[1]
    assert decoded[3] == "**Final Answer**\nThe area is 21 cm².\n"
    answer = _decode(byte_tokenizer, tok.input_ids, tok.answer_span)
    assert "\\boxed{21}" in answer and answer.endswith("<|eos|>")  # EOS is part of F
    assert "</think>" not in answer and all("</think>" not in d for d in decoded)


def test_eos_is_not_doubled_when_the_response_ends_with_it(byte_tokenizer):
    record = R1_TRACES[0]
    with_eos = tokenize_trace(byte_tokenizer, record["prompt"], record["response"] + "<|eos|>")
    without = tokenize_trace(byte_tokenizer, record["prompt"], record["response"])
    assert with_eos.input_ids == without.input_ids


def test_segmenting_when_no_steps_are_given(byte_tokenizer):
    record = R1_TRACES[0]
    tok = tokenize_trace(byte_tokenizer, record["prompt"], record["response"])
    assert len(tok.step_spans) == 3


def test_errors_for_no_answer_and_no_marker(byte_tokenizer):
    with pytest.raises(AlignmentError, match="no final-answer tokens"):
        tokenize_trace(byte_tokenizer, "p", "reasoning here</think>", append_eos=False)
    with pytest.raises(AlignmentError, match="no end-of-thinking marker"):
        tokenize_trace(byte_tokenizer, "p", "no marker at all")


def test_step_that_covers_no_token_start_is_reported(byte_tokenizer):
    # A one-character step inside a multi-character token has no token of its own.
    text = "First, the area is 21.\nThen"
    ids = byte_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    inside = next(s + 1 for s, e in ids if e - s >= 3)
    steps = [text[:inside], text[inside:inside + 1], text[inside + 1:]]
    with pytest.raises(AlignmentError, match="step 1 .* maps to no token"):
        tokenize_trace(byte_tokenizer, "", text + "</think>x", steps)


def test_generated_offsets_match_the_decoded_text_including_multibyte_characters(byte_tokenizer):
    text = "So × is 21 cm² — réponse.\n</think>\\boxed{21}"
    ids = byte_tokenizer(text, add_special_tokens=False)["input_ids"]
    decoded, starts = generated_char_offsets(byte_tokenizer, ids)
    assert decoded == byte_tokenizer.decode(ids)
    assert starts == sorted(starts) and len(starts) == len(ids)


def test_generated_offsets_of_whole_token_texts_equal_the_incremental_decoding(byte_tokenizer):
    """Text whose tokens each decode to whole characters takes the batched path; the starts are those
    the incremental decoding (the path for multi-byte pieces) gives."""

    class OneAtATime:  # the same tokenizer without the batched shortcut: incremental decoding only
        backend_tokenizer = None

        def decode(self, ids, skip_special_tokens=False):
            return byte_tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

        def batch_decode(self, batch, skip_special_tokens=False):
            return ["\ufffd"] * len(batch)

    text = R1_TRACES[0]["response"]
    ids = byte_tokenizer(text, add_special_tokens=False)["input_ids"] + [byte_tokenizer.eos_token_id]
    assert all("\ufffd" not in byte_tokenizer.decode([i]) for i in ids)
    assert generated_char_offsets(byte_tokenizer, ids) == generated_char_offsets(OneAtATime(), ids)
    assert generated_char_offsets(byte_tokenizer, []) == ("", [])


def test_align_generated_equals_tokenize_trace_on_the_same_ids(byte_tokenizer):
    record = R1_TRACES[1]
    from_file = tokenize_trace(byte_tokenizer, record["prompt"], record["response"])
    prompt_ids = from_file.input_ids[: from_file.prompt_len]
    generated = align_generated(byte_tokenizer, prompt_ids, from_file.input_ids[from_file.prompt_len:])
    assert generated.step_spans == from_file.step_spans
    assert generated.answer_span == from_file.answer_span
    assert align_generated(byte_tokenizer, prompt_ids, byte_tokenizer("no marker")["input_ids"]) is None


def test_collate_pads_on_the_right(byte_tokenizer):
    a = tokenize_trace(byte_tokenizer, R1_TRACES[0]["prompt"], R1_TRACES[0]["response"])
    b = tokenize_trace(byte_tokenizer, R1_TRACES[1]["prompt"], R1_TRACES[1]["response"])
    batch = collate([a, b], pad_id=0)
    assert batch.input_ids.shape[1] == max(a.length, b.length)
    assert batch.attention_mask[0].sum() == a.length and batch.attention_mask[1].sum() == b.length
    assert batch.answer_mask[1].nonzero().flatten().tolist() == list(range(*b.answer_span))


def test_a_token_belongs_to_the_step_of_its_first_non_whitespace_character(byte_tokenizer):
    from kfh_probe.alignment import visible_starts

    text = "ab  cd\n\n"
    assert visible_starts(text, [(0, 2), (2, 6), (6, 8), (8, 8)]) == [0, 4, 6, -1]
    # the cut sits in front of "Wait"; a token " Wait" (space first) must open the second step
    reasoning = "x" * 30 + " Wait, the sum is wrong."
    steps = [reasoning[:31], reasoning[31:]]
    tok = tokenize_trace(byte_tokenizer, "", reasoning + "</think>y", steps)
    first, second = (byte_tokenizer.decode(tok.input_ids[a:b]) for a, b in tok.step_spans)
    assert first.rstrip() == "x" * 30 and second.lstrip() == "Wait, the sum is wrong."
