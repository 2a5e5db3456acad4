"""Do the Key-Focus Heads drift during training? Re-sweep trained policies and compare them with the manifest
they started from.

For every ``OUT/<arm>-seed<s>/final`` of an ``attnpo_vs_tlmre.py`` run folder (the arms given), the sweep is
re-run on the organism's shipped labeled traces with the trained policy, and its ranking compared with the
initial manifest (``kfh_probe.views.compare_manifests``: rank correlations over all heads, overlap of the
initial top-N). Each policy's result is cached in ``OUT/<arm>-seed<s>/resweep.json``.

    python benchmarks/resweep_policies.py --organism v5 --out runs/attnpo_vs_tlmre_v5 \
        --arms tlmre attnpo attnpo_reasoning --json figures/attnpo_vs_tlmre_v5_heads.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def resweep(final: Path, traces: Path, initial: dict) -> dict:
    """The trained policy's best heads and its agreement with ``initial`` (cached next to ``final``)."""
    from kfh_probe.io import atomic_write_json
    from kfh_probe.sweep import run_sweep
    from kfh_probe.views import compare_manifests

    cached = final.parent / "resweep.json"
    if cached.is_file():
        return json.loads(cached.read_text(encoding="utf-8"))
    manifest = run_sweep(final, traces, progress=False, log=None)
    initial_top = [[h["layer"], h["head"]] for h in initial["heads"][: initial["top_n"]]]
    sra = {(h["layer"], h["head"]): h["sra"] for h in manifest["heads"]}
    record = {
        "best_head": [manifest["heads"][0]["layer"], manifest["heads"][0]["head"]],
        "best_sra": manifest["heads"][0]["sra"],
        "initial_top_sra": [sra[tuple(h)] for h in initial_top],
        "top_n": manifest["top_n"],
        "ensemble_sra_at_initial_top_n": manifest["ensemble"][initial["top_n"] - 1]["sra"],
        "compare": compare_manifests(initial, manifest, initial["top_n"]),
    }
    atomic_write_json(cached, record)
    return record


def main() -> None:
    from kfh_probe import DEFAULT_ORGANISM, ORGANISMS
    from kfh_probe.io import atomic_write_json
    from kfh_probe.organism import default_manifest_path, default_traces_path

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--organism", choices=ORGANISMS, default=DEFAULT_ORGANISM)
    parser.add_argument("--out", required=True, help="the attnpo_vs_tlmre.py run folder")
    parser.add_argument("--arms", nargs="+", default=["tlmre", "attnpo"])
    parser.add_argument("--json", required=True)
    args = parser.parse_args()

    started = time.perf_counter()
    initial = json.loads(default_manifest_path(args.organism).read_text(encoding="utf-8"))
    traces = default_traces_path(args.organism)
    initial_top = [[h["layer"], h["head"]] for h in initial["heads"][: initial["top_n"]]]
    result: dict = {"organism": args.organism, "initial": {"top": initial_top, "best_sra": initial["heads"][0]["sra"],
                                                           "top_n": initial["top_n"]}, "arms": {}}
    for arm in args.arms:
        finals = sorted(Path(args.out).glob(f"{arm}-seed*/final"))
        if not finals:
            raise SystemExit(f"{args.out} has no finished {arm} run (no {arm}-seed*/final)")
        runs = {final.parent.name: resweep(final, traces, initial) for final in finals}
        rows = list(runs.values())
        result["arms"][arm] = {
            "runs": runs,
            "best_sra_mean": statistics.fmean(r["best_sra"] for r in rows),
            "spearman_mean": statistics.fmean(r["compare"]["spearman"] for r in rows),
            "top_overlap_mean": statistics.fmean(r["compare"]["top_overlap"] for r in rows),
        }
        print(f"{arm}: {len(rows)} policies; best-head SRA {result['arms'][arm]['best_sra_mean']:.3f} "
              f"(initial {initial['heads'][0]['sra']:.3f}), Spearman with the initial ranking "
              f"{result['arms'][arm]['spearman_mean']:.3f}, initial top-{initial['top_n']} kept "
              f"{result['arms'][arm]['top_overlap_mean']:.1f}", flush=True)
    result["wall_s"] = time.perf_counter() - started
    atomic_write_json(Path(args.json), result)


if __name__ == "__main__":
    main()
