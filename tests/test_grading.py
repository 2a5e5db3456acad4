"""The one answer-grading rule (``kfh_probe.grading``, method page section 5): the last balanced
``\\boxed{...}`` after exactly one end-of-thinking marker, and answer matching with the two graders.

The boxed-answer edge cases on which the project's three former copies disagreed (the trainer's reward,
the post-answer labeller, the organism's labeler) are checked here against the one rule, and against
each place that now reads answers through it."""

import pytest

from kfh_probe import grading
from kfh_probe.errors import InputError, NotInstalledError
from kfh_probe.grading import answers_match, extract_final_answer, is_correct, last_boxed


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


# --- one rule for every reader ---------------------------------------------------------------------

# (final answer after the marker, the last boxed answer, the post-answer labeller's answer). The comments
# say what the former copies did where they disagreed with the rule.
BOXED_CASES = [
    ("So \\boxed{7}.", "7", "7"),
    ("\\boxed{3}, no: \\boxed{7}", "7", "7"),  # several boxes: the last
    ("\\boxed{ 7 }", "7", "7"),  # whitespace stripped
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}", "\\frac{1}{2}"),  # one level: the organism's copy found no box
    # two levels: the post-answer copy found no box and fell back to the last number, "2"
    ("\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{1}{\\sqrt{2}}", "\\frac{1}{\\sqrt{2}}"),
    # the last box is never closed: the post-answer and organism copies took the earlier 7
    ("\\boxed{7}, or \\boxed{8", None, "8"),
    ("\\boxed{}", None, None),  # empty: the trainer's copy returned "", the post-answer copy None
    ("\\boxed 7", None, "7"),  # \boxed without braces is no box
    ("the answer is 7", None, "7"),
]


@pytest.mark.parametrize("tail, boxed, post_answer", BOXED_CASES)
def test_every_reader_takes_the_last_balanced_box_after_the_marker(tail, boxed, post_answer):
    from kfh_probe.labelers.rules import final_answer
    from kfh_probe.organism.labeler import extract_answer
    from kfh_probe.traces import parse_record

    response = "<think>\\boxed{5} first try</think>" + tail
    assert last_boxed(tail) == boxed
    assert extract_final_answer(response) == boxed
    assert extract_answer(response) == (int(boxed) if boxed is not None and boxed.isdigit() else None)
    assert final_answer(parse_record({"id": "t", "prompt": "p", "response": response}, 1)) == post_answer


def test_the_graders_see_the_same_answer_as_the_extractor():
    assert is_correct("r</think>\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{\\sqrt{2}}{2}")
    assert not is_correct("r</think>\\boxed{7}, or \\boxed{8", "7", grader="exact")
    assert not is_correct("r</think>\\boxed{}", "0", grader="exact")


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
    monkeypatch.setattr(grading, "_mv_parse", lambda s, **_: s)
    monkeypatch.setattr(grading, "_mv_verify", lambda gold, pred, **_: calls.append((gold, pred)) or True)
    assert not answers_match("41", "42")
    assert calls == []
    # a non-integer string mismatch is handed to the symbolic checker, gold first
    assert answers_match("0.5", "\\frac{1}{2}")
    assert calls == [("$\\frac{1}{2}$", "$0.5$")]


def test_symbolic_checker_errors_count_as_no_match(monkeypatch):
    def broken(gold, pred):
        raise RuntimeError("unparsable")

    monkeypatch.setattr(grading, "_mv_parse", lambda s, **_: s)
    monkeypatch.setattr(grading, "_mv_verify", broken)
    assert not answers_match("0.5", "\\frac{1}{2}")


def test_exact_grader_makes_no_symbolic_check():
    assert answers_match("1,000", "1000", grader="exact")
    assert not answers_match("0.5", "\\frac{1}{2}", grader="exact")


def test_math_verify_grader_without_the_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(grading, "_mv_verify", None)
    with pytest.raises(NotInstalledError, match="pip install math-verify"):
        answers_match("0.5", "\\frac{1}{2}")


def test_auto_grader_is_exact_on_the_organism_and_math_verify_on_real_data():
    assert grading.resolve_grader("auto", organism=True) == "exact"
    assert grading.resolve_grader("auto", organism=False) == "math-verify"
    with pytest.raises(InputError, match="grader"):
        grading.resolve_grader("fuzzy", organism=False)


# --- grading real data with math-verify (the verifier of open-r1 and TRL's examples) ----------------


def _graded(response: str, reference: str, grader: str = "math-verify") -> bool:
    return is_correct(response, reference, grader=grader)


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


