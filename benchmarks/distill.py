"""Attention-guided CoT distillation on the embedded organism, against its ground truth: does a small student
learn more, or sooner, when it also learns the teacher's stepwise attention on key information, and does it
inherit Key-Focus Heads?

The teacher is the shipped organism (v4). Students (2 layers, hidden 64, 4 heads: ``STUDENT_PRESET``) are
trained from scratch by ``attnpo_train.distill`` on ``--train-traces`` traces sampled from the teacher
(``kfh-probe organism traces --source model``, seed ``TRAIN_SEED``; cached in ``OUT/train_traces.jsonl``).
Arms, each for every seed, with the same traces, steps and settings:

    ce        cross-entropy only (transfer_weight 0)
    mol       + attention transfer, student layers aligned by the learnable Mixture of Layers
    fixed     + attention transfer, fixed layer map (the ablation)
    shuffled  + attention transfer with each trace's teacher steps permuted (the control), Mixture of Layers

Reported per run: greedy accuracy and avg@K accuracy at temperature 1.0 on ``--eval-n`` held-out problems;
greedy accuracy on ``--curve-problems`` problems every ``--eval-every`` steps (sample efficiency); the SRA of
the student's best head (``kfh_probe.run_sweep``) on the organism's shipped, ground-truth-labeled,
model-sampled traces, which no student trains on. Each finished run is written to
``OUT/<arm>-seed<s>/result.json`` at once (a stopped benchmark resumes, a run cut mid-training resumes from
its checkpoint), and the summary to ``--json`` after every run, marked ``"partial"`` until all are done;
the curves and end points are drawn to ``--plot`` at the end (``--plot-only`` draws them from ``--json``).

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/distill.py
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

from seed_runs import cached_run, mean_ci  # this folder is on sys.path when a script here runs

ROOT = Path(__file__).resolve().parent.parent
TRAIN_SEED = 1  # the shipped traces are seed 0: training traces are another draw
EVAL_SEED = 9_000_001  # held out: apart from the build seeds and the curve problems
ARMS = {
    "ce": {"transfer_weight": 0.0},
    "mol": {"layer_map": "mixture"},
    "fixed": {"layer_map": "fixed"},
    "shuffled": {"layer_map": "mixture", "teacher_signal": "shuffled"},
}
REPORTED = ("accuracy_greedy", "accuracy_t1", "best_head_sra")
RUN_KEYS = ("arm", "seed", *REPORTED, "best_head", "best_head_ci95", "best_head_null_p95", "curve", "final_ce",
            "final_transfer", "layer_weights", "train_s", "eval_s")
"""What ``--json`` keeps of each run (the run's own result.json has the full evaluations)."""


def train_traces(args) -> Path:
    """The training traces, sampled from the teacher once (cached)."""
    from kfh_probe.organism.traces import write_organism_traces

    path = Path(args.out) / "train_traces.jsonl"
    if not path.is_file():
        written = write_organism_traces(path, args.train_traces, TRAIN_SEED, source="model")
        print(f"sampled {written} training traces from the teacher into {path}", flush=True)
    return path


def settings_of(args) -> dict:
    """What a cached run must share with this invocation to be reused."""
    keys = ("steps", "batch_size", "lr", "transfer_weight", "train_traces", "eval_n", "eval_samples", "eval_every",
            "curve_problems", "max_new_tokens")
    return {k: getattr(args, k) for k in keys}


def evaluate_student(model_dir: Path, args) -> dict:
    """Greedy and avg@K (T 1.0) accuracy on held-out problems, and the best head's SRA on the shipped traces."""
    from attnpo_train.data import organism_prompts
    from attnpo_train.evaluate import evaluate
    from kfh_probe import SweepConfig, default_traces_path, load_model, load_tokenizer, run_sweep
    model, tokenizer = load_model(model_dir), load_tokenizer(model_dir)
    prompts = organism_prompts(args.eval_n, EVAL_SEED, "v4", "eval")
    common = {"batch_size": 100, "grader": "exact"}
    greedy = evaluate(model, tokenizer, prompts, args.max_new_tokens, **common)
    sampled = evaluate(model, tokenizer, prompts, args.max_new_tokens, samples=args.eval_samples, temperature=1.0,
                       top_p=1.0, seed=0, **common)
    manifest = run_sweep(model_dir, default_traces_path(), SweepConfig(bootstrap=200, permutations=200),
                         progress=False, log=None)
    best = manifest["heads"][0]
    return {"accuracy_greedy": greedy["accuracy"], "accuracy_t1": sampled["accuracy"],
            "best_head_sra": best["sra"], "best_head": [best["layer"], best["head"]], "best_head_ci95": best["ci95"],
            "best_head_null_p95": manifest["baselines"]["permutation_null"]["best_head_sra_p95"],
            "greedy": greedy, "t1": sampled, "sra_baselines": manifest["baselines"]}


def run_one(arm: str, seed: int, inputs, args) -> dict:
    """Train one arm for one seed and evaluate the student; cached in OUT/<arm>-seed<seed>/result.json."""
    from attnpo_train.distill.config import DistillConfig
    from attnpo_train.distill.loop import train_student
    from kfh_probe import atomic_write_json

    out = Path(args.out) / f"{arm}-seed{seed}"
    done = out / "result.json"
    settings = settings_of(args)
    if (record := cached_run(done, settings)) is not None:
        return record
    arm_settings = {"transfer_weight": args.transfer_weight, **ARMS[arm]}
    config = DistillConfig(**arm_settings, seed=seed, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                           eval_every=args.eval_every, eval_problems=args.curve_problems,
                           max_new_tokens=args.max_new_tokens, checkpoint_every=args.eval_every, out=str(out))
    run_inputs = inputs if config.transfer_weight > 0 else dataclasses.replace(inputs, teacher_mass=None)
    start = time.perf_counter()
    resume = (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir())
    metrics = train_student(run_inputs, config, resume=resume, progress=False)
    train_s = time.perf_counter() - start
    evals = evaluate_student(out / "final", args)
    record = {"arm": arm, "seed": seed, "settings": settings, "config": dataclasses.asdict(config), **evals,
              "curve": [{"step": m["step"], "accuracy_greedy": m["accuracy_greedy"]}
                        for m in metrics if "accuracy_greedy" in m],
              "final_ce": statistics.fmean(m["ce"] for m in metrics[-20:]),
              "final_transfer": (statistics.fmean(m["transfer"] for m in metrics[-20:])
                                 if "transfer" in metrics[-1] else None),
              "layer_weights": metrics[-1].get("layer_weights"),
              "train_s": train_s, "eval_s": time.perf_counter() - start - train_s}
    atomic_write_json(done, record)
    return record


def summarise(runs: list[dict], arms: list[str]) -> dict:
    """summary[arm]: each of ``REPORTED`` (mean over seeds) with ``*_ci95``, ``seeds``, and the mean accuracy
    curve ``curve`` ([[step, mean greedy accuracy]])."""
    summary: dict = {}
    for arm in arms:
        mine = sorted((r for r in runs if r["arm"] == arm), key=lambda r: r["seed"])
        if not mine:
            continue
        block: dict = {"seeds": [r["seed"] for r in mine]}
        for key in REPORTED:
            block[key], block[f"{key}_ci95"] = mean_ci([r[key] for r in mine])
        steps = [point["step"] for point in mine[0]["curve"]]
        block["curve"] = [[s, statistics.fmean(r["curve"][i]["accuracy_greedy"] for r in mine)]
                          for i, s in enumerate(steps)]
        summary[arm] = block
    return summary


def write_summary(runs: list[dict], args, jobs: list, started: float) -> None:
    from kfh_probe import atomic_write_json

    settings = {k: v for k, v in vars(args).items() if k not in ("out", "json", "plot", "plot_only")}
    record = {
        "partial": len(runs) < len(jobs),
        "settings": {**settings, "train_seed": TRAIN_SEED, "eval_seed": EVAL_SEED, "arms": {a: ARMS[a] for a in args.arms}},
        "summary": summarise(runs, args.arms),
        "runs": [{k: r[k] for k in RUN_KEYS} for r in runs],
        "wall_s": time.perf_counter() - started,
    }
    atomic_write_json(Path(args.json), record)


def plot(record: dict, path: Path) -> None:
    """Greedy accuracy against training steps (each seed thin, the mean thick) and the three end points per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kfh_probe.io import atomic_write_png

    colours = {"ce": "tab:gray", "mol": "tab:red", "fixed": "tab:blue", "shuffled": "tab:orange"}
    summary = record["summary"]
    fig, (curve, bars) = plt.subplots(1, 2, figsize=(12, 4.2))
    for arm, block in summary.items():
        for run in (r for r in record["runs"] if r["arm"] == arm):
            curve.plot([p["step"] for p in run["curve"]], [p["accuracy_greedy"] for p in run["curve"]],
                       color=colours[arm], lw=0.6, alpha=0.5)
        curve.plot(*zip(*block["curve"]), color=colours[arm], lw=2, label=f"{arm} (n={len(block['seeds'])})")
    curve.set_xlabel("training step")
    curve.set_ylabel("greedy accuracy (curve problems)")
    curve.legend(fontsize=8)
    width = 0.8 / max(1, len(summary))
    for i, (arm, block) in enumerate(summary.items()):
        xs = [k + (i - (len(summary) - 1) / 2) * width for k in range(len(REPORTED))]
        means = [block[key] for key in REPORTED]
        errors = [[m - (block[f"{key}_ci95"] or [m, m])[0] for key, m in zip(REPORTED, means)],
                  [(block[f"{key}_ci95"] or [m, m])[1] - m for key, m in zip(REPORTED, means)]]
        bars.bar(xs, means, width, yerr=errors, color=colours[arm], label=arm, capsize=2)
    bars.set_xticks(range(len(REPORTED)), ["greedy accuracy", "avg@K accuracy, T 1.0", "best-head SRA"])
    bars.legend(fontsize=8)
    fig.suptitle("Attention-guided distillation on the organism: means over seeds, 95% t intervals", fontsize=11)
    fig.tight_layout()
    atomic_write_png(path, fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--transfer-weight", type=float, default=10.0, help="lambda of every transfer arm")
    parser.add_argument("--train-traces", type=int, default=2000, help="traces sampled from the teacher to train on")
    parser.add_argument("--eval-n", type=int, default=200)
    parser.add_argument("--eval-samples", type=int, default=4, help="K of avg@K at temperature 1.0")
    parser.add_argument("--eval-every", type=int, default=150, help="steps between points of the accuracy curve")
    parser.add_argument("--curve-problems", type=int, default=100)
    parser.add_argument("--max-new-tokens", type=int, default=320)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "runs" / "distill"))
    parser.add_argument("--json", default=str(ROOT / "figures" / "distill.json"))
    parser.add_argument("--plot", default=str(ROOT / "figures" / "distill.png"))
    parser.add_argument("--plot-only", action="store_true", help="draw --plot from --json (as far as it goes); train nothing")
    args = parser.parse_args()
    if args.plot_only:
        plot(json.loads(Path(args.json).read_text(encoding="utf-8")), Path(args.plot))
        return

    import torch

    from attnpo_train.distill.config import DistillConfig
    from attnpo_train.distill.loop import prepare_distill

    torch.set_num_threads(args.threads)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    traces = train_traces(args)
    inputs = prepare_distill(DistillConfig(traces=str(traces), transfer_weight=args.transfer_weight or 10.0))
    print(f"teacher signal on {len(inputs.traces)} traces ready ({time.perf_counter() - started:.0f} s in)", flush=True)
    jobs = [(arm, seed) for seed in args.seeds for arm in args.arms]  # seed by seed: a partial result has whole seeds
    runs: list[dict] = []
    for arm, seed in jobs:
        run = run_one(arm, seed, inputs, args)
        runs.append(run)
        write_summary(runs, args, jobs, started)
        print(f"{arm:8s} seed {seed}: greedy {run['accuracy_greedy']:.3f}, t1 {run['accuracy_t1']:.3f}, best-head SRA "
              f"{run['best_head_sra']:.3f} (train {run['train_s']:.0f} s, eval {run['eval_s']:.0f} s; "
              f"{time.perf_counter() - started:.0f} s in)", flush=True)
    plot(json.loads(Path(args.json).read_text(encoding="utf-8")), Path(args.plot))
    print(f"wrote {args.json} and {args.plot} ({time.perf_counter() - started:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
