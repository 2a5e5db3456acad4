"""The AttnPO experiment on the embedded organism: does attention-guided credit remove the redundant
steps, and better than a length penalty (TLMRE) and than chance (shuffled scores)?

Arms (all from the shipped organism, same settings, same prompts and random streams per seed):

    rloo      0/1 correctness reward, RLOO baseline (no length penalty: the control for RL itself)
    tlmre     length-penalised reward (TLMRE), uniform advantages
    attnpo    TLMRE + stepwise rescaling by the manifest's Key-Focus Heads (the paper's baseline |F|/|o|)
    attnpo_reasoning   the same with ``baseline: reasoning`` (scores relative to each head's mean over the
              reasoning, against the manifest's calibrated margin)
    shuffled  AttnPO with each response's step scores permuted among its own steps (no attention info)
    oracle    AttnPO with step scores from the ground-truth labels (the ceiling of this rescaling)
    pos_only  AttnPO with Pos-Adv attenuation only
    neg_only  AttnPO with Neg-Adv attenuation only
    preplan   TLMRE with the advantage of the top 40% tokens by WAAD rise times 1.5 where it is >= 0
    anchor    the same on the top 40% tokens by FAI (Preplan-and-Anchor, arXiv 2510.13554)
    coupled   the same on anchors next to a preplan token and those preplan tokens
    preplan_paper, anchor_paper, coupled_paper   the same strategies under the paper's own token rule
              (``rhythm_rule: paper``, docs/method.md section 8); run only when named in --arms

The oracle needs no second arm for the reasoning baseline: its scores are 0 and twice the bar, so both
baselines give it the same multipliers. ``--seeds`` seeds run for every arm but ``FEW_SEED_ARMS``, which
run on the first ``--few-seeds`` of them; seeds 0-2 of every arm run before the later seeds of any.

Every final policy is evaluated on held-out problems greedily, avg@K at temperature 0.6 / top-p 0.95,
and avg@K at temperature 1.0, with ground-truth step accounting; at each of ``--budgets`` training steps
the policy of that step is evaluated too (avg@``--budget-samples`` at temperature 0.6), so an arm that
wins by speed shows. Each budget's evaluation is written to ``OUT/<arm>-seed<s>/budget-<b>.json`` and each
finished run to ``OUT/<arm>-seed<s>/result.json`` at once, so a stopped benchmark resumes where it stopped;
the summary (means over seeds with 95% t intervals, paired differences against tlmre, the budgets block;
``partial`` while runs are missing) goes to ``--json`` and the curves to ``--plot``.

    python benchmarks/attnpo_vs_tlmre.py --steps 40 --lr 2e-4 --workers 2
    python benchmarks/attnpo_vs_tlmre.py --arms tlmre --seeds 0 --lr 5e-4 --json figures/calibration.json

Nothing here is tuned for AttnPO: every arm runs with the same settings (given on the command line).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from seed_runs import cached_run, mean_ci  # this folder is on sys.path when a script here runs

ROOT = Path(__file__).resolve().parent.parent
EVAL_SEED = 9_000_001  # held out: training draws problems from the run seed's own stream
ARMS = {
    "rloo": {"method": "rloo"},
    "tlmre": {"method": "tlmre"},
    "attnpo": {"method": "attnpo"},
    "attnpo_reasoning": {"method": "attnpo", "baseline": "reasoning"},
    "shuffled": {"method": "attnpo", "credit": "shuffled"},
    "oracle": {"method": "attnpo", "credit": "oracle"},
    "pos_only": {"method": "attnpo", "neg_attenuation": False},
    "neg_only": {"method": "attnpo", "pos_attenuation": False},
    "preplan": {"method": "preplan"},
    "anchor": {"method": "anchor"},
    "coupled": {"method": "coupled"},
    "preplan_paper": {"method": "preplan", "rhythm_rule": "paper"},
    "anchor_paper": {"method": "anchor", "rhythm_rule": "paper"},
    "coupled_paper": {"method": "coupled", "rhythm_rule": "paper"},
}
OPTIONAL_ARMS = ("preplan_paper", "anchor_paper", "coupled_paper")  # run only when named in --arms
FEW_SEED_ARMS = ("pos_only", "neg_only", "preplan", "anchor", "coupled", *OPTIONAL_ARMS)
EVALS = {"greedy": (1, None, 1.0), "t0.6": (None, 0.6, 0.95), "t1.0": (None, 1.0, 1.0)}  # samples, T, top-p
REPORTED = ("accuracy", "tokens", "redundant_steps", "essential_steps", "missing_essential", "other", "recheck",
            "restate", "reread", "skipped_reread", "efficiency", "aes")
PAIRED = ("accuracy", "tokens", "redundant_steps", "essential_steps", "missing_essential", "skipped_reread")
CURVES = ("response_tokens_mean", "redundant_steps_per_response", "essential_steps_per_response", "accuracy",
          "pos_precision", "neg_precision", "frac_attenuated", "boundary_redundant_corr")
SAVED_CURVES = (*CURVES, "reward_mean", "mean_gamma", "other_per_response", "recheck_per_response",
                "redundant_in_positive_share", "essential_in_negative_share", "reread_per_response",
                "skipped_reread_per_response",
                "restate_per_response", "missing_essential_per_response", "confused_per_response",
                "summary_per_response", "pos_attenuated_steps", "neg_shielded_steps", "amplified_frac")
"""Per-step metrics kept in the JSON for notebook 02 (the plot shows ``CURVES``)."""


def _eval_prompts(n: int, organism: str):
    from attnpo_train.data import organism_prompts

    return organism_prompts(n, EVAL_SEED, organism, "eval")


def evaluate_dir(model_dir: Path, args, evals: list[str] | None = None, avg_k: int | None = None) -> dict:
    """Evaluations of one model folder: {eval: evaluate(...) result} for ``evals`` (``args.evals`` when None),
    the avg@K ones with K = ``avg_k`` (``args.eval_samples`` when None)."""
    from attnpo_train.evaluate import evaluate
    from kfh_probe.loading import load_model, load_tokenizer

    model, tokenizer = load_model(model_dir), load_tokenizer(model_dir)
    prompts = _eval_prompts(args.eval_n, args.organism)
    out = {}
    for name in evals or args.evals:
        samples, temperature, top_p = EVALS[name]
        out[name] = evaluate(model, tokenizer, prompts, args.max_new_tokens, batch_size=args.eval_batch,
                             samples=samples or avg_k or args.eval_samples, temperature=temperature, top_p=top_p,
                             seed=0)
    return out


def _atomic_json(path: Path, record: dict) -> None:
    from kfh_probe.io import atomic_write_json

    atomic_write_json(path, record)


def run_one(arm: str, seed: int, args) -> dict:
    """Train one arm for one seed and evaluate its final policy; cached in OUT/<arm>-seed<seed>/result.json."""
    import torch

    torch.set_num_threads(args.threads)
    from attnpo_train.config import TrainConfig
    from attnpo_train.loop import prepare_run, train
    from kfh_probe.organism import default_manifest_path, default_model_dir

    out = Path(args.out) / f"{arm}-seed{seed}"
    done = out / "result.json"
    settings = run_settings(args)
    if (record := cached_run(done, settings)) is not None:
        return record
    config = TrainConfig(
        **ARMS[arm], seed=seed, steps=args.steps, prompts_per_step=args.prompts_per_step, group_size=args.group_size,
        max_new_tokens=args.max_new_tokens, lr=args.lr, horizon=args.steps,
        model=str(default_model_dir(args.organism)), manifest=str(default_manifest_path(args.organism)), out=str(out),
        checkpoint_every=math.gcd(args.steps, *args.budgets),
    )
    inputs = prepare_run(config)
    train_s, budgets = 0.0, {}
    for budget in [*args.budgets, args.steps]:  # train up to each budget in turn (a resumed run is the same run)
        cached = out / f"budget-{budget}.json"
        if budget < args.steps and cached.is_file():
            budgets[str(budget)] = json.loads(cached.read_text(encoding="utf-8"))["evals"]
            continue
        begun = time.perf_counter()
        resume = (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir())
        metrics = train(inputs, dataclasses.replace(config, steps=budget), resume=resume, progress=False)
        train_s += time.perf_counter() - begun
        if budget < args.steps:
            budgets[str(budget)] = evaluate_dir(out / "final", args, ["t0.6"], args.budget_samples)
            _atomic_json(cached, {"evals": budgets[str(budget)]})
    evals_start = time.perf_counter()
    evals = evaluate_dir(out / "final", args)
    record = {"arm": arm, "seed": seed, "settings": settings, "evals": evals, "budgets": budgets, "metrics": metrics,
              "train_s": train_s, "eval_s": time.perf_counter() - evals_start}
    _atomic_json(done, record)
    return record


EVAL_SETTINGS = ("organism", "max_new_tokens", "eval_n", "eval_samples", "evals")


def run_settings(args, keys: tuple[str, ...] = ("steps", "lr", "prompts_per_step", "group_size", "budgets",
                                                "budget_samples", *EVAL_SETTINGS)) -> dict:
    """The settings a cached run (or, with ``EVAL_SETTINGS``, the cached base) must share with this
    invocation to be reused."""
    return {k: getattr(args, k) for k in keys}


def base_evals(args) -> dict:
    """The untrained organism's evaluations (cached in OUT/base.json)."""
    import torch

    torch.set_num_threads(args.threads)
    from kfh_probe.organism import default_model_dir

    path = Path(args.out) / "base.json"
    settings = run_settings(args, EVAL_SETTINGS)
    if (record := cached_run(path, settings)) is not None:
        return record["evals"]
    evals = evaluate_dir(default_model_dir(args.organism), args)
    _atomic_json(path, {"settings": settings, "evals": evals})
    return evals


def flat(result: dict, base: dict) -> dict:
    """The reported quantities of one evaluation (``REPORTED``), efficiency scores against ``base``."""
    from attnpo_train.evaluate import efficiency

    steps = result.get("steps", {})
    scores = efficiency(result, base)
    return {"accuracy": result["accuracy"], "tokens": result["response_tokens_mean"],
            **{k: steps.get(k) for k in ("redundant_steps", "essential_steps", "missing_essential", "other",
                                         "recheck", "restate", "reread", "skipped_reread")},
            "efficiency": scores["efficiency"], "aes": scores["aes"]}


def summarise(runs: list[dict], base: dict, arms: list[str]) -> dict:
    """summary[arm][eval][quantity] (mean over seeds), with ``*_ci95`` and ``seeds``."""
    summary: dict = {}
    for arm in arms:
        mine = sorted((r for r in runs if r["arm"] == arm), key=lambda r: r["seed"])
        if not mine:
            continue
        summary[arm] = {}
        for ev in base:
            rows = [flat(r["evals"][ev], base[ev]) for r in mine]
            block: dict = {"seeds": [r["seed"] for r in mine]}
            for key in REPORTED:
                values = [row[key] for row in rows if row[key] is not None]
                if values:
                    block[key], block[f"{key}_ci95"] = mean_ci(values)
            summary[arm][ev] = block
    return summary


def paired(runs: list[dict], base: dict, arms: list[str], against: str = "tlmre") -> dict:
    """paired[arm][eval][quantity]: the per-seed differences arm minus ``against`` (same seed: same prompts
    and random streams), their mean with its 95% t interval, standard deviation and mean / SD, for every arm
    run with ``against``."""
    reference = {r["seed"]: r for r in runs if r["arm"] == against}
    out: dict = {}
    for arm in arms:
        mine = sorted((r for r in runs if r["arm"] == arm and r["seed"] in reference), key=lambda r: r["seed"])
        if arm == against or not mine:
            continue
        out[arm] = {}
        for ev in base:
            block: dict = {"seeds": [r["seed"] for r in mine]}
            for key in PAIRED:
                diffs = [flat(r["evals"][ev], base[ev])[key] - flat(reference[r["seed"]]["evals"][ev], base[ev])[key]
                         for r in mine if flat(r["evals"][ev], base[ev])[key] is not None]
                if len(diffs) < 2:
                    continue
                mean, ci95 = mean_ci(diffs)
                sd = statistics.stdev(diffs)
                block[key] = {"diffs": diffs, "mean": mean, "ci95": ci95, "sd": sd,
                              "mean_over_sd": mean / sd if sd else None}
            out[arm][ev] = block
    return out


def budget_block(runs: list[dict], base: dict, arms: list[str], args) -> dict:
    """budgets[str(step)] = {"summary": ..., "paired_vs_tlmre": ...} of the t0.6 evaluation of the policy after
    each of ``args.budgets`` steps and after all ``args.steps`` (the final policy's avg@K)."""
    block = {}
    for budget in [*args.budgets, args.steps]:
        at = [{**r, "evals": {"t0.6": r["evals"]["t0.6"] if budget == args.steps else r["budgets"][str(budget)]["t0.6"]}}
              for r in runs]
        t06 = {"t0.6": base["t0.6"]}
        block[str(budget)] = {"summary": summarise(at, t06, arms), "paired_vs_tlmre": paired(at, t06, arms)}
    return block


def print_table(summary: dict, base: dict, ev: str) -> None:
    b = flat(base[ev], base[ev])
    print(f"\n{ev}: base accuracy {100 * b['accuracy']:.1f}%, {b['tokens']:.1f} tokens, "
          f"{b['redundant_steps']:.2f} redundant / {b['essential_steps']:.2f} essential steps")
    print("| arm | seeds | accuracy | tokens | redundant steps | other | re-check | restate | essential steps | missing | AES |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for arm, evs in summary.items():
        s = evs[ev]

        def cell(key: str, scale: float = 1.0, fmt: str = ".2f") -> str:
            ci = s.get(f"{key}_ci95")
            text = f"{scale * s[key]:{fmt}}"
            return text + (f" [{scale * ci[0]:{fmt}}, {scale * ci[1]:{fmt}}]" if ci else "")

        print(f"| {arm} | {len(s['seeds'])} | {cell('accuracy', 100, '.1f')}% | {cell('tokens', 1, '.1f')} | "
              f"{cell('redundant_steps')} | {s['other']:.2f} | {s['recheck']:.2f} | {s['restate']:.2f} | "
              f"{cell('essential_steps')} | {s['missing_essential']:.3f} | {cell('aes', 1, '+.3f')} |")


def plot(runs: list[dict], arms: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kfh_probe.io import atomic_write_png

    colours = {"rloo": "tab:gray", "tlmre": "tab:blue", "attnpo": "tab:red", "shuffled": "tab:orange",
               "oracle": "tab:green", "attnpo_reasoning": "darkred", "pos_only": "tab:purple", "neg_only": "tab:brown", "preplan": "tab:pink",
               "anchor": "tab:olive", "coupled": "tab:cyan",
               "preplan_paper": "lightpink", "anchor_paper": "yellowgreen", "coupled_paper": "paleturquoise"}
    titles = {"response_tokens_mean": "rollout tokens", "redundant_steps_per_response": "redundant steps / response",
              "essential_steps_per_response": "essential steps / response", "accuracy": "rollout accuracy",
              "pos_precision": "Pos-Adv precision (attenuated that are redundant)",
              "neg_precision": "Neg-Adv precision (shielded that are essential)",
              "frac_attenuated": "fraction of rated steps attenuated",
              "boundary_redundant_corr": "corr(advantage at step start, step redundant)"}
    fig, axes = plt.subplots(2, 4, figsize=(19, 7.5))
    for ax, key in zip(axes.flat, CURVES):
        for arm in arms:
            mine = [r for r in runs if r["arm"] == arm]
            by_step: dict[int, list[float]] = {}
            for r in mine:
                for m in r["metrics"]:
                    if m.get(key) is not None:
                        by_step.setdefault(m["step"], []).append(m[key])
            if not by_step:
                continue
            steps = sorted(by_step)
            values = [statistics.fmean(by_step[s]) for s in steps]
            if len(steps) >= 5:  # a 5-step running mean: single steps of 64 rollouts are noisy
                values = [statistics.fmean(values[max(0, i - 4):i + 1]) for i in range(len(values))]
            ax.plot(steps, values, color=colours.get(arm), label=f"{arm} (n={len(mine)})", lw=1.6)
        ax.set_title(titles[key], fontsize=10)
        ax.set_xlabel("training step")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("AttnPO experiment on the organism: per-step means over seeds (5-step running mean)", fontsize=11)
    fig.tight_layout()
    atomic_write_png(path, fig)


def main() -> None:
    from kfh_probe import DEFAULT_ORGANISM, ORGANISMS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", nargs="+", default=[a for a in ARMS if a not in OPTIONAL_ARMS], choices=list(ARMS))
    parser.add_argument("--organism", choices=ORGANISMS, default=DEFAULT_ORGANISM, help="the shipped organism trained on")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--few-seeds", type=int, default=2, help="seeds of FEW_SEED_ARMS (the first of --seeds)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--budgets", type=int, nargs="*", default=None,
                        help="earlier training steps whose policy is evaluated too (default: a third and two thirds "
                             "of --steps)")
    parser.add_argument("--budget-samples", type=int, default=4, help="K of the avg@K t0.6 evaluation at a budget")
    parser.add_argument("--lr", type=float, default=2e-4, help="calibrated on TLMRE (docs/results/organism.md)")
    parser.add_argument("--prompts-per-step", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=320)
    parser.add_argument("--eval-n", type=int, default=200)
    parser.add_argument("--eval-samples", type=int, default=8, help="K of the avg@K evaluations")
    parser.add_argument("--eval-batch", type=int, default=200)
    parser.add_argument("--evals", nargs="+", default=list(EVALS), choices=list(EVALS),
                        help="evaluations of every final policy (calibration runs may take t0.6 alone)")
    parser.add_argument("--workers", type=int, default=2, help="runs in parallel (each with --threads threads)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cached-only", action="store_true",
                        help="summarise only the runs already finished in --out; start no training")
    parser.add_argument("--out", default=str(ROOT / "runs" / "attnpo_vs_tlmre"))
    parser.add_argument("--json", default=str(ROOT / "figures" / "attnpo_vs_tlmre.json"))
    parser.add_argument("--plot", default=str(ROOT / "figures" / "attnpo_vs_tlmre.png"))
    args = parser.parse_args()
    if args.budgets is None:
        args.budgets = sorted({args.steps // 3, 2 * args.steps // 3} - {0})
    if any(not 0 < b < args.steps for b in args.budgets) or args.budgets != sorted(set(args.budgets)):
        parser.error(f"--budgets must be increasing steps in [1, {args.steps - 1}]; got {args.budgets}")

    Path(args.out).mkdir(parents=True, exist_ok=True)
    main_arms = [a for a in args.arms if a not in FEW_SEED_ARMS]
    few_arms = [a for a in args.arms if a in FEW_SEED_ARMS]
    jobs = ([(arm, seed) for seed in args.seeds[:3] for arm in main_arms]
            + [(arm, seed) for seed in args.seeds[:args.few_seeds] for arm in few_arms]
            + [(arm, seed) for seed in args.seeds[3:] for arm in main_arms])
    planned = len(jobs)
    if args.cached_only:  # summarise what is finished; a benchmark still running on OUT keeps filling it
        jobs = [(arm, seed) for arm, seed in jobs if (Path(args.out) / f"{arm}-seed{seed}" / "result.json").is_file()]
        if not (Path(args.out) / "base.json").is_file() or not jobs:
            raise SystemExit(f"--cached-only: {args.out} has no base.json or no finished run of these arms and seeds")
        print(f"--cached-only: {len(jobs)} finished runs: {jobs}", flush=True)
    started = time.perf_counter()
    runs: list[dict] = []
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        base_future = pool.submit(base_evals, args)
        futures = {pool.submit(run_one, arm, seed, args): (arm, seed) for arm, seed in jobs}
        base = base_future.result()
        print("base: " + ", ".join(f"{ev} accuracy {r['accuracy']:.3f} tokens {r['response_tokens_mean']:.1f}"
                                    for ev, r in base.items()), flush=True)
        for future, (arm, seed) in futures.items():
            run = future.result()
            ev = run["evals"]["t0.6"]
            print(f"{arm:8s} seed {seed}: t0.6 accuracy {ev['accuracy']:.3f}, tokens {ev['response_tokens_mean']:.1f}, "
                  f"redundant {ev.get('steps', {}).get('redundant_steps', float('nan')):.2f} "
                  f"(train {run['train_s']:.0f} s, eval {run['eval_s']:.0f} s; {time.perf_counter() - started:.0f} s in)",
                  flush=True)
            runs.append(run)
    summary = summarise(runs, base, args.arms)
    for ev in base:
        print_table(summary, base, ev)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "json", "plot")}
    record = {
        "settings": {**settings, "horizon": args.steps, "evals": {k: {"samples": EVALS[k][0] or args.eval_samples,
                                                                       "temperature": EVALS[k][1], "top_p": EVALS[k][2]}
                                                                   for k in args.evals}},
        "base": base,
        "summary": summary,
        "paired_vs_tlmre": paired(runs, base, args.arms),
        "budgets": budget_block(runs, base, args.arms, args),
        "partial": len(runs) < planned,
        "runs_planned": planned,
        "runs": [{"arm": r["arm"], "seed": r["seed"], "evals": r["evals"], "budgets": r["budgets"], "train_s": r["train_s"],
                  "eval_s": r["eval_s"], "curves": {k: [m.get(k) for m in r["metrics"]] for k in SAVED_CURVES},
                  "scoring_share": sum(m["time_scoring_s"] for m in r["metrics"])
                  / sum(m["time_rollout_s"] + m["time_scoring_s"] + m["time_update_s"] for m in r["metrics"])}
                 for r in runs],
        "wall_s": time.perf_counter() - started,
    }
    _atomic_json(Path(args.json), record)
    plot(runs, args.arms, Path(args.plot))
    print(f"wrote {args.json} and {args.plot} ({record['wall_s']:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
