"""``kfh-probe label`` and ``kfh-probe label-report``.

Exit codes as in :mod:`kfh_probe.cli`: 0 success, 2 bad input or a labeller that cannot run (one line
that names file, line and id of each broken trace), 130 interrupted. Nothing is written on failure.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..errors import InputError

LABELERS = ("given", "organism", "judge", "post-answer", "ablation")
LABELER_HELP = (
    "given: the labels already in the file (validation only). "
    "organism: the organism task's ground truth. "
    "judge: consensus of LLM judges (--judge URL=MODEL, --judge-local DIR). "
    "post-answer: steps after the first one that states the final answer are redundant, the rest "
    "essential -- cheap and crude (a coincidental mention of the answer's value ends the essential part). "
    "ablation: essential when deleting the step lowers the model's log-probability of its final answer "
    "(--model, --threshold or --top-fraction)."
)


def _add_segmenter_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--min-chars", type=int, default=80, help="merge pieces shorter than this (default 80; 0: never)")
    p.add_argument("--segment-mode", choices=("phrases", "blank-line"), default="phrases",
                   help="how traces without steps are segmented (default: the reference phrases)")
    p.add_argument("--marker", default="</think>", help="end-of-thinking marker (default </think>)")


def _add_judge_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("judge labeller")
    g.add_argument("--judge", action="append", default=[], metavar="URL=MODEL",
                   help="an OpenAI-compatible endpoint and model, e.g. http://localhost:8000/v1=qwen (repeatable)")
    g.add_argument("--judge-local", action="append", default=[], metavar="DIR",
                   help="a local Hugging Face chat model folder or .gguf file as a judge (repeatable)")
    g.add_argument("--api-key-env", default="OPENAI_API_KEY",
                   help="environment variable holding the API key (default OPENAI_API_KEY; optional)")
    g.add_argument("--prompt-template", help="prompt template file ($question, $steps, $num_steps, $answer); "
                                             "default: the packaged kfh_probe/data/judge_prompt.txt")
    g.add_argument("--consensus", choices=("all", "majority"), default="all",
                   help="all: keep a step's label only when every judge agrees (default); majority: more than half. "
                        "Disputed steps get label null and are counted")
    g.add_argument("--workers", type=int, default=4, help="requests in flight at most (default 4)")
    g.add_argument("--timeout", type=float, default=60.0, help="seconds per request (default 60)")
    g.add_argument("--retries", type=int, default=4, help="retries on 429/5xx/connection errors (default 4)")
    g.add_argument("--malformed-retries", type=int, default=2, help="re-asks after a reply that is not a verdict (default 2)")
    g.add_argument("--cache", help="answer cache folder (default: $XDG_CACHE_HOME/kfh-probe/judge or ~/.cache/...)")
    g.add_argument("--no-cache", action="store_true", help="do not read or write the answer cache")
    g.add_argument("--local-max-new-tokens", type=int, default=512, help="generation budget of --judge-local (default 512)")


def _add_ablation_args(p: argparse.ArgumentParser, model_help: str) -> None:
    from ..loading import GGUF_FILE_HELP

    g = p.add_argument_group("ablation labeller")
    g.add_argument("--model", help=model_help)
    g.add_argument("--gguf-file", help=GGUF_FILE_HELP)
    how = g.add_mutually_exclusive_group()
    how.add_argument("--threshold", type=float, default=None,
                     help="essential when deleting the step drops the answer's log-probability by at least this many nats (default 1.0)")
    how.add_argument("--top-fraction", type=float, default=None, help="essential: this fraction of each trace's steps with the largest drops")
    g.add_argument("--batch-size", type=int, default=64, help="sequences per forward (default 64: K+1 <= 64 is one forward)")
    g.add_argument("--dtype", default="float32", help="float32, bfloat16, float16 (default float32)")
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``label`` and ``label-report`` commands."""
    label = subparsers.add_parser("label", help="segment and label the steps of a trace file",
                                  description="Segment traces without steps and label every step. " + LABELER_HELP)
    label.add_argument("--traces", required=True, help="trace JSONL")
    label.add_argument("--labeler", required=True, choices=LABELERS, help=LABELER_HELP)
    label.add_argument("--out", required=True, help="labelled trace JSONL (written atomically)")
    label.add_argument("--skip-invalid", action="store_true", help="leave out traces that cannot be read or labelled (counted)")
    label.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_segmenter_args(label)
    _add_judge_args(label)
    _add_ablation_args(label, "model folder or .gguf file for --labeler ablation (default: the embedded organism)")
    label.set_defaults(func=cmd_label)

    report = subparsers.add_parser("label-report", help="measure the labellers against the organism's ground truth")
    report.add_argument("--traces", help="organism traces (default: the shipped model-sampled traces, else fresh samples)")
    report.add_argument("--labelers", default="given,organism,post-answer,ablation",
                        help="comma-separated labellers (default given,organism,post-answer,ablation; judge "
                             "is added when --judge or --judge-local is given)")
    report.add_argument("--n", type=int, default=64, help="traces to sample when no trace file is available (default 64)")
    report.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    report.add_argument("--out-md", help="also write the markdown table here")
    report.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_segmenter_args(report)
    _add_judge_args(report)
    _add_ablation_args(report, "model folder (default: the embedded organism)")
    report.set_defaults(func=cmd_label_report)


def _cache_dir(args) -> Path | None:
    if args.no_cache:
        return None
    if args.cache:
        return Path(args.cache)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kfh-probe" / "judge"


def parse_judge_spec(spec: str) -> tuple[str, str]:
    """``"URL=MODEL"`` -> ``(URL, MODEL)`` (split at the last ``=``)."""
    url, sep, model = spec.rpartition("=")
    if not sep or not url.startswith(("http://", "https://")) or not model:
        raise InputError(f"--judge {spec!r}: expected URL=MODEL with an http(s) URL, e.g. http://localhost:8000/v1=my-model")
    return url, model


def judge_labeler(args):
    """The :class:`~.judge.JudgeLabeler` the judge flags describe."""
    from .judge import JudgeLabeler, load_template
    from .judge_client import AnswerCache, ChatJudge, LocalJudge

    if not args.judge and not args.judge_local:
        raise InputError("--labeler judge needs at least one --judge URL=MODEL or --judge-local DIR")
    cache_dir = _cache_dir(args)
    cache = AnswerCache(cache_dir) if cache_dir else None
    api_key = os.environ.get(args.api_key_env) or None
    judges = [ChatJudge(url, model, api_key, args.timeout, args.retries, cache=cache)
              for url, model in map(parse_judge_spec, args.judge)]
    judges += [LocalJudge(path, args.local_max_new_tokens, args.device, cache) for path in args.judge_local]
    return JudgeLabeler(judges, load_template(args.prompt_template), args.consensus, args.workers,
                        args.malformed_retries, args.marker, progress=not args.quiet)


def model_dir(args) -> str:
    """``--model``, or the embedded organism's folder when it is built."""
    if args.model:
        return args.model
    from ..organism import built_model_dir

    return str(built_model_dir())


def ablation_labeler(args, model=None, tokenizer=None):
    """The :class:`~.ablation.AblationLabeler` the ablation flags describe (loads the model unless given)."""
    from ..loading import load_model, load_tokenizer, pad_token_id
    from .ablation import AblationLabeler

    if model is None:
        path = model_dir(args)
        model, tokenizer = load_model(path, args.dtype, args.device), load_tokenizer(path)
    threshold = None if args.top_fraction is not None else (1.0 if args.threshold is None else args.threshold)
    return AblationLabeler(model, tokenizer, pad_token_id(tokenizer), threshold, args.top_fraction,
                           args.batch_size, args.marker)


def make_labeler(name: str, args):
    """The labeller called ``name``, configured from the command line."""
    from .rules import GivenLabeler, OrganismLabeler, PostAnswerLabeler

    if name == "given":
        return GivenLabeler()
    if name == "organism":
        return OrganismLabeler()
    if name == "post-answer":
        return PostAnswerLabeler(args.marker)
    if name == "ablation":
        return ablation_labeler(args)
    if name == "judge":
        return judge_labeler(args)
    raise InputError(f"unknown labeller {name!r}; choose from {', '.join(LABELERS)}")


def segmenter(args):
    from ..segmentation import SegmenterConfig

    return SegmenterConfig(mode=args.segment_mode, min_chars=args.min_chars)


def cmd_label(args) -> int:
    from ..io import atomic_write_jsonl
    from ..traces import read_traces
    from .base import run_labeler

    config = segmenter(args)
    traces, skipped = read_traces(args.traces, args.marker, args.skip_invalid)
    labeler = make_labeler(args.labeler, args)
    run = run_labeler(traces, labeler, config, args.marker, args.skip_invalid, source=args.traces)
    run.skipped = sorted(skipped + run.skipped, key=lambda p: p.line)
    if run.traces:
        atomic_write_jsonl(args.out, [t.to_record() for t in run.traces])
        print(f"wrote {args.out} ({args.labeler}): {run.summary()}", file=sys.stderr)
    else:
        print(f"kfh-probe label: no trace of {args.traces} could be labelled ({args.labeler}: {run.summary()}); "
              "nothing was written", file=sys.stderr)
    for problem in run.skipped[:20]:
        print(f"  skipped {args.traces}:{problem.line} (id {problem.id!r}): {problem.reason}", file=sys.stderr)
    return 0 if run.traces else 2


def report_labelers(args) -> dict:
    """``--labelers`` (plus ``judge`` when a judge is given) as name -> factory of ``label_report``; the
    ablation labeller reuses the report's loaded model."""
    names = [n.strip() for n in args.labelers.split(",") if n.strip()]
    if (args.judge or args.judge_local) and "judge" not in names:
        names.append("judge")
    unknown = [n for n in names if n not in LABELERS]
    if unknown:
        raise InputError(f"--labelers: unknown {unknown}; choose from {', '.join(LABELERS)}")
    return {name: (lambda model, tokenizer: ablation_labeler(args, model, tokenizer)) if name == "ablation" else
            (lambda model, tokenizer, name=name: make_labeler(name, args)) for name in names}


def cmd_label_report(args) -> int:
    from .report import label_report

    rule = (f"top {args.top_fraction:.0%} of drops" if args.top_fraction is not None else
            f"drop >= {1.0 if args.threshold is None else args.threshold} nats")
    table = label_report(
        model_dir(args), report_labelers(args), args.traces, n=args.n, seed=args.seed, marker=args.marker,
        segmenter=segmenter(args), dtype=args.dtype, device=args.device, progress=not args.quiet,
        note=f"ablation rule: {rule}",
    )
    print(table)
    if args.out_md:
        from ..io import atomic_write_text

        atomic_write_text(args.out_md, table + "\n")
        print(f"wrote {args.out_md}", file=sys.stderr)
    return 0
