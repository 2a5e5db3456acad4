"""Trace export and the ``organism`` command line."""

from __future__ import annotations

import argparse
import json

import pytest

from kfh_probe.organism import default_model_dir, default_traces_path
from kfh_probe.cli import main
from kfh_probe.organism.cli import register
from kfh_probe.organism.traces import sample_labeled_traces
from kfh_probe.organism.traces import write_organism_traces


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_teacher_traces_follow_the_design_format(tmp_path):
    path = tmp_path / "t.jsonl"
    assert write_organism_traces(path, 25, seed=1) == 25
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len({r["id"] for r in records}) == 25
    for r in records:
        assert set(r) == {"id", "prompt", "response", "answer", "steps", "labeler"}
        assert r["labeler"] == "organism"  # the labels are the task's ground truth, and the file says so
        assert "".join(s["text"] for s in r["steps"]) == r["response"].split("</think>")[0]
        assert {s["label"] for s in r["steps"]} <= {"essential", "redundant"}
        assert int(r["answer"]) >= 1
    assert [p.name for p in tmp_path.iterdir()] == ["t.jsonl"]


def test_export_is_repeatable_for_a_seed(tmp_path):
    write_organism_traces(tmp_path / "a.jsonl", 10, seed=5)
    write_organism_traces(tmp_path / "b.jsonl", 10, seed=5)
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()


@pytest.mark.slow  # about 13 s: one batch of 125 sampled responses
def test_the_shipped_model_traces_regenerate_through_the_shared_sampler():
    # The shipped file is `organism traces --source model --n 300 --seed 0`; its first sampling batch
    # (125 problems, the organism report's batch size) depends on nothing after it.
    shipped = [json.loads(line) for line in default_traces_path().read_text(encoding="utf-8").splitlines()]
    first_batch = [r for r in shipped if int(r["id"].rsplit("-", 1)[1]) < 125]
    assert 100 < len(first_batch) <= 125
    assert sample_labeled_traces(default_model_dir(), 125, seed=0) == first_batch


def test_unknown_source_is_refused():
    with pytest.raises(ValueError, match="source must be"):
        write_organism_traces("x.jsonl", 1, seed=0, source="oracle")


def test_cli_traces_command_writes_the_file(tmp_path, capsys):
    args = _parse(["organism", "traces", "--n", "3", "--out", str(tmp_path / "o.jsonl"), "--seed", "2"])
    assert args.func(args) == 0
    assert len((tmp_path / "o.jsonl").read_text().splitlines()) == 3
    assert "wrote 3 of 3" in capsys.readouterr().out


def test_cli_rejects_model_folder_for_teacher_traces(tmp_path, capsys):
    assert main(["organism", "traces", "--n", "3", "--out", str(tmp_path / "o.jsonl"), "--model", "m"]) == 2
    assert "--model only applies" in capsys.readouterr().err


def test_cli_report_names_a_missing_model_folder(tmp_path, capsys):
    assert main(["organism", "report", "--model", str(tmp_path / "none")]) == 2
    assert f"{tmp_path / 'none'} is not a Hugging Face model folder" in capsys.readouterr().err


def test_cli_build_defaults_match_the_shipped_build():
    args = _parse(["organism", "build"])
    assert (args.out, args.seed) == (None, 0)
