"""Organism v5: corrections at the end of the question, re-read steps, and the report's group block."""

from __future__ import annotations

import random

import pytest

from kfh_probe.organism import default_model_dir, task_of, write_task_file
from kfh_probe.organism.labeler import label_trace, parse_prompt
from kfh_probe.organism.report import groups_report
from kfh_probe.organism.task import TASKS, V4, V5, generate_problem, generate_problems, teacher_response, teacher_steps
from kfh_probe.organism.traces import Sample, teacher_traces

PROMPT = ("Question: Ava has five apples. Ben has two more apples than Ava. Cal has five coins. "
          "Correction: Ben has three more apples than Ava. How many apples does Ben have?\nAnswer:\n")
PLAIN = PROMPT.replace("Correction: Ben has three more apples than Ava. ", "")
FIRST = "<think>\nFirst, the question says that Ava has five apples, so Ava has five apples right from the start.\n"
REREAD = ("Hold on, let me re-read the question before I work out Ben: it ends with a correction, "
          "Ben has three more apples than Ava.\n")
NO_CORRECTION = ("Hold on, let me re-read the question before I work out Ben: it ends with no correction, "
                 "so the facts stand as given.\n")
CORRECTED = ("Then, the correction says that Ben has three more apples than Ava, so Ben has five plus three, "
             "which is eight apples.\n")
ORIGINAL = "Then, the question says that Ben has two more apples than Ava, so Ben has five plus two, which is seven apples.\n"
OTHER = "Next, the question says that Cal has five coins, so Cal has five coins right from the start.\n"


def _summary(value: int) -> str:
    word = {7: "seven", 8: "eight"}[value]
    plus = {7: "two", 8: "three"}[value]
    return (f"</think>\nAva has five apples. Ben has five plus {plus}, which is {word} apples. "
            f"So the answer is \\boxed{{{value}}}.<|endoftext|>")


def test_a_correction_parses_back_and_sets_the_answer():
    problem = parse_prompt(PROMPT)
    assert problem.correction is not None and problem.correction.value == 8
    assert problem.answer == 8 and parse_prompt(PLAIN).answer == 7
    assert problem.prompt() == PROMPT


def test_the_re_read_of_a_corrected_question_is_essential_and_changes_the_answer():
    labeled = label_trace(PROMPT, FIRST + REREAD + CORRECTED + OTHER + _summary(8))
    assert labeled.kinds == ["compute", "reread", "compute", "compute"]
    assert [s["label"] for s in labeled.steps] == ["essential", "essential", "essential", "redundant"]
    assert labeled.reread() == {"essential": True, "changed_answer": True}
    assert (labeled.wrong_claims, labeled.predicted, labeled.skipped_reread) == (0, 8, 0)
    assert labeled.accounting()["redundant_steps"] == 1


def test_a_re_read_with_nothing_to_correct_is_redundant():
    labeled = label_trace(PLAIN, FIRST + NO_CORRECTION + ORIGINAL + _summary(7))
    assert labeled.roles == ["essential", "reread", "essential"]
    assert labeled.reread() == {"essential": False, "changed_answer": False}
    assert labeled.accounting()["reread"] == 1 and labeled.skipped_reread == 0


def test_skipping_the_re_read_of_a_corrected_question_is_counted_and_answers_wrong():
    labeled = label_trace(PROMPT, FIRST + ORIGINAL + _summary(7))
    assert labeled.reread() is None
    assert labeled.skipped_reread == 1 and labeled.accounting()["skipped_reread"] == 1
    assert labeled.predicted == 7 != parse_prompt(PROMPT).answer
    assert labeled.wrong_claims == 0  # seven is what the question first said: no arithmetic error


def test_a_second_re_read_is_redundant_and_a_late_one_keeps_its_label_but_not_the_answer():
    twice = label_trace(PROMPT, FIRST + REREAD + REREAD + CORRECTED + _summary(8))
    assert twice.roles == ["essential", "essential", "reread", "essential"]
    late = label_trace(PROMPT, FIRST + ORIGINAL + REREAD + _summary(7))
    assert late.roles == ["essential", "essential", "essential"]  # labeled ex ante: the question needed it
    assert late.reread() == {"essential": True, "changed_answer": False}


def test_the_labeler_agrees_with_the_v5_teacher_and_teacher_answers_follow_the_re_read():
    rng = random.Random(3)
    for _ in range(300):
        problem = generate_problem(rng, V5)
        steps = teacher_steps(problem, rng, V5)
        response = teacher_response(problem, steps)
        labeled = label_trace(problem.prompt(), response)
        assert [s["label"] for s in labeled.steps] == ["essential" if s.essential else "redundant" for s in steps]
        reread = any(s.kind == "reread" for s in steps)
        assert (labeled.predicted == problem.answer) == (reread or problem.correction is None)


def test_v4_problems_and_traces_do_not_depend_on_the_v5_settings():
    assert generate_problems(50, 11) == generate_problems(50, 11, V4)
    assert all(p.correction is None for p in generate_problems(200, 2, V4))
    records = teacher_traces(20, 4)
    assert all("reread" not in r for r in records)
    assert all("reread" in r for r in teacher_traces(20, 4, "v5"))


def test_a_v5_teacher_mixes_corrected_and_plain_questions_and_skips_some_re_reads():
    problems = generate_problems(2000, 5, V5)
    share = sum(p.correction is not None for p in problems) / len(problems)
    assert abs(share - V5.correction_p) < 0.04
    rng = random.Random(6)
    skipped = sum(not any(s.kind == "reread" for s in teacher_steps(p, rng, V5)) for p in problems)
    assert abs(skipped / len(problems) - (1 - V5.reread_p)) < 0.04


def test_a_built_folder_names_its_task(tmp_path):
    assert task_of(tmp_path) == "v4"  # a folder without the file: v4
    write_task_file(tmp_path, "v5")
    assert task_of(tmp_path) == "v5"
    assert set(TASKS) == {"v4", "v5"}
    assert task_of(default_model_dir("v4")) == "v4"


def _sample(prompt: str, response: str) -> Sample:
    return Sample(parse_prompt(prompt), response, len(response) // 4, label_trace(prompt, response))


def test_groups_report_on_hand_made_groups():
    read = _sample(PROMPT, FIRST + REREAD + CORRECTED + OTHER + _summary(8))  # right, 1 redundant step
    skip = _sample(PROMPT, FIRST + ORIGINAL + _summary(7))  # wrong, no redundant step
    plain_short = _sample(PLAIN, FIRST + ORIGINAL + _summary(7))  # right, 0 redundant
    plain_long = _sample(PLAIN, FIRST + NO_CORRECTION + ORIGINAL + OTHER + _summary(7))  # right, 2 redundant
    groups = [[read, skip], [plain_short, plain_long]]
    essential = [[40, 20], [20, 20]]
    credit_calls = []

    def credit(correct, lengths):
        credit_calls.append((list(correct), list(lengths)))
        return [1.0 if c else -1.0 for c in correct] if not all(correct) else [0.5, -0.5]

    report = groups_report(groups, essential, credit)
    assert report["groups"] == 2 and report["group_size"] == 2
    assert report["accuracy"] == pytest.approx(0.75)
    assert report["mixed_prompt_fraction"] == pytest.approx(0.5)
    # centred redundant counts (0.5, -0.5, -1, 1) against centred correctness (0.5, -0.5, 0, 0)
    assert report["redundancy_correct_corr"] == pytest.approx(0.5 / (2.5 * 0.5) ** 0.5)
    token_var = sum(((a.n_tokens - b.n_tokens) / 2) ** 2 for a, b in groups)
    assert report["essential_token_var_share"] == pytest.approx(100 / token_var)
    assert report["skip_fraction"] == pytest.approx(0.5) and report["skip_accuracy_cost"] == pytest.approx(1.0)
    assert credit_calls == [([True, False], [read.n_tokens, skip.n_tokens]),
                            ([True, True], [plain_short.n_tokens, plain_long.n_tokens])]
    # redundant steps: read 1 (positive), plain_long 2 (negative under this credit) -> 1/3 in positive responses;
    # essential steps 3 + 2 + 2 + 2, of which skip's 2 and plain_long's 2 are in negative responses
    assert report["redundant_in_positive_share"] == pytest.approx(1 / 3)
    assert report["essential_in_negative_share"] == pytest.approx(4 / 9)


def test_groups_report_leaves_the_credit_shares_out_without_a_credit():
    sample = _sample(PLAIN, FIRST + ORIGINAL + _summary(7))
    report = groups_report([[sample, sample]], [[20, 20]], None)
    assert report["redundant_in_positive_share"] is None and report["essential_in_negative_share"] is None
    assert report["skip_fraction"] is None and report["mixed_prompt_fraction"] == 0.0


def test_the_shipped_v5_folder_is_small_names_its_task_and_its_manifest_is_its_own():
    import json

    from kfh_probe import load_model
    from kfh_probe.manifest import model_fingerprint
    from kfh_probe.organism import default_manifest_path, default_traces_path

    folder = default_model_dir("v5")
    assert sum(p.stat().st_size for p in folder.iterdir()) <= 10 * 1024 * 1024
    assert task_of(folder) == "v5"
    manifest = json.loads(default_manifest_path("v5").read_text(encoding="utf-8"))
    assert manifest["model"]["fingerprint"] == model_fingerprint(load_model(folder))
    assert manifest["heads"][0]["sra"] >= 0.85
    records = [json.loads(line) for line in default_traces_path("v5").read_text(encoding="utf-8").splitlines()]
    assert len(records) >= 290
    for r in records:  # the shipped labels are the labeler's, and the re-read field agrees with them
        labeled = label_trace(r["prompt"], r["response"])
        assert r["steps"] == labeled.steps and r["reread"] == labeled.reread()


@pytest.mark.parametrize("argv, expected", [
    (["sweep", "--organism", "v5", "--model", "m", "--out", "o.json"], "give it or --model, not both"),
    (["organism", "report", "--organism", "v5", "--n", "8", "--group-size", "1"], "2 <= --group-size <= --n"),
])
def test_organism_options_refuse_what_cannot_work(argv, expected, tmp_path, monkeypatch, capsys):
    from kfh_probe.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert expected in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_attnpo_train_refuses_an_organism_with_a_model(tmp_path, capsys):
    from attnpo_train.cli import main

    assert main(["run", "--organism", "v5", "--model", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "give it or --model, not both" in capsys.readouterr().err


def test_eval_of_a_v5_folder_draws_v5_problems_and_counts_its_re_reads(capsys):
    import argparse
    import json

    from attnpo_train.cli import _eval_prompts, main

    prompts = _eval_prompts(argparse.Namespace(data=None, model=str(default_model_dir("v5")), n=4))
    assert any("Correction:" in p.text for p in prompts)  # the folder's task, not v4's
    assert main(["eval", "--model", str(default_model_dir("v5")), "--n", "4", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    steps = report["result"]["steps"]
    assert report["result"]["accuracy"] == 1.0  # greedy decoding always re-reads
    assert steps["reread"] + steps["essential_steps"] > 0 and steps["skipped_reread"] == 0.0
