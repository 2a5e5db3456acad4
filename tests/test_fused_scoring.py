"""Fused KFH scoring (``TrainConfig.fused_scoring``): the step scores read off the update's own forward give
the per-token advantages, gradients and training metrics of the separate scoring forward; the capture hook
it is built on leaves the forward and its gradients untouched."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from attnpo_train import loop
from attnpo_train.advantages import group_advantages
from attnpo_train.config import TrainConfig
from attnpo_train.rewards import rollout_correctness
from attnpo_train.strategies import CreditBatch, read_separately
from attnpo_train.truth import GroundTruth
from conftest import R1_TRACES, SHORT_55, attnpo_strategy, max_difference, tiny_model, write_manifest
from kfh_probe.capture import AnswerRowRecorder, answer_rows, attention_calls, capture_answer_attention
from kfh_probe.organism import default_manifest_path, default_model_dir
from kfh_probe.sampling import Rollouts

ORGANISM = default_model_dir()
TOLERANCE = 1e-6  # the bound on |fused - unfused| per-token advantage


def both_paths(strategy, model, rollouts, answers, config, prompt_texts=None):
    """(unfused advantages, metrics, truth, gradients), (fused advantages, metrics, truth, gradients) of one update
    at step 3: the attention read in separate no-grad forwards (``read_separately``), then off the update's own."""
    correct = rollout_correctness(rollouts, answers, config)
    advantages = group_advantages(strategy.rewards(correct, rollouts), config.estimator)
    truth = None if prompt_texts is None else GroundTruth.read(prompt_texts, rollouts)
    pad_id = strategy.tokenizer.pad_token_id
    results = []
    for fused in (False, True):
        strategy.prepare(CreditBatch(rollouts, correct, advantages, 3, truth))
        if not fused:
            read_separately(strategy, model, pad_id, config.micro_batch_size)
        loop.accumulate_policy_gradient(model, None, rollouts, strategy, config, pad_id)
        values = [strategy.handed_out[i] for i in range(len(rollouts.response_ids))]
        results.append((values, strategy.metrics(), strategy.truth, [p.grad.clone() for p in model.parameters()]))
    return results


def assert_same_credit(unfused, fused, grad_tolerance: float) -> None:
    (u_values, u_metrics, u_truth, u_grads), (f_values, f_metrics, f_truth, f_grads) = unfused, fused
    assert max_difference(u_values, f_values) <= TOLERANCE
    assert u_metrics["rescaled_responses"] == f_metrics["rescaled_responses"] > 0
    assert u_metrics == f_metrics and u_truth == f_truth
    assert max_difference(u_grads, f_grads) <= grad_tolerance


@pytest.mark.parametrize("credit", ["attention", "shuffled", "oracle"])
def test_fused_and_unfused_scoring_give_the_same_advantages_and_gradients_on_the_organism(credit, organism_rollouts):
    model, tokenizer, prompts, rollouts, _ = organism_rollouts
    # micro-batches of 3 split the groups of 4 and mix rated and unrated responses: the scoring forward's
    # batches (rated responses only) are composed differently from the update's
    strategy = attnpo_strategy(model, tokenizer, ground_truth=True, credit=credit, horizon=0, micro_batch_size=3)
    texts = [prompts[i // 4].text for i in range(len(rollouts.texts))]
    unfused, fused = both_paths(strategy, model, rollouts, [p.answer for p in prompts], strategy.config, texts)
    assert_same_credit(unfused, fused, grad_tolerance=1e-6)
    assert 0 < unfused[1]["frac_attenuated"] < 1 and unfused[2] is not None
    print(f"\nattnpo ({credit}): max |fused - unfused| advantage {max_difference(unfused[0], fused[0]):.3g}")


def test_fused_and_unfused_scoring_agree_on_a_qwen2_with_bf16_weights(byte_tokenizer, tmp_path):
    model = tiny_model("qwen2", vocab_size=len(byte_tokenizer)).to(torch.bfloat16)
    prompt = R1_TRACES[0]["prompt"]
    # all correct (p = 1), three lengths: the shortest has A > 0 (Pos-Adv), the longest A < 0 (Neg-Adv)
    answers = [R1_TRACES[0]["response"], R1_TRACES[0]["response"].replace("Yes.", "Yes, that is right."), SHORT_55]
    prompt_ids = byte_tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = [byte_tokenizer(r, add_special_tokens=False)["input_ids"] + [byte_tokenizer.eos_token_id]
                    for r in answers]
    rollouts = Rollouts(3, [list(prompt_ids)] * 3, response_ids, answers, [True] * 3)
    manifest = write_manifest(tmp_path / "m.json", model, [(2, 1), (1, 3), (2, 0)])
    strategy = attnpo_strategy(model, byte_tokenizer, manifest, group_size=3, horizon=0, micro_batch_size=2)
    unfused, fused = both_paths(strategy, model, rollouts, ["55"], strategy.config)
    assert_same_credit(unfused, fused, grad_tolerance=0.0)
    assert unfused[1]["frac_attenuated"] > 0


@pytest.mark.slow
def test_fused_and_unfused_seeded_runs_log_the_same_metrics(tmp_path):
    config = TrainConfig(method="attnpo", steps=3, prompts_per_step=2, group_size=4, max_new_tokens=320, horizon=0,
                         lr=2e-3, seed=3, micro_batch_size=3, model=str(ORGANISM),
                         manifest=str(default_manifest_path()), out=str(tmp_path / "fused"), checkpoint_every=10)
    fused = loop.train(loop.prepare_run(config), config, progress=False)
    unfused_config = dataclasses.replace(config, fused_scoring=False, out=str(tmp_path / "unfused"))
    unfused = loop.train(loop.prepare_run(unfused_config), unfused_config, progress=False)
    assert sum(m["rescaled_responses"] for m in fused) > 0 and len({m["loss"] for m in fused}) == 3
    timing = set(loop.TIMING_FIELDS)
    assert [{k: v for k, v in m.items() if k not in timing} for m in fused] == \
        [{k: v for k, v in m.items() if k not in timing} for m in unfused]
    assert all(m["time_scoring_s"] > 0 for m in fused)


def test_attention_calls_leave_the_forward_and_its_gradients_untouched(byte_tokenizer):
    model = tiny_model("qwen2", vocab_size=len(byte_tokenizer))
    ids = torch.tensor([byte_tokenizer(R1_TRACES[1]["prompt"] + R1_TRACES[1]["response"])["input_ids"][:60]])
    answer = torch.zeros_like(ids, dtype=torch.bool)
    answer[0, -7:] = True

    def loss_and_grads():
        loss = model(input_ids=ids).logits.float().logsumexp(-1).mean()
        grads = torch.autograd.grad(loss, list(model.parameters()))
        return loss.detach(), grads

    plain_loss, plain_grads = loss_and_grads()
    rows, valid = answer_rows(answer)
    recorder = AnswerRowRecorder(rows, valid, {0: [3], 2: [1, 0]})
    with attention_calls(model, [0, 2], recorder):
        watched_loss, watched_grads = loss_and_grads()
    assert torch.equal(plain_loss, watched_loss)
    assert all(torch.equal(a, b) for a, b in zip(plain_grads, watched_grads))
    # only the heads asked for, detached, equal to the probe's own capture of every head
    full = capture_answer_attention(model, ids, torch.ones_like(ids), answer, layers=[0, 2])
    assert recorder.results[0].shape == (1, 1, 60) and not recorder.results[2].requires_grad
    torch.testing.assert_close(recorder.results[0][:, 0], full.values[:, 0, 3], atol=1e-6, rtol=0)
    torch.testing.assert_close(recorder.results[2], full.values[:, 1, [1, 0]], atol=1e-6, rtol=0)


def test_fused_scoring_refuses_attention_dropout_in_training_mode(byte_tokenizer, tmp_path):
    model = tiny_model("qwen2", vocab_size=len(byte_tokenizer), attention_dropout=0.1).train()
    prompt_ids = byte_tokenizer(R1_TRACES[0]["prompt"], add_special_tokens=False)["input_ids"]
    response = byte_tokenizer(R1_TRACES[0]["response"], add_special_tokens=False)["input_ids"] + [0]
    rollouts = Rollouts(2, [prompt_ids] * 2, [response] * 2, [R1_TRACES[0]["response"]] * 2, [True] * 2)
    strategy = attnpo_strategy(model, byte_tokenizer, write_manifest(tmp_path / "m.json", model, [(1, 0)]))
    strategy.prepare(CreditBatch(rollouts, torch.tensor([[1.0, 1.0]]), torch.tensor([[0.1, -0.1]]), 0))
    with pytest.raises(ValueError, match="attention dropout"):
        with strategy.observe(model, [0, 1], torch.tensor([prompt_ids + response] * 2)):
            pass
