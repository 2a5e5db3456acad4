"""Hand-computed checks of attnpo_train.rewards (method page section 5)."""

import math

import pytest
import torch

from attnpo_train import rewards
from attnpo_train.rewards import (
    answers_match,
    correctness,
    extract_final_answer,
    length_penalised_rewards,
)
from kfh_probe.errors import NotInstalledError


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# --- extract_final_answer -------------------------------------------------------------------------


def test_extract_takes_last_box_after_the_marker():
    response = "Try \\boxed{3}. Wait, no.</think>So \\boxed{4}, i.e. \\boxed{5}."
    assert extract_final_answer(response) == "5"


def test_extract_ignores_boxes_before_the_marker():
    assert extract_final_answer("\\boxed{3}</think>The answer is 3.") is None


def test_extract_handles_nested_braces():
    assert extract_final_answer("x</think>\\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert extract_final_answer("x</think>\\boxed{ {a}_{ {b} } }") == "{a}_{ {b} }"


@pytest.mark.parametrize(
    "response",
    [
        "no marker \\boxed{4}",  # never finished thinking
        "a</think>b</think>\\boxed{4}",  # two markers: ambiguous
        "a</think>\\boxed{4",  # unclosed box
        "a</think>the answer is 4",  # no box
    ],
)
def test_extract_returns_none(response):
    assert extract_final_answer(response) is None


def test_extract_custom_marker():
    assert extract_final_answer("r<|end|>\\boxed{7}", marker="<|end|>") == "7"
    assert extract_final_answer("r</think>\\boxed{7}", marker="<|end|>") is None


# --- answers_match --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pred, ref",
    [
        ("1,000", "1000"),  # thousands separator
        ("+12", "12"),  # leading plus
        (" 42 ", "42"),
        ("$42$", "42"),
        ("42.", "42"),  # trailing full stop
        ("-1,234,567", "-1234567"),
        ("\\left(1, 2\\right)", "(1,2)"),  # \left/\right and spaces
        ("\\dfrac{1}{2}", "\\frac{1}{2}"),
        ("x^2 + 1", "x^2+1"),
    ],
)
def test_answers_that_match(pred, ref):
    assert answers_match(pred, ref)


@pytest.mark.parametrize(
    "pred, ref",
    [
        ("41", "42"),
        ("1,00", "100"),  # not a thousands grouping, so not the integer 100
        ("", "0"),
        ("\\frac{1}{3}", "\\frac{1}{2}"),
    ],
)
def test_answers_that_do_not_match(pred, ref):
    assert not answers_match(pred, ref)


def test_integer_mismatch_is_final_even_with_a_symbolic_checker(monkeypatch):
    calls = []
    monkeypatch.setattr(rewards, "_mv_parse", lambda s, **_: s)
    monkeypatch.setattr(rewards, "_mv_verify", lambda gold, pred, **_: calls.append((gold, pred)) or True)
    assert not answers_match("41", "42")
    assert calls == []
    # a non-integer string mismatch is handed to the symbolic checker, gold first
    assert answers_match("0.5", "\\frac{1}{2}")
    assert calls == [("$\\frac{1}{2}$", "$0.5$")]


def test_symbolic_checker_errors_count_as_no_match(monkeypatch):
    def broken(gold, pred):
        raise RuntimeError("unparsable")

    monkeypatch.setattr(rewards, "_mv_parse", lambda s, **_: s)
    monkeypatch.setattr(rewards, "_mv_verify", broken)
    assert not answers_match("0.5", "\\frac{1}{2}")


def test_exact_grader_makes_no_symbolic_check():
    assert answers_match("1,000", "1000", grader="exact")
    assert not answers_match("0.5", "\\frac{1}{2}", grader="exact")


def test_math_verify_grader_without_the_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(rewards, "_mv_verify", None)
    with pytest.raises(NotInstalledError, match="pip install math-verify"):
        answers_match("0.5", "\\frac{1}{2}")


def test_auto_grader_is_exact_on_the_organism_and_math_verify_on_real_data():
    assert rewards.resolve_grader("auto", organism=True) == "exact"
    assert rewards.resolve_grader("auto", organism=False) == "math-verify"
    with pytest.raises(ValueError, match="grader"):
        rewards.resolve_grader("fuzzy", organism=False)


# --- grading real data with math-verify (the verifier of open-r1 and TRL's examples) ----------------


def _graded(response: str, reference: str, grader: str = "math-verify") -> bool:
    return bool(correctness([response], reference, grader=grader)[0])


@pytest.mark.parametrize(
    "answer, reference",
    [
        ("0.5", "\\frac{1}{2}"),
        ("\\dfrac{1}{2}", "0.5"),
        ("5 \\text{ cm}", "5"),  # units are dropped
        ("5", "5 \\text{ cm}"),
        ("x = 5", "5"),  # the right-hand side of a single equation
        ("50\\%", "0.5"),  # chosen (math-verify's rule): a percentage equals its fraction ...
        ("50\\%", "50"),  # ... and its bare number
        ("\\frac{1}{\\sqrt{2}}", "\\frac{\\sqrt{2}}{2}"),  # nested braces inside the box
        ("\\{2, 3\\}", "\\{3, 2\\}"),
    ],
)
def test_math_verify_counts_equal_values_as_correct(answer, reference):
    assert _graded(f"<think>work</think>The answer is $\\boxed{{{answer}}}$.", reference)


@pytest.mark.parametrize(
    "answer, reference",
    [("0.6", "\\frac{1}{2}"), ("x = 4", "5"), ("\\frac{1}{\\sqrt{3}}", "\\frac{\\sqrt{2}}{2}"), ("\\pi", "3.14159")],
)
def test_math_verify_counts_different_values_as_wrong(answer, reference):
    assert not _graded(f"<think>work</think>$\\boxed{{{answer}}}$", reference)


def test_a_response_without_a_boxed_answer_is_wrong_whatever_it_says():
    assert not _graded("<think>work</think>The answer is 5.", "5")
    assert not _graded("<think>work</think>The answer is $5$.", "5")


def test_the_organism_grader_keeps_its_exact_integer_check():
    assert _graded("<think>w</think>\\boxed{7}", "7", grader="exact")
    assert not _graded("<think>w</think>\\boxed{7.0}", "7", grader="exact")
    assert _graded("<think>w</think>\\boxed{7.0}", "7")  # math-verify: the same number


# --- correctness ----------------------------------------------------------------------------------


def test_correctness_vector():
    responses = [
        "think</think>\\boxed{12}",  # correct
        "think</think>\\boxed{13}",  # wrong answer
        "think \\boxed{12}",  # no marker
        "a</think>b</think>\\boxed{12}",  # two markers
        "think</think>\\boxed{+12}.",  # correct after normalisation
    ]
    got = correctness(responses, "12")
    assert got.dtype == torch.float32
    assert got.tolist() == [1.0, 0.0, 0.0, 0.0, 1.0]


# --- length_penalised_rewards ---------------------------------------------------------------------


def test_length_penalty_hand_computed():
    # correct lengths 100, 200, 300: mu = 200, population sigma = sqrt((100^2 + 0 + 100^2) / 3)
    #   = sqrt(20000 / 3) = 81.6497 ; z = -1.224745, 0, +1.224745
    # r = 1 - 0.2 * sigmoid(z): sigmoid(-1.224745) = 0.227103 -> 0.954579 ; 0.5 -> 0.9 ;
    #   sigmoid(1.224745) = 0.772897 -> 0.845421 ; the incorrect response (length 50) gets 0.
    correct = torch.tensor([True, True, True, False])
    lengths = torch.tensor([100, 200, 300, 50])
    got = length_penalised_rewards(correct, lengths, alpha_len=0.2)
    sigma = math.sqrt(20000 / 3)
    expected = [1 - 0.2 * sigmoid(-100 / sigma), 0.9, 1 - 0.2 * sigmoid(100 / sigma), 0.0]
    assert got.tolist() == pytest.approx(expected, abs=1e-6)
    assert got[0].item() == pytest.approx(0.954579, abs=1e-6)
    assert got[2].item() == pytest.approx(0.845421, abs=1e-6)


def test_length_penalty_uses_population_not_sample_std():
    # two correct lengths 10 and 30: population sigma = 10 (sample sigma would be 14.14)
    # z = -1 and +1 -> r = 1 - 0.2 * sigmoid(-1) = 0.946212, 1 - 0.2 * sigmoid(1) = 0.853788
    got = length_penalised_rewards(torch.tensor([1.0, 1.0]), torch.tensor([10, 30]))
    assert got.tolist() == pytest.approx([0.946212, 0.853788], abs=1e-6)


def test_length_penalty_single_correct_response_gets_half_penalty():
    # sigma = 0, L = mu: sigmoid(0 / 1e-8) = 0.5 -> r = 1 - 0.2 * 0.5 = 0.9
    got = length_penalised_rewards(torch.tensor([0, 1, 0]), torch.tensor([5, 500, 7]))
    assert got.tolist() == pytest.approx([0.0, 0.9, 0.0])


def test_length_penalty_no_correct_response_is_all_zero():
    got = length_penalised_rewards(torch.zeros(4), torch.tensor([1, 2, 3, 4]))
    assert got.tolist() == [0.0, 0.0, 0.0, 0.0]


def test_length_penalty_validates_inputs():
    with pytest.raises(ValueError, match="shape"):
        length_penalised_rewards(torch.ones(3), torch.ones(4))
    with pytest.raises(ValueError, match="alpha_len"):
        length_penalised_rewards(torch.ones(2), torch.ones(2), alpha_len=1.5)
