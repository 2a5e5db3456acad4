"""AttnPO against TLMRE (and GRPO) on the embedded organism: same seeds, same step budget.

For each seed and method it trains the organism with ``attnpo_train.loop.train`` and evaluates the
final policy greedily on held-out organism problems, against the untrained organism (the base). It
prints, per method, the mean and standard deviation over seeds of the length reduction and accuracy
change against the base, the share of step time spent on KFH scoring, and writes a JSON file and a
plot (``figures/attnpo_vs_tlmre.png``).

    python benchmarks/attnpo_vs_tlmre.py --seeds 0 1 2 --steps 40

Nothing here is tuned to make AttnPO win: every method runs with the trainer's defaults plus the
shared settings given on the command line.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EVAL_SEED = 9_000_001  # held out: training draws problems from the run seed's own stream


def _eval_prompts(n: int):
    import random

    from attnpo_train.data import Prompt
    from kfh_probe.organism.task import generate_problem

    rng = random.Random(EVAL_SEED)
    return [Prompt(f"eval-{i}", p.prompt(), str(p.answer)) for i, p in enumerate(generate_problem(rng) for _ in range(n))]


def _evaluate(model_dir: Path, prompts, max_new_tokens: int) -> dict:
    from attnpo_train.evaluate import evaluate
    from kfh_probe.loading import load_model, load_tokenizer

    return evaluate(load_model(model_dir), load_tokenizer(model_dir), prompts, max_new_tokens)


def run_one(method: str, seed: int, args, model_dir: Path, manifest: Path, out_root: Path) -> dict:
    from attnpo_train.config import TrainConfig
    from attnpo_train.loop import prepare_run, train

    config = TrainConfig(
        method=method, seed=seed, steps=args.steps, prompts_per_step=args.prompts_per_step, group_size=args.group_size,
        max_new_tokens=args.max_new_tokens, lr=args.lr, horizon=args.horizon, checkpoint_every=args.steps,
        model=str(model_dir), manifest=str(manifest), out=str(out_root / f"{method}-seed{seed}"),
    )
    metrics = train(prepare_run(config), config, progress=False)
    timing = {k: sum(m[k] for m in metrics) for k in ("time_rollout_s", "time_scoring_s", "time_update_s")}
    return {"method": method, "seed": seed, "metrics": metrics, "timing": timing, "final": Path(config.out) / "final"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=["grpo", "tlmre", "attnpo"])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--prompts-per-step", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=320)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--horizon", type=int, default=None, help="schedule horizon T (default: --steps)")
    parser.add_argument("--eval-n", type=int, default=300)
    parser.add_argument("--out", default=str(ROOT / "runs" / "attnpo_vs_tlmre"))
    parser.add_argument("--json", default=str(ROOT / "figures" / "attnpo_vs_tlmre.json"))
    parser.add_argument("--plot", default=str(ROOT / "figures" / "attnpo_vs_tlmre.png"))
    args = parser.parse_args()
    args.horizon = args.steps if args.horizon is None else args.horizon

    from kfh_probe.io import atomic_write_bytes, atomic_write_json
    from kfh_probe.organism import default_manifest_path, default_model_dir

    model_dir, manifest, out_root = default_model_dir(), default_manifest_path(), Path(args.out)
    prompts = _eval_prompts(args.eval_n)
    base = _evaluate(model_dir, prompts, args.max_new_tokens)
    print(f"base: accuracy {base['accuracy']:.3f}, mean tokens {base['response_tokens_mean']:.1f}", flush=True)
    runs = []
    for seed in args.seeds:
        for method in args.methods:
            start = time.perf_counter()
            run = run_one(method, seed, args, model_dir, manifest, out_root)
            run["eval"] = _evaluate(run["final"], prompts, args.max_new_tokens)
            ev = run["eval"]
            print(f"{method:7s} seed {seed}: accuracy {ev['accuracy']:.3f}, mean tokens {ev['response_tokens_mean']:.1f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
            runs.append(run)

    summary = {}
    for method in args.methods:
        mine = [r for r in runs if r["method"] == method]
        reductions = [1 - r["eval"]["response_tokens_mean"] / base["response_tokens_mean"] for r in mine]
        changes = [100 * (r["eval"]["accuracy"] - base["accuracy"]) for r in mine]
        scoring = sum(r["timing"]["time_scoring_s"] for r in mine) / sum(sum(r["timing"].values()) for r in mine)
        spread = statistics.stdev if len(mine) > 1 else (lambda values: 0.0)
        summary[method] = {
            "length_reduction_mean": statistics.mean(reductions), "length_reduction_std": spread(reductions),
            "accuracy_change_points_mean": statistics.mean(changes), "accuracy_change_points_std": spread(changes),
            "accuracy_mean": statistics.mean(r["eval"]["accuracy"] for r in mine),
            "tokens_mean": statistics.mean(r["eval"]["response_tokens_mean"] for r in mine),
            "scoring_share_of_step_time": scoring,
        }
    print(f"\nbase: accuracy {100 * base['accuracy']:.1f}%, {base['response_tokens_mean']:.1f} tokens; "
          f"{len(args.seeds)} seeds x {args.steps} steps x {args.prompts_per_step} prompts x G={args.group_size}")
    print("| method | accuracy | tokens | length reduction vs base | accuracy change vs base (points) | KFH scoring share of step time |")
    print("|---|---|---|---|---|---|")
    for method, s in summary.items():
        print(f"| {method} | {100 * s['accuracy_mean']:.1f}% | {s['tokens_mean']:.1f} | "
              f"{100 * s['length_reduction_mean']:.1f}% ± {100 * s['length_reduction_std']:.1f} | "
              f"{s['accuracy_change_points_mean']:+.1f} ± {s['accuracy_change_points_std']:.1f} | "
              f"{100 * s['scoring_share_of_step_time']:.1f}% |")

    settings = {k: v for k, v in vars(args).items() if k not in ("out", "json", "plot")}
    record = {"settings": settings, "base": base, "summary": summary,
              "runs": [{k: (str(v) if k == "final" else v) for k, v in r.items()} for r in runs]}
    atomic_write_json(args.json, record)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    colours = {"grpo": "tab:gray", "tlmre": "tab:blue", "attnpo": "tab:red"}
    for method in args.methods:
        mine = [r for r in runs if r["method"] == method]
        for k, r in enumerate(mine):
            steps = [m["step"] for m in r["metrics"]]
            left.plot(steps, [m["response_tokens_mean"] for m in r["metrics"]], color=colours.get(method), alpha=0.7,
                      label=method if k == 0 else None)
        right.scatter([100 * (1 - r["eval"]["response_tokens_mean"] / base["response_tokens_mean"]) for r in mine],
                      [100 * (r["eval"]["accuracy"] - base["accuracy"]) for r in mine], color=colours.get(method), label=method)
    left.set_xlabel("training step")
    left.set_ylabel("mean response tokens (rollouts)")
    left.legend()
    right.axhline(0, color="black", lw=0.5)
    right.set_xlabel("length reduction vs base (%)")
    right.set_ylabel("accuracy change vs base (points)")
    right.set_title("held-out greedy evaluation, one point per seed", fontsize=9)
    right.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    atomic_write_bytes(args.plot, buffer.getvalue())
    print(f"wrote {args.json} and {args.plot}", file=sys.stderr)


if __name__ == "__main__":
    main()
