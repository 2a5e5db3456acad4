"""``kfh-probe label-report`` on organism-task traces (a tiny model stands in for the organism)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import tiny_model, write_jsonl
from kfh_probe.cli import main
from kfh_probe.labelers.report import agreement
from kfh_probe.organism.traces import teacher_traces


@pytest.fixture(scope="module")
def organism_like_model_dir(tmp_path_factory, byte_tokenizer):
    """A tiny Qwen2 folder whose vocabulary covers every id the reloaded byte tokenizer gives organism text."""
    path = tmp_path_factory.mktemp("tiny-organism")
    tiny_model("qwen2", vocab_size=len(byte_tokenizer) + 64).save_pretrained(path)
    byte_tokenizer.save_pretrained(path)
    return path


def test_agreement_counts_only_labelled_steps():
    got = agreement([["essential", None, "redundant"]], [["essential", "essential", "essential"]])
    assert (got["essential"], got["redundant"], got["null"], got["accuracy"]) == (1, 1, 1, 0.5)


def test_label_report_prints_one_row_per_labeller_with_truth_rows_perfect(tmp_path, organism_like_model_dir, capsys):
    traces = write_jsonl(tmp_path / "organism.jsonl", teacher_traces(3, seed=2))
    out_md = tmp_path / "report.md"
    code = main(["label-report", "--traces", str(traces), "--model", str(organism_like_model_dir), "--top-fraction", "0.5",
                 "--out-md", str(out_md), "--quiet"])
    table = capsys.readouterr().out
    assert code == 0 and out_md.read_text(encoding="utf-8").strip() == table.strip()
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in table.splitlines() if line.startswith("| ")}
    assert set(rows) >= {"given", "organism", "post-answer", "ablation"}
    for name in ("given", "organism"):
        assert rows[name][1] == "3/3" and rows[name][5:7] == ["1.000", "1.000"]
    assert rows["organism"][7] == rows["given"][7]  # same labels, same top heads


def test_label_report_header_holds_no_absolute_path(tmp_path, organism_like_model_dir, capsys, monkeypatch):
    traces = write_jsonl(tmp_path / "organism.jsonl", teacher_traces(2, seed=3))
    monkeypatch.chdir(tmp_path)
    code = main(["label-report", "--traces", str(traces), "--model", str(organism_like_model_dir), "--labelers", "given",
                 "--quiet"])
    header = capsys.readouterr().out.splitlines()[0]
    assert code == 0
    assert "(organism.jsonl" in header  # under the working directory: relative
    assert f"model {Path(organism_like_model_dir).name}" in header  # elsewhere: its name only
    assert str(tmp_path) not in header and str(organism_like_model_dir) not in header
