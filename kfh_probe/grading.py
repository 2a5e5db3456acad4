"""Answer grading: the final answer a response gives, and whether it equals a reference answer.

Method page (docs/method.md), section 5. The probe (``kfh-probe generate``, ``kfh-probe causal``, the
post-answer labeller), the organism (its labeler and report) and the trainer's rewards
(``attnpo_train.rewards``) all read answers with ``extract_final_answer`` and compare them with
``answers_match``, so a response is graded the same everywhere.

Two graders decide whether an extracted answer is right (``answers_match``):

- ``"math-verify"`` for real data: Hugging Face's ``math-verify`` (the verifier of open-r1 and TRL's
  examples) compares the answer and the reference symbolically, so ``0.5`` matches ``\\frac{1}{2}``,
  ``x = 5`` and ``5 \\text{ cm}`` match ``5``, and, by math-verify's own choice, ``50\\%`` matches both
  ``0.5`` and ``50``.
- ``"exact"`` for the embedded organism, whose answers are integers: integers compared exactly, other
  answers by their normalised strings.

``"auto"`` (the trainer's and ``attnpo-train eval``'s default) is ``"exact"`` on the organism's task and
``"math-verify"`` on a data file (``resolve_grader``).
"""

from __future__ import annotations

import re
import threading

from .errors import InputError, NotInstalledError
from .segmentation import split_response

try:
    from math_verify import parse as _mv_parse
    from math_verify import verify as _mv_verify
except ImportError:  # a dependency of the project; absent only in a broken install
    _mv_parse = None
    _mv_verify = None

GRADERS = ("math-verify", "exact")

_BOXED = "\\boxed{"
# "1,234,567" (commas only as thousands separators) or plain digits, after stripping a leading "+".
_INTEGER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)")
# LaTeX that changes only the typesetting of an answer, never its value.
_LATEX_NOISE = ("\\left", "\\right", "\\!", "\\,", "\\;", "\\:")


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` in ``text``, stripped of surrounding whitespace, or None.

    Braces inside the box are balanced to any depth, so ``\\boxed{\\frac{1}{\\sqrt{2}}}`` gives
    ``\\frac{1}{\\sqrt{2}}``. None when there is no ``\\boxed{``, when the last one is never closed (the
    answer is unfinished: an earlier, closed box is not taken instead) and when the box is empty.
    ``\\boxed`` without a brace (``\\boxed 5``) is not a box.
    """
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    depth = 0
    for i in range(start + len(_BOXED) - 1, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start + len(_BOXED) : i].strip() or None
    return None


def extract_final_answer(response: str, marker: str = "</think>") -> str | None:
    """``last_boxed`` of the text after the end-of-thinking marker, or None.

    A response is graded only if it holds the marker exactly once (``kfh_probe.segmentation.
    split_at_marker``: no marker, the model never finished thinking; two or more, the answer region is
    ambiguous); a box before the marker is reasoning, not the answer.
    """
    parts = split_response(response, marker)
    return None if parts is None else last_boxed(parts[1])


def _normalise(answer: str) -> str:
    """Strip what does not change an answer's value: ``$``, whitespace, ``\\left``/``\\right``, LaTeX
    spacing commands, a trailing full stop; ``\\dfrac``/``\\tfrac`` become ``\\frac``."""
    text = answer.replace("$", "")
    for noise in _LATEX_NOISE:
        text = text.replace(noise, "")
    text = text.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    text = "".join(text.split())
    return text.rstrip(".")


def _as_integer(normalised: str) -> int | None:
    """The integer a normalised answer spells (``+12``, ``1,000``, ``-7``), or None."""
    text = normalised[1:] if normalised.startswith("+") else normalised
    if _INTEGER.fullmatch(text) is None:
        return None
    return int(text.replace(",", ""))


def resolve_grader(grader: str, organism: bool) -> str:
    """``"auto"`` -> ``"exact"`` on the organism's task, ``"math-verify"`` on real data; others as given."""
    if grader == "auto":
        return "exact" if organism else "math-verify"
    if grader not in GRADERS:
        raise InputError(f"grader must be 'auto' or one of {GRADERS}, got {grader!r}")
    if grader == "math-verify" and _mv_verify is None:
        raise NotInstalledError("grader 'math-verify' needs the math-verify package: pip install math-verify")
    return grader


def answers_match(predicted: str, reference: str, grader: str = "math-verify") -> bool:
    """Whether a predicted final answer equals the reference answer (method page section 5).

    Both graders:

    1. Equal normalised strings (see ``_normalise``) match.
    2. Both spell integers (after normalisation, a leading ``+`` and thousands commas removed):
       compared exactly as integers, and the comparison is final.

    Then ``"exact"`` says no; ``"math-verify"`` asks ``math_verify.verify(parse(reference),
    parse(predicted))`` (an answer it cannot parse does not match).
    """
    pred, ref = _normalise(predicted), _normalise(reference)
    if not pred or not ref:
        return False
    if pred == ref:
        return True
    pred_int, ref_int = _as_integer(pred), _as_integer(ref)
    if pred_int is not None and ref_int is not None:
        return pred_int == ref_int
    if resolve_grader(grader, organism=False) == "exact":
        return False
    # math-verify's timeouts use signal.alarm, which only the main thread may set.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    try:
        gold = _mv_parse(f"${reference}$", parsing_timeout=timeout)
        answer = _mv_parse(f"${predicted}$", parsing_timeout=timeout)
        return bool(_mv_verify(gold, answer, timeout_seconds=timeout))
    except Exception:  # math_verify raises on unparsable LaTeX; an unparsable answer does not match
        return False


def is_correct(response: str, reference: str, marker: str = "</think>", grader: str = "math-verify") -> bool:
    """Whether ``response`` gives the reference answer: ``extract_final_answer`` finds an answer and it
    ``answers_match`` the reference (no boxed answer after the marker: False)."""
    answer = extract_final_answer(response, marker)
    return answer is not None and answers_match(answer, reference, grader)
