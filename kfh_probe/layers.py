"""Which decoder layers a command works on: the ``layers`` text (``--layers``) and the check against a model.

Every command and backend that takes a list of layers goes through these two functions, so a
malformed spec or a layer the model lacks is refused the same way everywhere, by name.
"""

from __future__ import annotations

import re

from .errors import InputError

_PART = re.compile(r"(\d+)(?:\s*-\s*(\d+))?")


def parse_layers(text: str, setting: str = "layers") -> list[int]:
    """``"0,3,5-7"`` -> ``[0, 3, 5, 6, 7]`` (sorted, without repeats).

    A part is a layer ``N`` or an inclusive range ``A-B`` with ``A <= B``; parts are comma-separated.

    Raises:
        InputError: naming ``setting`` and the part that is neither.
    """
    layers: set[int] = set()
    for part in text.split(","):
        match = _PART.fullmatch(part.strip())
        if match is None:
            raise InputError(f"`{setting}` {text!r}: {part.strip()!r} is not a layer N or a range A-B (e.g. '0-3,8')",
                             settings=(setting,))
        lo, hi = int(match[1]), int(match[2] if match[2] is not None else match[1])
        if lo > hi:
            raise InputError(f"`{setting}` {text!r}: the range {part.strip()!r} runs backwards; write {hi}-{lo}",
                             settings=(setting,))
        layers.update(range(lo, hi + 1))
    return sorted(layers)


def check_layers(layers: list[int] | None, num_layers: int, setting: str = "layers") -> list[int]:
    """The sorted layers to work on (all ``num_layers`` when ``layers`` is None), each checked to exist.

    Raises:
        InputError: naming ``setting`` and every layer the model does not have.
    """
    if layers is None:
        return list(range(num_layers))
    missing = sorted({layer for layer in layers if not 0 <= layer < num_layers})
    if missing:
        raise InputError(f"`{setting}`: the model has no layer(s) {missing}; it has layers 0..{num_layers - 1}",
                         settings=(setting,))
    if not layers:
        raise InputError(f"`{setting}`: no layer given", settings=(setting,))
    return sorted(set(layers))
