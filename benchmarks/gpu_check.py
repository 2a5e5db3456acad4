"""One check of the real-size path on one GPU, written as one JSON file.

Each part runs as a command of its own, with a time limit; a part that fails or runs out of time is recorded
as failed and the next one runs, and a part whose optional dependency is missing is skipped, saying so:

  capture  ``bench_capture.py`` on DeepSeek-R1-Distill-Qwen-1.5B's full shape (28 layers, bf16 weights, batch 1)
           at T = 4096, 8192, 16384 and 32768: the plain sdpa forward, all-head answer-row capture ("rows") and
           the sweep's own path ("hf": rows summed over the answer, the forward stopped after the last layer's
           attention), time and the allocator's peak memory.
  scoring  ``bench_scoring.py --models r1shape`` on the same shape (28 layers, bf16 autocast over float32 weights,
           gradient checkpointing) at 8192 and 16384 tokens: what fused and unfused scoring add to an update.
  train    ``attnpo-train run`` on the organism for 2 steps on the device, in bf16 with gradient checkpointing.
  sweep    ``kfh-probe sweep`` of the organism on the device in float32 and in bfloat16, each against the shipped
           CPU manifest: the largest |SRA difference| over the heads.
  trl      two steps of ``examples/train_attnpo_trl.py`` (the TRL adapter) on the organism; skipped without trl.

``--tiny`` shrinks every shape (4 layers, a 539-token vocabulary, T = 64 and 128, 128 tokens, 2 x 2 rollouts of 48
tokens, 24 traces, TRL completions of 32 tokens) so that the whole check runs on a CPU in a test
(``--device cpu``); its numbers mean nothing.

JSON (``--out``; format "kfh-gpu-check", version 1)::

    {"format": "kfh-gpu-check", "version": 1, "date": "2026-12-05T09:30:00+00:00", "device": "cuda",
     "device_name": "NVIDIA H100 80GB HBM3", "torch": "2.x", "cuda": "12.x" or null, "transformers": "5.x",
     "tiny": false, "seconds": 412.0,
     "parts": {NAME: {"status": "ok" | "skipped" | "failed", "seconds": 61.2, "reason": "..." (skipped, failed),
                      "result": {...} (ok)}},
     "goals": [{"name": "...", "value": 1.01 or null, "limit": 1.02, "met": true | false | null}]}

Results: capture: ``{"rows": [bench_capture's JSON rows]}`` (``seconds``, ``peak_bytes``, or ``skipped``);
scoring: ``{"8192": bench_scoring's JSON row of r1shape, "16384": ...}`` (``seconds`` per update kind,
``fused_over_tlmre``, ``unfused_over_tlmre``, ``scoring_seconds``, ``peak_gib``); train: the metrics lines;
sweep: ``{"float32": {"max_abs_sra_difference", "heads"}, "bfloat16": ...}``; trl: the logged steps. Goals: the
sweep's capture (hf) at T = 16384 costs at most 1.02x the plain forward's time and 1.05x its peak memory; fused
scoring adds at most 1% to an update at 8192 tokens (``fused_over_tlmre - 1``, synchronised wall time: on a GPU
the trainer's ``time_scoring_s`` is host time, which waits on the forward's kernels). ``met`` is null where
the part did not run. In ``--tiny`` the goals are read at the tiny shape's counterparts (T = 128, 128 tokens).

Run:  python benchmarks/gpu_check.py --out gpu_check.json [--device cuda] [--tiny] [--skip PART ...]
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PARTS = ("capture", "scoring", "train", "sweep", "trl")
FULL = {"layers": 28, "vocab": 151936, "lengths": [4096, 8192, 16384, 32768], "tokens": [8192, 16384],
        "goal_T": 16384, "goal_tokens": 8192, "repeats": 3, "train": [], "sweep": [],
        "trl": ["--num_generations", "4", "--per_device_train_batch_size", "4", "--max_completion_length", "256"]}
TINY = {"layers": 4, "vocab": 539, "lengths": [64, 128], "tokens": [128], "goal_T": 128, "goal_tokens": 128,
        "repeats": 1, "train": ["--set", "prompts_per_step=2", "--set", "group_size=2", "--set", "max_new_tokens=48"],
        "sweep": ["--max-traces", "24", "--bootstrap", "20", "--permutations", "20"],
        "trl": ["--num_generations", "2", "--per_device_train_batch_size", "2", "--max_completion_length", "32"]}
LIMITS_S = {"capture": 240, "scoring": 180, "train": 120, "sweep": 120, "trl": 180}
"""Time limit of each part on a GPU (a tiny check on a CPU gets five times as long)."""


class Skipped(Exception):
    """A part cannot run here (an optional dependency is missing)."""


def run(command: list[str], limit_s: float, cwd: Path = REPO) -> str:
    """Run ``command``; its stdout. Raises RuntimeError with the tail of its output when it fails or times out."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    try:
        done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=limit_s, check=False)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"timed out after {limit_s:.0f} s: {' '.join(command[1:4])} ...") from None
    if done.returncode != 0:
        raise RuntimeError(f"exit {done.returncode}: {(done.stdout + done.stderr)[-1500:]}")
    return done.stdout


def capture_part(args, shape: dict, work: Path, limit_s: float) -> dict:
    out = work / "capture.json"
    run([sys.executable, str(HERE / "bench_capture.py"), "--device", args.device, "--dtype", "bfloat16",
         "--layers", str(shape["layers"]), "--vocab", str(shape["vocab"]), "--batch", "1", "--lengths", *map(str, shape["lengths"]),
         "--repeats", str(shape["repeats"]), "--methods", "plain", "rows", "--backends", "hf", "--json", str(out)], limit_s)
    return {"rows": json.loads(out.read_text())}


def scoring_part(args, shape: dict, work: Path, limit_s: float) -> dict:
    result = {}
    for tokens in shape["tokens"]:
        out = work / f"scoring-{tokens}.json"
        run([sys.executable, str(HERE / "bench_scoring.py"), "--models", "r1shape", "--device", args.device,
             "--dtype", "bfloat16", "--gradient-checkpointing", "--layers", str(shape["layers"]),
             "--vocab", str(shape["vocab"]), "--tokens", str(tokens),
             "--group-size", "2", "--repeats", str(shape["repeats"]), "--json", str(out)], limit_s / len(shape["tokens"]))
        result[str(tokens)] = json.loads(out.read_text())["r1shape"]
    return result


def train_part(args, shape: dict, work: Path, limit_s: float) -> dict:
    out = work / "train"
    run([sys.executable, "-m", "attnpo_train.cli", "run", "--steps", "2", "--device", args.device, "--dtype", "bfloat16",
         "--set", "gradient_checkpointing=true", "--set", "checkpoint_every=2", "--out", str(out), "--no-progress",
         *shape["train"]], limit_s)
    return {"metrics": [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]}


def sweep_part(args, shape: dict, work: Path, limit_s: float) -> dict:
    from kfh_probe.organism import default_manifest_path

    shipped = {(h["layer"], h["head"]): h["sra"] for h in json.loads(default_manifest_path().read_text())["heads"]}
    result = {}
    for dtype in ("float32", "bfloat16"):
        out = work / f"sweep-{dtype}.json"
        run([sys.executable, "-m", "kfh_probe.cli", "sweep", "--device", args.device, "--dtype", dtype, "--out", str(out),
             "--quiet", *shape["sweep"]], limit_s / 2)
        heads = {(h["layer"], h["head"]): h["sra"] for h in json.loads(out.read_text())["heads"]}
        result[dtype] = {"max_abs_sra_difference": max(abs(heads[k] - shipped[k]) for k in shipped), "heads": len(heads)}
    return result


def trl_part(args, shape: dict, work: Path, limit_s: float) -> dict:
    if importlib.util.find_spec("trl") is None:
        raise Skipped("trl is not installed (pip install 'kfh-attnpo[trl]')")
    from kfh_probe.organism import default_manifest_path, default_model_dir
    from kfh_probe.organism.task import generate_problems

    data = work / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p.prompt(), "answer": str(p.answer)}) + "\n"
                            for p in generate_problems(8, 5)))
    out = work / "trl"
    device = ["--bf16", "true"] if args.device.startswith("cuda") else ["--use_cpu", "true"]
    run([sys.executable, str(REPO / "examples" / "train_attnpo_trl.py"), "--model", str(default_model_dir()),
         "--data", str(data), "--attnpo_manifest", str(default_manifest_path()), "--output_dir", str(out),
         "--max_steps", "2", "--logging_steps", "1", "--report_to", "none", "--save_strategy", "no",
         "--attnpo_horizon", "0", "--learning_rate", "1e-4", *device, *shape["trl"]], limit_s)
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return {"steps": [h for h in history if "attnpo/reward" in h]}


RUNNERS: dict[str, Callable] = {"capture": capture_part, "scoring": scoring_part, "train": train_part,
                                "sweep": sweep_part, "trl": trl_part}


def goals(parts: dict, shape: dict) -> list[dict]:
    """The issue's three goals, read off the parts' results (value and met None where a part did not run)."""
    def goal(name: str, limit: float, value: float | None) -> dict:
        return {"name": name, "value": value, "limit": limit, "met": None if value is None else value <= limit}

    capture = parts.get("capture", {}).get("result")
    time_ratio = memory_ratio = None
    if capture is not None:
        at = {row["method"]: row for row in capture["rows"] if row["T"] == shape["goal_T"]}
        if "skipped" not in at["plain"] and "skipped" not in at["hf"]:
            time_ratio = at["hf"]["seconds"] / at["plain"]["seconds"]
            memory_ratio = at["hf"]["peak_bytes"] / at["plain"]["peak_bytes"]
    scoring = parts.get("scoring", {}).get("result")
    added = None if scoring is None else scoring[str(shape["goal_tokens"])]["fused_over_tlmre"] - 1
    T, tokens = shape["goal_T"], shape["goal_tokens"]
    return [goal(f"capture (sweep path) time / plain bf16 forward at T = {T}", 1.02, time_ratio),
            goal(f"capture (sweep path) peak memory / plain bf16 forward at T = {T}", 1.05, memory_ratio),
            goal(f"fused scoring's added share of an update at {tokens} tokens", 0.01, added)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="the JSON file to write")
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu with --tiny")
    parser.add_argument("--tiny", action="store_true", help="shrink every shape: a CPU run of the whole check")
    parser.add_argument("--skip", nargs="+", choices=PARTS, default=[], help="parts not to run (said in the JSON)")
    args = parser.parse_args(argv)
    import torch
    import transformers

    from kfh_probe import atomic_write_json

    shape = TINY if args.tiny else FULL
    scale = 5 if args.tiny else 1
    report = {"format": "kfh-gpu-check", "version": 1,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": args.device, "torch": torch.__version__, "cuda": torch.version.cuda,
              "transformers": transformers.__version__, "tiny": args.tiny, "parts": {}}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        for name in PARTS:
            began = time.perf_counter()
            if name in args.skip:
                entry = {"status": "skipped", "reason": "--skip"}
            else:
                (Path(folder) / name).mkdir()
                try:
                    entry = {"status": "ok", "result": RUNNERS[name](args, shape, Path(folder) / name,
                                                                     LIMITS_S[name] * scale)}
                except Skipped as why:
                    entry = {"status": "skipped", "reason": str(why)}
                except Exception as err:  # a failed part is recorded; the others still run
                    entry = {"status": "failed", "reason": f"{type(err).__name__}: {err}"}
            report["parts"][name] = {**entry, "seconds": round(time.perf_counter() - began, 1)}
            print(f"{name}: {entry['status']} ({report['parts'][name]['seconds']} s)"
                  + (f": {entry['reason'][:300]}" if "reason" in entry else ""), flush=True)
    report["seconds"] = round(time.perf_counter() - start, 1)
    cuda = args.device.startswith("cuda") and torch.cuda.is_available()
    report["device_name"] = torch.cuda.get_device_name(torch.device(args.device)) if cuda else "cpu"
    report["goals"] = goals(report["parts"], shape)
    atomic_write_json(args.out, report)
    for g in report["goals"]:
        value = "-" if g["value"] is None else f"{g['value']:.4f}"
        print(f"goal: {g['name']}: {value} (limit {g['limit']}; met: {g['met']})")
    print(f"wrote {args.out} ({report['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
