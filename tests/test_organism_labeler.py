"""Ground-truth labeler: agrees with the teacher and handles imperfect model-style traces."""

from __future__ import annotations

import pytest

from kfh_probe.organism.labeler import TraceFormatError, extract_answer, label_trace, parse_prompt, split_steps
from kfh_probe.organism.traces import teacher_traces

PROMPT = ("Question: Ava has 7 apples. Cal has 5 coins. Ben has 3 more apples than Ava. "
          "Dan has 2 fewer coins than Cal. Eve has 4 fewer apples than Ben. How many apples does Eve have?\nAnswer:\n")
STEPS = [
    "<think>\nOkay, so the question asks how many apples Eve has, and I will go through the facts one by one.\n",
    "First, the question says that Ava has 7 apples, so Ava has 7 apples right from the start.\n",
    "Next, the question says that Cal has 5 coins, so Cal has 5 coins right from the start.\n",
    "Then, the question says that Ben has 3 more apples than Ava, so Ben has 7 + 3 = 10 apples.\n",
    "Wait, let me double-check Ben: 10 - 3 = 7, which matches Ava, so the value 10 for Ben is right.\n",
    "Now, the question says that Dan has 2 fewer coins than Cal, so Dan has 5 - 2 = 3 coins.\n",
    "Finally, the question says that Eve has 4 fewer apples than Ben, so Eve has 10 - 4 = 6 apples.\n",
]
SUMMARY = "</think>\nAva has 7 apples. Ben has 7 + 3 = 10 apples. Eve has 10 - 4 = 6 apples. So the answer is \\boxed{6}.<|endoftext|>"


def test_hand_checked_trace_is_labeled_by_the_dependency_chain():
    labeled = label_trace(PROMPT, "".join(STEPS) + SUMMARY)
    assert [s["text"] for s in labeled.steps] == STEPS
    assert [s["label"] for s in labeled.steps] == [
        "redundant", "essential", "redundant", "essential", "redundant", "redundant", "essential"]
    assert labeled.kinds == ["restate", "compute", "compute", "compute", "recheck", "compute", "compute"]
    assert (labeled.unknown_steps, labeled.wrong_claims, labeled.predicted) == (0, 0, 6)


def test_recomputing_a_chain_quantity_is_redundant_and_wrong_arithmetic_keeps_the_label():
    steps = [
        "<think>\nFirst, the question says that Ava has 7 apples, so Ava has 7 apples right from the start.\n",
        "Then, the question says that Ben has 3 more apples than Ava, so Ben has 7 + 3 = 11 apples.\n",
        "Next, the question says that Ben has 3 more apples than Ava, so Ben has 7 + 3 = 10 apples.\n",
        "blah blah\n\n",
        "Finally, the question says that Eve has 4 fewer apples than Ben, so Eve has 10 - 4 = 6 apples.\n",
    ]
    labeled = label_trace(PROMPT, "".join(steps) + SUMMARY)
    assert [s["label"] for s in labeled.steps] == ["essential", "essential", "redundant", "redundant", "essential"]
    assert labeled.kinds[3] == "unknown"
    assert (labeled.unknown_steps, labeled.wrong_claims) == (1, 1)


def test_labeler_agrees_with_the_teacher_on_every_teacher_trace():
    for record in teacher_traces(500, seed=11):
        labeled = label_trace(record["prompt"], record["response"])
        assert labeled.steps == record["steps"]
        assert labeled.unknown_steps == 0 and labeled.wrong_claims == 0


def test_a_response_without_exactly_one_think_close_cannot_be_labeled():
    with pytest.raises(TraceFormatError, match="exactly 1"):
        label_trace(PROMPT, "".join(STEPS))
    assert extract_answer("".join(STEPS) + "\\boxed{6}") is None
    assert extract_answer("a</think>b</think>\\boxed{6}") is None
    assert extract_answer("a</think>\\boxed{5} then \\boxed{6}") == 6


def test_blank_lines_and_the_opener_join_neighbouring_steps():
    assert split_steps("<think>\nA\n\nB\nC") == ["<think>\nA\n\n", "B\n", "C"]
    assert split_steps("<think>\n") == ["<think>\n"]


def test_prompt_outside_the_grammar_is_rejected_with_a_clear_message():
    with pytest.raises(TraceFormatError, match="not an organism prompt"):
        parse_prompt("What is 2 + 2?")
    with pytest.raises(TraceFormatError, match="unknown 'Zed'"):
        parse_prompt("Question: Ava has 3 more coins than Zed. How many coins does Ava have?\nAnswer:\n")
