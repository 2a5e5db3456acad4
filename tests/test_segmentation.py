"""The reference segmentation rules on realistic DeepSeek-R1-style reasoning."""

from __future__ import annotations

import pytest
from conftest import R1_TRACES

from kfh_probe.segmentation import SegmenterConfig, segment_reasoning, segment_spans


def _reasoning(i: int) -> str:
    return R1_TRACES[i]["response"].split("</think>")[0]


def test_pieces_concatenate_to_the_text():
    for record in R1_TRACES:
        text = _reasoning(R1_TRACES.index(record))
        assert "".join(segment_reasoning(text)) == text


def test_r1_trace_splits_at_wait_and_hmm_and_keeps_latex_and_code_inside_steps():
    steps = segment_reasoning(_reasoning(0))
    assert len(steps) == 3
    assert steps[0].startswith("<think>\nOkay, so")
    assert "$\\frac{10 \\cdot 11}{2} = 55$" in steps[0]  # the short "So for n = 10" line merged backward
    assert steps[1].startswith("Wait, let me double-check")
    assert steps[2].startswith("Hmm, alternatively") and "```python\nprint(sum(range(11)))\n```" in steps[2]


def test_unicode_trace_splits_at_line_start_phrases_and_keeps_final_answer_whole():
    steps = segment_reasoning(_reasoning(1))
    assert [s.split()[0] for s in steps] == ["<think>", "Then", "Alternatively,", "**Final"]
    assert steps[0].endswith("7 × 3 = 21 square centimetres.\n")
    assert steps[3] == "**Final Answer**\nThe area is 21 cm².\n"  # short, but never merged


def test_progression_phrase_mid_line_does_not_split_but_confused_phrase_does():
    line = "x" * 90 + " Then we add one more thing to the running total here. " + "y" * 90
    assert len(segment_reasoning(line)) == 1
    text = "z" * 90 + " Wait, that is not right, the sum must be recomputed from the start. " + "w" * 90
    steps = segment_reasoning(text)
    assert len(steps) == 2 and steps[1].startswith("Wait, that is not right")


def test_longest_phrase_decides_the_family():
    config = SegmenterConfig(min_chars=0)
    text = "Start of the work here.\nHmm, wait, the sign is wrong. Hmm, wait, maybe not."
    # "Hmm, wait" is confused (splits anywhere); bare "Hmm" would be progression (line start only).
    assert segment_reasoning(text, config) == [
        "Start of the work here.\n", "Hmm, wait, the sign is wrong. ", "Hmm, wait, maybe not."]


def test_phrase_must_be_a_whole_word():
    config = SegmenterConfig(min_chars=0)
    assert segment_reasoning("Sometimes we add.\nSolving now.\nSo done.", config) == [
        "Sometimes we add.\nSolving now.\n", "So done."]
    assert segment_reasoning("abc Butter is not But", config) == ["abc Butter is not ", "But"]


def test_short_pieces_merge_by_reference_rules():
    long_a = "First, compute the total of the two groups of apples that were bought at the store.\n"
    config = SegmenterConfig(min_chars=80)
    # short confused piece merges forward into the next piece
    steps = segment_reasoning(long_a + "Wait.\n" + "Then we find that the total is twelve apples for the whole group of friends.\n", config)
    assert steps == [long_a, "Wait.\nThen we find that the total is twelve apples for the whole group of friends.\n"]
    # short progression piece followed by a confused piece merges backward
    confused = "Wait, let me double-check that: six plus six is twelve, which matches the total above.\n"
    steps = segment_reasoning(long_a + "Next, add.\n" + confused, config)
    assert steps == [long_a + "Next, add.\n", confused]
    # a bare summary trigger merges forward even before a confused piece
    steps = segment_reasoning(long_a + "So\n" + confused, config)
    assert steps == [long_a, "So\n" + confused]


def test_blank_line_mode():
    text = "para one is here\n\npara two\nstill two\n\n\npara three"
    config = SegmenterConfig(mode="blank-line", min_chars=0)
    assert segment_reasoning(text, config) == ["para one is here\n\n", "para two\nstill two\n\n\n", "para three"]
    assert segment_reasoning(text, SegmenterConfig(mode="blank-line", min_chars=15)) == [
        "para one is here\n\n", "para two\nstill two\n\n\npara three"]


def test_configurable_phrases_and_invalid_settings():
    config = SegmenterConfig(min_chars=0, confused=("Oops",), branching=(), progression=(), summary=(), final=())
    assert segment_reasoning("one thing Oops another", config) == ["one thing ", "Oops another"]
    with pytest.raises(ValueError, match="mode"):
        SegmenterConfig(mode="sentences")
    with pytest.raises(ValueError, match="empty"):
        SegmenterConfig(confused=("",))


def test_spans_cover_the_text_without_gaps():
    text = _reasoning(0)
    spans = segment_spans(text)
    assert spans[0][0] == 0 and spans[-1][1] == len(text)
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))


@pytest.mark.parametrize(
    "phrase, family",
    [
        ("No, that is wrong", "confused"),
        ("Let me just double-check", "confused"),
        ("Let's just verify", "confused"),
        ("Just to make sure", "confused"),
        ("Let me recap", "confused"),  # the recap family
        ("Let's just recap", "confused"),
        ("Another idea", "branching"),
        ("I guess another way", "branching"),
        ("Hmm, so", "summary"),
        ("Similarly", "progression"),
        ("First off,", "progression"),
    ],
)
def test_reference_phrases_are_recognised_with_their_family(phrase, family):
    assert SegmenterConfig().match(phrase + " more", 0)[1] == family


def test_restored_reference_phrases_cut_where_the_reference_cuts():
    config = SegmenterConfig(min_chars=0)
    text = "We get 12. No, that ignores the tax. Let me just double-check the rate.\nSimilarly for B.\nHmm, so 13."
    assert segment_reasoning(text, config) == [
        "We get 12. ", "No, that ignores the tax. ", "Let me just double-check the rate.\n", "Similarly for B.\n",
        "Hmm, so 13."]
    # "No," needs its comma, as in the reference: "No one" opens no step
    assert segment_reasoning("x No one said so.", config) == ["x No one said so."]
