"""The organism's task: problems, teacher traces and their compatibility with the default segmenter."""

from __future__ import annotations

import random
import re

import pytest

from kfh_probe.organism.labeler import extract_answer, parse_prompt
from kfh_probe.organism.task import MAX_VALUE, WORKED_ITEMS, generate_problems, problem_with_blocks, teacher_steps
from kfh_probe.organism.traces import teacher_traces

TRACES = teacher_traces(400, seed=7)
TRANSITIONS = ("First,", "Then,", "Next,", "Now,", "Finally,", "Okay, so", "Wait, let me double-check",
               "Hmm, let me double-check", "Let me verify", "Alternatively,")
SPLIT_ANYWHERE = ("Wait", "But", "However", "Hold on", "Looking back", "Let me double-check", "Let me verify",
                  "Let me check", "Let me make sure", "Let's verify", "Just to confirm", "Is that right?",
                  "Alternatively", "Another approach", "Another way", "Or maybe", "**Final Answer")


def test_problems_are_a_pure_function_of_the_seed():
    assert generate_problems(20, 3) == generate_problems(20, 3)
    assert generate_problems(20, 3) != generate_problems(20, 4)


def test_every_value_stays_small_and_the_answer_follows_the_chain():
    for problem in generate_problems(500, 1):
        assert all(1 <= f.value <= MAX_VALUE for f in problem.facts)
        chain = problem.chain()
        assert chain[-1] == problem.target and 2 <= len(chain) <= 4
        assert all(problem.by_name[n].item == problem.item for n in chain)
        assert len(problem.facts) > len(chain)  # there is always something the answer does not need


def test_prompt_parses_back_to_the_same_problem():
    for problem in generate_problems(200, 2):
        assert parse_prompt(problem.prompt()) == problem


def test_steps_concatenate_to_the_reasoning_and_the_answer_is_boxed_after_one_think_close():
    for record in TRACES:
        reasoning, rest = record["response"].split("</think>")
        assert "".join(s["text"] for s in record["steps"]) == reasoning
        assert reasoning.startswith("<think>\nFirst, ") or reasoning.startswith("<think>\nOkay, so ")
        assert rest.endswith("<|endoftext|>")
        assert extract_answer(record["response"]) == int(record["answer"])


def test_each_step_is_one_long_line_opened_by_a_transition_phrase():
    for record in TRACES:
        for i, step in enumerate(record["steps"]):
            text = step["text"].removeprefix("<think>\n") if i == 0 else step["text"]
            assert len(text) >= 80 and text.endswith("\n") and text.count("\n") == 1
            assert text.startswith(TRANSITIONS), text
            body = text.split(" ", 2)[-1]  # no split-anywhere phrase after the opener
            assert not any(re.search(rf"\b{re.escape(p)}", body) for p in SPLIT_ANYWHERE), text


def test_question_is_two_blocks_the_chain_first_then_a_shorter_distractor_chain():
    lengths = set()
    for problem in generate_problems(300, 6):
        chain = set(problem.chain())
        on_chain = [f.name in chain for f in problem.facts]
        assert on_chain == sorted(on_chain, reverse=True)
        assert all((f.item == problem.item) == (f.name in chain) for f in problem.facts)
        lengths.add((len(chain), len(problem.facts) - len(chain)))
    assert lengths == {(2, 1), (3, 1), (3, 2), (4, 1), (4, 2), (4, 3)}


def test_problems_of_any_block_lengths_can_be_drawn_for_off_distribution_checks():
    rng = random.Random(0)
    for n_chain, n_distract in ((2, 2), (2, 4), (3, 0)):
        problem = problem_with_blocks(rng, n_chain, n_distract)
        assert len(problem.chain()) == n_chain and len(problem.facts) == n_chain + n_distract
        assert parse_prompt(problem.prompt()) == problem
    with pytest.raises(ValueError, match="n_chain"):
        problem_with_blocks(rng, 0, 2)


def test_teacher_works_the_chain_first_and_the_other_block_after_it_when_at_all():
    rng = random.Random(0)
    for problem in generate_problems(500, 5):
        steps = teacher_steps(problem, rng)
        computed = [s.name for s in steps if s.kind == "compute"]
        chain = problem.chain()
        other = [f.name for f in problem.facts if f.name not in chain]
        assert [s.name for s in steps if s.essential] == chain
        assert computed in (chain, chain + other)  # skipped, or worked after the chain; each in question order


def test_the_other_block_is_optional_more_often_worked_for_some_items():
    rng = random.Random(1)
    worked = {True: [], False: []}
    for problem in generate_problems(4000, 8):
        chain = set(problem.chain())
        steps = teacher_steps(problem, rng)
        other_item = problem.facts[-1].item
        worked[other_item in WORKED_ITEMS].append(any(s.kind == "compute" and s.name not in chain for s in steps))
    first, second = (sum(v) / len(v) for v in (worked[True], worked[False]))
    assert 0.66 < first < 0.74 and 0.26 < second < 0.34
    assert 0.45 < (sum(worked[True]) + sum(worked[False])) / 4000 < 0.55


def test_redundancy_varies_from_none_to_many_and_subtractions_are_rechecked_at_once():
    rng = random.Random(2)
    counts, after_minus, rechecked_at_once = [], 0, 0
    for problem in generate_problems(4000, 9):
        steps = teacher_steps(problem, rng)
        extras = [s for s in steps if s.kind != "compute"]
        assert len(extras) <= 4
        counts.append(sum(not s.essential for s in steps))
        for k, step in enumerate(steps[:-1]):
            fact = problem.by_name.get(step.name)
            if step.kind == "compute" and fact.op == "-" and fact.name != problem.target:
                after_minus += 1
                nxt = steps[k + 1]
                rechecked_at_once += nxt.kind == "recheck" and nxt.name == step.name and nxt.text.startswith("Wait,")
        assert not any(s.kind == "recheck" and s.name == problem.target for s in steps)
    assert 0.17 < counts.count(0) / len(counts) < 0.28  # the minimal response is common
    assert set(counts) >= set(range(0, 8))
    assert 0.45 < rechecked_at_once / after_minus < 0.55


def test_final_answer_restates_the_essential_computations_verbatim():
    for record in TRACES[:100]:
        summary = record["response"].split("</think>")[1]
        for step in record["steps"]:
            if step["label"] == "essential":
                claim = re.search(r"so (\w+ has \w+ \w+) right from the start|so (\w+ has \w+ (?:plus|minus) \w+, "
                                  r"which is \w+ \w+)\.", step["text"])
                assert (claim.group(1) or claim.group(2)) + "." in summary


def test_default_segmenter_splits_teacher_traces_exactly_at_step_boundaries():
    from kfh_probe.segmentation import segment_reasoning

    for record in TRACES:
        reasoning = record["response"].split("</think>")[0]
        assert segment_reasoning(reasoning) == [s["text"] for s in record["steps"]]
