"""``kfh-probe organism ...``: build the organism, export labeled traces, report its quality."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kfh_probe.errors import InputError


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``organism`` command with ``build``, ``traces`` and ``report`` sub-commands."""
    from kfh_probe.organism.train import OrganismTrainConfig

    org = subparsers.add_parser("organism", help="the embedded model organism of overthinking")
    sub = org.add_subparsers(dest="organism_command", required=True)

    b = sub.add_parser("build", help="train the organism from scratch (deterministic for a seed)")
    b.add_argument("--out", type=Path, default=None, help="output folder (default: the shipped folder)")
    b.add_argument("--seed", type=int, default=OrganismTrainConfig.seed)
    b.add_argument("--steps", type=int, default=OrganismTrainConfig.steps)
    b.set_defaults(func=_build)

    t = sub.add_parser("traces", help="write ground-truth labeled traces (JSONL)")
    t.add_argument("--n", type=int, required=True)
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--source", choices=("teacher", "model"), default="teacher")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--model", type=Path, default=None, help="model folder for --source model (default: shipped)")
    t.set_defaults(func=_traces)

    r = sub.add_parser("report", help="greedy and sampled accuracy, lengths, redundant steps")
    r.add_argument("--model", type=Path, default=None)
    r.add_argument("--n", type=int, default=500)
    r.add_argument("--json", type=Path, default=None, help="also write the report here")
    r.set_defaults(func=_report)


def _build(args: argparse.Namespace) -> int:
    from kfh_probe.organism import default_model_dir
    from kfh_probe.organism.train import OrganismTrainConfig, build

    out = build(args.out or default_model_dir(), OrganismTrainConfig(seed=args.seed, steps=args.steps))
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
    written = write_organism_traces(args.out, args.n, args.seed, args.source, args.model)
    print(f"wrote {written} of {args.n} traces to {args.out}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from kfh_probe.loading import model_folder
    from kfh_probe.organism import built_model_dir
    from kfh_probe.organism.report import organism_report

    model = built_model_dir() if args.model is None else model_folder(args.model)
    report = organism_report(model, n=args.n)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(text + "\n", encoding="utf-8")
        tmp.replace(args.json)
    return 0
