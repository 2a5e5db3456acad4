"""The notebooks run top to bottom on the organism (small parameters) and write non-empty figures."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import write_jsonl

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
MIN_PNG_BYTES = 5 * 1024


def run_notebook(name: str, parameters: str) -> None:
    """Execute ``notebooks/<name>`` in a python3 kernel, cwd notebooks/, with its ``parameters`` cell replaced."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{name} must have exactly one cell tagged 'parameters'"
    tagged[0].source = parameters
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    )
    client.execute()


def check_pngs(directory: Path, names: list[str]) -> None:
    for name in names:
        path = directory / name
        assert path.is_file(), f"{name} was not written"
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{name} is not a PNG"
        assert len(data) > MIN_PNG_BYTES, f"{name} is only {len(data)} bytes"


def test_notebooks_have_no_outputs():
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{path.name}: clear the outputs"


@pytest.mark.slow
def test_kfh_heatmaps_notebook(tmp_path):
    run_notebook(
        "01_kfh_heatmaps.ipynb",
        f"N_TRACES = 24\nOUT_DIR = {str(tmp_path)!r}\nTRACES = None\nMODEL = None\nBATCH_SIZE = 8\n"
        "BOOTSTRAP = 50\nEXAMPLE_TRACES = 2\nTEXT_TRACES = 1\nTEXT_TOP_HEADS = 2\nRANDOM_DRAWS = 20\nCAUSAL_TRACES = 2\n"
        "CAUSAL_DRAWS = 2\nSEED = 0",
    )
    check_pngs(tmp_path, ["kfh_sra_heatmap.png", "kfh_step_scores.png", "kfh_attention_text.png",
                          "kfh_ensemble_curve.png", "kfh_vs_random.png", "kfh_causal.png"])


@pytest.mark.slow
def test_attnpo_training_notebook_trains_when_no_metrics(tmp_path):
    run_notebook(
        "02_attnpo_training.ipynb",
        f"METRICS = {{'attnpo': {str(tmp_path / 'missing.jsonl')!r}}}\nBENCHMARK = None\nOUT_DIR = {str(tmp_path)!r}\n"
        "FIGURE_PREFIX = 'attnpo'\nMETHODS = ['tlmre', 'attnpo']\nSTEPS = 2\nPROMPTS_PER_STEP = 2\nGROUP_SIZE = 2\nMAX_NEW_TOKENS = 256\nSEED = 0",
    )
    check_pngs(tmp_path, ["attnpo_training_curves.png", "attnpo_phrase_frequencies.png"])


@pytest.mark.slow
def test_attnpo_training_notebook_reads_metrics_files(tmp_path):
    """Given files (one method with two seeds, one with a single path), it plots them and trains nothing."""
    paths = {}
    for name, seed, slope in [("attnpo", 0, -8.0), ("attnpo", 1, -6.0), ("tlmre", 0, -3.0)]:
        rows = [
            {"step": s, "reward_mean": 0.1 * s, "accuracy": 0.5 + 0.05 * s, "response_tokens_mean": 200 + slope * s,
             "frac_attenuated": 0.02 * s if name == "attnpo" else 0.0, "mean_gamma": 1.0,
             "confused_per_response": 2.0 - 0.1 * s, "summary_per_response": 1.0 + 0.05 * s}
            for s in range(1, 6)
        ]
        path = write_jsonl(tmp_path / f"{name}-{seed}.jsonl", rows)
        paths.setdefault(name, []).append(str(path))
    metrics = {"attnpo": paths["attnpo"], "tlmre": paths["tlmre"][0]}
    out = tmp_path / "figs"
    run_notebook(
        "02_attnpo_training.ipynb",
        f"METRICS = {metrics!r}\nBENCHMARK = None\nOUT_DIR = {str(out)!r}\nFIGURE_PREFIX = 'attnpo'\nMETHODS = []\nSTEPS = 1\nPROMPTS_PER_STEP = 1\n"
        "GROUP_SIZE = 2\nMAX_NEW_TOKENS = 8\nSEED = 0",
    )
    check_pngs(out, ["attnpo_training_curves.png", "attnpo_phrase_frequencies.png"])


@pytest.mark.slow
def test_attnpo_training_notebook_plots_a_benchmark_files_curves_and_step_budgets(tmp_path):
    """A benchmark file (``benchmarks/attnpo_vs_tlmre.py --json``) with a ``budgets`` block: curves and budgets."""
    import json

    curves = {"reward_mean": [0.1, 0.2], "accuracy": [0.5, 0.6], "response_tokens_mean": [150.0, 140.0],
              "confused_per_response": [1.0, 0.9], "summary_per_response": [1.0, 1.1],
              "frac_attenuated": [0.0, 0.1], "boundary_redundant_corr": [-0.1, -0.2]}
    at = {"t0.6": {"accuracy": 0.9, "tokens": 140.0, "redundant_steps": 0.3, "redundant_steps_ci95": [0.2, 0.4],
                   "seeds": [0, 1]}}
    budgets = {str(step): {"summary": {"tlmre": at, "oracle": at}, "paired_vs_tlmre": {}} for step in (10, 20, 30)}
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"runs": [{"arm": arm, "curves": curves} for arm in ("tlmre", "oracle")],
                                 "budgets": budgets}), encoding="utf-8")
    out = tmp_path / "figs"
    run_notebook(
        "02_attnpo_training.ipynb",
        f"METRICS = {{}}\nBENCHMARK = {str(bench)!r}\nOUT_DIR = {str(out)!r}\nFIGURE_PREFIX = 'v5'\nMETHODS = []\n"
        "STEPS = 1\nPROMPTS_PER_STEP = 1\nGROUP_SIZE = 2\nMAX_NEW_TOKENS = 8\nSEED = 0",
    )
    check_pngs(out, ["v5_training_curves.png", "v5_phrase_frequencies.png", "v5_budgets.png"])


@pytest.mark.slow
def test_rhythm_notebook(tmp_path):
    run_notebook(
        "03_rhythm.ipynb",
        f"N_TRACES = 30\nOUT_DIR = {str(tmp_path)!r}\nRHYTHM = None\nTRACES = None\nEXAMPLE = 0\nTOP = 0.4\n"
        "MAX_OFFSET = 40",
    )
    check_pngs(tmp_path, ["rhythm_sawtooth.png", "rhythm_anchor_text.png", "rhythm_vs_steps.png"])
