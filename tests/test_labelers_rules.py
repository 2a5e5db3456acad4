"""The model-free labellers (given, organism, post-answer), the ablation labeller, and the CLI end to end."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import R1_TRACES, tiny_model, write_jsonl
from kfh_probe.alignment import tokenize_trace
from kfh_probe.cli import main
from kfh_probe.labelers.ablation import AblationLabeler, answer_logprobs, deletions, label_from_drops
from kfh_probe.labelers.base import run_labeler
from kfh_probe.labelers.rules import OrganismLabeler, PostAnswerLabeler, project_labels, states_answer
from kfh_probe.organism.traces import teacher_traces
from kfh_probe.segmentation import SegmenterConfig
from kfh_probe.traces import TraceFileError, parse_record, read_traces


def unlabelled(records: list[dict]):
    return [parse_record({k: v for k, v in r.items() if k != "steps"}, i + 1) for i, r in enumerate(records)]


def test_post_answer_marks_steps_after_the_first_statement_of_the_answer_redundant():
    run = run_labeler(unlabelled(R1_TRACES), PostAnswerLabeler())
    assert [[s.label for s in t.steps] for t in run.traces] == [
        ["essential", "redundant", "redundant"], ["essential", "redundant", "redundant", "redundant"]]


def test_post_answer_reports_a_trace_whose_steps_never_state_the_answer():
    record = {**R1_TRACES[0], "answer": "56"}
    with pytest.raises(TraceFileError, match=r"\(id 'sum-1-10'\): post-answer labeller: no step states the final answer '56'"):
        run_labeler(unlabelled([record]), PostAnswerLabeler(), source="f.jsonl")


def test_answer_must_appear_as_a_whole_number():
    assert states_answer("so 5+6=11, total 55.", "55")
    assert not states_answer("155 and 5.55", "55")
    assert states_answer("which is Five apples", "5") and states_answer("so twelve.", "12")
    assert not states_answer("fivefold, 15", "5") and not states_answer("one hundred", "100")


def test_organism_labeler_reproduces_the_teacher_ground_truth():
    records = teacher_traces(12, seed=3)
    run = run_labeler(unlabelled(records), OrganismLabeler())
    assert [[s.label for s in t.steps] for t in run.traces] == [[s["label"] for s in r["steps"]] for r in records]


def test_projection_gives_each_piece_to_the_step_holding_most_of_it():
    source = [("aaaa", "essential"), ("bbbb", "redundant"), ("cc", "redundant")]
    assert project_labels(source, ["aaa", "abbbbc", "c"]) == ["essential", "redundant", None]
    assert project_labels(source, ["aaaabbbbcc"]) == ["essential"]


def test_deleting_the_first_step_keeps_the_think_opener():
    assert deletions(["<think>\nA", "B", "C"], "<think>") == [["<think>B", "C"], ["<think>\nA", "C"], ["<think>\nA", "B"]]


def test_drop_rules_threshold_and_top_fraction():
    drops = [2.0, 0.1, 1.5, -0.3]
    assert label_from_drops(drops, 1.0, None) == ["essential", "redundant", "essential", "redundant"]
    assert label_from_drops(drops, None, 0.25) == ["essential", "redundant", "redundant", "redundant"]


@pytest.mark.parametrize("family", ["qwen2", "gemma2"])
def test_answer_logprobs_equal_the_full_forward(byte_tokenizer, family):
    model = tiny_model(family, vocab_size=len(byte_tokenizer))
    seqs = [tokenize_trace(byte_tokenizer, r["prompt"], r["response"]) for r in R1_TRACES]
    got = answer_logprobs(model, seqs, byte_tokenizer.pad_token_id)
    for b, seq in enumerate(seqs):
        with torch.no_grad():
            logp = model(torch.tensor([seq.input_ids])).logits[0].float().log_softmax(-1)
        start, end = seq.answer_span
        want = sum(float(logp[t - 1, seq.input_ids[t]]) for t in range(start, end))
        assert got[b].item() == pytest.approx(want, abs=1e-4)


def test_ablation_scores_k_plus_one_sequences_in_one_forward(byte_tokenizer):
    model = tiny_model("qwen2", vocab_size=len(byte_tokenizer))
    calls = []
    model.get_decoder().register_forward_hook(lambda m, a, kw, out: calls.append(kw["input_ids"].shape[0]), with_kwargs=True)
    labeler = AblationLabeler(model, byte_tokenizer, byte_tokenizer.pad_token_id, threshold=None, top_fraction=0.5)
    run = run_labeler(unlabelled(R1_TRACES), labeler)
    assert calls == [4, 5]  # K + 1 sequences per trace, one forward each
    assert [sum(s.label == "essential" for s in t.steps) for t in run.traces] == [2, 2]
    drops = labeler.drops["sum-1-10"]
    expected = ["essential" if k in sorted(range(3), key=lambda k: -drops[k])[:2] else "redundant" for k in range(3)]
    assert [s.label for s in run.traces[0].steps] == expected


def test_ablation_on_the_organism_agrees_with_ground_truth_better_than_chance(organism):
    # post-answer is not held to this: it keeps every step before the first statement of the answer,
    # essential or not (its agreement with the ground truth: docs/results/labelers.md).
    from kfh_probe.labelers.report import agreement
    from kfh_probe.loading import pad_token_id

    records = teacher_traces(8, seed=11)
    truth = [[s["label"] for s in r["steps"]] for r in records]
    model, tok = organism
    labeler = AblationLabeler(model, tok, pad_token_id(tok), threshold=None, top_fraction=0.5)
    run = run_labeler(unlabelled(records), labeler, skip_invalid=True)
    by_id = {t.id: [s.label for s in t.steps] for t in run.traces}
    got = [by_id.get(r["id"], [None] * len(r["steps"])) for r in records]
    assert agreement(got, truth)["accuracy"] > 0.5


def test_cli_label_writes_a_file_that_read_traces_accepts(tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", R1_TRACES)
    out = tmp_path / "out.jsonl"
    assert main(["label", "--traces", str(source), "--labeler", "post-answer", "--out", str(out)]) == 0
    traces, _ = read_traces(out)
    assert [t.id for t in traces] == ["sum-1-10", "rect-area"]
    for trace, record in zip(traces, R1_TRACES):
        assert "".join(s.text for s in trace.steps) == record["response"].split("</think>")[0]
        assert all(s.label in ("essential", "redundant") for s in trace.steps)


def test_cli_segmenter_flags_change_the_steps(tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", R1_TRACES[:1])
    out = tmp_path / "out.jsonl"
    assert main(["label", "--traces", str(source), "--labeler", "post-answer", "--out", str(out),
                 "--segment-mode", "blank-line", "--min-chars", "0"]) == 0
    steps = read_traces(out)[0][0].steps
    assert len(steps) == 4 and steps[1].text.startswith("The formula is")


def test_cli_bad_input_exits_2_naming_line_and_id_and_writes_nothing(tmp_path, capsys):
    broken = {**R1_TRACES[1], "id": "no-marker", "response": R1_TRACES[1]["response"].replace("</think>", "")}
    source = tmp_path / "in.jsonl"
    write_jsonl(source, [R1_TRACES[0], broken])
    with open(source, "a", encoding="utf-8") as handle:
        handle.write('{"id": "cut", "prompt": \n')
    out = tmp_path / "out.jsonl"
    assert main(["label", "--traces", str(source), "--labeler", "post-answer", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert ":2 (id 'no-marker')" in err and "marker" in err and ":3 (id None): not valid JSON" in err
    assert "Traceback" not in err and not out.exists()
    assert main(["label", "--traces", str(source), "--labeler", "post-answer", "--out", str(out), "--skip-invalid"]) == 0
    assert [t.id for t in read_traces(out)[0]] == ["sum-1-10"]
    assert "2 trace(s) skipped" in capsys.readouterr().err


def test_cli_given_validates_and_names_traces_without_labels(tmp_path, labeled_trace_file, capsys):
    out = tmp_path / "out.jsonl"
    assert main(["label", "--traces", str(labeled_trace_file), "--labeler", "given", "--out", str(out)]) == 0
    assert out.read_text(encoding="utf-8") == labeled_trace_file.read_text(encoding="utf-8")
    source = write_jsonl(tmp_path / "in.jsonl", [json.loads(labeled_trace_file.read_text().splitlines()[0]), R1_TRACES[1]])
    assert main(["label", "--traces", str(source), "--labeler", "given", "--out", str(tmp_path / "x.jsonl")]) == 2
    assert ":2 (id 'rect-area'): given labeller: no step has a label" in capsys.readouterr().err


def test_cli_ablation_on_a_model_folder(tmp_path, tiny_model_dir):
    source = write_jsonl(tmp_path / "in.jsonl", R1_TRACES)
    out = tmp_path / "out.jsonl"
    assert main(["label", "--traces", str(source), "--labeler", "ablation", "--model", str(tiny_model_dir),
                 "--threshold", "-1000", "--out", str(out)]) == 0
    assert all(s.label == "essential" for t in read_traces(out)[0] for s in t.steps)


def test_cli_organism_labels_teacher_traces(tmp_path):
    records = teacher_traces(3, seed=5)
    source = write_jsonl(tmp_path / "in.jsonl", [{k: v for k, v in r.items() if k != "steps"} for r in records])
    out = tmp_path / "out.jsonl"
    assert main(["label", "--traces", str(source), "--labeler", "organism", "--out", str(out)]) == 0
    written = [t.to_record() for t in read_traces(out)[0]]
    # each record says what labelled it and which segmenter cut its steps (the file had none)
    assert [(r.pop("labeler"), r.pop("segmenter")) for r in written] == [("organism", SegmenterConfig().to_dict())] * 3
    assert written == [{k: v for k, v in r.items() if k != "labeler"} for r in records]
