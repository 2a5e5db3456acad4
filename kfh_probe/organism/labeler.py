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
  a repeated chain computation, a re-check, a restatement. A chain quantity that no step computes
  is counted in ``missing_essential``.
* A step that matches none of the task's step forms (compute, recheck, restate) computes nothing
  recognisable: it is labelled redundant and counted in ``unknown_steps``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from kfh_probe.errors import KFHError
from kfh_probe.grading import extract_final_answer
from kfh_probe.organism.task import NUMBER_WORDS, RECHECK_OPENERS, THINK_CLOSE, Fact, Problem
from kfh_probe.segmentation import split_at_marker

_PROMPT = re.compile(r"^Question: (?P<facts>.*) How many (?P<item>\w+) does (?P<target>\w+) have\?\nAnswer:\n$", re.S)
_FACT = re.compile(r"(\w+) has (\w+) (?:(more|fewer) )?(\w+)(?: than (\w+))?\.")
_CLAIM_CONST = re.compile(r"so (\w+) has (\w+) (\w+) right from the start")
_CLAIM_OP = re.compile(r"so (\w+) has (\w+) (plus|minus) (\w+), which is (\w+) (\w+)")
_RECHECK = re.compile(r"^(?:<think>\n)?(?:" + "|".join(map(re.escape, RECHECK_OPENERS)) + r") \w+:")
_RESTATE = re.compile(r"^(?:<think>\n)?Okay, so ")


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
    facts = []
    for name, num_word, word, item, base in _FACT.findall(m["facts"]):
        num = number(num_word)
        if num is None:
            raise TraceFormatError(f"fact about {name} has {num_word!r} where a number word belongs")
        if base:
            if base not in values:
                raise TraceFormatError(f"fact about {name} refers to unknown {base!r}")
            op = "+" if word == "more" else "-"
            value = values[base] + num if op == "+" else values[base] - num
            facts.append(Fact(name, item, value, base, op, num))
        else:
            value = num
            facts.append(Fact(name, item, value))
        values[name] = value
    if m["target"] not in values:
        raise TraceFormatError(f"question asks about unknown {m['target']!r}")
    return Problem(tuple(facts), m["target"], m["item"])


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


ROLES = ("essential", "other", "repeat", "recheck", "restate", "unknown")
"""What a step does, by ground truth: ``essential`` computes a chain quantity for the first time;
the redundant roles are ``other`` (computes only quantities off the answer's chain: the other item),
``repeat`` (computes a chain quantity again), ``recheck``, ``restate`` and ``unknown`` (no step form)."""

REDUNDANT_KINDS = ("other", "recheck", "restate")
"""The redundancy kinds the organism's teacher writes (``repeat`` and ``unknown`` are the model's own)."""


@dataclass
class LabeledTrace:
    """Steps with labels plus what the labeler noticed about the trace."""

    steps: list[dict] = field(default_factory=list)  # [{"text", "label"}]
    kinds: list[str] = field(default_factory=list)  # compute / recheck / restate / unknown
    roles: list[str] = field(default_factory=list)  # one of ROLES per step
    unknown_steps: int = 0
    wrong_claims: int = 0
    missing_essential: int = 0  # chain quantities no step computes
    predicted: int | None = None

    def accounting(self) -> dict[str, int]:
        """Per-response step counts: ``essential_steps``, ``redundant_steps`` and each redundant role
        (``other``, ``repeat``, ``recheck``, ``restate``, ``unknown``), ``missing_essential``."""
        counts = {role: self.roles.count(role) for role in ROLES}
        return {"essential_steps": counts.pop("essential"), "redundant_steps": len(self.roles) - self.roles.count("essential"),
                **counts, "missing_essential": self.missing_essential}


def label_trace(prompt: str, response: str) -> LabeledTrace:
    """Label every step of ``response`` (exactly one ``</think>`` required)."""
    try:
        reasoning, _ = split_at_marker(response, THINK_CLOSE)
    except ValueError as err:
        raise TraceFormatError(str(err)) from None
    problem = parse_prompt(prompt)
    facts, chain = problem.by_name, set(problem.chain())
    out = LabeledTrace(predicted=extract_answer(response))
    computed: set[str] = set()
    for text in split_steps(reasoning):
        claims = [(n, number(v)) for n, v, _ in _CLAIM_CONST.findall(text)]
        claims += [(n, number(v)) for n, _, _, _, v, _ in _CLAIM_OP.findall(text)]
        essential = any(n in chain and n not in computed for n, _ in claims)
        out.wrong_claims += sum(n not in facts or facts[n].value != v for n, v in claims)
        computed.update(n for n, _ in claims)
        kind = ("compute" if claims else "recheck" if _RECHECK.match(text)
                else "restate" if _RESTATE.match(text) else "unknown")
        out.unknown_steps += kind == "unknown"
        out.kinds.append(kind)
        if kind != "compute":
            role = kind
        else:
            role = "essential" if essential else "repeat" if any(n in chain for n, _ in claims) else "other"
        out.roles.append(role)
        out.steps.append({"text": text, "label": "essential" if essential else "redundant"})
    out.missing_essential = len(chain - computed)
    return out


def step_accounting(prompt: str, response: str) -> dict[str, int] | None:
    """Ground-truth step counts of one response (:meth:`LabeledTrace.accounting`), or ``None`` when the
    prompt is not an organism prompt or the response has no single ``</think>`` (absent, not zero)."""
    try:
        return label_trace(prompt, response).accounting()
    except TraceFormatError:
        return None
