"""Checks of the attnpo-train command line: run, resume, refusals with exit code 2, eval and efficiency."""

from __future__ import annotations

import json

import pytest

from attnpo_train.cli import main
from attnpo_train.evaluate import efficiency
from conftest import write_manifest

SMALL = ["--set", "prompts_per_step=1", "--set", "group_size=2", "--set", "max_new_tokens=8", "--no-progress"]


def run(tiny_model_dir, manifest, data, out, *extra):
    return main(["run", "--model", str(tiny_model_dir), "--manifest", str(manifest), "--data", str(data),
                 "--out", str(out), *SMALL, *extra])


def test_run_then_resume_to_more_steps(tiny_model_dir, data_file, tmp_path, capsys):
    manifest = tmp_path / "m.json"
    write_manifest(manifest, tiny_model_dir)
    out = tmp_path / "out"
    assert run(tiny_model_dir, manifest, data_file, out, "--steps", "1") == 0
    assert "trained 1 steps (attnpo)" in capsys.readouterr().out
    assert run(tiny_model_dir, manifest, data_file, out, "--steps", "2", "--resume") == 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["step"] for l in lines] == [1, 2]
    assert (out / "final" / "config.json").is_file() and (out / "checkpoints" / "step-00000002").is_dir()

    assert run(tiny_model_dir, manifest, data_file, out, "--steps", "3", "--resume", "--set", "lr=0.1") == 2
    assert "lr: checkpoint 1e-05, now 0.1" in capsys.readouterr().err


@pytest.mark.parametrize(
    "changes, allow, expected",
    [
        ({"num_heads": 8}, False, "num_heads: manifest 8, model 4"),
        ({"num_heads": 8}, True, "num_heads: manifest 8, model 4"),
        ({"fingerprint": "f" * 64}, False, "weight fingerprint mismatch"),
    ],
)
def test_manifest_mismatch_exits_2_naming_it(changes, allow, expected, tiny_model_dir, data_file, tmp_path, capsys):
    manifest = tmp_path / "m.json"
    write_manifest(manifest, tiny_model_dir, **changes)
    extra = ["--allow-finetuned"] if allow else []
    assert run(tiny_model_dir, manifest, data_file, tmp_path / "out", *extra) == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_allow_finetuned_accepts_a_fingerprint_mismatch(tiny_model_dir, data_file, tmp_path):
    manifest = tmp_path / "m.json"
    write_manifest(manifest, tiny_model_dir, fingerprint="f" * 64)
    assert run(tiny_model_dir, manifest, data_file, tmp_path / "out", "--steps", "1", "--allow-finetuned") == 0


def test_bad_data_rows_exit_2_with_line_numbers(tiny_model_dir, tmp_path, capsys):
    manifest = tmp_path / "m.json"
    write_manifest(manifest, tiny_model_dir)
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "a", "answer": "1"}\n{"prompt": "b"}\n{"prompt": "c", "answer": ""}\n')
    assert run(tiny_model_dir, manifest, data, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "2 row(s) cannot be used" in err and "line 2:" in err and "line 3:" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--set", "bogus=1"], "unknown config key 'bogus'"),
        (["--set", "lr"], "--set expects key=value"),
        (["--set", "group_size=1"], "'group_size' must be >= 2"),
        (["--resume"], "--resume: no checkpoint"),
        (["--config", "missing.yaml"], "--config: no such file"),
    ],
)
def test_bad_settings_exit_2(args, expected, tiny_model_dir, data_file, tmp_path, capsys):
    manifest = tmp_path / "m.json"
    write_manifest(manifest, tiny_model_dir)
    assert run(tiny_model_dir, manifest, data_file, tmp_path / "out", *args) == 2
    assert expected in capsys.readouterr().err


def test_a_user_model_needs_data_and_a_manifest(tiny_model_dir, tmp_path, capsys):
    assert main(["run", "--model", str(tiny_model_dir), "--out", str(tmp_path / "o"), "--method", "tlmre"]) == 2
    assert "--model was given without --data" in capsys.readouterr().err
    assert main(["run", "--model", str(tiny_model_dir), "--data", "x.jsonl", "--out", str(tmp_path / "o")]) == 2
    assert "needs the KFH manifest of --model: pass --manifest" in capsys.readouterr().err


def test_eval_against_itself_has_zero_efficiency(tiny_model_dir, data_file, capsys):
    code = main(["eval", "--model", str(tiny_model_dir), "--data", str(data_file), "--base", str(tiny_model_dir),
                 "--max-new-tokens", "10", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["result"] == report["base"] and report["result"]["n"] == 2
    assert 0 < report["result"]["response_tokens_mean"] <= 10
    assert report["efficiency"] == 0.0 and report["length_reduction"] == 0.0

    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(data_file), "--n", "1",
                 "--max-new-tokens", "6"]) == 0
    table = capsys.readouterr().out
    assert "accuracy" in table and "efficiency" not in table


def test_eval_bad_inputs_exit_2(tiny_model_dir, data_file, tmp_path, capsys):
    assert main(["eval", "--model", str(tmp_path / "nope"), "--data", str(data_file)]) == 2
    assert "is not a Hugging Face model folder or a GGUF file" in capsys.readouterr().err
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(data_file), "--n", "0"]) == 2
    assert "--n must be >= 1" in capsys.readouterr().err


def test_efficiency_formula():
    base = {"accuracy": 0.30, "response_tokens_mean": 1000.0}
    trained = {"accuracy": 0.373, "response_tokens_mean": 390.0}
    result = efficiency(trained, base)
    assert result["length_reduction"] == pytest.approx(0.61)
    assert result["accuracy_change_points"] == pytest.approx(7.3)
    assert result["efficiency"] == pytest.approx(0.683)
    assert efficiency({"accuracy": 0.2, "response_tokens_mean": 1200.0}, base)["efficiency"] == pytest.approx(-0.3)
