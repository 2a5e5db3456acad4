"""``attnpo-train``: train a policy with RLOO / TLMRE / AttnPO, and evaluate the result.

    attnpo-train run [--config Y] [--model DIR] [--manifest M] [--data F] [--out DIR] [--method ...]
                     [--steps N] [--resume] [--allow-finetuned] [--device ...] [--dtype ...] [--set key=value ...]
    attnpo-train eval --model DIR [--data F] [--base DIR] [--n N] [--json]
    attnpo-train distill [--teacher DIR --traces F] [--student-config C] [--out DIR] [--steps N] [--resume]
                         [--config Y] [--set key=value ...]

Exit codes: 0 success, 2 bad input (a :class:`~kfh_probe.errors.KFHError`: one line
``attnpo-train CMD: error: ...`` on stderr; any other exception is a bug and shows its traceback),
130 interrupted (a checkpoint of the last completed step is saved first; continue with the same command
and --resume).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from attnpo_train.config import COMPUTE_DTYPES
from attnpo_train.evaluate import efficiency, evaluate
from attnpo_train.strategies import methods, strategy_class
from kfh_probe import DEFAULT_ORGANISM, ORGANISMS, InputError, KFHError, organism_option, report_error

ORGANISM_EVAL_SEED = 7_000_001
"""Seed of the organism problems ``eval`` draws when no --data is given (apart from the build seeds)."""

_EFFICIENCY_HELP = (
    "efficiency = length_reduction + accuracy_change_points / 100, with length_reduction = "
    "(L_base - L) / L_base (mean response tokens) and accuracy_change_points = 100 * (acc - acc_base): "
    "the paper's two headline numbers with equal weight (1 point of accuracy = 1%% of length); "
    "0 for the base itself, > 0 better on balance"
)


def _load_settings(args: argparse.Namespace, cls: type, flags: tuple[str, ...], **extra: object):
    """A checked ``cls`` settings object: the YAML of --config, then ``--set key=value`` pairs, then the named
    ``flags`` that were given and ``extra`` (they win)."""
    from attnpo_train.config import load_config

    if args.config is not None and not Path(args.config).is_file():
        raise InputError(f"--config: no such file {args.config}")
    values: dict[str, object] = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError(f"--set expects key=value, got {item!r}")
        values[key.strip()] = value.strip()
    values.update({name: getattr(args, name) for name in flags if getattr(args, name) is not None})
    return load_config(args.config, {**values, **extra}, cls)


def _run_config(args: argparse.Namespace):
    """The run's TrainConfig with the embedded organism and its files filled in where no path was given."""
    from attnpo_train.config import TrainConfig

    flags = ("model", "manifest", "data", "out", "method", "steps", "device", "dtype")
    config = _load_settings(args, TrainConfig, flags, **({"allow_finetuned": True} if args.allow_finetuned else {}))
    updates: dict[str, object] = {}
    organism = organism_option(args.organism, config.model)
    is_organism = organism is not None
    if is_organism:
        from kfh_probe import built_model_dir

        updates["model"] = str(built_model_dir(organism))
    for need in strategy_class(config.method).files:
        if getattr(config, need.setting) is None and not is_organism:
            raise InputError(f"method {config.method!r} needs the {need.what} of --model: {need.how}")
        updates[need.setting] = need.path(dataclasses.replace(config, **updates))
    if config.data is None and not is_organism:
        raise InputError("--model was given without --data: pass the training prompts with --data F (JSONL with prompt, answer)")
    return dataclasses.replace(config, **updates)


def _train(command: str, config, prepare, train, args: argparse.Namespace) -> dict | None:
    """Refuse --resume without a checkpoint, ``prepare(config)``, then ``train``: its last metrics line ({} for
    none), or None after a Ctrl-C (said on stderr with the checkpoint to resume from)."""
    from attnpo_train.checkpoint import latest_checkpoint

    if args.resume and latest_checkpoint(config.out) is None:
        raise InputError(f"--resume: no checkpoint in {Path(config.out) / 'checkpoints'}")
    inputs = prepare(config)
    try:
        metrics = train(inputs, config, resume=args.resume, progress=not args.no_progress)
    except KeyboardInterrupt:
        saved = latest_checkpoint(config.out)
        where = f"checkpoint {saved}" if saved is not None else "no checkpoint (no step had completed)"
        print(f"attnpo-train {command}: interrupted; {where}; continue with the same command and --resume",
              file=sys.stderr)
        return None
    return metrics[-1] if metrics else {}


def cmd_run(args: argparse.Namespace) -> int:
    from attnpo_train.loop import prepare_run, train

    config = _run_config(args)
    last = _train("run", config, prepare_run, train, args)
    if last is None:
        return 130
    print(
        f"trained {config.steps} steps ({config.method}); last step: reward {last.get('reward_mean', 0):.3f}, "
        f"accuracy {last.get('accuracy', 0):.3f}, tokens {last.get('response_tokens_mean', 0):.1f}; "
        f"metrics in {Path(config.out) / 'metrics.jsonl'}, final model in {Path(config.out) / 'final'}"
    )
    return 0


def _distill_config(args: argparse.Namespace):
    """The run's DistillConfig; without --teacher, the embedded organism (``--organism``) and its shipped traces."""
    from attnpo_train.distill.config import DistillConfig

    config = _load_settings(args, DistillConfig, ("teacher", "traces", "student_config", "out", "steps", "device"))
    organism = organism_option(args.organism, config.teacher)
    if organism is not None:
        from kfh_probe import built_model_dir, default_traces_path

        updates = {"teacher": str(built_model_dir(organism))}
        if config.traces is None:
            updates["traces"] = str(default_traces_path(organism))
        config = dataclasses.replace(config, **updates)
    return config


def cmd_distill(args: argparse.Namespace) -> int:
    from attnpo_train.distill.loop import prepare_distill, train_student

    config = _distill_config(args)
    last = _train("distill", config, prepare_distill, train_student, args)
    if last is None:
        return 130
    transfer = f", transfer {last['transfer']:.4f}" if "transfer" in last else ""
    print(f"distilled {config.steps} steps; last step: cross-entropy {last.get('ce', 0):.4f}{transfer}; "
          f"metrics in {Path(config.out) / 'metrics.jsonl'}, student in {Path(config.out) / 'final'}")
    return 0


def _eval_prompts(args: argparse.Namespace):
    from attnpo_train.data import load_prompts, organism_prompts

    if args.data is None:
        from kfh_probe import task_of

        return organism_prompts(args.n or 100, ORGANISM_EVAL_SEED, task_of(args.model), "organism-eval")
    prompts = load_prompts(args.data)
    return prompts[: args.n] if args.n else prompts


def _evaluations(path: str, prompts, args: argparse.Namespace) -> dict:
    """Greedy, and avg@K when --samples is given, of the model folder ``path``."""
    from kfh_probe import load_model, load_tokenizer, resolve_grader

    model, tokenizer = load_model(path, "float32", args.device), load_tokenizer(path)
    grader = resolve_grader(args.grader, organism=args.data is None)
    common = {"max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size, "marker": args.marker,
              "grader": grader}
    out = {"greedy": evaluate(model, tokenizer, prompts, **common)}
    if args.samples is not None:
        out["sampled"] = evaluate(model, tokenizer, prompts, **common, samples=args.samples,
                                  temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    return out


def cmd_eval(args: argparse.Namespace) -> int:
    for name in ("n", "max_new_tokens", "batch_size", "samples"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if not args.temperature > 0 or not 0 < args.top_p <= 1:
        raise InputError(f"need --temperature > 0 and --top-p in (0, 1]; got {args.temperature}, {args.top_p}")
    prompts = _eval_prompts(args)
    model = _evaluations(args.model, prompts, args)
    report: dict = {"model": args.model, "data": args.data or "organism task", "result": model["greedy"]}
    base = _evaluations(args.base, prompts, args) if args.base is not None else None
    if base is not None:
        report["base"] = base["greedy"]
        report["base_model"] = args.base
        report.update(efficiency(report["result"], report["base"]))
    if "sampled" in model:
        report["sampled"] = {"result": model["sampled"]}
        if base is not None:
            report["sampled"].update(base=base["sampled"], **efficiency(model["sampled"], base["sampled"]))
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    rows = [("model", "greedy", report["result"])] + ([("base", "greedy", report["base"])] if base else [])
    if "sampled" in report:
        label = f"avg@{args.samples}"
        rows += [("model", label, report["sampled"]["result"])] + ([("base", label, report["sampled"]["base"])] if base else [])
    print(f"{'':6} {'eval':>8} {'n':>5} {'accuracy':>9} {'tokens':>8} {'truncated':>10} {'redundant':>10} {'essential':>10}")
    for name, kind, r in rows:
        steps = r.get("steps")
        red, ess = (f"{steps['redundant_steps']:.2f}", f"{steps['essential_steps']:.2f}") if steps else ("-", "-")
        print(f"{name:6} {kind:>8} {r['n']:>5} {r['accuracy']:>9.3f} {r['response_tokens_mean']:>8.1f} "
              f"{r['truncated_frac']:>10.3f} {red:>10} {ess:>10}")
    for kind, scores in (("greedy", report), (f"avg@{args.samples}", report.get("sampled", {}))):
        if "efficiency" in scores:
            aes_text = "undefined (base accuracy 0)" if scores["aes"] is None else f"{scores['aes']:+.3f}"
            print(f"{kind}: length reduction {scores['length_reduction']:+.1%}, accuracy change "
                  f"{scores['accuracy_change_points']:+.1f} points, efficiency {scores['efficiency']:+.3f}, "
                  f"AES (weights 3/5) {aes_text}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from kfh_probe import GGUF_FILE_HELP

    parser = argparse.ArgumentParser(prog="attnpo-train", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser(
        "run",
        help="train a policy (checkpoints, resume, metrics.jsonl, final model in OUT/final)",
        description="Train with a credit strategy (--method: RLOO's 0/1 reward, TLMRE, AttnPO, the Preplan-and-Anchor "
        "strategies, or any registered one). Settings: the YAML of --config, then --set key=value, "
        "then the named flags. Without --model the embedded model organism is trained on its own task, with "
        "its shipped KFH manifest.",
    )
    run.add_argument("--config", help="YAML file of TrainConfig settings")
    run.add_argument("--model", help="policy model folder or .gguf file (default: the embedded model organism)")
    run.add_argument("--organism", choices=ORGANISMS, help="which embedded organism, with its manifest and task, "
                     f"to train when --model is not given (default: {DEFAULT_ORGANISM})")
    run.add_argument("--gguf-file", help=GGUF_FILE_HELP)
    run.add_argument("--manifest", help="KFH manifest (required for attnpo unless the organism is trained)")
    run.add_argument("--data", help="JSONL of {prompt, answer, id?} (default: the organism's task generator)")
    run.add_argument("--out", help="output folder (default: runs/attnpo)")
    run.add_argument("--method", choices=methods(), help="the credit strategy (attnpo_train.strategies)")
    run.add_argument("--steps", type=int)
    run.add_argument("--device", help="cpu, cuda, cuda:1 ...")
    run.add_argument("--dtype", choices=COMPUTE_DTYPES,
                     help="compute dtype: bfloat16/float16 train in mixed precision (autocast; float32 weights unless "
                          "--set weights_dtype=bfloat16); default float32")
    run.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUT")
    run.add_argument("--allow-finetuned", action="store_true",
                     help="accept a manifest whose weight fingerprint differs (the policy is a fine-tune of the probed model)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any TrainConfig setting")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.set_defaults(func=cmd_run)

    ev = sub.add_parser(
        "eval",
        help="greedy and avg@K accuracy, mean response tokens, step accounting, efficiency against a base",
        description="Greedy evaluation, and avg@K over sampled responses with --samples K. On organism "
        "problems, also ground-truth steps per response (essential, redundant by kind, missing). With --base, "
        "also: " + _EFFICIENCY_HELP + "; and AES (O1-Pruner, weights 3 and 5).",
    )
    ev.add_argument("--model", required=True, help="model folder (e.g. OUT/final of a run) or .gguf file")
    ev.add_argument("--gguf-file", help=GGUF_FILE_HELP)
    ev.add_argument("--data", help="JSONL of {prompt, answer, id?} (default: problems of the organism task "
                    "the --model folder was trained on, v4 for a folder that names none)")
    ev.add_argument("--base", help="base model folder to compare with (adds the efficiency score)")
    ev.add_argument("--n", type=int, help="first N prompts of --data (default all; 100 organism problems)")
    ev.add_argument("--max-new-tokens", type=int, default=512)
    ev.add_argument("--batch-size", type=int, default=16)
    ev.add_argument("--marker", default="</think>", help="end-of-thinking marker")
    ev.add_argument("--grader", choices=("auto", "math-verify", "exact"), default="auto",
                    help="correctness: math-verify (symbolic), exact (integers exactly); auto (default): exact on "
                         "the organism's problems, math-verify on --data")
    ev.add_argument("--samples", type=int, help="also evaluate avg@K: K sampled responses per problem")
    ev.add_argument("--temperature", type=float, default=0.6, help="sampling temperature for --samples (0.6)")
    ev.add_argument("--top-p", type=float, default=0.95, help="nucleus top-p for --samples (0.95)")
    ev.add_argument("--seed", type=int, default=0, help="seed of the sampled evaluation")
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.set_defaults(func=cmd_eval)

    di = sub.add_parser(
        "distill",
        help="train a small student on a teacher's traces with attention-guided distillation (checkpoints, resume)",
        description="Attention-guided CoT distillation (docs/method.md, section 10): a student trained from scratch "
        "on the teacher's traces with cross-entropy plus `transfer_weight` times the KL between the teacher's "
        "and the student's stepwise attention on key information, student layers aligned with the teacher's by "
        "a learnable Mixture of Layers (`layer_map`). Settings (attnpo_train/distill/config.py): the YAML of "
        "--config, then --set key=value, then the named flags. Without --teacher: the embedded organism and its "
        "shipped model-sampled traces.",
    )
    di.add_argument("--config", help="YAML file of DistillConfig settings")
    di.add_argument("--teacher", help="teacher model folder (default: the embedded model organism)")
    di.add_argument("--organism", choices=ORGANISMS, help=f"which embedded organism teaches when --teacher is not "
                    f"given (default: {DEFAULT_ORGANISM})")
    di.add_argument("--traces", help="the teacher's traces, JSONL (default: the organism's shipped traces)")
    di.add_argument("--student-config", help="JSON object of model-config fields replacing the teacher's "
                    "(default: 2 layers, hidden 64, 4 heads)")
    di.add_argument("--out", help="output folder (default: runs/distill)")
    di.add_argument("--steps", type=int)
    di.add_argument("--device", help="cpu, cuda, cuda:1 ...")
    di.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUT")
    di.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any DistillConfig setting")
    di.add_argument("--no-progress", action="store_true", help="no progress bar")
    di.set_defaults(func=cmd_distill, gguf_file=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one ``attnpo-train`` command; a :class:`~kfh_probe.errors.KFHError` ends it with one line and exit code 2."""
    from kfh_probe import model_path

    args = build_parser().parse_args(argv)
    try:
        if args.gguf_file is not None:
            args.model = model_path(args.model, args.gguf_file)
        return args.func(args)
    except KFHError as err:
        return report_error(f"attnpo-train {args.command}", err)


if __name__ == "__main__":
    sys.exit(main())
