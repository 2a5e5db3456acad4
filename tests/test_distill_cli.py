"""``attnpo-train distill`` end to end on the organism at a tiny size: outputs, an exact resume, refusals."""

from __future__ import annotations

import json
import shutil

import pytest

from attnpo_train.cli import main
from attnpo_train.distill.config import DistillConfig
from conftest import write_jsonl
from kfh_probe import default_traces_path, load_model

TINY_STUDENT = {"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
                "num_key_value_heads": 1}


@pytest.fixture(scope="module")
def distill_files(tmp_path_factory):
    """Twelve of the organism's shipped traces and a one-layer student config."""
    folder = tmp_path_factory.mktemp("distill")
    lines = default_traces_path().read_text(encoding="utf-8").splitlines()[:12]
    (folder / "traces.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (folder / "student.json").write_text(json.dumps(TINY_STUDENT), encoding="utf-8")
    return folder


def distill(files, out, *extra):
    return main(["distill", "--traces", str(files / "traces.jsonl"), "--student-config", str(files / "student.json"),
                 "--out", str(out), "--no-progress", "--set", "batch_size=4", "--set", "checkpoint_every=2", *extra])


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_distill_trains_a_student_with_the_transfer_term_and_resumes_exactly(distill_files, tmp_path, capsys):
    out = tmp_path / "full"
    assert distill(distill_files, out, "--steps", "4", "--set", "eval_every=4", "--set", "eval_problems=2",
                   "--set", "max_new_tokens=8") == 0
    assert "distilled 4 steps" in capsys.readouterr().out
    full = metrics(out)
    assert [m["step"] for m in full] == [1, 2, 3, 4]
    weight = DistillConfig().transfer_weight
    assert all(m["transfer"] > 0 and m["loss"] == pytest.approx(m["ce"] + weight * m["transfer"], rel=1e-5) for m in full)
    assert all(sum(row) == pytest.approx(1.0) for m in full for row in m["layer_weights"])
    assert full[-1]["layer_weights"] != [[0.25] * 4]  # learned away from the uniform start
    assert "accuracy_greedy" in full[-1] and "accuracy_greedy" not in full[0]
    student = load_model(out / "final")
    assert student.config.num_hidden_layers == 1 and student.config.hidden_size == 32

    # interrupted after step 2: only that checkpoint is left; the resumed run logs the same lines
    cut = tmp_path / "cut"
    shutil.copytree(out, cut)
    shutil.rmtree(cut / "final")
    shutil.rmtree(cut / "checkpoints" / "step-00000004")
    assert distill(distill_files, cut, "--steps", "4", "--set", "eval_every=4", "--set", "eval_problems=2",
                   "--set", "max_new_tokens=8", "--resume") == 0
    resumed = metrics(cut)
    for a, b in zip(resumed, full, strict=True):
        assert {k: v for k, v in a.items() if k != "time_s"} == {k: v for k, v in b.items() if k != "time_s"}


def test_fixed_map_and_shuffled_control_run(distill_files, tmp_path):
    out = tmp_path / "fixed"
    assert distill(distill_files, out, "--steps", "1", "--set", "layer_map=fixed", "--set", "teacher_signal=shuffled") == 0
    (line,) = metrics(out)
    assert line["transfer"] > 0 and "layer_weights" not in line


def test_cross_entropy_only_reads_no_attention(distill_files, tmp_path):
    out = tmp_path / "ce"
    assert distill(distill_files, out, "--steps", "1", "--set", "transfer_weight=0") == 0
    (line,) = metrics(out)
    assert line["loss"] == line["ce"] and "transfer" not in line


@pytest.mark.parametrize("extra, expected", [
    (["--set", "transfer_weight=0", "--set", "layer_map=fixed"], "setting 'layer_map' must be 'mixture' when transfer_weight is 0"),
    (["--set", "transfer_weight=-1"], "setting 'transfer_weight' must be"),
    (["--set", "layer_map=deepest"], "setting 'layer_map' must be one of"),
    (["--set", "shots=3"], "unknown config key 'shots'"),
])
def test_bad_settings_exit_2_naming_them(extra, expected, distill_files, tmp_path, capsys):
    assert distill(distill_files, tmp_path / "out", "--steps", "1", *extra) == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_traces_outside_the_organism_grammar_are_refused_for_the_transfer_term(tmp_path, distill_files, capsys):
    from conftest import R1_TRACES

    bad = write_jsonl(tmp_path / "r1.jsonl", R1_TRACES)
    assert main(["distill", "--traces", str(bad), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "2 trace(s) cannot be used" in err and "line 1 (id 'sum-1-10')" in err and "transfer_weight 0" in err


def test_a_student_config_field_the_teacher_lacks_is_refused(tmp_path, distill_files, capsys):
    config = tmp_path / "student.json"
    config.write_text(json.dumps({"num_layers": 2}), encoding="utf-8")
    assert main(["distill", "--traces", str(distill_files / "traces.jsonl"), "--student-config", str(config),
                 "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    assert "'num_layers' not a field of the teacher's Qwen2Config" in capsys.readouterr().err


def test_resume_without_a_checkpoint_is_refused(distill_files, tmp_path, capsys):
    assert distill(distill_files, tmp_path / "none", "--steps", "1", "--resume") == 2
    assert "--resume: no checkpoint" in capsys.readouterr().err
