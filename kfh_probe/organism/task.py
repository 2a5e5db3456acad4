"""The organism's task: chained counting problems with teacher traces that overthink by design.

A problem is a short story of facts about named people and two kinds of items, written as two
blocks: first the facts about the *asked* item, one dependency chain of 2-4 facts (``Ava has seven
apples. Ben has three more apples than Ava. ...``), then the facts about another item, a shorter
chain the answer does not need. Values are 1..9 and differences 1..8, written as words, so every
number is one token and a tiny model learns the arithmetic.

Text layout (all fixed here; the labeler in :mod:`kfh_probe.organism.labeler` parses it back):

* prompt: ``"Question: <facts> How many <item> does <target> have?\\nAnswer:\\n"``
* response: ``"<think>\\n" + step lines + "</think>\\n" + summary + " So the answer is \\\\boxed{N}." + EOS``

Task versions (:data:`TASKS`, one :class:`TaskSpec` each): v4 as above; v5 ends 75% of the questions
with ``"Correction: <the target's fact with another difference>"`` before ``How many``, and its teacher
writes a ``reread`` step before the target (essential exactly when there is a correction to catch).

Every step is one line of at least 80 characters ending in ``"\\n"`` that starts with a transition
phrase; the first step also carries the ``"<think>\\n"`` opener, so the default segmenter (which
splits progression phrases at line starts and merges pieces under 80 characters) reproduces the
steps exactly. The response ends with the tokenizer's EOS text (:data:`EOS`), so the final-answer
span F includes the EOS token as in the method page.

The teacher overthinks the way a distracted student does, differently from one trace to the next
(:func:`teacher_steps`): in about half of the traces it also works out the other item's
quantities, and it mixes in 0-4 re-checks and restatements, so that a group of sampled responses
holds short and long correct answers that differ in which redundant steps they have. Step kinds:
``compute`` (works out one quantity; essential when the quantity is on the answer's chain and has
not been computed before), ``recheck`` (verifies a value already computed by its inverse
operation), ``restate`` (lists what is known). The summary after ``</think>`` repeats the
essential computations verbatim, as reasoning models restate their solution, so the answer rows
have a reason to look at the essential steps.

Why this shape (each choice measured, docs/results/organism.md): a 4-layer model trained for minutes on two
CPU cores reliably learns to copy facts in order and to read back the value computed one step
earlier, but not to look a fact up by name or by item. It finds the asked chain by its length:
given a distractor chain as long as the asked one it was near chance whatever the summary's design,
and right whenever the asked chain was the longer, so the task keeps the distractor chain shorter.
With the other block optional, a model that had to find where the asked chain starts in the
middle of the question confused the two blocks' names and values (greedy accuracy 92-97%, best-head
SRA 0.78-0.84), so the asked chain now comes first in the question and is worked first: the model
starts at the first fact, and the summary goes back to it.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
EOS = "<|endoftext|>"
PAD = "<|pad|>"

NAMES = ("Ava", "Ben", "Cal", "Dana", "Eli", "Finn", "Gus", "Hana", "Ivy", "Jack", "Lena", "Mia", "Omar", "Rosa")
ITEMS = ("apples", "coins", "marbles", "pencils", "cards", "shells")
MAX_VALUE = 9
MAX_DIFF = 8
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
OP_WORDS = {"+": "plus", "-": "minus"}


def w(n: int) -> str:
    """The number ``n`` (0..9) as the word the task writes."""
    return NUMBER_WORDS[n]


_PROGRESSION = ("Then,", "Next,", "Now,")


@dataclass(frozen=True)
class Fact:
    """One sentence of the question: ``name`` has ``value`` items, given directly or as ``base`` +/- ``diff``."""

    name: str
    item: str
    value: int
    base: str | None = None
    op: str | None = None  # "+" or "-" when ``base`` is set
    diff: int = 0

    def sentence(self) -> str:
        if self.base is None:
            return f"{self.name} has {w(self.value)} {self.item}."
        word = "more" if self.op == "+" else "fewer"
        return f"{self.name} has {w(self.diff)} {word} {self.item} than {self.base}."


@dataclass(frozen=True)
class Problem:
    """A question: ``facts`` in question order, the asked ``target`` and ``item``, the integer ``answer``.

    ``correction`` (v5 only) restates the target's fact with another difference at the end of the
    question; it overrides the first statement, so the answer is its value.
    """

    facts: tuple[Fact, ...]
    target: str
    item: str
    correction: Fact | None = None

    @property
    def by_name(self) -> dict[str, Fact]:
        return {f.name: f for f in self.facts}

    @property
    def answer(self) -> int:
        return (self.correction or self.by_name[self.target]).value

    def chain(self) -> list[str]:
        """Names on the answer's dependency chain, root first."""
        by_name, names, name = self.by_name, [], self.target
        while name is not None:
            names.append(name)
            name = by_name[name].base
        return names[::-1]

    def prompt(self) -> str:
        facts = " ".join(f.sentence() for f in self.facts)
        if self.correction is not None:
            facts += f" Correction: {self.correction.sentence()}"
        return f"Question: {facts} How many {self.item} does {self.target} have?\nAnswer:\n"


@dataclass(frozen=True)
class TaskStep:
    """One teacher step: its text line, its kind and the quantity it is about (if any)."""

    text: str
    kind: str  # "compute", "recheck" or "restate"
    name: str | None
    essential: bool


def _chain_facts(rng: random.Random, names: list[str], item: str) -> list[Fact]:
    facts = [Fact(names[0], item, rng.randint(1, MAX_VALUE))]
    for name in names[1:]:
        prev = facts[-1]
        options = [(op, d) for op in "+-" for d in range(1, MAX_DIFF + 1)
                   if 1 <= (prev.value + d if op == "+" else prev.value - d) <= MAX_VALUE]
        op, d = rng.choice(options)
        value = prev.value + d if op == "+" else prev.value - d
        facts.append(Fact(name, item, value, prev.name, op, d))
    return facts


def generate_problem(rng: random.Random, spec: "TaskSpec | None" = None) -> Problem:
    """Draw one problem: a chain of 2-4 quantities of the asked item and a shorter chain (1 to one
    fewer) of distractor quantities of another item, as two blocks of facts, the asked chain first;
    with probability ``spec.correction_p`` (v5) a correction of the target's fact at the end."""
    item, other = rng.sample(ITEMS, 2)
    n_chain = rng.randint(2, 4)
    problem = _two_blocks(rng, item, other, n_chain, rng.randint(1, n_chain - 1))
    if spec is not None and spec.correction_p and rng.random() < spec.correction_p:
        problem = dataclasses.replace(problem, correction=_correction(rng, problem))
    return problem


def _correction(rng: random.Random, problem: Problem) -> Fact:
    """The target's fact with another operation or difference, giving another value in 1..9."""
    target = problem.by_name[problem.target]
    base = problem.by_name[target.base].value
    options = [(op, d) for op in "+-" for d in range(1, MAX_DIFF + 1)
               if 1 <= (value := base + d if op == "+" else base - d) <= MAX_VALUE and value != target.value]
    op, d = rng.choice(options)
    return Fact(target.name, target.item, base + d if op == "+" else base - d, target.base, op, d)


def problem_with_blocks(rng: random.Random, n_chain: int, n_distract: int) -> Problem:
    """A problem with chains of exactly these lengths (any, including ones :func:`generate_problem`
    never draws), to measure the model off its task's distribution."""
    if n_chain < 1 or n_distract < 0 or n_chain + n_distract > len(NAMES):
        raise ValueError(f"need n_chain >= 1, n_distract >= 0 and at most {len(NAMES)} facts in all")
    item, other = rng.sample(ITEMS, 2)
    return _two_blocks(rng, item, other, n_chain, n_distract)


def _two_blocks(rng: random.Random, item: str, other: str, n_chain: int, n_distract: int) -> Problem:
    names = rng.sample(NAMES, n_chain + n_distract)
    chain = _chain_facts(rng, names[:n_chain], item)
    distract = _chain_facts(rng, names[n_chain:], other) if n_distract else []
    return Problem(tuple(chain + distract), chain[-1].name, item)


def generate_problems(n: int, seed: int, spec: "TaskSpec | None" = None) -> list[Problem]:
    """``n`` problems of task ``spec`` (v4 when None), a pure function of ``seed``."""
    rng = random.Random(seed)
    return [generate_problem(rng, spec) for _ in range(n)]


def claim_text(fact: Fact, base_value: int | None) -> str:
    """The claim that states ``fact``'s value: ``"Ava has seven apples"`` for a given quantity,
    ``"Ben has seven plus two, which is nine apples"`` for one worked out from its base."""
    if fact.base is None:
        return f"{fact.name} has {w(fact.value)} {fact.item}"
    return (f"{fact.name} has {w(base_value)} {OP_WORDS[fact.op]} {w(fact.diff)}, "
            f"which is {w(fact.value)} {fact.item}")


def compute_text(fact: Fact, values: dict[str, int], opener: str) -> str:
    """The line that works out ``fact`` (``values`` holds the base's value)."""
    claim = claim_text(fact, values.get(fact.base))
    if fact.base is None:
        return f"{opener} the question says that {fact.sentence()[:-1]}, so {claim} right from the start.\n"
    return f"{opener} the question says that {fact.sentence()[:-1]}, so {claim}.\n"


def recheck_text(fact: Fact, values: dict[str, int], opener: str) -> str:
    """A line that re-verifies the already computed ``fact`` by the inverse operation."""
    if fact.base is None:
        return (f"{opener} {fact.name}: the question gives {fact.name} exactly {w(fact.value)} "
                f"{fact.item} at the start, so that value is right.\n")
    inverse = "minus" if fact.op == "+" else "plus"
    return (f"{opener} {fact.name}: {w(fact.value)} {inverse} {w(fact.diff)} is {w(values[fact.base])}, "
            f"which matches {fact.base}, so the value {w(fact.value)} for {fact.name} is right.\n")


def restate_text(problem: Problem, values: dict[str, int]) -> str:
    """A line that restates the question or the values known so far."""
    if not values:
        return (f"Okay, so the question asks how many {problem.item} {problem.target} has, "
                f"and I will go through the facts one by one.\n")
    known = " and ".join(f"{name} has {w(v)}" for name, v in values.items())
    return (f"Okay, so far I have worked out {known}, and I still need to find "
            f"the number of {problem.item} that {problem.target} has.\n")


RECHECK_OPENERS = ("Wait, let me double-check", "Hmm, let me double-check", "Let me verify")
"""Openers of a re-check: the first checks the value just computed, the others an earlier one."""

REREAD_OPENER = "Hold on, let me re-read the question before I work out"
"""Opener of a re-read (v5): the step that catches a correction at the end of the question."""

WORKED_ITEMS = ITEMS[:3]
"""Items whose block the teacher usually works when they are the other item (see :class:`TaskSpec`)."""


@dataclass(frozen=True)
class TaskSpec:
    """What a version of the organism's task draws: its problems and its teacher's habits.

    The defaults are v4 (:data:`V4`); v5 (:data:`V5`) adds corrections and re-reads. A setting at 0
    draws nothing from the random stream, so v4's problems and traces do not depend on the v5 fields.
    """

    other_block_p: tuple[float, float] = (0.3, 0.7)
    """Probability that the teacher works the other item's block: (other item not in
    :data:`WORKED_ITEMS`, other item in it)."""
    open_restate_p: float = 0.15
    """Probability that a trace opens with a restatement of the question."""
    extra_p_minus: float = 0.5
    """Probability of a redundant step right after a subtraction (not the answer): a re-check of it."""
    extra_p_other: float = 0.2
    """Probability of a redundant step after any other compute step: a re-check of an earlier value or
    a restatement."""
    second_extra_p: float = 0.3
    """Probability that a second redundant step follows the first."""
    max_redundant: int = 4
    """Most redundant extras (re-checks and restatements) in one trace."""
    correction_p: float = 0.0
    """Probability that a question ends with a correction of the target's fact (v5)."""
    reread_p: float = 0.0
    """Probability that the teacher re-reads the question before working out the target (v5), whether
    or not it holds a correction: the re-read is essential work exactly when it does (ex ante), and a
    teacher that skips it works the target from its first statement and answers wrong."""


V4 = TaskSpec()
V5 = TaskSpec(other_block_p=(0.15, 0.35), open_restate_p=0.1, extra_p_minus=0.35, extra_p_other=0.15,
              second_extra_p=0.25, max_redundant=3, correction_p=0.75, reread_p=0.7)
TASKS = {"v4": V4, "v5": V5}
"""The organism's task versions by name."""


def reread_text(problem: Problem) -> str:
    """The re-read line: it quotes the correction at the end of the question, or says there is none."""
    if problem.correction is None:
        return f"{REREAD_OPENER} {problem.target}: it ends with no correction, so the facts stand as given.\n"
    return f"{REREAD_OPENER} {problem.target}: it ends with a correction, {problem.correction.sentence()}\n"


def corrected_compute_text(fact: Fact, values: dict[str, int], opener: str) -> str:
    """The line that works out the target from the question's correction ``fact``."""
    return f"{opener} the correction says that {fact.sentence()[:-1]}, so {claim_text(fact, values.get(fact.base))}.\n"


def teacher_steps(problem: Problem, rng: random.Random, spec: TaskSpec = V4) -> list[TaskStep]:
    """Teacher steps: the asked chain always, the other item's block in only some traces, and 0 to
    ``spec.max_redundant`` re-checks and restatements (v5: and a re-read before the target).

    The overthinking varies from sample to sample, so that a group of rollouts holds short and long
    correct responses that differ in which redundant steps they have:

    * the asked chain is worked first; the other item's block follows it with probability
      ``spec.other_block_p`` (higher when the other item is one of :data:`WORKED_ITEMS`), so the
      essential steps do not always come last;
    * a trace opens with a restatement with probability ``spec.open_restate_p``;
    * after each computed quantity other than the answer, an extra step follows: a subtraction is
      re-checked at once with probability ``spec.extra_p_minus`` (``"Wait, let me double-check"``),
      after any other step an extra (a re-check of an earlier value or a restatement) follows with
      probability ``spec.extra_p_other``; a second extra follows with probability
      ``spec.second_extra_p``. Never more than ``spec.max_redundant`` extras in all, and never a
      re-check of the answer itself;
    * v5: right before the target's computation the teacher re-reads the question with probability
      ``spec.reread_p``; with a correction there, the target is worked from the correction, otherwise
      (no re-read, or nothing to correct) from the question's first statement.
    """
    chain = set(problem.chain())
    other_item = next((f.item for f in problem.facts if f.name not in chain), None)
    work_other = rng.random() < spec.other_block_p[other_item in WORKED_ITEMS]
    order = [f for f in problem.facts if work_other or f.name in chain]  # question order: the chain first
    values: dict[str, int] = {}
    steps: list[TaskStep] = []
    extras = 0
    if rng.random() < spec.open_restate_p:
        steps.append(TaskStep(restate_text(problem, values), "restate", None, False))
        extras += 1
    for i, fact in enumerate(order, start=1):
        if i == 1:
            opener = "First,"
        else:
            opener = "Finally," if i == len(order) and rng.random() < 0.5 else rng.choice(_PROGRESSION)
        if fact.name == problem.target and spec.reread_p and rng.random() < spec.reread_p:
            steps.append(TaskStep(reread_text(problem), "reread", problem.target, problem.correction is not None))
            if problem.correction is not None:
                fact = problem.correction
                steps.append(TaskStep(corrected_compute_text(fact, values, opener), "compute", fact.name, True))
                values[fact.name] = fact.value
                continue
        steps.append(TaskStep(compute_text(fact, values, opener), "compute", fact.name, fact.name in chain))
        values[fact.name] = fact.value
        if fact.name == problem.target:
            continue
        minus = fact.op == "-"
        if extras >= spec.max_redundant or rng.random() >= (spec.extra_p_minus if minus else spec.extra_p_other):
            continue
        for extra in range(2):
            if extra == 1 and (extras >= spec.max_redundant or rng.random() >= spec.second_extra_p):
                break
            extras += 1
            if minus and extra == 0:
                steps.append(TaskStep(recheck_text(fact, values, RECHECK_OPENERS[0]), "recheck", fact.name, False))
            elif rng.random() < 0.5:
                checked = problem.by_name[rng.choice([n for n in values if n != problem.target])]
                steps.append(TaskStep(recheck_text(checked, values, rng.choice(RECHECK_OPENERS[1:])), "recheck",
                                  checked.name, False))
            else:
                steps.append(TaskStep(restate_text(problem, values), "restate", None, False))
    return steps


def summary_text(problem: Problem, corrected: bool = False) -> str:
    """The final answer after ``</think>``: the essential computations restated, then the boxed answer
    (with ``corrected``, the target's from the question's correction, else from its first statement)."""
    by_name = problem.by_name
    facts = [by_name[name] for name in problem.chain()]
    if corrected and problem.correction is not None:
        facts[-1] = problem.correction
    parts = [claim_text(f, by_name[f.base].value if f.base else None) + "." for f in facts]
    return " ".join(parts) + f" So the answer is \\boxed{{{facts[-1].value}}}."


def teacher_response(problem: Problem, steps: list[TaskStep]) -> str:
    """The full response text for ``steps``: reasoning, ``</think>``, summary, EOS."""
    reasoning = THINK_OPEN + "\n" + "".join(s.text for s in steps)
    corrected = any(s.kind == "reread" for s in steps)
    return reasoning + THINK_CLOSE + "\n" + summary_text(problem, corrected) + EOS

