"""Ground-truth labels for traces written in the organism's grammar (teacher or model-sampled).

Rules (they are the definition of the organism's ground truth):

* The question is parsed back from the prompt; the answer's dependency chain is the asked person
  and, recursively, the person each fact refers to.
* The reasoning (everything before the single ``</think>``) is split into lines; each line is a
  step, the ``<think>\\n`` opener belongs to the first step, and a blank line joins the step before.
* A step is **essential** when it contains a computation claim (``so X has V ITEM right from the
  start`` or ``so X has A plus|minus B, which is V ITEM``) for a chain quantity that no earlier step
  computed, and **redundant** otherwise. Wrong arithmetic does not change the label (the answer
  still depends on the step); it is counted in ``wrong_claims``.
* A redundant step's role says why it is redundant (:data:`ROLES`): another item's computation,
  a repeated chain computation, a re-check, a restatement, a re-read. A chain quantity that no step
  computes is counted in ``missing_essential``.
* v5: a question may end with a correction of the target's fact. The re-read step (``Hold on, let me
  re-read the question ...``) is **essential** when the question has a correction (ex ante: the answer
  needs it, whether or not the response then uses it) and redundant otherwise; only the first re-read
  counts. A response to a corrected question that never re-reads it counts one ``skipped_reread``. A
  claim about the target is right with either its first statement's value or the correction's.
* A step that matches none of the task's step forms (compute, recheck, restate) computes nothing
  recognisable: it is labelled redundant and counted in ``unknown_steps``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from kfh_probe.errors import KFHError
from kfh_probe.grading import extract_final_answer
from kfh_probe.organism.task import NUMBER_WORDS, RECHECK_OPENERS, REREAD_OPENER, THINK_CLOSE, Fact, Problem
from kfh_probe.segmentation import split_at_marker

_PROMPT = re.compile(r"^Question: (?P<facts>.*?)(?: Correction: (?P<correction>[^.]*\.))? How many (?P<item>\w+) "
                     r"does (?P<target>\w+) have\?\nAnswer:\n$", re.S)
_FACT = re.compile(r"(\w+) has (\w+) (?:(more|fewer) )?(\w+)(?: than (\w+))?\.")
_CLAIM_CONST = re.compile(r"so (\w+) has (\w+) (\w+) right from the start")
_CLAIM_OP = re.compile(r"so (\w+) has (\w+) (plus|minus) (\w+), which is (\w+) (\w+)")
_RECHECK = re.compile(r"^(?:<think>\n)?(?:" + "|".join(map(re.escape, RECHECK_OPENERS)) + r") \w+:")
_RESTATE = re.compile(r"^(?:<think>\n)?Okay, so ")
_REREAD = re.compile(r"^(?:<think>\n)?" + re.escape(REREAD_OPENER) + r" \w+:")


class TraceFormatError(KFHError, ValueError):
    """A prompt or response that the organism's grammar cannot describe."""


def number(word: str) -> int | None:
    """The value of a number word of the task (``"seven"`` -> 7), ``None`` for any other word."""
    return NUMBER_WORDS.index(word) if word in NUMBER_WORDS else None


def parse_prompt(prompt: str) -> Problem:
    """The :class:`Problem` behind an organism prompt; raises :class:`TraceFormatError` otherwise."""
    m = _PROMPT.match(prompt)
    if not m:
        raise TraceFormatError(f"not an organism prompt: {prompt[:80]!r}")
    values: dict[str, int] = {}
    facts = [_parse_fact(groups, values) for groups in _FACT.findall(m["facts"])]
    if m["target"] not in values:
        raise TraceFormatError(f"question asks about unknown {m['target']!r}")
    correction = None
    if m["correction"] is not None:
        found = _FACT.findall(m["correction"])
        if len(found) != 1 or found[0][0] != m["target"] or not found[0][4]:
            raise TraceFormatError(f"the correction {m['correction']!r} does not restate the target's fact")
        correction = _parse_fact(found[0], dict(values))
    return Problem(tuple(facts), m["target"], m["item"], correction)


def _parse_fact(groups: tuple[str, ...], values: dict[str, int]) -> Fact:
    """The :class:`Fact` of one matched fact sentence; ``values`` (by name) gains its value."""
    name, num_word, word, item, base = groups
    num = number(num_word)
    if num is None:
        raise TraceFormatError(f"fact about {name} has {num_word!r} where a number word belongs")
    if not base:
        values[name] = num
        return Fact(name, item, num)
    if base not in values:
        raise TraceFormatError(f"fact about {name} refers to unknown {base!r}")
    op = "+" if word == "more" else "-"
    values[name] = values[base] + num if op == "+" else values[base] - num
    return Fact(name, item, values[name], base, op, num)


def extract_answer(response: str) -> int | None:
    """The integer in the last ``\\boxed{}`` after exactly one ``</think>``
    (``kfh_probe.grading.extract_final_answer``), else ``None``."""
    answer = extract_final_answer(response, THINK_CLOSE)
    try:
        return None if answer is None else int(answer)
    except ValueError:
        return None


def split_steps(reasoning: str) -> list[str]:
    """Line steps whose concatenation is exactly ``reasoning`` (opener and blank lines joined)."""
    lines = re.findall(r"[^\n]*\n|[^\n]+$", reasoning)
    steps: list[str] = []
    pending = ""
    for line in lines:
        if not line.strip() or line == "<think>\n":
            if steps and line != "<think>\n":
                steps[-1] += line
            else:
                pending += line
            continue
        steps.append(pending + line)
        pending = ""
    if pending:
        if steps:
            steps[-1] += pending
        else:
            steps.append(pending)
    return steps


ROLES = ("essential", "other", "repeat", "recheck", "restate", "reread", "unknown")
"""What a step does, by ground truth: ``essential`` computes a chain quantity for the first time (or
is the first re-read of a corrected question); the redundant roles are ``other`` (computes only
quantities off the answer's chain: the other item), ``repeat`` (computes a chain quantity again),
``recheck``, ``restate``, ``reread`` (a re-read with no correction to catch, or a second one) and
``unknown`` (no step form)."""

REDUNDANT_KINDS = ("other", "recheck", "restate", "reread")
"""The redundancy kinds the organism's teachers write (``repeat`` and ``unknown`` are the model's own;
``reread`` only v5's)."""


@dataclass
class LabeledTrace:
    """Steps with labels plus what the labeler noticed about the trace."""

    steps: list[dict] = field(default_factory=list)  # [{"text", "label"}]
    kinds: list[str] = field(default_factory=list)  # compute / recheck / restate / reread / unknown
    roles: list[str] = field(default_factory=list)  # one of ROLES per step
    unknown_steps: int = 0
    wrong_claims: int = 0
    missing_essential: int = 0  # chain quantities no step computes
    skipped_reread: int = 0  # 1 when the question has a correction and no step re-reads it (v5)
    corrected: int | None = None  # the correction's value, when the question has one (v5)
    predicted: int | None = None

    def reread(self) -> dict[str, bool] | None:
        """What the re-read did (v5 trace records carry it): ``None`` when no step re-reads the question,
        else ``essential`` (the question has a correction) and ``changed_answer`` (the response's answer
        is the correction's value)."""
        if "reread" not in self.kinds:
            return None
        return {"essential": self.corrected is not None,
                "changed_answer": self.corrected is not None and self.predicted == self.corrected}

    def accounting(self) -> dict[str, int]:
        """Per-response step counts: ``essential_steps``, ``redundant_steps`` and each redundant role
        (``other``, ``repeat``, ``recheck``, ``restate``, ``reread``, ``unknown``), ``missing_essential``,
        ``skipped_reread``."""
        counts = {role: self.roles.count(role) for role in ROLES}
        return {"essential_steps": counts.pop("essential"), "redundant_steps": len(self.roles) - self.roles.count("essential"),
                **counts, "missing_essential": self.missing_essential, "skipped_reread": self.skipped_reread}


def label_trace(prompt: str, response: str) -> LabeledTrace:
    """Label every step of ``response`` (exactly one ``</think>`` required)."""
    try:
        reasoning, _ = split_at_marker(response, THINK_CLOSE)
    except ValueError as err:
        raise TraceFormatError(str(err)) from None
    problem = parse_prompt(prompt)
    facts, chain = problem.by_name, set(problem.chain())
    right = {name: {fact.value} for name, fact in facts.items()}
    if problem.correction is not None:
        right[problem.target].add(problem.correction.value)
    corrected = None if problem.correction is None else problem.correction.value
    out = LabeledTrace(corrected=corrected, predicted=extract_answer(response))
    computed: set[str] = set()
    reread = False
    for text in split_steps(reasoning):
        claims = [(n, number(v)) for n, v, _ in _CLAIM_CONST.findall(text)]
        claims += [(n, number(v)) for n, _, _, _, v, _ in _CLAIM_OP.findall(text)]
        out.wrong_claims += sum(v not in right.get(n, ()) for n, v in claims)
        if claims:
            kind = "compute"
            essential = any(n in chain and n not in computed for n, _ in claims)
            role = "essential" if essential else "repeat" if any(n in chain for n, _ in claims) else "other"
            computed.update(n for n, _ in claims)
        else:
            kind = ("reread" if _REREAD.match(text) else "recheck" if _RECHECK.match(text)
                    else "restate" if _RESTATE.match(text) else "unknown")
            essential = kind == "reread" and problem.correction is not None and not reread
            role = "essential" if essential else kind
            reread = reread or kind == "reread"
        out.unknown_steps += kind == "unknown"
        out.kinds.append(kind)
        out.roles.append(role)
        out.steps.append({"text": text, "label": "essential" if essential else "redundant"})
    out.missing_essential = len(chain - computed)
    out.skipped_reread = int(problem.correction is not None and not reread)
    return out


def step_accounting(prompt: str, response: str) -> dict[str, int] | None:
    """Ground-truth step counts of one response (:meth:`LabeledTrace.accounting`), or ``None`` when the
    prompt is not an organism prompt or the response has no single ``</think>`` (absent, not zero)."""
    try:
        return label_trace(prompt, response).accounting()
    except TraceFormatError:
        return None


def credit_shares(advantages: list[float], redundant: list[int], essential: list[int]) -> dict[str, float]:
    """Where outcome credit puts the steps of a set of responses.

    Args:
        advantages, redundant, essential: per response, its advantage and its redundant and essential step counts.
    Returns:
        "redundant_in_positive_share": of all redundant steps, those in responses with a positive advantage;
        "essential_in_negative_share": of all essential steps, those in responses with a negative one (0 without
        any such step).
    """
    total_r, total_e = sum(redundant), sum(essential)
    return {
        "redundant_in_positive_share": sum(r for a, r in zip(advantages, redundant) if a > 0) / total_r if total_r else 0.0,
        "essential_in_negative_share": sum(e for a, e in zip(advantages, essential) if a < 0) / total_e if total_e else 0.0,
    }
