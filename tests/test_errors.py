"""One error type: every expected failure is a KFHError that each command line reports as one line with
exit code 2; anything else is a bug and keeps its traceback. Malformed --layers and broken model folders
are refused by name in every command."""

from __future__ import annotations

import json
import shutil

import pytest

from attnpo_train.cli import main as attnpo_main
from kfh_probe.cli import main as kfh_main
from kfh_probe.errors import KFHError
from kfh_probe.io import atomic_write_json
from kfh_probe.layers import check_layers, parse_layers
from kfh_probe.organism import default_manifest_path


def _error_line(capsys, prog: str) -> str:
    """The one line ``PROG: error: ...`` that must end stderr (progress lines may come before it)."""
    err = capsys.readouterr().err
    lines = err.rstrip("\n").split("\n")
    assert lines[-1].startswith(f"{prog}: error: ") and err.count(": error: ") == 1 and "Traceback" not in err, err
    return lines[-1]


def test_every_error_class_is_a_kfh_error_and_keeps_its_builtin_base():
    from attnpo_train.checkpoint import ResumeError
    from attnpo_train.data import DataError
    from kfh_probe.alignment import AlignmentError
    from kfh_probe.backends import BackendNotInstalledError
    from kfh_probe.capture import UnsupportedModelError
    from kfh_probe.generate import OutputExistsError, ProblemFileError
    from kfh_probe.labelers.base import LabelerError
    from kfh_probe.labelers.judge import VerdictError
    from kfh_probe.labelers.judge_client import JudgeUnavailable
    from kfh_probe.loading import ModelFolderError
    from kfh_probe.manifest import ManifestError, ManifestMismatchError
    from kfh_probe.organism.labeler import TraceFormatError
    from kfh_probe.traces import TraceFileError

    value_errors = [VerdictError, TraceFileError, TraceFormatError, AlignmentError, ManifestError, ManifestMismatchError,
                    ProblemFileError, DataError, ResumeError, ModelFolderError]
    runtime_errors = [LabelerError, JudgeUnavailable, BackendNotInstalledError, UnsupportedModelError]
    for cls in value_errors + runtime_errors + [OutputExistsError]:
        assert issubclass(cls, KFHError), cls
    assert all(issubclass(cls, ValueError) for cls in value_errors)
    assert all(issubclass(cls, RuntimeError) for cls in runtime_errors)
    assert issubclass(OutputExistsError, FileExistsError)


@pytest.mark.parametrize("spec, expected", [
    ("0,3,5-7", [0, 3, 5, 6, 7]), ("2", [2]), (" 1 - 1 , 0", [0, 1]), ("3-1", None), ("0-3-5", None),
    ("a", None), ("", None), ("1,,2", None), ("-1", None),
])
def test_layer_spec_is_parsed_or_refused_naming_the_argument(spec, expected):
    if expected is not None:
        assert parse_layers(spec) == expected
        return
    with pytest.raises(KFHError, match=f"^`layers` {spec!r}: "):
        parse_layers(spec)


def test_layers_outside_the_model_are_refused_naming_them():
    assert check_layers(None, 3) == [0, 1, 2]
    assert check_layers([2, 0, 2], 3) == [0, 2]
    with pytest.raises(KFHError, match=r"`layers`: the model has no layer\(s\) \[3, 7\]; it has layers 0\.\.2"):
        check_layers([7, 1, 3], 3)


def test_sweep_names_a_malformed_layer_spec_before_loading_anything(tiny_model_dir, labeled_trace_file, tmp_path, capsys):
    out = tmp_path / "m.json"
    code = kfh_main(["sweep", "--model", str(tiny_model_dir), "--traces", str(labeled_trace_file), "--out", str(out),
                     "--layers", "0-3-5"])
    assert code == 2 and not out.exists()
    assert "--layers '0-3-5': '0-3-5' is not a layer N or a range A-B" in _error_line(capsys, "kfh-probe sweep")


def test_sweep_names_layers_the_model_lacks(tiny_model_dir, labeled_trace_file, tmp_path, capsys):
    out = tmp_path / "m.json"
    code = kfh_main(["sweep", "--model", str(tiny_model_dir), "--traces", str(labeled_trace_file), "--out", str(out),
                     "--layers", "1-4", "--quiet"])
    assert code == 2 and not out.exists()
    assert "--layers: the model has no layer(s) [3, 4]; it has layers 0..2" in _error_line(capsys, "kfh-probe sweep")


CORRUPTIONS = {
    "invalid JSON": ('{"model_type": "qwen2",', "not valid JSON"),
    "no model_type": ('{"hidden_size": 64}', "no 'model_type'"),
    "unknown architecture": ('{"model_type": "no-such-arch"}', "unknown model_type 'no-such-arch'"),
    "not a causal LM": ('{"model_type": "t5"}', "model_type 't5' is not a causal language model"),
}


@pytest.fixture(params=list(CORRUPTIONS))
def corrupt_model_dir(request, tiny_model_dir, tmp_path):
    """A copy of the tiny model folder whose config.json is broken one way; ``(folder, expected message)``."""
    folder = tmp_path / "broken-model"
    shutil.copytree(tiny_model_dir, folder)
    text, message = CORRUPTIONS[request.param]
    (folder / "config.json").write_text(text)
    return folder, message


def _model_commands(model: str, traces: str, tmp_path) -> list[tuple[str, list[str]]]:
    """``(prog, argv)`` of every command that takes a model folder, run on ``model``."""
    out = str(tmp_path / "out")
    problems = tmp_path / "problems.jsonl"
    problems.write_text(json.dumps({"id": "p", "problem": "1 + 1?", "answer": "2"}) + "\n")
    return [
        ("kfh-probe sweep", ["sweep", "--model", model, "--traces", traces, "--out", out]),
        ("kfh-probe causal", ["causal", "--model", model, "--traces", traces, "--manifest", str(default_manifest_path())]),
        ("kfh-probe generate", ["generate", "--model", model, "--problems", str(problems), "--out", out]),
        ("kfh-probe rhythm", ["rhythm", "--model", model, "--traces", traces, "--out", out]),
        ("kfh-probe label", ["label", "--traces", traces, "--labeler", "ablation", "--model", model, "--out", out]),
        ("kfh-probe organism", ["organism", "traces", "--n", "1", "--source", "model", "--model", model, "--out", out]),
        ("kfh-probe organism", ["organism", "report", "--model", model]),
        ("attnpo-train run", ["run", "--model", model, "--data", traces, "--method", "rloo", "--out", out]),
        ("attnpo-train eval", ["eval", "--model", model, "--data", traces]),
    ]


def test_every_model_command_names_a_corrupt_config_json(corrupt_model_dir, labeled_trace_file, tmp_path, capsys):
    folder, message = corrupt_model_dir
    for prog, argv in _model_commands(str(folder), str(labeled_trace_file), tmp_path):
        main = attnpo_main if prog.startswith("attnpo-train") else kfh_main
        assert main(argv) == 2, argv
        line = _error_line(capsys, prog)
        assert f"{folder / 'config.json'}: {message}" in line, (argv, line)
    assert not (tmp_path / "out").exists()


def test_a_folder_without_weights_is_named_not_a_transformers_traceback(tiny_model_dir, labeled_trace_file, tmp_path, capsys):
    folder = tmp_path / "no-weights"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "model.safetensors").unlink()
    assert kfh_main(["sweep", "--model", str(folder), "--traces", str(labeled_trace_file), "--out", str(tmp_path / "m")]) == 2
    assert f"{folder}: transformers cannot load it" in _error_line(capsys, "kfh-probe sweep")


@pytest.mark.parametrize("prog, argv, expected", [
    ("kfh-probe show", ["show", "nope.json"], "manifest not found: nope.json"),
    ("kfh-probe compare", ["compare", "nope.json", "nope.json"], "manifest not found: nope.json"),
    ("kfh-probe sweep", ["sweep", "--traces", "t.jsonl", "--out", "m.json"], "--traces was given without --model"),
    ("kfh-probe sweep", ["sweep", "--out", "m.json", "--bootstrap", "0"], "setting 'bootstrap' must be >= 1; got 0"),
    ("kfh-probe label", ["label", "--traces", "nope.jsonl", "--labeler", "given", "--out", "o.jsonl"],
     "trace file not found: nope.jsonl"),
    ("kfh-probe label", ["label", "--traces", "TRACES", "--labeler", "judge", "--judge", "localhost=m", "--out", "o.jsonl"],
     "--judge 'localhost=m': expected URL=MODEL"),
    ("kfh-probe rhythm", ["rhythm", "--out", "r.jsonl", "--window", "0"], "--window must be >= 1; got 0"),
    ("attnpo-train run", ["run", "--set", "lr"], "--set expects key=value"),
    ("attnpo-train run", ["run", "--set", "no_such_key=1"], "overrides: unknown config key 'no_such_key'"),
    ("attnpo-train eval", ["eval", "--model", "m", "--n", "0"], "--n must be >= 1"),
])
def test_bad_input_ends_every_cli_with_one_line_and_exit_2(prog, argv, expected, labeled_trace_file, tmp_path,
                                                           monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = [str(labeled_trace_file) if a == "TRACES" else a for a in argv]
    main = attnpo_main if prog.startswith("attnpo-train") else kfh_main
    assert main(argv) == 2
    assert expected in _error_line(capsys, prog)
    assert [p.name for p in tmp_path.iterdir()] == [labeled_trace_file.name]  # nothing was written


@pytest.mark.parametrize("error", [RuntimeError("a bug"), KeyError("a bug"), ValueError("a bug")])
def test_a_bug_in_kfh_probe_shows_its_traceback(error, monkeypatch):
    def broken(path):
        raise error

    monkeypatch.setattr("kfh_probe.manifest.load_manifest", broken)
    with pytest.raises(type(error), match="a bug"):
        kfh_main(["show", "any.json"])


@pytest.mark.parametrize("error", [RuntimeError("a bug"), KeyError("a bug"), ValueError("a bug")])
def test_a_bug_in_a_labeller_shows_its_traceback(error, labeled_trace_file, tmp_path, monkeypatch):
    def broken(self, traces):
        raise error

    monkeypatch.setattr("kfh_probe.labelers.rules.GivenLabeler.label", broken)
    out = tmp_path / "o.jsonl"
    with pytest.raises(type(error), match="a bug"):
        kfh_main(["label", "--traces", str(labeled_trace_file), "--labeler", "given", "--out", str(out)])
    assert not out.exists()


@pytest.mark.parametrize("error", [RuntimeError("a bug"), KeyError("a bug"), ValueError("a bug"), FileNotFoundError("a bug")])
def test_a_bug_in_the_trainer_cli_shows_its_traceback(error, tiny_model_dir, labeled_trace_file, monkeypatch):
    def broken(*args, **kwargs):
        raise error

    monkeypatch.setattr("attnpo_train.cli.evaluate", broken)
    with pytest.raises(type(error), match="a bug"):
        attnpo_main(["eval", "--model", str(tiny_model_dir), "--data", str(labeled_trace_file)])


def test_an_output_path_that_cannot_be_written_is_named(tiny_model_dir, labeled_trace_file, tmp_path, capsys):
    folder = tmp_path / "a-folder"
    folder.mkdir()
    code = kfh_main(["sweep", "--model", str(tiny_model_dir), "--traces", str(labeled_trace_file), "--out", str(folder),
                     "--quiet"])
    assert code == 2 and list(folder.iterdir()) == []
    assert f"{folder}: cannot write the output there, it is a folder" in _error_line(capsys, "kfh-probe sweep")
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(KFHError, match="cannot write the output there"):
        atomic_write_json(blocker / "out.json", {})


def test_rhythm_refuses_a_folder_as_output_before_any_work(tiny_model_dir, raw_trace_file, tmp_path, capsys, monkeypatch):
    import kfh_probe.preplan_anchor_run

    monkeypatch.setattr(kfh_probe.preplan_anchor_run, "trace_distances", lambda *a, **k: pytest.fail("the work started"))
    code = kfh_main(["rhythm", "--model", str(tiny_model_dir), "--traces", str(raw_trace_file), "--out", str(tmp_path),
                     "--quiet"])
    assert code == 2
    assert f"{tmp_path}: cannot write the output there, it is a folder" in _error_line(capsys, "kfh-probe rhythm")
