"""The public probe API (``kfh_probe.run_sweep``, ``StepScorer``, ``top_heads``, ``manifest_segmenter``) and
the truthful provenance of a manifest: who labelled, where the steps came from, how many traces got EOS
appended; and the trainers that segment with the manifest's segmenter and warn when it did not cut the steps."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import R1_TRACES, labeled, tiny_model

import kfh_probe
from attnpo_train import loop
from attnpo_train.config import TrainConfig
from attnpo_train.strategies.attnpo import align_steps
from kfh_probe.sampling import Rollouts
from kfh_probe import (
    SegmenterConfig, StepScorer, SweepConfig, align_generated, load_manifest, manifest_segmenter, run_sweep,
    tokenize_trace, top_heads,
)
from kfh_probe.alignment import collate
from kfh_probe.capture import capture_answer_attention
from kfh_probe.cli import main
from kfh_probe.manifest import validate_manifest
from kfh_probe.scoring import step_scores

HEADS = [(2, 1), (1, 3), (2, 0)]
SHIPPED = Path(kfh_probe.__file__).parent / "data" / "organism_manifest.json"
V1 = Path(__file__).resolve().parent / "data" / "organism_manifest_v1.json"


def _write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def _sweep(model_dir, traces) -> dict:
    return run_sweep(model_dir, traces, SweepConfig(bootstrap=20, permutations=20), progress=False, log=None)


def _former_trainer_scores(model, traces, heads, pad_id, batch_size) -> list[torch.Tensor]:
    """What ``attnpo_train.credit.kfh_step_scores`` computed before ``StepScorer`` replaced it (the reference)."""
    layers = sorted({layer for layer, _ in heads})
    scores = []
    with torch.no_grad():
        for start in range(0, len(traces), batch_size):
            chunk = traces[start : start + batch_size]
            batch = collate(chunk, pad_id)
            captured = capture_answer_attention(model, batch.input_ids, batch.attention_mask, batch.answer_mask,
                                                layers=layers)
            picked = torch.stack([captured.values[:, captured.layers.index(l), h] for l, h in heads], dim=1)
            for b, trace in enumerate(chunk):
                scores.append(step_scores(picked[b, :, : trace.length].float().cpu(), trace.step_spans).mean(dim=0))
    return scores


# --- the API ------------------------------------------------------------------------------------------


def test_every_public_name_resolves():
    assert all(getattr(kfh_probe, name) is not None for name in kfh_probe.__all__)
    with pytest.raises(AttributeError, match="no attribute 'sweep_internals'"):
        kfh_probe.sweep_internals  # noqa: B018


def test_run_sweep_writes_the_bytes_of_the_cli_and_returns_that_manifest(tiny_model_dir, labeled_trace_file, tmp_path):
    from_cli, from_api = tmp_path / "cli.json", tmp_path / "api.json"
    assert main(["sweep", "--model", str(tiny_model_dir), "--traces", str(labeled_trace_file), "--out", str(from_cli),
                 "--batch-size", "1", "--quiet"]) == 0
    manifest = run_sweep(tiny_model_dir, labeled_trace_file, SweepConfig(batch_size=1), out=from_api, progress=False,
                         log=None)
    assert from_api.read_bytes() == from_cli.read_bytes()
    assert manifest == json.loads(from_cli.read_text(encoding="utf-8"))
    assert not (tmp_path / "api.json.parts").exists()
    in_memory = run_sweep(tiny_model_dir, labeled_trace_file, SweepConfig(batch_size=2), progress=False, log=None)
    assert in_memory == manifest  # batch size changes nothing; without out nothing is written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["api.json", "cli.json", "traces.jsonl"]


@pytest.mark.parametrize("batch_size", [1, 2])
def test_head_scores_equal_the_trainers_former_scores_on_hf(batch_size, byte_tokenizer):
    model = tiny_model("qwen2", vocab_size=len(byte_tokenizer)).eval()
    traces = [tokenize_trace(byte_tokenizer, r["prompt"], r["response"]) for r in R1_TRACES]
    got = StepScorer(model, 0).head_scores(traces, HEADS, batch_size)
    expected = _former_trainer_scores(model, traces, HEADS, 0, batch_size)
    assert [g.shape for g in got] == [e.shape for e in expected] == [(len(t.step_spans),) for t in traces]
    assert all(torch.equal(g, e) for g, e in zip(got, expected))
    assert min(float(e.max()) for e in expected) > 0.01  # real attention, not zeros


def test_head_scores_on_nnsight_equal_the_trainers_former_scores(byte_tokenizer):
    pytest.importorskip("nnsight", reason="the 'nnsight' backend's package is not installed")
    model = tiny_model("qwen2", vocab_size=len(byte_tokenizer)).eval()
    traces = [tokenize_trace(byte_tokenizer, r["prompt"], r["response"]) for r in R1_TRACES]
    got = StepScorer(model, 0, byte_tokenizer, backend="nnsight").head_scores(traces, HEADS, 2)
    expected = _former_trainer_scores(model, traces, HEADS, 0, 2)
    assert max((g - e).abs().max().item() for g, e in zip(got, expected)) < 1e-5


def test_head_attention_averages_to_the_head_scores(byte_tokenizer):
    model = tiny_model("qwen2", vocab_size=len(byte_tokenizer)).eval()
    trace = tokenize_trace(byte_tokenizer, R1_TRACES[0]["prompt"], R1_TRACES[0]["response"])
    scorer = StepScorer(model, 0)
    attention = scorer.head_attention(trace, HEADS)
    assert attention.shape == (len(HEADS), trace.length)
    assert torch.equal(step_scores(attention, trace.step_spans).mean(dim=0), scorer.head_scores([trace], HEADS, 1)[0])


def test_top_heads_reads_the_manifests_ranking():
    manifest = load_manifest(SHIPPED)
    assert top_heads(manifest) == [(h["layer"], h["head"]) for h in manifest["heads"][: manifest["top_n"]]]
    assert top_heads(manifest, 2) == [(h["layer"], h["head"]) for h in manifest["heads"][:2]]


# --- provenance ---------------------------------------------------------------------------------------


def test_labels_and_steps_made_by_label_are_recorded_in_the_file_and_the_manifest(tiny_model_dir, tmp_path):
    raw, out = _write(tmp_path / "raw.jsonl", R1_TRACES), tmp_path / "labeled.jsonl"
    assert main(["label", "--traces", str(raw), "--labeler", "post-answer", "--min-chars", "40", "--out", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    cut_by = SegmenterConfig(min_chars=40)
    assert [(r["labeler"], r["segmenter"]) for r in records] == [("post-answer", cut_by.to_dict())] * 2
    probe = _sweep(tiny_model_dir, out)["probe"]
    assert (probe["labeler"], probe["steps_from"], probe["segmenter"]) == ("post-answer", "segmenter", cut_by.to_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the steps came from the segmenter: nothing to warn about
        assert manifest_segmenter({"probe": probe}) == cut_by


def test_given_labels_and_file_steps_are_said_so(tiny_model_dir, labeled_trace_file):
    manifest = _sweep(tiny_model_dir, labeled_trace_file)
    probe = manifest["probe"]
    assert (probe["labeler"], probe["steps_from"], "segmenter" in probe) == ("given", "file", False)
    assert validate_manifest(manifest) == []
    with pytest.warns(UserWarning, match="steps that came with the trace file"):
        assert manifest_segmenter(manifest) == SegmenterConfig()


def test_mixed_labellers_and_step_origins_are_counted(tiny_model_dir, tmp_path):
    first = {**labeled(R1_TRACES[0], ["essential", "redundant", "redundant"]), "labeler": "judge"}
    second = {**labeled(R1_TRACES[1], ["essential", "redundant", "redundant", "essential"]),
              "segmenter": SegmenterConfig().to_dict()}
    probe = _sweep(tiny_model_dir, _write(tmp_path / "mixed.jsonl", [first, second]))["probe"]
    assert probe["labeler"] == {"given": 1, "judge": 1}
    assert (probe["steps_from"], probe["segmenter"]) == ({"file": 1, "segmenter": 1}, SegmenterConfig().to_dict())


def test_traces_cut_by_different_segmenters_are_refused(tiny_model_dir, tmp_path):
    records = [{**labeled(R1_TRACES[0], ["essential", "redundant", "redundant"]), "segmenter": SegmenterConfig().to_dict()},
               {**labeled(R1_TRACES[1], ["essential", "redundant", "redundant", "essential"]),
                "segmenter": SegmenterConfig(min_chars=81).to_dict()}]
    with pytest.raises(ValueError, match=r"different segmenter settings \(line 1, id 'sum-1-10', and line 2, id 'rect-area'\)"):
        _sweep(tiny_model_dir, _write(tmp_path / "two.jsonl", records))


def test_traces_whose_response_lacks_eos_are_counted(tiny_model_dir, tmp_path, byte_tokenizer):
    first = labeled(R1_TRACES[0], ["essential", "redundant", "redundant"])
    second = labeled(R1_TRACES[1], ["essential", "redundant", "redundant", "essential"])
    with_eos = {**first, "response": first["response"] + byte_tokenizer.eos_token}
    probe = _sweep(tiny_model_dir, _write(tmp_path / "eos.jsonl", [with_eos, second]))["probe"]
    assert probe["eos_appended"] == 1  # only the second response lacks the EOS text
    both = _sweep(tiny_model_dir, _write(tmp_path / "no-eos.jsonl", [first, second]))["probe"]
    assert both["eos_appended"] == 2


def test_manifest_provenance_is_checked_and_old_manifests_stay_valid():
    shipped = load_manifest(SHIPPED)
    assert (shipped["probe"]["labeler"], shipped["probe"]["steps_from"]) == ("organism", "file")
    assert validate_manifest(json.loads(V1.read_text(encoding="utf-8"))) == []
    old_v2 = json.loads(json.dumps(shipped))
    for key in ("steps_from", "eos_appended"):
        del old_v2["probe"][key]
    old_v2["probe"]["segmenter"] = SegmenterConfig().to_dict()
    assert validate_manifest(old_v2) == []
    with pytest.warns(UserWarning, match="does not record whether the steps its heads were ranked on came from the segmenter"):
        assert manifest_segmenter(old_v2) == SegmenterConfig()
    broken = json.loads(json.dumps(shipped))
    broken["probe"].update(steps_from="segmenter", eos_appended=-1, labeler={"judge": 0})
    assert validate_manifest(broken) == [
        "probe.labeler must be a labeller's name or a count per labeller",
        "probe.segmenter must be given exactly when the segmenter cut some steps (probe.steps_from)",
        "probe.eos_appended must be a count, got -1",
    ]


# --- the trainers -------------------------------------------------------------------------------------


def test_align_steps_cuts_responses_with_the_segmenter_it_is_given(byte_tokenizer):
    prompt = byte_tokenizer(R1_TRACES[0]["prompt"], add_special_tokens=False)["input_ids"]
    response = byte_tokenizer(R1_TRACES[0]["response"], add_special_tokens=False)["input_ids"] + [byte_tokenizer.eos_token_id]
    rollouts = Rollouts(1, [prompt], [response], [R1_TRACES[0]["response"]], [True])
    blank_line = SegmenterConfig(mode="blank-line", min_chars=0)
    spans = {}
    for name, segmenter in (("default", None), ("blank-line", blank_line)):
        aligned = align_steps(byte_tokenizer, rollouts, torch.ones(1), "</think>", segmenter)[0]
        trace = align_generated(byte_tokenizer, prompt, response, "</think>", segmenter)
        assert aligned.spans == [(a - len(prompt), b - len(prompt)) for a, b in trace.step_spans]
        spans[name] = aligned.spans
    assert spans["default"] != spans["blank-line"]


@pytest.fixture
def prompts_file(tmp_path):
    return _write(tmp_path / "data.jsonl", [{"id": r["id"], "prompt": r["prompt"], "answer": r["answer"]} for r in R1_TRACES])


def test_trainer_uses_the_manifests_segmenter_and_warns_when_steps_came_from_the_file(
    tiny_model_dir, labeled_trace_file, prompts_file, tmp_path
):
    from_file = tmp_path / "file-steps.json"
    run_sweep(tiny_model_dir, labeled_trace_file, SweepConfig(bootstrap=20, permutations=20), out=from_file,
              progress=False, log=None)
    config = TrainConfig(model=str(tiny_model_dir), manifest=str(from_file), data=str(prompts_file), out=str(tmp_path / "o"))
    with pytest.warns(UserWarning, match="file-steps.json ranked its heads on steps that came with the trace file"):
        assert loop.prepare_run(config).strategy.segmenter == SegmenterConfig()

    raw, labeled_file, cut = _write(tmp_path / "raw.jsonl", R1_TRACES), tmp_path / "cut.jsonl", tmp_path / "cut.json"
    assert main(["label", "--traces", str(raw), "--labeler", "post-answer", "--min-chars", "40", "--out", str(labeled_file)]) == 0
    run_sweep(tiny_model_dir, labeled_file, SweepConfig(bootstrap=20, permutations=20), out=cut, progress=False, log=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inputs = loop.prepare_run(TrainConfig(**{**vars(config), "manifest": str(cut)}))
    assert inputs.strategy.segmenter == SegmenterConfig(min_chars=40)


def test_trl_trainer_warns_when_the_manifests_steps_came_from_the_file(tiny_model_dir, labeled_trace_file, tmp_path,
                                                                       byte_tokenizer):
    pytest.importorskip("trl", reason="TRL is not installed (pip install 'kfh-attnpo[trl]')")
    from datasets import Dataset

    from attnpo_train.trl import AttnPOConfig, AttnPOGRPOTrainer

    manifest = tmp_path / "m.json"
    run_sweep(tiny_model_dir, labeled_trace_file, SweepConfig(bootstrap=20, permutations=20), out=manifest,
              progress=False, log=None)
    args = AttnPOConfig(output_dir=str(tmp_path / "out"), attnpo_manifest=str(manifest), num_generations=2,
                        per_device_train_batch_size=2, max_completion_length=8, report_to="none", use_cpu=True,
                        save_strategy="no")
    with pytest.warns(UserWarning, match="m.json ranked its heads on steps that came with the trace file"):
        AttnPOGRPOTrainer(model=str(tiny_model_dir), args=args, train_dataset=Dataset.from_list([{"prompt": "p", "answer": "1"}]),
                          processing_class=byte_tokenizer)
