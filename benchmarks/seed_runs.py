"""What the experiment scripts in this folder share: runs cached one per arm and seed, and statistics over
seeds. The scripts import it by name (a script's own folder is on ``sys.path`` when it runs)."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path


def cached_run(done: Path, settings: dict) -> dict | None:
    """The finished run (or evaluation) recorded in the JSON file ``done`` with its ``settings``, or None when
    it has not finished.

    Raises:
        SystemExit: the run was made with other settings than ``settings`` (a summary would mix them).
    """
    if not done.is_file():
        return None
    record = json.loads(done.read_text(encoding="utf-8"))
    if record["settings"] != settings:
        raise SystemExit(f"{done} was made with other settings ({record['settings']}); use another --out")
    return record


def mean_ci(values: list[float]) -> tuple[float, list[float] | None]:
    """Mean and its 95% t interval over ``values`` (one per seed; the interval is None for a single value)."""
    from scipy.stats import t

    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None
    half = t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, [mean - half, mean + half]
