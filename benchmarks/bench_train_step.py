"""Training step time of the organism under each precision setting, as ratios to float32 in the same run.

Runs ``attnpo-train``'s loop (``attnpo_train.loop.train``) on the embedded organism for --steps steps under each
setting (float32; bfloat16 autocast; bfloat16 autocast with gradient checkpointing; float16 autocast with loss
scaling; bfloat16 weights), all with the same seed, so they draw the same prompts (the rollouts differ where the
dtype changes sampling). Each setting runs --rounds times, in a rotated order, so that drifting load on the
machine hits all alike; printed: the median over rounds of the mean per-step seconds in rollout, scoring and
update (the metrics' ``time_*_s``), their sum, and the sum's ratio to float32's.

Run:  python benchmarks/bench_train_step.py [--steps 2] [--rounds 2] [--method attnpo] [--prompts 4] [--group-size 4]
          [--max-new-tokens 256] [--settings float32 bfloat16 bfloat16+gc float16 bf16-weights] [--threads N]
          [--device cpu] [--json F]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile

import torch

from attnpo_train.config import TrainConfig
from attnpo_train.loop import TIMING_FIELDS, prepare_run, train
from kfh_probe.organism import default_manifest_path, default_model_dir

SETTINGS = {
    "float32": {},
    "bfloat16": {"dtype": "bfloat16"},
    "bfloat16+gc": {"dtype": "bfloat16", "gradient_checkpointing": True},
    "float16": {"dtype": "float16"},
    "bf16-weights": {"dtype": "bfloat16", "weights_dtype": "bfloat16", "allow_finetuned": True},
}


def step_seconds(args: argparse.Namespace, setting: str, folder: str) -> dict[str, float]:
    """Mean seconds per step of one run of ``setting``: rollout, scoring, update."""
    config = TrainConfig(method=args.method, steps=args.steps, prompts_per_step=args.prompts, group_size=args.group_size,
                         max_new_tokens=args.max_new_tokens, horizon=0, seed=0, device=args.device,
                         model=str(default_model_dir()), manifest=str(default_manifest_path()),
                         out=f"{folder}/{setting}", checkpoint_every=args.steps, **SETTINGS[setting])
    metrics = train(prepare_run(config), config, progress=False)
    return {field: statistics.mean(m[field] for m in metrics) for field in TIMING_FIELDS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--method", default="attnpo")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step")
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="also write the results as JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = ["float32", *(s for s in args.settings if s != "float32")]  # float32 is the ratios' base
    runs: dict[str, list[dict[str, float]]] = {s: [] for s in settings}
    with tempfile.TemporaryDirectory() as folder:
        for r in range(args.rounds):
            order = settings[r % len(settings):] + settings[: r % len(settings)]
            for setting in order:
                runs[setting].append(step_seconds(args, setting, f"{folder}/{r}"))
    results = {}
    for setting, rounds in runs.items():
        row = {field: statistics.median(run[field] for run in rounds) for field in TIMING_FIELDS}
        row["step_s"] = sum(row[field] for field in TIMING_FIELDS)
        results[setting] = row
    base = results["float32"]["step_s"]
    print(f"organism, {args.method}: {args.prompts} prompts x {args.group_size} rollouts of <= {args.max_new_tokens} "
          f"tokens, {args.steps} steps; median of {args.rounds} rounds on {args.device}; seconds per step")
    print(f"{'setting':>13} | {'rollout':>8} {'scoring':>8} {'update':>8} {'step':>8} | {'/ float32':>9}")
    for setting, row in results.items():
        row["over_float32"] = row["step_s"] / base
        print(f"{setting:>13} | {row['time_rollout_s']:8.3f} {row['time_scoring_s']:8.3f} {row['time_update_s']:8.3f} "
              f"{row['step_s']:8.3f} | {row['over_float32']:9.3f}", flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
