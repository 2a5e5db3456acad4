"""Where a model comes from: a Hugging Face folder or a GGUF file, and what a bad --model says."""

from __future__ import annotations

import pytest

from kfh_probe.cli import main
from kfh_probe.errors import InputError
from kfh_probe.loading import ModelFolderError, cache_root, model_folder, model_path


def test_gguf_file_is_joined_to_its_folder(tmp_path):
    assert model_path(str(tmp_path), "m.gguf") == str(tmp_path / "m.gguf")
    assert model_path("any", None) == "any"
    with pytest.raises(InputError, match="needs `model` to be the folder"):
        model_path(str(tmp_path / "nowhere"), "m.gguf")


def test_a_path_that_is_no_model_is_refused_by_name(tmp_path, tiny_model_dir):
    assert model_folder(tiny_model_dir) == tiny_model_dir
    with pytest.raises(ModelFolderError, match="no such file or folder"):
        model_folder(tmp_path / "missing")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelFolderError, match="not a .gguf file"):
        model_folder(tmp_path / "weights.bin")


def test_cache_location_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("KFH_ATTNPO_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    monkeypatch.delenv("KFH_ATTNPO_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache_root() == tmp_path / "x" / "kfh-attnpo"


def test_sweep_with_a_missing_gguf_exits_2_naming_it(tmp_path, labeled_trace_file, capsys):
    code = main(["sweep", "--model", str(tmp_path), "--gguf-file", "absent.gguf", "--traces", str(labeled_trace_file),
                 "--out", str(tmp_path / "m.json")])
    assert code == 2
    assert "absent.gguf is not a Hugging Face model folder or a GGUF file" in capsys.readouterr().err
    assert not (tmp_path / "m.json").exists()
