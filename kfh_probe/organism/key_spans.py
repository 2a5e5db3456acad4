"""The key information of an organism trace: the question's facts and the quantities computed so far.

Attention-guided CoT distillation (docs/method.md, section 10) transfers how a reasoning step's attention
is spread over the key information available to it. On the organism's task that information is known
exactly from the grammar the labeler reads (:mod:`kfh_probe.organism.labeler`):

* **facts**: every fact sentence of the question (``Ben has three more apples than Ava.``; in v5 also the
  correction's sentence), available to every step;
* **computed quantities**: every computation claim of the reasoning (``Ben has seven plus three, which is
  ten apples``, ``Ava has seven apples right from the start``, without the leading ``so``); a step may
  attend to the claims that end before it starts (``kfh_probe.key_information``), so a claim is key
  information for the steps after the one that makes it.

Spans are character offsets into ``prompt + response``.
"""

from __future__ import annotations

from dataclasses import dataclass

from kfh_probe.organism.labeler import _CLAIM_CONST, _CLAIM_OP, _FACT, _PROMPT, TraceFormatError
from kfh_probe.organism.task import THINK_CLOSE
from kfh_probe.segmentation import split_at_marker


@dataclass(frozen=True)
class KeySpan:
    """One piece of key information: characters ``[start, end)`` of ``prompt + response``."""

    start: int
    end: int
    kind: str  # "fact" or "computed"


def key_spans(prompt: str, response: str) -> list[KeySpan]:
    """The facts of the question, then the computation claims of the reasoning, in text order.

    Raises:
        TraceFormatError: the prompt is not an organism question, or the response has no single ``</think>``.
    """
    match = _PROMPT.match(prompt)
    if not match:
        raise TraceFormatError(f"not an organism prompt: {prompt[:80]!r}")
    spans = [KeySpan(m.start(), m.end(), "fact") for m in _FACT.finditer(prompt, 0, match.end("facts"))]
    if match["correction"] is not None:
        spans += [KeySpan(m.start(), m.end(), "fact")
                  for m in _FACT.finditer(prompt, match.start("correction"), match.end("correction"))]
    try:
        reasoning, _ = split_at_marker(response, THINK_CLOSE)
    except ValueError as err:
        raise TraceFormatError(str(err)) from None
    offset = len(prompt)
    claims = sorted([*_CLAIM_CONST.finditer(reasoning), *_CLAIM_OP.finditer(reasoning)], key=lambda m: m.start())
    return spans + [KeySpan(offset + m.start() + len("so "), offset + m.end(), "computed") for m in claims]
