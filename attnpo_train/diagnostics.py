"""The loop's diagnostics hook: what it logs about a step's responses besides their rewards and credit.

``Diagnostics`` counts confused/reflection and summary phrases in every response (``phrase_counts``) and,
where it is asked to (the organism's task), reads the responses' ground truth with the organism's labeler
(``attnpo_train.truth.GroundTruth``): their steps per response, and, handed to the credit strategy, the truth
of its rated steps (AttnPO's credit precision and its "oracle" control).
"""

from __future__ import annotations

import statistics

from attnpo_train.truth import GroundTruth
from kfh_probe import Rollouts, SegmenterConfig

_PHRASE_COUNTER = SegmenterConfig()


def phrase_counts(response: str, marker: str = "</think>") -> dict[str, int]:
    """Occurrences of confused/reflection and summary phrases in a response's reasoning.

    The reasoning is the text before the marker (the whole response when the marker is missing). A
    phrase counts where a word starts, longest match first (so "Okay, so" is one summary phrase and
    "Hmm, wait" one confused phrase), with the phrase families of ``kfh_probe.segmentation``.

    Returns:
        {"confused": n, "summary": n}.
    """
    reasoning = response.split(marker, 1)[0]
    counts = {"confused": 0, "summary": 0}
    pos = 0
    while pos < len(reasoning):
        if pos == 0 or not reasoning[pos - 1].isalnum():
            found = _PHRASE_COUNTER.match(reasoning, pos)
            if found is not None:
                phrase, family = found
                if family in counts:
                    counts[family] += 1
                pos += len(phrase)
                continue
        pos += 1
    return counts


class Diagnostics:
    """Per-step metrics of the responses that are not credit assignment.

    Args:
        marker: the end-of-thinking marker (the reasoning is the text before it).
        ground_truth: read the responses with the organism's labeler (prompts of the organism's task).
    """

    def __init__(self, marker: str, ground_truth: bool) -> None:
        self.marker = marker
        self.ground_truth = ground_truth

    def truth(self, prompt_texts: list[str], rollouts: Rollouts) -> GroundTruth | None:
        """The step's ground truth (None without ``ground_truth`` or when no response is readable)."""
        return GroundTruth.read(prompt_texts, rollouts) if self.ground_truth else None

    def metrics(self, rollouts: Rollouts, truth: GroundTruth | None) -> dict[str, float]:
        """Means over the responses: "confused_per_response", "summary_per_response", and with ``truth`` its
        step accounting (``<count>_per_response`` of ``attnpo_train.truth.ACCOUNT_KEYS``, "labelled_fraction")."""
        counts = [phrase_counts(text, self.marker) for text in rollouts.texts]
        steps = {} if truth is None else {
            key if key == "labelled_fraction" else f"{key}_per_response": value for key, value in truth.accounting.items()
        }
        return {
            **steps,
            "confused_per_response": statistics.fmean(c["confused"] for c in counts),
            "summary_per_response": statistics.fmean(c["summary"] for c in counts),
        }
