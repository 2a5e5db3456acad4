"""The sweep end to end on a tiny model: exact step scores, a complete deterministic manifest, the
commands around it, and refusal of bad input without writing anything."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from conftest import (
    R1_TRACES, check_ranks_write_what_one_writes, interrupting, kfh_probe_cli, tiny_model, with_broken_record,
)

from kfh_probe.alignment import tokenize_trace
from kfh_probe.cli import main
from kfh_probe.io import atomic_write_bytes
from kfh_probe.manifest import (
    ManifestMismatchError, check_model_matches, load_manifest, model_fingerprint, top_heads, validate_manifest,
)
from kfh_probe.sweep import SweepConfig, collect_step_scores


_sweep = functools.partial(kfh_probe_cli, "sweep")


def test_step_scores_equal_the_definition_on_eager_attention(byte_tokenizer):
    model = tiny_model("qwen2", vocab_size=len(byte_tokenizer))
    record = R1_TRACES[1]
    tok = tokenize_trace(byte_tokenizer, record["prompt"], record["response"])
    got = collect_step_scores(model, [tok], SweepConfig(), pad_id=0, progress=False)[0]  # [L, H, K]
    model.set_attn_implementation("eager")
    with torch.no_grad():
        maps = model(input_ids=torch.tensor([tok.input_ids]), output_attentions=True).attentions
    a0, a1 = tok.answer_span
    for layer, attention in enumerate(maps):
        for k, (s0, s1) in enumerate(tok.step_spans):
            expected = attention[0, :, a0:a1, s0:s1].sum(dim=(1, 2)) / (s1 - s0)
            assert torch.allclose(got[layer, :, k], expected, atol=1e-5)


def test_sweep_writes_a_complete_deterministic_manifest(tiny_model_dir, labeled_trace_file, tmp_path):
    out = tmp_path / "m.json"
    assert _sweep(tiny_model_dir, labeled_trace_file, out, "--seed", "3") == 0
    manifest = load_manifest(out)
    assert validate_manifest(manifest) == []
    assert len(manifest["heads"]) == 3 * 4
    sras = [h["sra"] for h in manifest["heads"]]
    assert sras == sorted(sras, reverse=True)
    assert all(h["ci95"][0] <= h["sra"] <= h["ci95"][1] and h["traces"] == 2 for h in manifest["heads"])
    assert [e["k"] for e in manifest["ensemble"]] == list(range(1, 11))
    assert manifest["probe"]["pairs"] == 2 + 4 and manifest["probe"]["traces_skipped"]["count"] == 0
    assert manifest["model"]["num_kv_heads"] == 2 and len(manifest["model"]["fingerprint"]) == 64
    again = tmp_path / "again.json"
    assert _sweep(tiny_model_dir, labeled_trace_file, again, "--seed", "3", "--batch-size", "1") == 0
    assert again.read_bytes() == out.read_bytes()


def test_layers_flag_limits_the_heads(tiny_model_dir, labeled_trace_file, tmp_path):
    out = tmp_path / "m.json"
    assert _sweep(tiny_model_dir, labeled_trace_file, out, "--layers", "1-2") == 0
    manifest = load_manifest(out)
    assert {h["layer"] for h in manifest["heads"]} == {1, 2} and manifest["probe"]["layers"] == [1, 2]


def test_broken_trace_file_fails_before_model_work_and_writes_nothing(tiny_model_dir, labeled_trace_file, tmp_path, capsys):
    broken = with_broken_record(labeled_trace_file, tmp_path)
    out = tmp_path / "m.json"
    assert _sweep(tiny_model_dir, broken, out) == 2
    err = capsys.readouterr().err
    assert f"{broken}:2 (id 'oops')" in err and "marker" in err
    assert not out.exists()
    assert _sweep(tiny_model_dir, broken, out, "--skip-invalid") == 0
    skipped = load_manifest(out)["probe"]["traces_skipped"]
    assert skipped["count"] == 1 and skipped["reasons"][0]["line"] == 2 and skipped["reasons"][0]["id"] == "oops"


def test_unlabeled_traces_are_refused_with_a_hint(tiny_model_dir, tmp_path, capsys):
    path = tmp_path / "raw.jsonl"
    path.write_text(json.dumps(R1_TRACES[0]) + "\n")
    assert _sweep(tiny_model_dir, path, tmp_path / "m.json") == 2
    assert "kfh-probe label" in capsys.readouterr().err


def test_interrupted_sweep_leaves_no_file_and_resumes_to_the_same_manifest(
    tiny_model_dir, labeled_trace_file, tmp_path, monkeypatch
):
    import kfh_probe.step_scorer as sweep_module  # where the sweep turns captured attention into step scores

    reference = tmp_path / "reference.json"
    assert _sweep(tiny_model_dir, labeled_trace_file, reference, "--batch-size", "1") == 0
    assert not (tmp_path / "reference.json.parts").exists()  # the work folder goes once the manifest is written

    real_step_scores, calls = sweep_module.step_scores, []
    monkeypatch.setattr(sweep_module, "step_scores", interrupting(real_step_scores, calls, at=2))
    out = tmp_path / "m.json"
    out.write_text("previous manifest")
    assert _sweep(tiny_model_dir, labeled_trace_file, out, "--batch-size", "1") == 130
    assert out.read_text() == "previous manifest"
    assert len(list((tmp_path / "m.json.parts").glob("scores-*.pt"))) == 1

    calls.clear()
    monkeypatch.setattr(sweep_module, "step_scores", interrupting(real_step_scores, calls, at=None))
    assert _sweep(tiny_model_dir, labeled_trace_file, out, "--batch-size", "1") == 0
    assert len(calls) == 1  # only the trace that was not finished was scored again
    assert out.read_bytes() == reference.read_bytes()


@pytest.mark.slow
def test_two_processes_give_the_same_manifest_as_one(tiny_model_dir, labeled_trace_file, tmp_path):
    check_ranks_write_what_one_writes("sweep", 2, tmp_path, "--model", tiny_model_dir, "--traces", labeled_trace_file,
                                      "--batch-size", "1")


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    target = tmp_path / "file.json"
    target.write_text("old")
    monkeypatch.setattr("os.fsync", lambda fd: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(target, b"new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.json"]


def test_show_plot_compare_validate(tiny_model_dir, labeled_trace_file, tmp_path, capsys):
    out = tmp_path / "m.json"
    assert _sweep(tiny_model_dir, labeled_trace_file, out) == 0
    capsys.readouterr()
    assert main(["show", str(out), "--rows", "5"]) == 0
    table = capsys.readouterr().out
    assert "rank  layer  head" in table and table.count("*") == load_manifest(out)["top_n"]
    png = tmp_path / "heat.png"
    assert main(["plot", str(out), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert main(["compare", str(out), str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["spearman"] == pytest.approx(1.0) and result["top_overlap"] == result["top_n"]
    assert main(["validate", str(out)]) == 0
    broken = json.loads(out.read_text())
    broken["heads"] = broken["heads"][::-1]
    broken["model"]["num_heads"] = 0
    (tmp_path / "bad.json").write_text(json.dumps(broken))
    capsys.readouterr()
    assert main(["validate", str(tmp_path / "bad.json")]) == 1
    err = capsys.readouterr().err
    assert "not sorted by SRA" in err and "num_heads must be a positive integer" in err


def test_manifest_refuses_another_model(tiny_model_dir, labeled_trace_file, tmp_path):
    out = tmp_path / "m.json"
    assert _sweep(tiny_model_dir, labeled_trace_file, out) == 0
    manifest = load_manifest(out)
    assert top_heads(manifest, 2) == [(h["layer"], h["head"]) for h in manifest["heads"][:2]]
    from transformers import AutoModelForCausalLM

    same = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    check_model_matches(manifest, same)
    assert manifest["model"]["fingerprint"] == model_fingerprint(same)
    # The same values in another dtype keep the fingerprint; values rounded to bf16 do not.
    assert model_fingerprint(same.to(torch.float64)) == manifest["model"]["fingerprint"]
    assert model_fingerprint(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)) != manifest["model"]["fingerprint"]
    same.to(torch.float32)
    with torch.no_grad():
        same.lm_head.weight[0, 0] += 1.0
    with pytest.raises(ManifestMismatchError, match="`allow_finetuned`"):
        check_model_matches(manifest, same)
    check_model_matches(manifest, same, allow_finetuned=True)
    other = tiny_model("qwen2", vocab_size=400, num_hidden_layers=2)
    with pytest.raises(ManifestMismatchError, match="num_layers: manifest 3, model 2"):
        check_model_matches(manifest, other, allow_finetuned=True)


@pytest.mark.slow
def test_accelerate_launch_with_two_cpu_processes_gives_the_same_manifest(tiny_model_dir, labeled_trace_file, tmp_path):
    import os
    import subprocess
    import sys

    pytest.importorskip("accelerate", reason="accelerate is not installed (pip install 'kfh-attnpo[trl]')")
    single = tmp_path / "single.json"
    assert _sweep(tiny_model_dir, labeled_trace_file, single, "--batch-size", "1") == 0
    launched = tmp_path / "launched.json"
    # `--cpu` alone starts one process (without an MPI hostfile); `--multi_gpu` starts two through torch.distributed
    done = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "kfh_probe.cli", "sweep", "--model", str(tiny_model_dir),
         "--traces", str(labeled_trace_file), "--out", str(launched), "--batch-size", "1", "--quiet"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "rank 1: my share" in done.stderr, done.stderr[-2000:]
    assert launched.read_bytes() == single.read_bytes()
