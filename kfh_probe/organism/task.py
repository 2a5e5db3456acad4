"""The organism's task: chained counting problems with teacher traces that overthink by design.

A problem is a short story of facts about named people and two kinds of items, written as two
blocks: first the facts about the *asked* item, one dependency chain of 2-4 facts (``Ava has seven
apples. Ben has three more apples than Ava. ...``), then the facts about another item, a shorter
chain the answer does not need. Values are 1..9 and differences 1..8, written as words, so every
number is one token and a tiny model learns the arithmetic.

Text layout (all fixed here; the labeler in :mod:`kfh_probe.organism.labeler` parses it back):

* prompt: ``"Question: <facts> How many <item> does <target> have?\\nAnswer:\\n"``
* response: ``"<think>\\n" + step lines + "</think>\\n" + summary + " So the answer is \\\\boxed{N}." + EOS``

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

Why this shape (each choice measured, see the README): a 4-layer model trained for minutes on two
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
    """A question: ``facts`` in question order, the asked ``target`` and ``item``, the integer ``answer``."""

    facts: tuple[Fact, ...]
    target: str
    item: str

    @property
    def by_name(self) -> dict[str, Fact]:
        return {f.name: f for f in self.facts}

    @property
    def answer(self) -> int:
        return self.by_name[self.target].value

    def chain(self) -> list[str]:
        """Names on the answer's dependency chain, root first."""
        by_name, names, name = self.by_name, [], self.target
        while name is not None:
            names.append(name)
            name = by_name[name].base
        return names[::-1]

    def prompt(self) -> str:
        facts = " ".join(f.sentence() for f in self.facts)
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


def generate_problem(rng: random.Random) -> Problem:
    """Draw one problem: a chain of 2-4 quantities of the asked item and a shorter chain (1 to one
    fewer) of distractor quantities of another item, as two blocks of facts, the asked chain first."""
    item, other = rng.sample(ITEMS, 2)
    n_chain = rng.randint(2, 4)
    return _two_blocks(rng, item, other, n_chain, rng.randint(1, n_chain - 1))


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


def generate_problems(n: int, seed: int) -> list[Problem]:
    """``n`` problems, a pure function of ``seed``."""
    rng = random.Random(seed)
    return [generate_problem(rng) for _ in range(n)]


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

OTHER_BLOCK_P = {True: 0.7, False: 0.3}
"""Probability that the teacher works the other item's block, by whether the other item is one of
:data:`WORKED_ITEMS` (about half of all traces; greedy decoding then works it for those items only)."""
WORKED_ITEMS = ITEMS[:3]
OPEN_RESTATE_P = 0.15
"""Probability that a trace opens with a restatement of the question."""
EXTRA_P = {"minus": 0.5, "other": 0.2}
"""Probability of a redundant step right after a compute step: after a subtraction (of a quantity
that is not the answer) it re-checks that subtraction, otherwise it re-checks an earlier value or
restates what is known. A second extra step follows with probability :data:`SECOND_EXTRA_P`."""
SECOND_EXTRA_P = 0.3


def teacher_steps(problem: Problem, rng: random.Random, max_redundant: int = 4) -> list[TaskStep]:
    """Teacher steps: the asked chain always, the other item's block in only some traces, and 0 to
    ``max_redundant`` re-checks and restatements.

    The overthinking varies from sample to sample, so that a group of rollouts holds short and long
    correct responses that differ in which redundant steps they have:

    * the asked chain is worked first; the other item's block follows it with probability
      :data:`OTHER_BLOCK_P` (0.7 when the other item is one of :data:`WORKED_ITEMS`, 0.3 otherwise),
      so the essential steps do not always come last;
    * a trace opens with a restatement with probability :data:`OPEN_RESTATE_P`;
    * after each computed quantity other than the answer, an extra step follows with probability
      :data:`EXTRA_P`: a subtraction is re-checked at once half the time (``"Wait, let me
      double-check"``), after any other step one in five gets a re-check of an earlier value or a
      restatement; a second extra follows with probability :data:`SECOND_EXTRA_P`. Never more than
      ``max_redundant`` extras in all, and never a re-check of the answer itself.

    The shortest correct response (the chain alone) is about a fifth of the teacher's traces.
    """
    chain = set(problem.chain())
    other_item = next((f.item for f in problem.facts if f.name not in chain), None)
    work_other = rng.random() < OTHER_BLOCK_P[other_item in WORKED_ITEMS]
    order = [f for f in problem.facts if work_other or f.name in chain]  # question order: the chain first
    values: dict[str, int] = {}
    steps: list[TaskStep] = []
    extras = 0
    if rng.random() < OPEN_RESTATE_P:
        steps.append(TaskStep(restate_text(problem, values), "restate", None, False))
        extras += 1
    for i, fact in enumerate(order, start=1):
        if i == 1:
            opener = "First,"
        else:
            opener = "Finally," if i == len(order) and rng.random() < 0.5 else rng.choice(_PROGRESSION)
        steps.append(TaskStep(compute_text(fact, values, opener), "compute", fact.name, fact.name in chain))
        values[fact.name] = fact.value
        if fact.name == problem.target:
            continue
        minus = fact.op == "-"
        if extras >= max_redundant or rng.random() >= EXTRA_P["minus" if minus else "other"]:
            continue
        for extra in range(2):
            if extra == 1 and (extras >= max_redundant or rng.random() >= SECOND_EXTRA_P):
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


def summary_text(problem: Problem) -> str:
    """The final answer after ``</think>``: the essential computations restated, then the boxed answer."""
    by_name = problem.by_name
    facts = [by_name[name] for name in problem.chain()]
    parts = [claim_text(f, by_name[f.base].value if f.base else None) + "." for f in facts]
    return " ".join(parts) + f" So the answer is \\boxed{{{problem.answer}}}."


def teacher_response(problem: Problem, steps: list[TaskStep]) -> str:
    """The full response text for ``steps``: reasoning, ``</think>``, summary, EOS."""
    reasoning = THINK_OPEN + "\n" + "".join(s.text for s in steps)
    return reasoning + THINK_CLOSE + "\n" + summary_text(problem) + EOS


def step_texts(steps: list[TaskStep]) -> list[str]:
    """Step texts as segments of the reasoning: the first carries the ``<think>\\n`` opener."""
    texts = [s.text for s in steps]
    texts[0] = THINK_OPEN + "\n" + texts[0]
    return texts
