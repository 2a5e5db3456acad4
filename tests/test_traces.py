"""Trace files: every broken record is named by line and id; good ones load."""

from __future__ import annotations

import json

import pytest
from conftest import R1_TRACES, labeled, write_jsonl

from kfh_probe.errors import InputError
from kfh_probe.traces import TraceFileError, read_traces


def test_valid_file_loads_with_steps_and_line_numbers(labeled_trace_file):
    traces, skipped = read_traces(labeled_trace_file)
    assert [t.id for t in traces] == ["sum-1-10", "rect-area"]
    assert [t.line for t in traces] == [1, 2]
    assert traces[1].steps[3].label == "essential"
    assert skipped == []


BROKEN = [
    ("{not json", "not valid JSON"),
    ('["a list"]', "expected a JSON object"),
    (json.dumps({"id": "no-prompt", "response": "a</think>b"}), "missing required field 'prompt'"),
    (json.dumps({"id": "no-marker", "prompt": "p", "response": "no end of thinking"}), "no end-of-thinking marker"),
    (json.dumps({"id": "two-markers", "prompt": "p", "response": "a</think>b</think>"}), "2 end-of-thinking marker"),
    (json.dumps({"id": "bad-steps", "prompt": "p", "response": "abc</think>x", "steps": [{"text": "ab", "label": "essential"}]}),
     "do not concatenate"),
    (json.dumps({"id": "bad-label", "prompt": "p", "response": "abc</think>x", "steps": [{"text": "abc", "label": "useful"}]}),
     "label 'useful'"),
]


@pytest.mark.parametrize("line,reason", BROKEN)
def test_broken_record_is_reported_with_file_line_and_id(tmp_path, line, reason):
    good = json.dumps(labeled(R1_TRACES[0], ["essential", "redundant", "redundant"]))
    path = write_jsonl(tmp_path / "t.jsonl", [good, line])
    with pytest.raises(TraceFileError) as caught:
        read_traces(path)
    message = str(caught.value)
    assert f"{path}:2" in message and reason in message
    if line.startswith("{\"id\""):
        assert repr(json.loads(line)["id"]) in message
    traces, skipped = read_traces(path, skip_invalid=True)
    assert len(traces) == 1 and len(skipped) == 1 and skipped[0].line == 2 and reason in skipped[0].reason


def test_duplicate_ids_are_refused(tmp_path):
    record = json.dumps(R1_TRACES[0])
    with pytest.raises(TraceFileError, match="duplicate id"):
        read_traces(write_jsonl(tmp_path / "t.jsonl", [record, record]))


def test_missing_file_is_named(tmp_path):
    with pytest.raises(InputError, match="nope.jsonl"):
        read_traces(tmp_path / "nope.jsonl")


def test_every_jsonl_reader_names_a_broken_line_the_same_way(tmp_path):
    from attnpo_train.data import DataError, load_prompts
    from kfh_probe.generate import ProblemFileError, read_problems

    path = tmp_path / "broken.jsonl"
    path.write_text('{"id": "a", "prompt": "p", "answer": "1"}\n\n{oops\n[1, 2]\n', encoding="utf-8")
    reasons = {3: "not valid JSON (Expecting property name enclosed in double quotes at column 2)",
               4: "expected a JSON object, got list"}
    with pytest.raises(TraceFileError) as traces_error:
        read_traces(path)
    with pytest.raises(ProblemFileError) as problems_error:
        read_problems(path, tokenizer=None)
    with pytest.raises(DataError) as prompts_error:
        load_prompts(path)
    assert all(f":{line} (id None): {reason}" in str(traces_error.value) for line, reason in reasons.items())
    assert all(f":{line}: {reason}" in str(problems_error.value) for line, reason in reasons.items())
    assert all(f"line {line}: {reason}" in str(prompts_error.value) for line, reason in reasons.items())
    for reader, error in ((read_traces, InputError), (read_problems, InputError), (load_prompts, DataError)):
        with pytest.raises(error, match="file not found: "):
            reader(tmp_path / "missing.jsonl", None) if reader is read_problems else reader(tmp_path / "missing.jsonl")
