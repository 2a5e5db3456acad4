"""Outcome rewards: answer extraction, answer matching, correctness and the length-penalised reward.

Method page (docs/method.md), section 5; paper: "AttnPO" (arXiv 2602.09953). The reward is the
TLMRE form the authors' code uses: a correct response earns 1 minus a length penalty that depends on
where its length sits among the group's correct responses; an incorrect response earns 0.

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

import re
import threading
from collections.abc import Sequence

import torch

from kfh_probe.errors import InputError, NotInstalledError

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


def extract_final_answer(response: str, marker: str = "</think>") -> str | None:
    """The content of the last ``\\boxed{...}`` after the end-of-thinking marker, or None.

    Method page section 5: a response is scored only if it contains the marker exactly once (no marker:
    the model never finished thinking; two or more: the answer region is ambiguous). Braces inside the
    box are balanced, so ``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}``. An unclosed box gives None.
    The content is returned stripped of surrounding whitespace.
    """
    if not marker:
        raise ValueError("marker must be a non-empty string")
    if response.count(marker) != 1:
        return None
    answer_part = response.split(marker, 1)[1]
    start = answer_part.rfind(_BOXED)
    if start < 0:
        return None
    depth = 1
    i = start + len(_BOXED)
    content_start = i
    while i < len(answer_part):
        ch = answer_part[i]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return answer_part[content_start:i].strip()
        i += 1
    return None


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


def correctness(
    responses: Sequence[str], reference: str, marker: str = "</think>", grader: str = "math-verify"
) -> torch.Tensor:
    """0/1 correctness of each response of one group against the reference answer.

    Args:
        responses: the G decoded responses of one prompt.
        reference: the reference final answer.
        marker: the end-of-thinking marker.
        grader: ``"math-verify"`` or ``"exact"`` (module docstring).
    Returns:
        float32 tensor [G]: 1.0 where ``extract_final_answer`` finds an answer that ``answers_match``
        the reference, else 0.0 (no ``\\boxed{}`` answer after the marker: 0.0).
    """
    scores = []
    for response in responses:
        answer = extract_final_answer(response, marker)
        scores.append(float(answer is not None and answers_match(answer, reference, grader)))
    return torch.tensor(scores, dtype=torch.float32)


def length_penalised_rewards(
    correct: torch.Tensor, lengths: torch.Tensor, alpha_len: float = 0.2
) -> torch.Tensor:
    """TLMRE length-penalised reward of one group (method page section 5).

        r_i = 1[correct_i] * (1 - alpha_len * sigmoid((L_i - mu_c) / (sigma_c + 1e-8)))

    mu_c and sigma_c are the mean and the *population* standard deviation (divide by n, as the authors'
    code does) of the lengths of the group's correct responses. Incorrect responses get 0, and a group
    with no correct response is all zeros. With a single correct response sigma_c = 0 and L_i = mu_c, so
    sigmoid(0) = 0.5 and its reward is 1 - alpha_len / 2 (the same value as a correct response of exactly
    average length in a larger group).

    Args:
        correct: [G] bool or 0/1 float, correctness of each response.
        lengths: [G] response lengths in tokens.
        alpha_len: penalty strength in [0, 1] (0.2 in the reference); rewards of correct responses lie
            in (1 - alpha_len, 1).
    Returns:
        float32 tensor [G].
    """
    correct = torch.as_tensor(correct)
    lengths = torch.as_tensor(lengths, dtype=torch.float32)
    if correct.ndim != 1 or correct.shape != lengths.shape:
        raise ValueError(
            f"correct and lengths must both have shape [G]; got {tuple(correct.shape)} and {tuple(lengths.shape)}"
        )
    if not 0.0 <= alpha_len <= 1.0:
        raise ValueError(f"alpha_len must be in [0, 1]; got {alpha_len}")
    is_correct = correct.bool()
    rewards = torch.zeros_like(lengths)
    if not is_correct.any():
        return rewards
    correct_lengths = lengths[is_correct]
    mu = correct_lengths.mean()
    sigma = correct_lengths.std(correction=0)
    penalty = alpha_len * torch.sigmoid((correct_lengths - mu) / (sigma + 1e-8))
    rewards[is_correct] = 1.0 - penalty
    return rewards
