"""Split the reasoning of a trace into steps.

Two modes:

- ``"phrases"`` (default): the reference rules of the AttnPO authors (method page, section 2; the phrase
  lists are the reference's, plus a few). The text is cut in front of transition phrases. Progression
  and summary phrases cut only at the start of a line; confused, branching and final phrases cut
  anywhere a word starts. At one position the longest matching phrase decides the family. Pieces
  shorter than ``min_chars`` are then merged into a neighbour, following the reference: short confused
  or branching pieces merge forward; short progression pieces (and the text before the first phrase)
  merge backward when the next piece is confused, otherwise forward; short summary pieces merge
  backward, unless little more than their trigger (15 characters at most beyond it), which merge
  forward; the final-answer piece is never merged. A piece that would merge past either end merges the
  other way. Where this differs from the reference's code, and why: ``docs/method.md``.
- ``"blank-line"``: cut after every blank line; pieces shorter than ``min_chars`` merge forward (the
  last one backward).

Segmentation works on characters only; :mod:`kfh_probe.alignment` maps the pieces to token spans
through the offsets of the real tokenisation.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields

from .settings import Interval, OneOf, check_settings, setting

CONFUSED = (
    "Wait", "But", "However", "Hold on", "Looking back", "I don't see any errors", "Hmm, wait", "Hmm, no",
    "Hmm, but", "Hmm, just", "Hmm, let me double-check", "Hmm, let me verify", "Hmm, let me make sure",
    "Hmm, let me check", "No,",
    "Let me double-check", "Let me just double-check", "Let's double-check", "Let's just double-check",
    "Just to double-check",
    "Let me verify", "Let me just verify", "Let's verify", "Let's just verify", "Just to verify",
    "Let me confirm", "Let me just confirm", "Let's confirm", "Let's just confirm", "Just to confirm",
    "Let me check", "Let me just check", "Let's check", "Let's just check", "Just to check",
    "Let me recap", "Let me just recap", "Let's recap", "Let's just recap", "Just to recap",
    "Let me make sure", "Let me just make sure", "Let's make sure", "Just to make sure",
    "So, is", "Is it", "Is that right?", "Is there", "Right?",
    # not in the reference's lists; common in R1-style traces (kept from this project's first version)
    "Let me recheck", "Let me re-check", "Let me re-examine", "Hmm, actually", "Actually, wait",
    "On second thought", "Double-checking",
)
BRANCHING = (
    "Alternatively", "Another approach", "Another way", "Another idea", "Another thought", "I guess another way",
    "I guess another approach", "Let me just think if there",
    "Let me try another", "Or maybe",  # not in the reference's list (kept from this project's first version)
)
PROGRESSION = (
    "Let me", "Let's", "I ", "We ", "Okay", "Hmm", "Now", "Alright", "First,", "First off,", "Second,", "Third,",
    "Starting", "Then", "Next", "Finally", "Similarly", "Again", "In this case", "Because", "Given that",
    "The problem gives", "To ", "Since",
)
SUMMARY = ("So", "Therefore", "Thus", "Hence", "Hmm, so", "Okay, so", "Putting it all together", "In summary")
FINAL = ("**Final Answer",)

_ANYWHERE_FAMILIES = ("confused", "branching", "final")
_LITTLE_MORE_THAN_TRIGGER = 15  # characters beyond the trigger for a summary piece to count as bare


@dataclass(frozen=True)
class SegmenterConfig:
    """How reasoning text is cut into steps (recorded in the manifest).

    Attributes:
        confused, branching, progression, summary, final: the phrase families (case-sensitive).
    """

    mode: str = setting("phrases", '"phrases" (reference rules) or "blank-line".', OneOf(("phrases", "blank-line")))
    min_chars: int = setting(
        80, "Pieces shorter than this many characters are merged into a neighbour (80 in the reference; 0 disables "
        "merging).", Interval(0, None),
    )
    confused: tuple[str, ...] = CONFUSED
    branching: tuple[str, ...] = BRANCHING
    progression: tuple[str, ...] = PROGRESSION
    summary: tuple[str, ...] = SUMMARY
    final: tuple[str, ...] = FINAL
    _phrases: dict[str, tuple[tuple[str, str], ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_settings(self)
        pairs = [
            (phrase, family)
            for family in ("confused", "branching", "progression", "summary", "final")
            for phrase in getattr(self, family)
        ]
        for phrase, family in pairs:
            if not isinstance(phrase, str) or not phrase.strip():
                raise ValueError(f"empty or non-string phrase in the {family} family: {phrase!r}")
        # Longest first, so "Hmm, wait" (confused) wins over "Hmm" (progression) at the same position;
        # grouped by first character, so a position is tried only against the phrases that can start there.
        by_first: dict[str, tuple[tuple[str, str], ...]] = {}
        for phrase, family in sorted(pairs, key=lambda p: -len(p[0])):
            by_first[phrase[0]] = (*by_first.get(phrase[0], ()), (phrase, family))
        object.__setattr__(self, "_phrases", by_first)

    def to_dict(self) -> dict:
        """The settings as plain JSON-able data."""
        data = asdict(self)
        data.pop("_phrases")
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}

    @classmethod
    def from_dict(cls, data: object) -> "SegmenterConfig":
        """The settings :meth:`to_dict` wrote (a labeled record's or a manifest's ``segmenter``).

        Raises:
            ValueError: not an object, an unknown key, or a setting ``__init__`` refuses.
        """
        if not isinstance(data, dict):
            raise ValueError(f"segmenter settings must be an object, got {type(data).__name__}")
        known = {f.name for f in fields(cls) if f.init}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown segmenter setting(s) {unknown}; known: {sorted(known)}")
        try:
            return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})
        except TypeError as err:
            raise ValueError(f"bad segmenter settings: {err}") from None

    def match(self, text: str, pos: int) -> tuple[str, str] | None:
        """The longest phrase that starts a word at ``pos`` as ``(phrase, family)``, or None."""
        for phrase, family in self._phrases.get(text[pos : pos + 1], ()):
            if text.startswith(phrase, pos):
                end = pos + len(phrase)
                # A phrase ending in a letter must end a word: "So" must not match "Some".
                if phrase[-1].isalnum() and end < len(text) and text[end].isalnum():
                    continue
                return phrase, family
        return None


@dataclass
class _Piece:
    start: int
    end: int
    family: str  # family of the phrase the piece starts with; "start" for text before any phrase
    trigger: str


def segment_reasoning(text: str, config: SegmenterConfig | None = None) -> list[str]:
    """Split reasoning text into steps; the returned pieces concatenate exactly to ``text``."""
    return [text[start:end] for start, end in segment_spans(text, config)]


def segment_spans(text: str, config: SegmenterConfig | None = None) -> list[tuple[int, int]]:
    """Character spans ``[start, end)`` of the steps of ``text``, covering it without gaps."""
    config = config or SegmenterConfig()
    if not text:
        return []
    pieces = _cut_blank_lines(text) if config.mode == "blank-line" else _cut_phrases(text, config)
    if config.min_chars > 0:
        pieces = _merge_short(pieces, text, config.min_chars)
    return [(p.start, p.end) for p in pieces]


def _cut_phrases(text: str, config: SegmenterConfig) -> list[_Piece]:
    cuts: list[tuple[int, str, str]] = []
    pos = 0
    n = len(text)
    while pos < n:
        at_line_start = pos == 0 or text[pos - 1] == "\n"
        if at_line_start:
            indent = pos
            while indent < n and text[indent] in " \t":
                indent += 1
            found = config.match(text, indent)
            if found:
                cuts.append((pos, found[1], found[0]))
                pos = indent + len(found[0])
                continue
        elif text[pos - 1].isspace():
            found = config.match(text, pos)
            if found and found[1] in _ANYWHERE_FAMILIES:
                cuts.append((pos, found[1], found[0]))
                pos += len(found[0])
                continue
        pos += 1
    if not cuts or cuts[0][0] != 0:
        cuts.insert(0, (0, "start", ""))
    bounds = [c[0] for c in cuts] + [n]
    return [_Piece(bounds[i], bounds[i + 1], fam, trig) for i, (_, fam, trig) in enumerate(cuts)]


def _cut_blank_lines(text: str) -> list[_Piece]:
    starts = [0] + [m.end() for m in re.finditer(r"\n[ \t]*\n\s*", text) if m.end() < len(text)]
    bounds = starts + [len(text)]
    return [_Piece(bounds[i], bounds[i + 1], "start", "") for i in range(len(starts))]


def _merge_direction(pieces: list[_Piece], i: int, text: str) -> int:
    """-1 to merge piece ``i`` into its predecessor, +1 into its successor (reference rules)."""
    piece = pieces[i]
    nxt = pieces[i + 1] if i + 1 < len(pieces) else None
    if piece.family == "summary":
        bare = piece.end - piece.start - len(piece.trigger) <= _LITTLE_MORE_THAN_TRIGGER
        direction = +1 if bare else -1
    elif piece.family in ("progression", "start"):
        direction = -1 if nxt is not None and nxt.family == "confused" else +1
    else:  # confused or branching
        direction = +1
    can_forward = nxt is not None and nxt.family != "final"
    can_backward = i > 0
    if direction == +1 and not can_forward:
        direction = -1
    if direction == -1 and not can_backward:
        direction = +1 if can_forward else 0
    return direction


def _merge_short(pieces: list[_Piece], text: str, min_chars: int) -> list[_Piece]:
    pieces = list(pieces)
    i = 0
    while i < len(pieces):
        piece = pieces[i]
        if piece.family == "final" or piece.end - piece.start >= min_chars:
            i += 1
            continue
        direction = _merge_direction(pieces, i, text)
        if direction == 0:
            i += 1
            continue
        j = i + direction
        first, second = (pieces[j], piece) if direction < 0 else (piece, pieces[j])
        merged = _Piece(first.start, second.end, first.family, first.trigger)
        lo = min(i, j)
        pieces[lo:lo + 2] = [merged]
        i = max(lo - 1, 0)  # the merged piece (or its predecessor's rule) may change
    return pieces


def split_at_marker(response: str, marker: str = "</think>") -> tuple[str, str]:
    """``(reasoning, answer)`` around the end-of-thinking marker, which must occur exactly once (method
    page, section 1: with none the model never finished thinking, with two the answer is ambiguous).
    The marker belongs to neither part. The project's one copy of this rule.

    Raises:
        ValueError: the marker is absent or repeated; the message says how often it occurs.
    """
    count = response.count(marker) if marker else 0  # an empty marker marks nothing
    if count != 1:
        raise ValueError(f"response has {'no' if count == 0 else count} end-of-thinking marker {marker!r}; "
                         "exactly one is needed")
    reasoning, answer = response.split(marker)
    return reasoning, answer


def think_opener(marker: str) -> str:
    """The tag that opens the thinking block a ``marker`` closes (``<think>`` for ``</think>``), or ``""``
    when the marker is no closing tag."""
    return marker.replace("</", "<", 1) if marker.startswith("</") else ""


def split_response(response: str, marker: str = "</think>") -> tuple[str, str] | None:
    """``split_at_marker``, or None where the marker does not occur exactly once."""
    try:
        return split_at_marker(response, marker)
    except ValueError:
        return None
