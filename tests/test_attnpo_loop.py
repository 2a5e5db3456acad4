"""Checks of attnpo_train.loop and the modules it runs on (data, rollouts, credit, checkpoint): end-to-end
runs of every method, AttnPO credit assignment against an independent eager-attention computation,
checkpoint/resume equality, Ctrl-C, data and manifest refusals."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from attnpo_train import loop
from attnpo_train.advantages import group_advantages
from attnpo_train.checkpoint import ResumeError, latest_checkpoint
from attnpo_train.config import TrainConfig
from attnpo_train.data import DataError, Prompt, PromptSource, load_prompts
from attnpo_train.diagnostics import phrase_counts
from attnpo_train.rewards import rollout_correctness
from attnpo_train.strategies import CreditBatch, strategy_class
from kfh_probe.sampling import generate_rollouts
from conftest import (
    R1_TRACES, SHORT_55, WRONG_54, attnpo_strategy, crafted_rollouts, separate_advantages, small_config, write_manifest,
)

TIMING = set(loop.TIMING_FIELDS)


def scramble_global_rngs() -> None:
    import random

    import numpy as np

    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)


def without_timing(metrics: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if k not in TIMING} for m in metrics]


# --- end to end -------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["rloo", "tlmre", "attnpo"])
def test_two_steps_of_each_method(method, tiny_model_dir, manifest_file, data_file, tmp_path):
    from transformers import AutoModelForCausalLM

    config = small_config(tiny_model_dir, manifest_file, data_file, tmp_path / "out", method=method,
                          kl_coef=0.1 if method == "rloo" else 0.0)
    inputs = loop.prepare_run(config)
    before = {k: v.clone() for k, v in inputs.model.state_dict().items()}
    metrics = loop.train(inputs, config, progress=False)

    lines = [json.loads(l) for l in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert lines == metrics and [m["step"] for m in metrics] == [1, 2]
    required = {"reward_mean", "accuracy", "response_tokens_mean", "frac_attenuated", "mean_gamma",
                "confused_per_response", "summary_per_response", "loss", "pg_loss", "grad_norm", "lr", *TIMING}
    assert required <= metrics[0].keys()
    assert ("kl" in metrics[0]) == (method == "rloo")
    assert all(0 < m["response_tokens_mean"] <= 20 for m in metrics)
    assert latest_checkpoint(tmp_path / "out").name == "step-00000002"
    assert not list((tmp_path / "out" / "checkpoints").glob(".tmp*"))
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "final")
    assert (tmp_path / "out" / "final" / "tokenizer.json").is_file()
    trained = final.state_dict()
    assert any(not torch.equal(before[k], trained[k]) for k in before), "the update changed no weight"
    assert all(torch.equal(trained[k], v) for k, v in inputs.model.state_dict().items())


def test_attnpo_advantages_match_an_eager_attention_computation(tiny_model_dir, byte_tokenizer, tmp_path):
    """Per-token advantages of the loop equal gamma_k * A computed here from the eager attention maps."""
    from transformers import AutoModelForCausalLM

    from kfh_probe.alignment import align_generated

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    eager = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager").eval()
    prompt = R1_TRACES[0]["prompt"]
    rollouts = crafted_rollouts(byte_tokenizer, [R1_TRACES[0]["response"], WRONG_54], prompt)
    heads = [(2, 1), (1, 3), (2, 0)]
    strategy = attnpo_strategy(model, byte_tokenizer, write_manifest(tmp_path / "m.json", model, heads), horizon=0,
                               group_size=2)
    correct = rollout_correctness(rollouts, ["55"], strategy.config)
    assert correct.tolist() == [[1.0, 0.0]]
    advantages = torch.tensor([[0.9, -0.9]])

    out, stats = separate_advantages(strategy, model, CreditBatch(rollouts, correct, advantages, 0), 0)

    trace = align_generated(byte_tokenizer, rollouts.prompt_ids[0], rollouts.response_ids[0])
    ids = torch.tensor([trace.input_ids])
    with torch.no_grad():
        maps = eager(input_ids=ids, output_attentions=True).attentions  # per layer [1, H, T, T]
    f0, f1 = trace.answer_span
    p, plen = 0.5, trace.prompt_len
    baseline = p**2 * (f1 - f0) / trace.length
    expected = torch.full((len(rollouts.response_ids[0]),), 0.9)
    attenuated = 0
    for start, end in trace.step_spans:
        score = sum(maps[l][0, h, f0:f1, start:end].sum(0).mean() for l, h in heads) / len(heads)
        gamma = p**2 * float(score) / baseline + (1 - p**2) if score < baseline else 1.0
        attenuated += gamma != 1.0
        expected[start - plen : end - plen] = 0.9 * gamma
    torch.testing.assert_close(out[0], expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out[1], torch.full((len(rollouts.response_ids[1]),), -0.9))
    assert stats["rescaled_responses"] == 1 and len(trace.step_spans) >= 2
    assert stats["frac_attenuated"] == attenuated / len(trace.step_spans)


def test_attnpo_step_rescales_correct_rollouts(tiny_model_dir, manifest_file, data_file, tmp_path, byte_tokenizer,
                                                monkeypatch):
    """A full training step on crafted correct rollouts goes through alignment, KFH scoring and rescaling."""
    prompt = R1_TRACES[0]["prompt"]
    fake = crafted_rollouts(byte_tokenizer, [R1_TRACES[0]["response"], SHORT_55], prompt)
    monkeypatch.setattr(loop, "generate_rollouts", lambda *args, **kwargs: fake)
    monkeypatch.setattr(PromptSource, "draw", lambda self, rng, k: [Prompt("p", prompt, "55")])
    config = small_config(tiny_model_dir, manifest_file, data_file, tmp_path / "out", method="attnpo", steps=1,
                          prompts_per_step=1, group_size=2, horizon=0)
    inputs = loop.prepare_run(config)
    correct = rollout_correctness(fake, ["55"], config)
    batch = CreditBatch(fake, correct, group_advantages(inputs.strategy.rewards(correct, fake)), 0)
    expected, stats = separate_advantages(attnpo_strategy(inputs.model, byte_tokenizer, manifest_file, horizon=0),
                                          inputs.model, batch, inputs.pad_id)
    metrics = loop.train(inputs, config, progress=False)
    m = metrics[0]
    assert m["accuracy"] == 1.0 and m["rescaled_responses"] == 2.0
    # p = 1: Pos-Adv attenuates the short response's low-score steps, Neg-Adv zeroes the long one's high-score steps
    assert m["mean_gamma"] < 1.0 and m["frac_attenuated"] > 0.0
    assert (m["mean_gamma"], m["frac_attenuated"]) == pytest.approx((stats["mean_gamma"], stats["frac_attenuated"]))
    # both reasonings: "Wait" (confused); "Okay, so" and "So" (summary); "Hmm, alternatively" is neither
    assert (m["confused_per_response"], m["summary_per_response"]) == (1.0, 2.0)
    # on-policy (ratio 1): the loss is -sum of the token advantages / tokens
    assert m["loss"] == pytest.approx(-float(torch.cat(expected).sum()) / sum(map(len, expected)), abs=1e-6)
    assert m["loss"] != 0.0 and m["grad_norm"] > 0.0


# --- resume -----------------------------------------------------------------------------------------


def test_interrupted_and_resumed_runs_log_the_same_metrics(tiny_model_dir, manifest_file, data_file, tmp_path,
                                                          monkeypatch):
    settings = dict(method="tlmre", steps=3, kl_coef=0.5, lr=0.05, checkpoint_every=100, temperature=1.5,
                    group_size=2, max_new_tokens=12)
    straight_config = small_config(tiny_model_dir, manifest_file, data_file, tmp_path / "a", **settings)
    straight = loop.train(loop.prepare_run(straight_config), straight_config, progress=False)
    assert len({round(m["kl"], 9) for m in straight}) == 3, "the metrics must change from step to step"

    # K steps, then resume to N
    short = small_config(tiny_model_dir, manifest_file, data_file, tmp_path / "b", **{**settings, "steps": 1})
    loop.train(loop.prepare_run(short), short, progress=False)
    full = dataclasses.replace(short, steps=3)
    scramble_global_rngs()  # a resumed run starts in a fresh process
    resumed = loop.train(loop.prepare_run(full), full, resume=True, progress=False)
    assert without_timing(resumed) == without_timing(straight)

    # Ctrl-C during the third step: a checkpoint of step 2 is saved, the resumed run ends identical
    config = small_config(tiny_model_dir, manifest_file, data_file, tmp_path / "c", **settings)
    real_step = loop.train_step

    def interrupted(step, *args, **kwargs):
        if step == 2:
            raise KeyboardInterrupt
        return real_step(step, *args, **kwargs)

    monkeypatch.setattr(loop, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        loop.train(loop.prepare_run(config), config, progress=False)
    assert latest_checkpoint(tmp_path / "c").name == "step-00000002"
    assert len((tmp_path / "c" / "metrics.jsonl").read_text().splitlines()) == 2
    monkeypatch.setattr(loop, "train_step", real_step)
    scramble_global_rngs()
    resumed = loop.train(loop.prepare_run(config), config, resume=True, progress=False)
    assert without_timing(resumed) == without_timing(straight)
    lines = [json.loads(l) for l in (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()]
    assert without_timing(lines) == without_timing(straight)
    a = torch.load(tmp_path / "a" / "checkpoints" / "step-00000003" / "state.pt", weights_only=False)["model"]
    c = torch.load(tmp_path / "c" / "checkpoints" / "step-00000003" / "state.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_resume_refuses_changed_settings_and_ignores_partial_checkpoints(tiny_model_dir, manifest_file, data_file,
                                                                         tmp_path):
    config = small_config(tiny_model_dir, manifest_file, data_file, tmp_path / "out", method="rloo", steps=1,
                          group_size=2, max_new_tokens=8)
    loop.train(loop.prepare_run(config), config, progress=False)
    (tmp_path / "out" / "checkpoints" / ".tmp-step-00000009-1").mkdir()  # a write that never finished
    assert latest_checkpoint(tmp_path / "out").name == "step-00000001"
    changed = dataclasses.replace(config, steps=2, lr=1e-3)
    with pytest.raises(ValueError, match="lr: checkpoint 1e-05, now 0.001"):
        loop.train(loop.prepare_run(changed), changed, resume=True, progress=False)
    with pytest.raises(ResumeError, match="no checkpoint"):
        empty = dataclasses.replace(config, out=str(tmp_path / "empty"))
        loop.train(loop.prepare_run(empty), empty, resume=True, progress=False)


# --- refusals ---------------------------------------------------------------------------------------


def test_data_rows_without_a_checkable_answer_are_reported_by_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(
        '{"prompt": "a", "answer": "1"}\n'
        '{"prompt": "b", "id": "x"}\n'
        "\n"
        '{"prompt": "c", "answer": "  "}\n'
        '{"prompt": "d", "answer": true}\n'
        "not json\n"
        '{"answer": "3"}\n'
        '{"prompt": "e", "answer": 7}\n',
        encoding="utf-8",
    )
    with pytest.raises(DataError) as err:
        load_prompts(path)
    message = str(err.value)
    assert "5 row(s)" in message
    for expected in ("line 2 (id 'x'): no checkable answer", "line 4: no checkable answer ('answer' is empty)",
                     "line 5: no checkable answer", "line 6: not valid JSON", "line 7: 'prompt' is missing"):
        assert expected in message
    assert "line 1" not in message and "line 8" not in message


def test_load_prompts_reads_ids_and_numeric_answers(tmp_path):
    path = tmp_path / "ok.jsonl"
    path.write_text('{"prompt": "a", "answer": 12, "id": "q1"}\n{"prompt": "b", "answer": " 3 "}\n', encoding="utf-8")
    assert load_prompts(path) == [Prompt("q1", "a", "12"), Prompt("line-2", "b", "3")]


def test_manifest_refusals_happen_before_training(tiny_model_dir, data_file, tmp_path):
    from kfh_probe.manifest import ManifestMismatchError

    shape = tmp_path / "shape.json"
    write_manifest(shape, tiny_model_dir, num_layers=5)
    config = small_config(tiny_model_dir, shape, data_file, tmp_path / "out")
    with pytest.raises(ManifestMismatchError, match="num_layers: manifest 5, model 3"):
        loop.prepare_run(config)
    with pytest.raises(ManifestMismatchError, match="num_layers"):
        loop.prepare_run(dataclasses.replace(config, allow_finetuned=True))

    other = tmp_path / "other.json"
    write_manifest(other, tiny_model_dir, fingerprint="0" * 64)
    config = small_config(tiny_model_dir, other, data_file, tmp_path / "out")
    with pytest.raises(ManifestMismatchError, match="fingerprint mismatch"):
        loop.prepare_run(config)
    inputs = loop.prepare_run(dataclasses.replace(config, allow_finetuned=True))
    assert inputs.strategy.heads == [(2, 0), (2, 1), (2, 2)]
    assert not (tmp_path / "out").exists()


# --- small pieces -----------------------------------------------------------------------------------


def test_phrase_counts_use_the_segmenter_families_in_the_reasoning_only():
    text = "Okay, so x. Wait, no. Hmm, wait: But Sometimes. Therefore y. So z.\nHmm fine </think> Wait So"
    assert phrase_counts(text) == {"confused": 3, "summary": 3}
    assert phrase_counts("no marker: But So") == {"confused": 1, "summary": 1}


def test_rewards_count_unfinished_responses_as_incorrect(byte_tokenizer):
    prompt = R1_TRACES[0]["prompt"]
    rollouts = crafted_rollouts(byte_tokenizer, [R1_TRACES[0]["response"], SHORT_55, WRONG_54], prompt)
    rollouts.finished[1] = False
    correct = rollout_correctness(rollouts, ["55"], TrainConfig(group_size=3))
    assert correct.tolist() == [[1.0, 0.0, 0.0]]
    # the method's strategy picks the reward: TLMRE's length-penalised one, or the correctness itself for "rloo"
    tlmre = strategy_class("tlmre")(TrainConfig(method="tlmre")).rewards(correct, rollouts)
    assert tlmre[0].tolist() == pytest.approx([0.9, 0.0, 0.0])
    rloo = strategy_class("rloo")(TrainConfig(method="rloo")).rewards(correct, rollouts)
    assert rloo.tolist() == correct.tolist() == [[1.0, 0.0, 0.0]]


def test_generate_rollouts_trims_at_eos_and_keeps_prompt_ids(tiny_model_dir, byte_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    prompts = [Prompt("a", "What is 1+1?", "2"), Prompt("b", R1_TRACES[1]["prompt"], "21")]
    torch.manual_seed(0)
    rollouts = generate_rollouts(model, byte_tokenizer, [p.text for p in prompts], 2, 12, 1.0)
    eos = byte_tokenizer.eos_token_id
    assert len(rollouts.response_ids) == 4
    for i, (ids, done) in enumerate(zip(rollouts.response_ids, rollouts.finished)):
        assert rollouts.prompt_ids[i] == byte_tokenizer(prompts[i // 2].text, add_special_tokens=False)["input_ids"]
        assert (ids[-1] == eos and eos not in ids[:-1]) if done else (len(ids) == 12 and eos not in ids)
    greedy = generate_rollouts(model, byte_tokenizer, [prompts[0].text], 2, 12, None)
    assert greedy.response_ids[0] == greedy.response_ids[1]


def test_a_checkpoint_from_before_a_setting_existed_resumes_with_its_default(tmp_path):
    from attnpo_train.checkpoint import check_resumable

    config = TrainConfig(method="coupled")
    saved = dataclasses.asdict(config)
    del saved["rhythm_rule"], saved["fused_scoring"]  # a checkpoint written before these settings were added
    check_resumable(saved, config, tmp_path)  # their defaults are what that run did: accepted
    with pytest.raises(ResumeError, match="rhythm_rule: checkpoint 'project', now 'paper'"):
        check_resumable(saved, dataclasses.replace(config, rhythm_rule="paper"), tmp_path)
