"""``kfh-probe``: sweep traces for Key-Focus Heads and look at the result.

Every command returns an exit code: 0 success, 1 a failed check (validate), 2 bad input, 130 interrupted.
Anything the user can fix (a :class:`~kfh_probe.errors.KFHError`) is one line ``kfh-probe CMD: error: ...``
on stderr, with the settings it names written as this command line's flags (``batch_size`` -> ``--batch-size``);
any other exception is a bug and shows its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

from . import __version__
from .errors import InputError, KFHError, report_error


def _default_inputs(args) -> None:
    """Fill in the embedded organism (``--organism``, default v4) and its labeled traces when
    --model/--traces are not given."""
    from .organism import organism_option

    args.organism = organism_option(args.organism, args.model)
    if args.model is not None and args.traces is not None:
        return
    if args.model is None and args.traces is not None:
        raise InputError("--traces was given without --model; give both, or neither to use the embedded organism")
    try:
        from .organism import DEFAULT_ORGANISM, built_model_dir, default_traces_path
    except ImportError:
        raise InputError("the embedded organism is not available in this installation; pass --model DIR --traces F") from None
    if args.model is None:
        args.model = str(built_model_dir(args.organism))
        args.model_name = "kfh-organism" + ("" if args.organism == DEFAULT_ORGANISM else f"-{args.organism}")
    if args.traces is None:
        if args.organism is None:
            raise InputError("--model was given without --traces; pass the labeled traces of that model with --traces F")
        args.traces = str(default_traces_path(args.organism))


def _default_inputs_with_manifest(args) -> None:
    """:func:`_default_inputs`, and the organism's manifest when --manifest is not given with the organism."""
    args.model_name = None
    _default_inputs(args)
    if args.manifest is None:
        if args.organism is None:
            raise InputError("--model was given without --manifest; pass that model's KFH manifest (kfh-probe sweep)")
        from .organism import default_manifest_path

        args.manifest = str(default_manifest_path(args.organism))


def _run_in_parts(args, run: Callable[..., object | None], report: Callable[[object], None]) -> int:
    """Run a command whose finished batches survive an interruption and whose batches may be shared by
    several processes (``sweep``, ``rhythm``): ``run(work_dir=, keep_parts=, rank=, world_size=)`` with
    ``RANK`` and ``WORLD_SIZE`` from the environment (as ``torchrun`` and ``accelerate launch`` set them).

    Rank 0 gets the result and ``report`` prints it; another rank says where its share is. Ctrl-C says
    how to continue and exits 130.
    """
    from .batch_runner import work_folder

    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    work_dir = work_folder(args.work_dir, args.out, rank, world_size)
    try:
        result = run(work_dir=work_dir, keep_parts=args.keep_parts, rank=rank, world_size=world_size)
    except KeyboardInterrupt:
        print(f"interrupted: finished batches are kept in {work_dir}; run the same command again to "
              "continue where it stopped", file=sys.stderr)
        return 130
    if result is None:
        print(f"rank {rank}: my share of the work is saved in {work_dir}; rank 0 writes {args.out}", file=sys.stderr)
    else:
        report(result)
    return 0


def cmd_sweep(args) -> int:
    from .layers import parse_layers
    from .sweep import SweepConfig, run_sweep

    args.model_name = None
    _default_inputs(args)
    config = SweepConfig(
        layers=parse_layers(args.layers) if args.layers is not None else None, batch_size=args.batch_size,
        top_n=args.top_n, seed=args.seed, bootstrap=args.bootstrap, permutations=args.permutations,
        marker=args.marker, skip_invalid=args.skip_invalid, backend=args.backend,
    )

    def report(manifest: dict) -> None:
        best = manifest["heads"][0]
        print(
            f"wrote {args.out}: {len(manifest['heads'])} heads ranked on {manifest['probe']['traces_with_pairs']} "
            f"traces; best head (layer {best['layer']}, head {best['head']}) SRA {best['sra']:.3f}; "
            f"top_n = {manifest['top_n']}",
            file=sys.stderr,
        )

    return _run_in_parts(args, partial(
        run_sweep, args.model, args.traces, config, out=args.out, model_name=args.model_name, max_traces=args.max_traces,
        dtype=args.dtype, device=args.device, progress=not args.quiet,
    ), report)


def cmd_causal(args) -> int:
    from .causal import CausalConfig, format_causal_table, prepare_causal_traces, run_causal
    from .io import atomic_write_json
    from .loading import load_model, load_tokenizer, pad_token_id
    from .manifest import check_model_matches, load_manifest, model_fingerprint, top_heads
    from .traces import read_traces

    _default_inputs_with_manifest(args)
    config = CausalConfig(k=args.k, k_fraction=args.k_fraction, top_n=args.top_n, draws=args.draws, seed=args.seed,
                          batch_size=args.batch_size, max_answer_tokens=args.max_answer_tokens, marker=args.marker)
    manifest = load_manifest(args.manifest)
    heads = top_heads(manifest, config.top_n)
    traces, skipped = read_traces(args.traces, config.marker, args.skip_invalid)
    tokenizer = load_tokenizer(args.model)
    items, left_out = prepare_causal_traces(traces, tokenizer, config, args.skip_invalid, source=args.traces)
    skipped += left_out
    items = items[: args.max_traces] if args.max_traces is not None else items
    if not items:
        raise InputError(f"no usable trace in {args.traces} ({len(skipped)} left out)")
    model = load_model(args.model, args.dtype, args.device)
    check_model_matches(manifest, model, allow_finetuned=args.allow_finetuned)
    print(f"{len(items)} traces ({len(skipped)} left out); heads {heads}", file=sys.stderr)
    summary = run_causal(model, tokenizer, items, heads, config, pad_token_id(tokenizer), progress=not args.quiet)
    print(format_causal_table(summary))
    if args.json:
        settings = {
            "model": args.model_name or args.model, "fingerprint": model_fingerprint(model), "manifest": Path(args.manifest).name,
            "traces": Path(args.traces).name, "traces_used": len(items),
            "traces_left_out": {"count": len(skipped), "reasons": [s.to_dict() for s in skipped]},
            "k": "the trace's essential steps (labeled), else round(k_fraction * K)" if config.k is None else config.k,
            "k_fraction": config.k_fraction, "top_n": len(heads), "draws": config.draws, "seed": config.seed,
            "max_answer_tokens": config.max_answer_tokens or "2 |F| + 16 per trace", "dtype": args.dtype,
        }
        atomic_write_json(args.json, {"format": "kfh-causal", "settings": settings, **summary})
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def cmd_view(args) -> int:
    from .io import check_output_path
    from .trace_view import view_traces

    _default_inputs_with_manifest(args)
    check_output_path(args.out)
    view = view_traces(
        args.model, args.traces, args.manifest, ids=args.ids, max_traces=args.max_traces, model_name=args.model_name,
        batch_size=args.batch_size, marker=args.marker, skip_invalid=args.skip_invalid,
        allow_finetuned=args.allow_finetuned, dtype=args.dtype, device=args.device, progress=not args.quiet,
    )
    view.save(args.out)
    size = Path(args.out).stat().st_size
    print(f"wrote {args.out}: {len(view.traces)} traces, {len(view.heads)} heads, top {view.top_n} ensemble; "
          f"{size / 1e6:.2f} MB", file=sys.stderr)
    return 0


def cmd_generate(args) -> int:
    import hashlib

    from .generate import (
        DEFAULT_INSTRUCTION, GenerateConfig, VLLMSampler, generate_traces, load_prompt_template, read_problems, sample_hf,
    )
    from .grading import resolve_grader
    from .io import file_sha256
    from .loading import load_model, load_tokenizer, model_folder
    from .manifest import model_fingerprint

    config = GenerateConfig(
        samples=args.samples, temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size, seed=args.seed, marker=args.marker, grader=args.grader,
        correct_only=args.correct_only, engine=args.engine,
    )
    tokenizer = load_tokenizer(args.model)
    template = load_prompt_template(args.prompt_template) if args.prompt_template else None
    instruction = DEFAULT_INSTRUCTION if args.instruction is None else args.instruction
    problems = read_problems(args.problems, tokenizer, template, instruction, args.think_prefix, args.correct_only)
    resolve_grader(config.grader, organism=False)  # a grader that cannot run fails here, before sampling
    print(f"{len(problems)} problems x {config.samples} samples; loading {args.model}", file=sys.stderr)
    model = load_model(args.model, args.dtype, args.device)
    prompts = hashlib.sha256("\0".join(p.prompt for p in problems).encode("utf-8")).hexdigest()
    key = {"model": str(args.model), "fingerprint": model_fingerprint(model), "problems_sha256": file_sha256(args.problems),
           "prompts_sha256": prompts, "config": vars(config)}
    if config.engine == "vllm":
        del model  # vLLM loads its own copy
        sample = VLLMSampler(model_folder(args.model), args.dtype, tokenizer)
    else:
        sample = partial(sample_hf, model, tokenizer)
    try:
        counts = generate_traces(problems, sample, config, args.out, key, args.overwrite, progress=not args.quiet)
    except KeyboardInterrupt:
        print(f"interrupted: finished batches are in {args.out}; run the same command again to continue", file=sys.stderr)
        return 130
    graded = f"; {counts['correct']} of {counts['graded']} graded correct ({config.grader})" if counts["graded"] else ""
    print(f"wrote {args.out}: {counts['kept']} of {counts['responses']} responses kept{graded}; "
          f"{counts['truncated']} truncated (no EOS within {config.max_new_tokens} tokens: marked, refused by the "
          f"sweep); {counts['no_marker']} finished without exactly one {config.marker!r}", file=sys.stderr)
    return 0


def cmd_rhythm(args) -> int:
    from .layers import parse_layers
    from .preplan_anchor_run import RhythmConfig, run_rhythm

    args.model_name = None
    _default_inputs(args)
    config = RhythmConfig(
        window=args.window, fai_range=tuple(args.fai_range), head_fraction=args.head_fraction,
        head_layers=args.head_layers if args.head_layers in (None, "middle") else parse_layers(args.head_layers, "head_layers"),
        batch_size=args.batch_size, marker=args.marker, skip_invalid=args.skip_invalid,
    )

    def report(lines: list[dict]) -> None:
        header = lines[0]
        print(f"wrote {args.out}: WAAD and FAI of {len(lines) - 1} traces; local heads "
              f"{[tuple(h) for h in header['local_heads']]}, global heads {[tuple(h) for h in header['global_heads']]}",
              file=sys.stderr)

    return _run_in_parts(args, partial(
        run_rhythm, args.model, args.traces, config, out=args.out, heads_from=args.heads_from,
        model_name=args.model_name, max_traces=args.max_traces, dtype=args.dtype, device=args.device,
        progress=not args.quiet,
    ), report)


def cmd_show(args) -> int:
    from .manifest import load_manifest
    from .views import format_table

    print(format_table(load_manifest(args.manifest), rows=args.rows))
    return 0


def cmd_plot(args) -> int:
    from .manifest import load_manifest
    from .views import plot_heatmap

    panels = ("sra", "sra_redundant_after") if args.redundant_after else ("sra",)
    plot_heatmap(load_manifest(args.manifest), args.out, args.top_n, panels)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def cmd_compare(args) -> int:
    from .manifest import load_manifest
    from .views import compare_manifests

    result = compare_manifests(load_manifest(args.a), load_manifest(args.b), args.top_n)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"{result['heads']} heads in common: Spearman {result['spearman']:.3f}, Kendall {result['kendall']:.3f}, "
            f"Pearson {result['pearson']:.3f}; top-{result['top_n']} overlap {result['top_overlap']}/{result['top_n']}"
        )
    return 0


def cmd_validate(args) -> int:
    from .manifest import ManifestError, load_manifest

    try:
        manifest = load_manifest(args.manifest)
    except ManifestError as err:
        print(err, file=sys.stderr)
        return 1
    print(f"{args.manifest}: valid KFH manifest (version {manifest['version']}, {len(manifest['heads'])} heads)")
    return 0


def _model_arguments(parser: argparse.ArgumentParser, required: bool) -> None:
    """``--model`` (a model folder or .gguf file; the embedded organism when optional) and ``--gguf-file``."""
    from .loading import GGUF_FILE_HELP

    default = "" if required else " (default: the embedded organism)"
    parser.add_argument("--model", required=required, help=f"Hugging Face model folder or .gguf file{default}")
    parser.add_argument("--gguf-file", help=GGUF_FILE_HELP)
    if not required:
        from .organism import DEFAULT_ORGANISM, ORGANISMS

        parser.add_argument("--organism", choices=ORGANISMS, help="which embedded organism, with its traces "
                            f"and manifest, to use when --model is not given (default: {DEFAULT_ORGANISM})")


def _manifest_run_arguments(parser: argparse.ArgumentParser, skip_invalid_help: str) -> None:
    """``--dtype``, ``--device``, ``--marker``, ``--skip-invalid``, ``--allow-finetuned`` and ``--quiet`` of a
    command that runs a model with its manifest (``causal``, ``view``)."""
    parser.add_argument("--dtype", default="float32", help="weights dtype: float32, bfloat16, float16")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    parser.add_argument("--marker", default="</think>", help="end-of-thinking marker (default </think>)")
    parser.add_argument("--skip-invalid", action="store_true", help=skip_invalid_help)
    parser.add_argument("--allow-finetuned", action="store_true", help="accept a manifest whose weight fingerprint differs")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _resume_arguments(parser: argparse.ArgumentParser) -> None:
    """``--work-dir`` and ``--keep-parts`` of a command whose finished batches survive an interruption."""
    parser.add_argument("--work-dir", help="where finished batches are kept so an interrupted run resumes "
                        "(default: OUT.parts; removed after the output is written)")
    parser.add_argument("--keep-parts", action="store_true", help="keep the work folder after success")


def build_parser() -> argparse.ArgumentParser:
    from .generate import DEFAULT_INSTRUCTION

    parser = argparse.ArgumentParser(prog="kfh-probe", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"kfh-probe {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    sweep = sub.add_parser("sweep", help="rank every head by Step Ranking Accuracy and write a KFH manifest")
    _model_arguments(sweep, required=False)
    sweep.add_argument("--traces", help="labeled trace JSONL (default: the organism's labeled traces)")
    sweep.add_argument("--out", required=True, help="manifest path (written atomically)")
    sweep.add_argument("--layers", help="layers to probe, e.g. '0-3,8' (default: all)")
    sweep.add_argument("--max-traces", type=int, help="use at most this many traces (in file order)")
    sweep.add_argument("--batch-size", type=int, default=8, help="traces per forward (default 8)")
    sweep.add_argument("--dtype", default="float32", help="weights dtype: float32, bfloat16, float16 (rows are float32)")
    sweep.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    sweep.add_argument("--top-n", type=int, help="recommended heads for training (default: from the ensemble curve)")
    sweep.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    sweep.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default 1000)")
    sweep.add_argument("--permutations", type=int, default=1000,
                       help="draws of the permutation null for heads (step scores shuffled within each trace; default 1000)")
    sweep.add_argument("--marker", default="</think>", help="end-of-thinking marker (default </think>)")
    sweep.add_argument("--backend", default="hf", choices=["hf", "nnsight", "lens"], help="attention capture backend")
    sweep.add_argument("--skip-invalid", action="store_true", help="leave out broken traces (counted in the manifest)")
    _resume_arguments(sweep)
    sweep.add_argument("--quiet", action="store_true", help="no progress bar")
    sweep.set_defaults(func=cmd_sweep)

    causal = sub.add_parser("causal", help="delete the steps the top heads rate highest / lowest, ablate the heads; "
                            "does the model still write the right answer?")
    _model_arguments(causal, required=False)
    causal.add_argument("--traces", help="trace JSONL, labeled or not (default: the organism's labeled traces)")
    causal.add_argument("--manifest", help="KFH manifest of the model (default: the organism's)")
    causal.add_argument("--json", help="write the results here (written atomically)")
    causal.add_argument("--k", type=int, help="steps deleted per trace (default: its essential steps when labeled, "
                        "else --k-fraction of its steps)")
    causal.add_argument("--k-fraction", type=float, default=0.3, help="fraction of an unlabeled trace's steps deleted (default 0.3)")
    causal.add_argument("--top-n", type=int, help="heads to use (default: the manifest's top_n)")
    causal.add_argument("--draws", type=int, default=5, help="random draws of steps (per trace) and of heads (default 5)")
    causal.add_argument("--seed", type=int, default=0)
    causal.add_argument("--batch-size", type=int, default=32,
                        help="sequences per forward (default 32; a labeled trace brings 6 + 2 x draws of them)")
    causal.add_argument("--max-answer-tokens", type=int, help="answer tokens written at most (default: 2 |F| + 16 per trace)")
    causal.add_argument("--max-traces", type=int, help="use at most this many traces (in file order)")
    _manifest_run_arguments(causal, "leave out broken traces (counted in the JSON)")
    causal.set_defaults(func=cmd_causal)

    view = sub.add_parser("view", help="one self-contained HTML page: each trace's steps shaded by the top heads' "
                          "scores, with their labels, per-head scores on hover and a head selector")
    _model_arguments(view, required=False)
    view.add_argument("--traces", help="labeled trace JSONL (default: the organism's labeled traces)")
    view.add_argument("--manifest", help="KFH manifest of the model (default: the organism's)")
    view.add_argument("--out", required=True, help="HTML path (written atomically)")
    view.add_argument("--ids", nargs="+", help="show only the traces with these ids, in this order")
    view.add_argument("--max-traces", type=int, help="show at most this many traces (in file order)")
    view.add_argument("--batch-size", type=int, default=8, help="traces per forward (default 8)")
    _manifest_run_arguments(view, "leave out broken traces")
    view.set_defaults(func=cmd_view)

    gen = sub.add_parser("generate", help="sample traces from a model on a problems file (the sweep's input)",
                         description="Sample K responses per problem and write them in the trace format. Rows: "
                                     '{"id", "problem" or "prompt", "answer"}; "problem" goes through the chat '
                                     'template (or --prompt-template), "prompt" is the exact model input.')
    _model_arguments(gen, required=True)
    gen.add_argument("--problems", required=True, help="problems JSONL")
    gen.add_argument("--out", required=True, help="trace JSONL (rewritten atomically after every batch; resumes)")
    gen.add_argument("--samples", type=int, default=1, help="responses per problem, K (default 1)")
    gen.add_argument("--temperature", type=float, default=0.6, help="sampling temperature; 0: greedy (default 0.6)")
    gen.add_argument("--top-p", type=float, default=0.95, help="nucleus top-p (default 0.95)")
    gen.add_argument("--max-new-tokens", type=int, default=4096, help="response budget; longer responses are "
                     "marked truncated (default 4096)")
    gen.add_argument("--batch-size", type=int, default=8, help="sequences per generate call (default 8)")
    gen.add_argument("--seed", type=int, default=0, help="seed (batch b is sampled with a seed of (seed, b))")
    gen.add_argument("--prompt-template", help="file with $problem: its text is the exact model input (instead "
                     "of the chat template)")
    gen.add_argument("--instruction", help="appended to each problem in the chat template (default: "
                     f"{DEFAULT_INSTRUCTION!r}; '' for none)")
    gen.add_argument("--think-prefix", default="", help="text the response is made to start with, appended to the "
                     "prompt (e.g. '<think>\n'; default none)")
    gen.add_argument("--marker", default="</think>", help="end-of-thinking marker (default </think>)")
    gen.add_argument("--correct-only", action="store_true", help="keep only responses graded correct")
    gen.add_argument("--grader", choices=("math-verify", "exact"), default="math-verify",
                     help="who decides correctness (default math-verify)")
    gen.add_argument("--engine", choices=("hf", "vllm"), default="hf", help="hf: transformers generate (default); "
                     "vllm: vLLM when installed")
    gen.add_argument("--dtype", default="float32", help="float32, bfloat16, float16 (default float32)")
    gen.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    gen.add_argument("--overwrite", action="store_true", help="replace an existing output instead of refusing")
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    gen.set_defaults(func=cmd_generate)

    rhythm = sub.add_parser("rhythm", help="Preplan-and-Anchor signals: WAAD and FAI of every response token")
    _model_arguments(rhythm, required=False)
    rhythm.add_argument("--traces", help="trace JSONL, labels not needed (default: the organism's traces)")
    rhythm.add_argument("--out", required=True, help="rhythm JSONL path (written atomically)")
    rhythm.add_argument("--heads-from", help="reuse the local/global heads of an earlier rhythm file (its header)")
    rhythm.add_argument("--window", type=int, default=10, help="W of WAAD (default 10)")
    rhythm.add_argument("--fai-range", type=int, nargs=2, default=[10, 50], metavar=("LO", "HI"),
                        help="FAI averages rows t in [s + LO, s + HI] (default 10 50)")
    rhythm.add_argument("--head-fraction", type=float, default=0.3, help="share of heads in each set (default 0.3)")
    rhythm.add_argument("--head-layers", help="rank only these layers' heads: a spec like 8-12 or 'middle' (the "
                        "paper's five evenly spaced layers of the middle third); default all layers")
    rhythm.add_argument("--max-traces", type=int, help="use at most this many traces (in file order)")
    rhythm.add_argument("--batch-size", type=int, default=8, help="traces per forward (default 8)")
    rhythm.add_argument("--dtype", default="float32", help="weights dtype (attention rows are float32)")
    rhythm.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    rhythm.add_argument("--marker", default="</think>", help="end-of-thinking marker (default </think>)")
    rhythm.add_argument("--skip-invalid", action="store_true", help="leave out broken traces")
    _resume_arguments(rhythm)
    rhythm.add_argument("--quiet", action="store_true", help="no progress bar")
    rhythm.set_defaults(func=cmd_rhythm)

    show = sub.add_parser("show", help="ranked table of a manifest")
    show.add_argument("manifest")
    show.add_argument("--rows", type=int, default=20)
    show.set_defaults(func=cmd_show)

    plot = sub.add_parser("plot", help="layer x head SRA heatmap (PNG)")
    plot.add_argument("manifest")
    plot.add_argument("--out", required=True)
    plot.add_argument("--top-n", type=int, help="heads to outline (default: the manifest's top_n)")
    plot.add_argument("--redundant-after", action="store_true",
                      help="add a second panel: SRA over only the pairs whose redundant step comes after the essential one")
    plot.set_defaults(func=cmd_plot)

    compare = sub.add_parser("compare", help="rank agreement of two manifests")
    compare.add_argument("a")
    compare.add_argument("b")
    compare.add_argument("--top-n", type=int)
    compare.add_argument("--json", action="store_true")
    compare.set_defaults(func=cmd_compare)

    validate = sub.add_parser("validate", help="check a manifest against the schema")
    validate.add_argument("manifest")
    validate.set_defaults(func=cmd_validate)

    try:
        from .organism.cli import register as register_organism
    except ImportError:
        pass
    else:
        register_organism(sub)
    from .labelers.cli import register as register_labelers

    register_labelers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one ``kfh-probe`` command; a :class:`~kfh_probe.errors.KFHError` ends it with one line and exit code 2."""
    from .loading import model_path

    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "gguf_file", None) is not None:
            args.model = model_path(args.model, args.gguf_file)
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return 130
    except KFHError as err:
        return report_error(f"kfh-probe {args.command}", err, flags=True)


if __name__ == "__main__":
    sys.exit(main())
