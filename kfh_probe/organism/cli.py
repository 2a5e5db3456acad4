"""``kfh-probe organism ...``: build the organism, export labeled traces, report its quality."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kfh_probe.errors import InputError


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``organism`` command with ``build``, ``traces`` and ``report`` sub-commands."""
    from kfh_probe.organism import DEFAULT_ORGANISM, ORGANISMS
    from kfh_probe.organism.train import OrganismTrainConfig

    org = subparsers.add_parser("organism", help="the embedded model organism of overthinking")
    sub = org.add_subparsers(dest="organism_command", required=True)

    b = sub.add_parser("build", help="train the organism from scratch (deterministic for a seed)")
    b.add_argument("--out", type=Path, default=None, help="output folder (default: the shipped folder)")
    b.add_argument("--organism", choices=ORGANISMS, default=DEFAULT_ORGANISM,
                   help="the task version to train on (default output: that organism's shipped folder)")
    b.add_argument("--seed", type=int, default=OrganismTrainConfig.seed)
    b.add_argument("--steps", type=int, default=OrganismTrainConfig.steps)
    b.set_defaults(func=_build)

    t = sub.add_parser("traces", help="write ground-truth labeled traces (JSONL)")
    t.add_argument("--n", type=int, required=True)
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--source", choices=("teacher", "model"), default="teacher")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--model", type=Path, default=None, help="model folder for --source model (default: shipped)")
    t.add_argument("--organism", choices=ORGANISMS, default=DEFAULT_ORGANISM,
                   help="the task whose teacher writes, or whose shipped model samples when --model is not given")
    t.set_defaults(func=_traces)

    r = sub.add_parser("report", help="greedy and sampled accuracy, lengths, redundant steps; with --group-size, "
                       "how groups of samples look to group RL")
    r.add_argument("--model", type=Path, default=None, help="organism folder (default: the shipped --organism)")
    r.add_argument("--organism", choices=ORGANISMS,
                   help=f"the shipped organism to report on when --model is not given (default: {DEFAULT_ORGANISM})")
    r.add_argument("--n", type=int, default=500, help="problems of the greedy and sampled blocks")
    r.add_argument("--group-size", type=int, default=None,
                   help="also report groups_t1: G samples at T = 1 of each of N // G problems")
    r.add_argument("--json", type=Path, default=None, help="also write the report here")
    r.set_defaults(func=_report)


def _build(args: argparse.Namespace) -> int:
    from kfh_probe.organism import default_model_dir
    from kfh_probe.organism.train import OrganismTrainConfig, build

    config = OrganismTrainConfig(seed=args.seed, task=args.organism, steps=args.steps)
    out = build(args.out or default_model_dir(args.organism), config)
    print(f"organism written to {out}")
    return 0


def _traces(args: argparse.Namespace) -> int:
    from kfh_probe.loading import model_folder
    from kfh_probe.organism.traces import write_organism_traces

    if args.n < 1:
        raise InputError("--n must be at least 1")
    if args.model is not None:
        if args.source != "model":
            raise InputError("--model only applies with --source model")
        model_folder(args.model)
    written = write_organism_traces(args.out, args.n, args.seed, args.source, args.model, args.organism)
    print(f"wrote {written} of {args.n} traces to {args.out}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from kfh_probe.io import atomic_write_json
    from kfh_probe.loading import model_folder
    from kfh_probe.organism import built_model_dir, organism_option
    from kfh_probe.organism.report import group_credit, organism_report

    if args.n < 1 or (args.group_size is not None and not 2 <= args.group_size <= args.n):
        raise InputError(f"need --n >= 1 and 2 <= --group-size <= --n; got {args.n}, {args.group_size}")
    organism = organism_option(args.organism, args.model)
    model = model_folder(args.model) if organism is None else built_model_dir(organism)
    report = organism_report(model, n=args.n, group_size=args.group_size, credit=group_credit())
    print(json.dumps(report, indent=2))
    if args.json:
        atomic_write_json(args.json, report)
    return 0
