"""Seeded short runs of every training method on the embedded organism, saved or compared metric by metric.

A refactoring of the training step must leave what a seeded run logs unchanged. This script runs each arm
below for a few steps through ``attnpo-train run`` (the organism model, its task, its manifest and rhythm
file; one CPU thread, so the float arithmetic is the same from run to run) and either saves every arm's
``metrics.jsonl`` or compares it with a saved copy, line by line and field by field, timing fields aside::

    python benchmarks/compare_metrics.py --save ../metrics_before      # on the code before the change
    python benchmarks/compare_metrics.py --compare ../metrics_before   # on the code after it

``--compare`` prints one line per arm (same, or the first differing fields) and exits 1 when any arm
differs; equality is exact (the JSON numbers as written). ``--dropped F ...`` names fields the change removes
on purpose: each must have been logged before and must be absent after; ``--added F ...`` fields it adds on
purpose: absent before, logged after; every other field must be equal.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

TIMING_FIELDS = ("time_rollout_s", "time_scoring_s", "time_update_s")
"""Fields that measure wall-clock time (the only ones that differ between identical runs)."""

COMMON = {"steps": "3", "prompts_per_step": "2", "group_size": "4", "max_new_tokens": "320", "horizon": "0",
          "lr": "2e-3", "seed": "3", "micro_batch_size": "3", "checkpoint_every": "10"}
"""Settings of every arm: 3 steps of 2 organism prompts x 4 rollouts; micro-batches of 3 split the groups."""

READING_ARMS: dict[str, dict[str, str]] = {
    "attnpo": {"method": "attnpo"},
    "attnpo_shuffled": {"method": "attnpo", "credit": "shuffled"},
    "attnpo_oracle": {"method": "attnpo", "credit": "oracle"},
    "preplan": {"method": "preplan"},
    "anchor": {"method": "anchor"},
    "coupled": {"method": "coupled"},
}
"""The arms whose strategy reads attention: each runs fused and, as "<arm>_unfused", with separate forwards."""
ARMS: dict[str, dict[str, str]] = {
    "rloo": {"method": "rloo", "max_new_tokens": "170"},  # some responses cut: 0/1 rewards that differ
    "rloo_kl": {"method": "rloo", "max_new_tokens": "170", "kl_coef": "0.1", "estimator": "grpo"},
    "tlmre": {"method": "tlmre"},
    **READING_ARMS,
    "coupled_paper": {"method": "coupled", "rhythm_rule": "paper"},
    **{f"{name}_unfused": {**settings, "fused_scoring": "false"} for name, settings in READING_ARMS.items()},
}
"""Arm name -> the settings it adds to ``COMMON`` (passed as ``--set key=value``)."""


def run_arm(name: str, out: Path) -> list[dict]:
    """Train arm ``name`` into ``out`` and return its metrics lines without the timing fields."""
    from attnpo_train.cli import main

    settings = {**COMMON, **ARMS[name]}
    argv = ["run", "--out", str(out), "--no-progress"]
    for key, value in settings.items():
        argv += ["--set", f"{key}={value}"]
    if main(argv) != 0:
        raise SystemExit(f"arm {name}: attnpo-train run failed")
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k not in TIMING_FIELDS} for line in lines]


def differences(before: list[dict], after: list[dict], dropped: tuple[str, ...] = (),
                added: tuple[str, ...] = ()) -> list[str]:
    """Human-readable differences between two runs' metrics lines (empty: identical but for ``dropped``, fields
    that were logged before and must not be after, and ``added``, fields that must be logged after only)."""
    if len(before) != len(after):
        return [f"{len(before)} lines before, {len(after)} after"]
    found = []
    for step, (a, b) in enumerate(zip(before, after), start=1):
        for key in dropped:
            if key not in a or key in b:
                found.append(f"step {step}: '{key}' was {'not ' if key not in a else ''}logged before and is "
                             f"{'still' if key in b else 'not'} logged after")
        for key in added:
            if key in a or key not in b:
                found.append(f"step {step}: '{key}' was {'' if key in a else 'not '}logged before and is "
                             f"{'' if key in b else 'not '}logged after")
        for key in sorted((a.keys() | b.keys()) - set(dropped) - set(added)):
            if key not in b:
                found.append(f"step {step}: '{key}' no longer logged")
            elif key not in a:
                found.append(f"step {step}: '{key}' newly logged")
            elif a[key] != b[key]:
                found.append(f"step {step}: '{key}' {a[key]!r} -> {b[key]!r}")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--save", type=Path, metavar="DIR", help="write DIR/<arm>.json for every arm")
    action.add_argument("--compare", type=Path, metavar="DIR", help="compare every arm with DIR/<arm>.json")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS), help="arms to run (default all)")
    parser.add_argument("--dropped", nargs="+", default=[], metavar="FIELD",
                        help="with --compare: fields logged before that the change removes on purpose")
    parser.add_argument("--added", nargs="+", default=[], metavar="FIELD",
                        help="with --compare: fields the change adds on purpose (not logged before)")
    args = parser.parse_args(argv)

    import torch

    from kfh_probe.io import atomic_write_json

    torch.set_num_threads(1)
    failed = 0
    with tempfile.TemporaryDirectory() as work:
        for name in args.arms:
            metrics = run_arm(name, Path(work) / name)
            if args.save is not None:
                args.save.mkdir(parents=True, exist_ok=True)
                atomic_write_json(args.save / f"{name}.json", metrics)
                print(f"{name}: saved {len(metrics)} steps", flush=True)
                continue
            saved = json.loads((args.compare / f"{name}.json").read_text())
            found = differences(saved, metrics, tuple(args.dropped), tuple(args.added))
            failed += bool(found)
            print(f"{name}: {'same' if not found else 'DIFFERS: ' + '; '.join(found[:6])} "
                  f"({len(metrics)} steps, {len(metrics[0]) if metrics else 0} fields)", flush=True)
    if args.compare is not None:
        print(f"{len(args.arms) - failed} of {len(args.arms)} arms log the same metrics")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
