"""Ground-truth labeler: agrees with the teacher and handles imperfect model-style traces."""

from __future__ import annotations

import pytest

from kfh_probe.organism.labeler import (
    TraceFormatError,
    extract_answer,
    label_trace,
    parse_prompt,
    split_steps,
    step_accounting,
)
from kfh_probe.organism.traces import teacher_traces

PROMPT = ("Question: Ava has seven apples. Ben has two more apples than Ava. Eve has four fewer apples than Ben. "
          "Cal has five coins. Dan has two fewer coins than Cal. How many apples does Eve have?\nAnswer:\n")
STEPS = [
    "<think>\nOkay, so the question asks how many apples Eve has, and I will go through the facts one by one.\n",
    "First, the question says that Ava has seven apples, so Ava has seven apples right from the start.\n",
    "Then, the question says that Ben has two more apples than Ava, so Ben has seven plus two, which is nine apples.\n",
    "Wait, let me double-check Ben: nine minus two is seven, which matches Ava, so the value nine for Ben is right.\n",
    "Now, the question says that Eve has four fewer apples than Ben, so Eve has nine minus four, which is five apples.\n",
    "Next, the question says that Cal has five coins, so Cal has five coins right from the start.\n",
    "Finally, the question says that Dan has two fewer coins than Cal, so Dan has five minus two, which is three coins.\n",
]
SUMMARY = ("</think>\nAva has seven apples. Ben has seven plus two, which is nine apples. "
           "Eve has nine minus four, which is five apples. So the answer is \\boxed{5}.<|endoftext|>")


def test_hand_checked_trace_is_labeled_by_the_dependency_chain():
    labeled = label_trace(PROMPT, "".join(STEPS) + SUMMARY)
    assert [s["text"] for s in labeled.steps] == STEPS
    assert [s["label"] for s in labeled.steps] == [
        "redundant", "essential", "essential", "redundant", "essential", "redundant", "redundant"]
    assert labeled.kinds == ["restate", "compute", "compute", "recheck", "compute", "compute", "compute"]
    assert (labeled.unknown_steps, labeled.wrong_claims, labeled.predicted) == (0, 0, 5)


def test_recomputing_a_chain_quantity_is_redundant_and_wrong_arithmetic_keeps_the_label():
    steps = [
        "<think>\nFirst, the question says that Ava has seven apples, so Ava has seven apples right from the start.\n",
        "Then, the question says that Ben has two more apples than Ava, so Ben has seven plus two, which is eight apples.\n",
        "Next, the question says that Ben has two more apples than Ava, so Ben has seven plus two, which is nine apples.\n",
        "blah blah\n\n",
        "Finally, the question says that Eve has four fewer apples than Ben, so Eve has nine minus four, which is lots apples.\n",
    ]
    labeled = label_trace(PROMPT, "".join(steps) + SUMMARY)
    assert [s["label"] for s in labeled.steps] == ["essential", "essential", "redundant", "redundant", "essential"]
    assert labeled.kinds[3] == "unknown"
    assert (labeled.unknown_steps, labeled.wrong_claims) == (1, 2)  # "eight" for Ben, "lots" is no number


def test_roles_and_accounting_of_a_hand_checked_trace():
    labeled = label_trace(PROMPT, "".join(STEPS) + SUMMARY)
    assert labeled.roles == ["restate", "essential", "essential", "recheck", "essential", "other", "other"]
    assert labeled.accounting() == {"essential_steps": 3, "redundant_steps": 4, "other": 2, "repeat": 0, "recheck": 1,
                                    "restate": 1, "reread": 0, "unknown": 0, "missing_essential": 0,
                                    "skipped_reread": 0}


def test_minimal_v4_trace_without_the_other_block_has_no_redundant_step():
    steps = [STEPS[1], STEPS[2], STEPS[4]]
    steps[0] = "<think>\n" + steps[0]
    labeled = label_trace(PROMPT, "".join(steps) + SUMMARY)
    assert [s["label"] for s in labeled.steps] == ["essential"] * 3
    assert labeled.accounting()["redundant_steps"] == 0 and labeled.missing_essential == 0


def test_other_block_after_the_chain_and_a_missing_chain_step():
    # v4 teachers may work the other item's block after the chain; here the model also skipped Ben.
    steps = ["<think>\n" + STEPS[1], STEPS[4], STEPS[5], STEPS[6]]
    labeled = label_trace(PROMPT, "".join(steps) + SUMMARY)
    assert labeled.roles == ["essential", "essential", "other", "other"]
    assert labeled.missing_essential == 1  # Ben's quantity is never computed
    assert step_accounting(PROMPT, "".join(steps) + SUMMARY)["missing_essential"] == 1
    assert step_accounting("Question: what?\nAnswer:\n", "x</think>y") is None
    assert step_accounting(PROMPT, "".join(steps)) is None  # no </think>: absent, not zero


def test_labeler_agrees_with_the_teacher_on_every_teacher_trace():
    for record in teacher_traces(500, seed=11):
        labeled = label_trace(record["prompt"], record["response"])
        assert labeled.steps == record["steps"]
        assert labeled.unknown_steps == 0 and labeled.wrong_claims == 0


def test_a_response_without_exactly_one_think_close_cannot_be_labeled():
    with pytest.raises(TraceFormatError, match="no end-of-thinking marker"):
        label_trace(PROMPT, "".join(STEPS))
    assert extract_answer("".join(STEPS) + "\\boxed{5}") is None
    assert extract_answer("a</think>b</think>\\boxed{6}") is None
    assert extract_answer("a</think>\\boxed{5} then \\boxed{6}") == 6


def test_blank_lines_and_the_opener_join_neighbouring_steps():
    assert split_steps("<think>\nA\n\nB\nC") == ["<think>\nA\n\n", "B\n", "C"]
    assert split_steps("<think>\n") == ["<think>\n"]


def test_prompt_outside_the_grammar_is_rejected_with_a_clear_message():
    with pytest.raises(TraceFormatError, match="not an organism prompt"):
        parse_prompt("What is 2 + 2?")
    with pytest.raises(TraceFormatError, match="unknown 'Zed'"):
        parse_prompt("Question: Ava has three more coins than Zed. How many coins does Ava have?\nAnswer:\n")
    with pytest.raises(TraceFormatError, match="'many' where a number word belongs"):
        parse_prompt("Question: Ava has many coins. How many coins does Ava have?\nAnswer:\n")
