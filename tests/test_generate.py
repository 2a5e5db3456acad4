"""``kfh-probe generate``: problems in, trace file out; seeded, resumable, truncation marked, graded."""

from __future__ import annotations

import json

import pytest
from conftest import write_jsonl

from kfh_probe.cli import main
from kfh_probe.generate import (
    GenerateConfig, ProblemFileError, generate_traces, generation_batches, read_problems, run_file,
)
from kfh_probe.traces import read_traces


class ChatTokenizer:
    """The one method of a tokenizer that building prompts uses, with a visible chat template."""

    chat_template = "<user>{content}<assistant>"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert not tokenize and add_generation_prompt and len(messages) == 1
        return f"<user>{messages[0]['content']}<assistant>"


def test_problem_rows_become_model_inputs(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"id": "a", "problem": "2+3?", "answer": 5},
        {"id": "b", "prompt": "EXACT INPUT", "answer": "x"},
        {"problem": "no id here"},
    ])
    problems = read_problems(path, ChatTokenizer(), instruction="Box it.", think_prefix="<think>\n")
    assert [p.id for p in problems] == ["a", "b", "line-3"]
    assert problems[0].prompt == "<user>2+3?\n\nBox it.<assistant><think>\n"
    assert problems[0].answer == "5"
    assert problems[1].prompt == "EXACT INPUT<think>\n"  # an exact prompt is used as it is
    assert problems[2].answer is None


def test_every_bad_problem_row_is_reported_with_line_and_id(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"id": "ok", "problem": "fine", "answer": "1"},
        "{not json",
        {"id": "both", "problem": "a", "prompt": "b"},
        {"id": "neither", "answer": "1"},
        {"id": "ok", "problem": "again"},
        {"id": "bad-answer", "problem": "q", "answer": True},
    ])
    with pytest.raises(ProblemFileError) as err:
        read_problems(path, ChatTokenizer())
    message = str(err.value)
    assert "5 unusable row(s)" in message
    for where in (":2: not valid JSON", ":3 (id 'both')", ":4 (id 'neither')", ":5 (id 'ok'): duplicate id (first seen on line 1)",
                  ":6 (id 'bad-answer')"):
        assert where in message, where


def test_correct_only_needs_an_answer_on_every_row(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"id": "q", "problem": "2+3?"}])
    with pytest.raises(ProblemFileError, match=r"p.jsonl:1 \(id 'q'\): no 'answer'"):
        read_problems(path, ChatTokenizer(), need_answers=True)


def test_a_tokenizer_without_a_chat_template_asks_for_a_prompt_template(tmp_path, byte_tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [{"id": "q", "problem": "2+3?"}])
    with pytest.raises(ProblemFileError, match="prompt template"):
        read_problems(path, byte_tokenizer)


def test_batches_cover_every_sample_in_file_order():
    assert generation_batches(3, 2, 4) == [[(0, 0), (0, 1), (1, 0), (1, 1)], [(2, 0), (2, 1)]]


SCRIPTED = {
    "right": ("<think>add them</think>\\boxed{\\frac{1}{2}}", False),
    "wrong": ("<think>guess</think>\\boxed{3}", False),
    "cut": ("<think>still thinking about", True),
}


def _scripted(prompts, config, seed):
    """A sampler whose responses depend on the prompt only (the driver's logic without a model)."""
    return [(SCRIPTED[p][0], SCRIPTED[p][1], 7) for p in prompts]


def _problems(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"id": k, "prompt": k, "answer": "0.5"} for k in SCRIPTED])
    return read_problems(path, ChatTokenizer())


def test_responses_are_graded_with_math_verify_and_truncation_is_marked(tmp_path):
    out = tmp_path / "t.jsonl"
    counts = generate_traces(_problems(tmp_path), _scripted, GenerateConfig(samples=2, batch_size=4), out, {"k": 1},
                             progress=False)
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in records] == ["right#0", "right#1", "wrong#0", "wrong#1", "cut#0", "cut#1"]
    assert [r["correct"] for r in records] == [True, True, False, False, False, False]  # 1/2 = 0.5
    assert [r["truncated"] for r in records] == [False] * 4 + [True] * 2
    assert counts == {"responses": 6, "kept": 6, "truncated": 2, "no_marker": 0, "graded": 6, "correct": 2}
    assert not run_file(out).exists()
    # the trace reader refuses a truncated response, by line and id; --skip-invalid counts it
    traces, skipped = read_traces(out, skip_invalid=True)
    assert len(traces) == 4 and [(s.line, s.id) for s in skipped] == [(5, "cut#0"), (6, "cut#1")]
    assert "truncated" in skipped[0].reason


def test_correct_only_keeps_the_graded_correct_responses(tmp_path):
    out = tmp_path / "t.jsonl"
    counts = generate_traces(_problems(tmp_path), _scripted, GenerateConfig(samples=1, correct_only=True), out, {},
                             progress=False)
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == ["right#0"]
    assert counts["responses"] == 3 and counts["kept"] == 1 and counts["truncated"] == 1


def test_an_existing_output_is_not_overwritten_silently(tmp_path):
    out = tmp_path / "t.jsonl"
    out.write_text("precious\n")
    with pytest.raises(FileExistsError, match="`overwrite`"):
        generate_traces(_problems(tmp_path), _scripted, GenerateConfig(), out, {}, progress=False)
    assert out.read_text() == "precious\n"


def test_an_interrupted_run_resumes_to_the_same_file(tmp_path, tiny_model_dir):
    from functools import partial

    from kfh_probe.generate import sample_hf
    from kfh_probe.loading import load_model, load_tokenizer

    model, tokenizer = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    path = write_jsonl(tmp_path / "p.jsonl", [{"id": f"q{i}", "prompt": f"What is {i} + {i}?<think>", "answer": str(2 * i)}
                                         for i in range(3)])
    problems = read_problems(path, tokenizer)
    config = GenerateConfig(samples=2, batch_size=2, max_new_tokens=6, temperature=1.0, top_p=1.0, seed=3)
    sample = partial(sample_hf, model, tokenizer)
    whole = tmp_path / "whole.jsonl"
    generate_traces(problems, sample, config, whole, {"run": 1}, progress=False)

    calls = []

    def interrupted(prompts, cfg, seed):
        calls.append(seed)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return sample(prompts, cfg, seed)

    resumed = tmp_path / "resumed.jsonl"
    with pytest.raises(KeyboardInterrupt):
        generate_traces(problems, interrupted, config, resumed, {"run": 1}, progress=False)
    assert len(resumed.read_text().splitlines()) == 2 and run_file(resumed).is_file()  # batch 0 is on disk
    generate_traces(problems, sample, config, resumed, {"run": 1}, progress=False)
    assert resumed.read_bytes() == whole.read_bytes()
    records = [json.loads(x) for x in whole.read_text().splitlines()]
    assert len(records) == 6 and len({r["response"] for r in records}) > 1  # sampled, not six copies
    assert all(r["response_tokens"] == 6 for r in records if r["truncated"])


def test_generate_command_writes_a_trace_file(tmp_path, tiny_model_dir, capsys):
    problems = write_jsonl(tmp_path / "p.jsonl", [{"id": "q", "problem": "1+1?", "answer": "2"}])
    template = tmp_path / "template.txt"
    template.write_text("Question: $problem\nAnswer:", encoding="utf-8")
    out = tmp_path / "t.jsonl"
    args = ["generate", "--model", str(tiny_model_dir), "--problems", str(problems), "--out", str(out),
            "--prompt-template", str(template), "--think-prefix", "<think>", "--samples", "2", "--max-new-tokens", "4",
            "--quiet"]
    assert main(args) == 0
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["prompt"] for r in records] == ["Question: 1+1?\nAnswer:<think>"] * 2
    assert main(args) == 2  # a finished output is kept unless --overwrite
    assert "use --overwrite" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0
    assert main(args + ["--overwrite", "--temperature", "0"]) == 2
    assert ("setting 'samples' must be 1 when temperature is 0 (greedy decoding gives one response per problem); "
            "got 2") in capsys.readouterr().err
