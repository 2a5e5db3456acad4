"""What AttnPO's step scoring (or a rhythm strategy's WAAD/FAI) costs: its update against a TLMRE update on the
same rollouts.

Three updates of the same rollouts, from the group advantages to the gradient left in ``.grad``
(``attnpo_train.loop.accumulate_policy_gradient``), timed in turns, each round in a rotated order, so
that load on the machine hits all three alike:

  tlmre:    uniform per-token advantages (the "tlmre" strategy), then the update;
  unfused:  the credit strategy reading the attention in separate no-grad forwards (``read_separately``, as
            with ``fused_scoring: false``), then the update;
  fused:    the credit strategy reading it off the update's own forward (the default).

The credit strategy is AttnPO's, or with ``--credit preplan|anchor|coupled`` a rhythm strategy's (WAAD and FAI
of the rollouts with a positive advantage). The organism uses its shipped manifest and rhythm file; the
r1shape model the heads (1, 2), (2, 9), (3, 2) and 15 local and 15 global heads (30% of its 48) from a fixed
random ranking, written to temporary files.

Two models:

  organism: the embedded model organism, its manifest's top-N heads and rollouts it samples from its own
            task (8 prompts x G = 8, up to 320 new tokens, temperature 1: the experiment's settings);
            also the time to sample them, for the scoring share of a whole training step (rollout +
            scoring + update). Its ground truth is read as the trainer does on the organism.
  r1shape:  Qwen2 with DeepSeek-R1-Distill-Qwen-1.5B's shape (hidden 1536, 12 query heads, 2 KV heads,
            head dim 128, MLP 8960, vocabulary 151936 unless --vocab) and --layers layers (4 by default, at
            least 4; the 1.5B model has 28), random float32 weights (as ``bench_capture.py``), heads (1, 2),
            (2, 9), (3, 2); G responses of about --tokens tokens each written from the organism's traces
            (reasoning steps repeated to length, a 64-token answer), tokenised with the organism's tokenizer,
            one sequence per micro-batch.

Every update runs as the trainer runs it with ``--dtype`` (``TrainConfig.dtype``: float32, or mixed precision
under autocast with float32 weights) and ``--gradient-checkpointing``; the unfused scoring forward runs in the
weights' float32, as the trainer's does. On a GPU each time is taken after ``torch.cuda.synchronize`` and the
peak memory of each update is the allocator's (``torch.cuda.max_memory_allocated``).

Printed per model: median seconds of each update, the ratios to TLMRE, the scoring time the trainer
logs (``time_scoring_s``: alignment, ground truth, capture and gammas; for unfused also its forward),
and the largest |fused - unfused| per-token advantage. Ratios come from the same run.
Run:  python benchmarks/bench_scoring.py [--models organism r1shape] [--credit attnpo] [--repeats 5] [--tokens 2048]
          [--vocab V] [--layers 28] [--dtype bfloat16] [--gradient-checkpointing] [--group-size G] [--threads N]
          [--device cuda] [--json F]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from attnpo_train.advantages import group_advantages
from attnpo_train.config import TrainConfig
from attnpo_train.data import Prompt, organism_prompts
from attnpo_train.config import COMPUTE_DTYPES
from attnpo_train.loop import accumulate_policy_gradient
from attnpo_train.precision import autocast, enable_checkpointing
from attnpo_train.rewards import rollout_correctness
from attnpo_train.strategies import CreditBatch, read_separately, strategy_class
from attnpo_train.truth import GroundTruth
from kfh_probe.loading import load_model, load_tokenizer
from kfh_probe.manifest import model_record
from kfh_probe.organism import default_model_dir, default_traces_path
from kfh_probe.preplan_anchor import rhythm_header, select_heads
from kfh_probe.sampling import Rollouts, generate_rollouts

from bench_capture import build_model  # noqa: E402  (this folder is on sys.path when a script here runs)

R1_HEADS = [(1, 2), (2, 9), (3, 2)]
ANSWER_TOKENS = 64


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def strategies(config: TrainConfig, model, tokenizer) -> dict:
    """The "tlmre" strategy and ``config.method``'s, attached to ``model``."""
    out = {}
    for kind, method in (("tlmre", "tlmre"), ("credit", config.method)):
        out[kind] = strategy_class(method)(TrainConfig(**{**vars(config), "method": method}), ground_truth=True)
        out[kind].attach(model, tokenizer)
    return out


def organism_case(device: str, seed: int, repeats: int, credit: str, precision: dict) -> dict:
    """The organism with its strategies (its manifest's top-N heads, its rhythm file), 8 x 8 rollouts sampled from
    its task, and the median seconds sampling them took (the same seeded rollouts ``repeats`` times, under autocast
    in ``precision["dtype"]`` as the trainer samples)."""
    path = default_model_dir()
    model, tokenizer = load_model(path, "float32", device), load_tokenizer(path)
    prompts = organism_prompts(8, seed, "v4", "p")
    config = TrainConfig(method=credit, group_size=8, horizon=0, micro_batch_size=8, **precision)
    if config.gradient_checkpointing:
        enable_checkpointing(model)
    seconds = []
    for _ in range(repeats):
        torch.manual_seed(seed)
        _sync(device)
        start = time.perf_counter()
        with autocast(config, model.device):
            rollouts = generate_rollouts(model, tokenizer, [p.text for p in prompts], config.group_size, 320, 1.0)
        _sync(device)
        seconds.append(time.perf_counter() - start)
    texts = [prompts[i // config.group_size].text for i in range(len(rollouts.texts))]
    return dict(model=model, tokenizer=tokenizer, prompts=prompts, rollouts=rollouts, config=config,
                prompt_texts=texts, rollout_s=statistics.median(seconds), **strategies(config, model, tokenizer))


def r1shape_files(model, folder: Path) -> dict[str, str]:
    """A manifest ranking ``R1_HEADS`` first and a rhythm file of 30% of the heads for the R1-shaped model."""
    record = model_record(model, "r1shape")
    layers = model.config.num_hidden_layers
    order = R1_HEADS + [(l, h) for l in range(layers) for h in range(12) if (l, h) not in R1_HEADS]
    heads = [{"layer": l, "head": h, "sra": 0.9 - 0.001 * i, "ci95": [0.0, 1.0], "traces": 2}
             for i, (l, h) in enumerate(order)]
    manifest = {"format": "kfh-manifest", "version": 1, "model": record, "probe": {}, "heads": heads,
                "top_n": len(R1_HEADS), "ensemble": [{"k": 1, "sra": 0.9}]}
    ranking = torch.randperm(layers * 12, generator=torch.Generator().manual_seed(0)).float().view(layers, 12)
    (folder / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    (folder / "rhythm.jsonl").write_text(json.dumps(rhythm_header(select_heads(ranking), 10, (10, 50), record)) + "\n",
                                         encoding="utf-8")
    return {"manifest": str(folder / "manifest.json"), "rhythm": str(folder / "rhythm.jsonl")}


def r1shape_case(device: str, tokens: int, group_size: int, vocab: int, credit: str, folder: Path, layers: int,
                 precision: dict) -> dict:
    """G responses of about ``tokens`` tokens to one organism prompt, for the R1-shaped random model (its strategy
    files written to ``folder``)."""
    tokenizer = load_tokenizer(default_model_dir())
    with open(default_traces_path(), encoding="utf-8") as handle:
        records = [json.loads(line) for line, _ in zip(handle, range(4 * group_size))]
    eos = tokenizer.eos_token_id
    prompt_ids = tokenizer(records[0]["prompt"], add_special_tokens=False)["input_ids"]
    responses, texts = [], []
    for g in range(group_size):
        steps = [s["text"] for r in records[g::group_size] for s in r["steps"]]
        sentence = f"The answer is {records[0]['answer']}. "
        answer = "</think>\n" + sentence * (ANSWER_TOKENS // len(tokenizer(sentence)["input_ids"])) + \
            f"\\boxed{{{records[0]['answer']}}}."
        target = tokens - 32 * g  # different lengths: the length penalty gives every response its own advantage
        reasoning, k = "", 0
        while len(tokenizer(reasoning + answer)["input_ids"]) < target:
            reasoning += steps[k % len(steps)]
            k += 1
        ids = tokenizer(reasoning + answer, add_special_tokens=False)["input_ids"] + [eos]
        responses.append(ids)
        texts.append(tokenizer.decode(ids, skip_special_tokens=True))
    rollouts = Rollouts(group_size, [list(prompt_ids)] * group_size, responses, texts, [True] * group_size)
    model = build_model(vocab, device, layers)
    config = TrainConfig(method=credit, group_size=group_size, horizon=0, micro_batch_size=1,
                         **r1shape_files(model, folder), **precision)
    if config.gradient_checkpointing:
        enable_checkpointing(model)
    return dict(model=model, tokenizer=tokenizer, prompts=[Prompt("p", records[0]["prompt"], records[0]["answer"])],
                rollouts=rollouts, config=config, prompt_texts=None, rollout_s=None,
                **strategies(config, model, tokenizer))


def updates(case: dict, device: str, first: int = 0) -> dict:
    """One timed update of each kind: {kind: (seconds, time_scoring_s, token advantages, peak GiB or None,
    seconds before the update)}."""
    model, tokenizer, rollouts, config = case["model"], case["tokenizer"], case["rollouts"], case["config"]
    pad_id = tokenizer.pad_token_id
    correct = rollout_correctness(rollouts, [p.answer for p in case["prompts"]], config)
    advantages = group_advantages(case["credit"].rewards(correct, rollouts), config.estimator)
    out = {}
    kinds = ("tlmre", "unfused", "fused")
    for kind in kinds[first:] + kinds[:first]:  # rounds rotate the order, so drifting load hits all alike
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        strategy = case["tlmre" if kind == "tlmre" else "credit"]
        _sync(device)
        start = time.perf_counter()
        texts = None if kind == "tlmre" else case["prompt_texts"]
        truth = None if texts is None else GroundTruth.read(texts, rollouts)
        strategy.prepare(CreditBatch(rollouts, correct, advantages, 0, truth))
        if kind == "unfused":
            read_separately(strategy, model, pad_id, config.micro_batch_size)
        before_update = time.perf_counter() - start
        accumulate_policy_gradient(model, None, rollouts, strategy, config, pad_id)
        _sync(device)
        seconds = time.perf_counter() - start
        scoring = 0.0 if kind == "tlmre" else before_update + strategy.seconds
        values = [strategy.handed_out[i] for i in range(len(rollouts.response_ids))]
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
        out[kind] = (seconds, scoring, values, peak, before_update)
        model.zero_grad(set_to_none=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=("organism", "r1shape"), default=["organism", "r1shape"])
    parser.add_argument("--credit", choices=("attnpo", "preplan", "anchor", "coupled"), default="attnpo",
                        help="whose scoring to time: AttnPO's step scores or a rhythm strategy's WAAD/FAI")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (each times all three updates once)")
    parser.add_argument("--tokens", type=int, default=2048, help="response length of the r1shape model")
    parser.add_argument("--group-size", type=int, default=4, help="responses of the r1shape model")
    parser.add_argument("--layers", type=int, default=4,
                        help="decoder layers of the r1shape model, at least 4 (DeepSeek-R1-Distill-Qwen-1.5B: 28)")
    parser.add_argument("--dtype", choices=COMPUTE_DTYPES, default="float32",
                        help="the trainer's compute dtype (bfloat16/float16: autocast, float32 weights)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="the trainer's activation checkpointing")
    parser.add_argument("--vocab", type=int, default=151936,
                        help="vocabulary of the r1shape model (DeepSeek-R1-Distill-Qwen's by default; a smaller one "
                             "makes the update cheaper, so scoring a larger share of it)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", help="also write the results as JSON here")
    args = parser.parse_args()
    if args.layers < 4:
        parser.error("--layers: at least 4 (the r1shape heads sit in layers 1-3)")
    precision = {"dtype": args.dtype, "gradient_checkpointing": args.gradient_checkpointing}
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {}
    folder = tempfile.TemporaryDirectory()
    for name in args.models:
        case = organism_case(args.device, args.seed, args.repeats, args.credit, precision) if name == "organism" else \
            r1shape_case(args.device, args.tokens, args.group_size, args.vocab, args.credit, Path(folder.name),
                         args.layers, precision)
        updates(case, args.device)  # warm-up
        rounds = [updates(case, args.device, r % 3) for r in range(args.repeats)]
        time_s = {k: statistics.median(r[k][0] for r in rounds) for k in ("tlmre", "unfused", "fused")}
        scoring_s = {k: statistics.median(r[k][1] for r in rounds) for k in ("unfused", "fused")}
        fused_before = statistics.median(r["fused"][4] for r in rounds)  # alignment (and ground truth)
        last = rounds[-1]
        diff = max(float((a - b).abs().max()) for a, b in zip(last["fused"][2], last["unfused"][2]))
        lengths = case["rollouts"].response_lengths.float()
        row = {"credit": args.credit, **precision, "responses": len(lengths), "response_tokens_mean": float(lengths.mean()), "seconds": time_s,
               "scoring_seconds": scoring_s, "fused_over_tlmre": time_s["fused"] / time_s["tlmre"],
               "unfused_over_tlmre": time_s["unfused"] / time_s["tlmre"], "max_abs_advantage_diff": diff,
               "fused_scoring_over_tlmre": scoring_s["fused"] / time_s["tlmre"],
               "fused_scoring_before_update_seconds": fused_before,
               "rollout_seconds": case["rollout_s"]}
        if case["rollout_s"] is not None:
            row["scoring_share_of_step"] = {
                k: scoring_s[k] / (case["rollout_s"] + time_s[k]) for k in ("unfused", "fused")}
        if args.device.startswith("cuda"):
            row["peak_gib"] = {k: max(r[k][3] for r in rounds) for k in ("tlmre", "unfused", "fused")}
        results[name] = row
        print(f"{name}: {row['responses']} responses, {row['response_tokens_mean']:.0f} tokens on average; "
              f"median of {args.repeats} on {args.device}; {args.dtype}"
              f"{', gradient checkpointing' if args.gradient_checkpointing else ''}")
        print(f"  update s: tlmre {time_s['tlmre']:.3f} | {args.credit} unfused {time_s['unfused']:.3f} | "
              f"{args.credit} fused {time_s['fused']:.3f}")
        print(f"  {args.credit} / tlmre: unfused {row['unfused_over_tlmre']:.3f} | fused {row['fused_over_tlmre']:.3f}")
        print(f"  time_scoring_s: unfused {scoring_s['unfused']:.4f} | fused {scoring_s['fused']:.4f} "
              f"({scoring_s['fused'] / time_s['tlmre']:.2%} of the TLMRE update; {fused_before:.4f} of it before "
              f"the update: {'which rollouts need signals' if args.credit != 'attnpo' else 'alignment'}"
              f"{' and ground truth' if case['prompt_texts'] else ''})")
        if "scoring_share_of_step" in row:
            share = row["scoring_share_of_step"]
            print(f"  rollout s {case['rollout_s']:.3f}; scoring share of a step: unfused {share['unfused']:.2%} | "
                  f"fused {share['fused']:.2%}")
        if "peak_gib" in row:
            print("  peak GiB: " + " | ".join(f"{k} {v:.2f}" for k, v in row["peak_gib"].items()))
        print(f"  max |fused - unfused| per-token advantage: {diff:.2e}", flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
