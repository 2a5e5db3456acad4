"""Greedy accuracy of the organism by the lengths of its two chains, on and off its task's distribution.

The task always makes the distractor chain shorter than the asked one. This script also asks the
model problems where the distractor chain is as long or longer, to show what the model relies on
to find the asked chain (docs/results/organism.md, "What the model relies on").

    python benchmarks/organism_block_lengths.py --n 100

Prints one row per asked-chain length and one column per distractor-chain length: accuracy (and,
marked with *, the cells the task never draws).
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SEED = 7_000_003


def main(argv: list[str] | None = None) -> int:
    from kfh_probe.loading import load_model, load_tokenizer
    from kfh_probe.organism import default_model_dir
    from kfh_probe.organism.labeler import extract_answer
    from kfh_probe.organism.traces import respond
    from kfh_probe.organism.task import problem_with_blocks

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(default_model_dir()), help="organism folder (default: shipped)")
    parser.add_argument("--n", type=int, default=100, help="problems per cell (default 100)")
    parser.add_argument("--chain", type=int, nargs="+", default=[2, 3, 4], help="asked-chain lengths")
    parser.add_argument("--distract", type=int, nargs="+", default=[1, 2, 3, 4], help="distractor-chain lengths")
    args = parser.parse_args(argv)

    model, tok = load_model(args.model), load_tokenizer(args.model)
    rng = random.Random(SEED)
    print(f"greedy accuracy, {args.n} problems per cell; * = never drawn by the task", flush=True)
    print("asked \\ distractor " + "".join(f"{d:>9}" for d in args.distract))
    for c in args.chain:
        cells = []
        for d in args.distract:
            problems = [problem_with_blocks(rng, c, d) for _ in range(args.n)]
            samples = respond(model, tok, problems, SEED)
            accuracy = sum(extract_answer(s.response) == s.answer for s in samples) / len(samples)
            cells.append(f"{100 * accuracy:7.1f}%{' ' if d < c else '*'}")
        print(f"{c:>19} " + "".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
