"""The end-of-thinking marker must occur exactly once (method page section 1): one rule,
``kfh_probe.segmentation.split_at_marker``, and every place that checks it gives the same verdict and
the same message."""

import pytest

from kfh_probe.alignment import AlignmentError, align_generated, tokenize_trace
from kfh_probe.generate import Progress
from kfh_probe.grading import extract_final_answer
from kfh_probe.labelers.base import with_steps
from kfh_probe.organism.labeler import TraceFormatError, label_trace
from kfh_probe.segmentation import SegmenterConfig, split_at_marker, split_response
from kfh_probe.traces import Trace, parse_record

ONCE = "<think>First, work.\n</think>So \\boxed{4}."
BROKEN = [  # (response, what the message says)
    ("<think>First, work.\nSo \\boxed{4}.", "response has no end-of-thinking marker '</think>'; exactly one is needed"),
    ("<think>First.\n</think>Wait.\n</think>\\boxed{4}", "response has 2 end-of-thinking marker '</think>'; exactly one is needed"),
]


def test_once_splits_into_reasoning_and_answer_without_the_marker():
    assert split_at_marker(ONCE) == ("<think>First, work.\n", "So \\boxed{4}.")
    assert split_response(ONCE) == split_at_marker(ONCE)
    assert split_at_marker("r<|end|>a", "<|end|>") == ("r", "a")


@pytest.mark.parametrize("response, message", BROKEN)
def test_absent_or_repeated_marker_is_refused_everywhere_with_one_message(response, message):
    with pytest.raises(ValueError) as split:
        split_at_marker(response)
    assert str(split.value) == message
    assert split_response(response) is None
    with pytest.raises(ValueError) as trace:
        parse_record({"id": "t", "prompt": "p", "response": response}, 1)
    assert str(trace.value) == message
    with pytest.raises(AlignmentError) as aligned:
        tokenize_trace(None, "p", response)  # refused before the tokenizer is used
    assert str(aligned.value) == message
    with pytest.raises(TraceFormatError) as organism:
        label_trace("not even an organism prompt", response)  # the marker is checked first
    assert str(organism.value) == message
    with pytest.raises(ValueError) as segmented:
        with_steps(Trace("t", "p", response), SegmenterConfig())
    assert str(segmented.value) == message
    assert extract_final_answer(response) is None


def test_an_empty_marker_marks_nothing():
    assert split_response("abc", "") is None
    with pytest.raises(ValueError, match="no end-of-thinking marker ''"):
        split_at_marker("abc", "")


def test_generate_counts_finished_responses_without_exactly_one_marker():
    progress = Progress(key={})
    for response, _ in BROKEN:
        progress.count({"response": response, "truncated": False, "correct": None}, True, "</think>")
    progress.count({"response": ONCE, "truncated": False, "correct": None}, True, "</think>")
    progress.count({"response": BROKEN[0][0], "truncated": True, "correct": None}, False, "</think>")  # cut off
    assert progress.counts["no_marker"] == 2 and progress.counts["truncated"] == 1


def test_a_generated_response_without_exactly_one_marker_gets_no_steps(byte_tokenizer):
    for response, _ in BROKEN:
        ids = byte_tokenizer(response, add_special_tokens=False)["input_ids"]
        assert align_generated(byte_tokenizer, [1, 2], ids) is None
    ids = byte_tokenizer(ONCE, add_special_tokens=False)["input_ids"]
    assert align_generated(byte_tokenizer, [1, 2], ids) is not None
