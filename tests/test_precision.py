"""Mixed precision and activation checkpointing in the trainer (``TrainConfig.dtype``, ``weights_dtype``,
``gradient_checkpointing``; ``attnpo_train.precision``): a checkpointed update observes every attention call once
per micro-batch and gives the plain update's credit and gradients; step scores read under bf16 autocast stay
float32 and match the separate float32 forward's within a stated tolerance; seeded bf16 runs repeat exactly."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter

import pytest
import torch

from attnpo_train import loop
from attnpo_train.advantages import group_advantages
from attnpo_train.checkpoint import latest_checkpoint
from attnpo_train.config import TrainConfig
from attnpo_train.precision import enable_checkpointing
from attnpo_train.rewards import rollout_correctness
from attnpo_train.strategies import CreditBatch, read_separately, strategy_class
from conftest import R1_TRACES, SHORT_55, attnpo_strategy, max_difference, small_config, tiny_model, write_manifest
from kfh_probe import InputError, SettingError
from kfh_probe.capture import AnswerRowRecorder, answer_rows, attention_calls, attention_modules
from kfh_probe.organism import default_manifest_path, default_model_dir
from kfh_probe.sampling import Rollouts

AUTOCAST_SCORE_TOLERANCE = 0.01
"""|step score under bf16 autocast - step score of the float32 forward| / the response's largest score, at most:
bf16 keeps 8 mantissa bits, so q and k carry about 0.4% relative error each into the logits."""


class CountingRecorder:
    """A strategy's recorder that also notes the layer of every attention call it sees."""

    def __init__(self, inner, calls: Counter) -> None:
        self.inner, self.calls = inner, calls

    def __call__(self, module, *args) -> None:
        self.calls[module.layer_idx] += 1
        self.inner(module, *args)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def counted_update(strategy, model, batch, config, pad_id) -> tuple[Counter, Counter, list, list]:
    """One update of ``batch``: (observed attention calls per layer, attention-module forwards per layer (the
    recomputation included), per-token advantages, gradients)."""
    observed, ran = Counter(), Counter()
    make = strategy.recorder
    strategy.recorder = lambda *args: CountingRecorder(make(*args), observed)
    hooks = [module.register_forward_hook(lambda m, *_: ran.update([m.layer_idx]))
             for modules in attention_modules(model).values() for module in modules]
    try:
        strategy.prepare(batch)
        loop.accumulate_policy_gradient(model, None, batch.rollouts, strategy, config, pad_id)
    finally:
        del strategy.recorder
        for hook in hooks:
            hook.remove()
    values = [strategy.handed_out[i] for i in range(len(batch.rollouts.response_ids))]
    return observed, ran, values, [p.grad.clone() for p in model.parameters()]


def check_checkpointed_update(strategy, model, batch, pad_id, micro_batches: int) -> None:
    """The checkpointed update replays every layer in backward, yet its observer sees each watched layer once per
    micro-batch, and it gives the plain update's advantages and gradients."""
    plain = counted_update(strategy, model, batch, strategy.config, pad_id)
    enable_checkpointing(model)
    checkpointed = counted_update(strategy, model, batch, dataclasses.replace(strategy.config, gradient_checkpointing=True),
                                  pad_id)
    layers = sorted(attention_modules(model))
    assert plain[1] == {layer: micro_batches for layer in layers}
    assert checkpointed[1] == {layer: 2 * micro_batches for layer in layers}  # forward + recomputation
    assert plain[0] == checkpointed[0] == {layer: micro_batches for layer in strategy.layers}
    assert max_difference(plain[2], checkpointed[2]) <= 1e-6
    assert max_difference(plain[3], checkpointed[3]) <= 1e-6
    assert not model.training


def r1_rollouts(tokenizer) -> Rollouts:
    """One group of three correct R1-style responses of different lengths (Pos-Adv and Neg-Adv both act)."""
    prompt = R1_TRACES[0]["prompt"]
    answers = [R1_TRACES[0]["response"], R1_TRACES[0]["response"].replace("Yes.", "Yes, that is right."), SHORT_55]
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = [tokenizer(r, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for r in answers]
    return Rollouts(3, [list(prompt_ids)] * 3, response_ids, answers, [True] * 3)


def prepared(strategy, rollouts, answers, step: int = 3) -> CreditBatch:
    correct = rollout_correctness(rollouts, answers, strategy.config)
    return CreditBatch(rollouts, correct, group_advantages(strategy.rewards(correct, rollouts), strategy.config.estimator), step)


def test_a_checkpointed_update_observes_each_attention_call_once_per_micro_batch_on_a_tiny_qwen2(byte_tokenizer, tmp_path):
    model = tiny_model("qwen2", vocab_size=len(byte_tokenizer))
    strategy = attnpo_strategy(model, byte_tokenizer, write_manifest(tmp_path / "m.json", model, [(2, 1), (0, 3)]),
                               group_size=3, horizon=0, micro_batch_size=2)
    batch = prepared(strategy, r1_rollouts(byte_tokenizer), ["55"])
    check_checkpointed_update(strategy, model, batch, byte_tokenizer.pad_token_id, micro_batches=2)


@pytest.mark.parametrize("method", ["attnpo", "coupled"])
def test_a_checkpointed_update_observes_each_attention_call_once_per_micro_batch_on_the_organism(method, organism_rollouts):
    model, tokenizer, prompts, rollouts, _ = organism_rollouts
    strategy = strategy_class(method)(TrainConfig(method=method, horizon=0, micro_batch_size=5), ground_truth=False)
    strategy.attach(model, tokenizer)
    batch = prepared(strategy, rollouts, [p.answer for p in prompts])
    check_checkpointed_update(strategy, model, batch, tokenizer.pad_token_id, micro_batches=3)  # 12 rollouts by 5


def test_a_backward_inside_the_observing_block_is_refused_rather_than_observed_twice(byte_tokenizer):
    model = tiny_model("qwen2", vocab_size=len(byte_tokenizer))
    enable_checkpointing(model)
    ids = torch.tensor([byte_tokenizer(R1_TRACES[1]["prompt"] + R1_TRACES[1]["response"])["input_ids"][:40]])
    answer = torch.zeros_like(ids, dtype=torch.bool)
    answer[0, -5:] = True
    recorder = AnswerRowRecorder(*answer_rows(answer), {1: [0]})
    model.train()
    with pytest.raises(RuntimeError, match="layer 1's attention was called for 2 batch rows"):
        with attention_calls(model, [1], recorder):
            model(input_ids=ids).logits.float().logsumexp(-1).mean().backward()


def test_checkpointing_refuses_a_policy_with_dropout(byte_tokenizer):
    model = tiny_model("qwen2", vocab_size=len(byte_tokenizer), attention_dropout=0.1)
    with pytest.raises(InputError, match="gradient_checkpointing.*attention_dropout=0.1"):
        enable_checkpointing(model)


def test_bfloat16_weights_need_the_bfloat16_compute_dtype():
    with pytest.raises(SettingError, match="weights_dtype"):
        TrainConfig(weights_dtype="bfloat16")
    assert TrainConfig(dtype="bfloat16", weights_dtype="bfloat16").weights_dtype == "bfloat16"
    with pytest.raises(SettingError, match="'dtype' must be one of"):
        TrainConfig(dtype="float64")


def test_attention_observers_compute_in_float32_under_autocast(byte_tokenizer):
    model = tiny_model("qwen2", vocab_size=len(byte_tokenizer))
    seen = []

    def observer(module, query, key, mask, kwargs) -> None:
        seen.append((query[:, :1].float() @ key[:, :1].float().transpose(-1, -2)).dtype)

    ids = torch.tensor([byte_tokenizer(R1_TRACES[0]["prompt"])["input_ids"][:30]])
    with attention_calls(model, [0], observer), torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids)
    assert seen == [torch.float32]  # under autocast a float32 matmul would run in bfloat16


def test_step_scores_under_bf16_autocast_match_the_float32_forward_within_tolerance(organism_rollouts):
    model, tokenizer, prompts, rollouts, _ = organism_rollouts
    strategy = attnpo_strategy(model, tokenizer, horizon=0, micro_batch_size=4, dtype="bfloat16")
    batch = prepared(strategy, rollouts, [p.answer for p in prompts])
    strategy.prepare(batch)
    read_separately(strategy, model, tokenizer.pad_token_id, 4)  # no autocast: the weights' float32
    separate = dict(strategy.readings)
    strategy.prepare(batch)
    loop.accumulate_policy_gradient(model, None, rollouts, strategy, strategy.config, tokenizer.pad_token_id)
    fused = strategy.readings
    assert sorted(fused) == sorted(separate) and len(fused) >= 4
    worst = 0.0
    for i, rating in fused.items():
        assert rating.scores.dtype == torch.float32
        worst = max(worst, float((rating.scores - separate[i].scores).abs().max() / separate[i].scores.abs().max()))
    print(f"\nbf16 autocast vs float32 step scores: largest relative difference {worst:.2e}")
    assert 0 < worst <= AUTOCAST_SCORE_TOLERANCE  # > 0: autocast did act on the forward


def non_timing(metrics: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if k not in loop.TIMING_FIELDS} for m in metrics]


def test_seeded_bfloat16_runs_repeat_exactly_and_differ_from_float32(tmp_path):
    config = TrainConfig(method="attnpo", steps=2, prompts_per_step=2, group_size=4, max_new_tokens=200, horizon=0,
                         lr=2e-3, seed=5, micro_batch_size=4, model=str(default_model_dir()), dtype="bfloat16",
                         manifest=str(default_manifest_path()), out=str(tmp_path / "a"), checkpoint_every=10)
    first = loop.train(loop.prepare_run(config), config, progress=False)
    again_config = dataclasses.replace(config, out=str(tmp_path / "b"))
    again = loop.train(loop.prepare_run(again_config), again_config, progress=False)
    assert non_timing(first) == non_timing(again)
    float32_config = dataclasses.replace(config, dtype="float32", out=str(tmp_path / "c"))
    float32 = loop.train(loop.prepare_run(float32_config), float32_config, progress=False)
    assert [m["loss"] for m in float32] != [m["loss"] for m in first]


def test_a_float16_run_scales_its_loss_and_checkpoints_the_scale(tiny_model_dir, manifest_file, data_file, tmp_path):
    config = small_config(tiny_model_dir, manifest_file, data_file, tmp_path / "run", dtype="float16",
                          gradient_checkpointing=True)
    metrics = loop.train(loop.prepare_run(config), config, progress=False)
    assert all(m["loss_scale"] > 0 for m in metrics)
    state = torch.load(latest_checkpoint(config.out) / "state.pt", weights_only=False)
    assert state["scaler"]["scale"] == metrics[-1]["loss_scale"]


def test_bfloat16_weights_keep_the_weights_and_adamw_states_in_bfloat16(tiny_model_dir, manifest_file, data_file,
                                                                          tmp_path):
    config = small_config(tiny_model_dir, manifest_file, data_file, tmp_path, dtype="bfloat16",
                          weights_dtype="bfloat16", allow_finetuned=True, steps=1)
    inputs = loop.prepare_run(config)
    loop.train(inputs, config, progress=False)
    state = torch.load(latest_checkpoint(config.out) / "state.pt", weights_only=False)
    assert {p.dtype for p in inputs.model.parameters()} == {torch.bfloat16}
    assert {s["exp_avg"].dtype for s in state["optimizer"]["state"].values()} == {torch.bfloat16}


def moved_fraction(dtype: torch.dtype, lr: float, byte_tokenizer) -> float:
    """The fraction of a tiny Qwen2's weights, stored in ``dtype``, that one AdamW step of the trainer moves."""
    model = tiny_model("qwen2", vocab_size=len(byte_tokenizer)).to(dtype)
    optimizer, _ = loop.make_optimizer(model, TrainConfig(lr=lr, weight_decay=0.0))
    before = torch.cat([p.detach().flatten().float() for p in model.parameters()])
    ids = torch.tensor([byte_tokenizer(R1_TRACES[0]["prompt"])["input_ids"][:40]])
    model(input_ids=ids).logits.float().logsumexp(-1).mean().backward()
    optimizer.step()
    return float((before != torch.cat([p.detach().flatten().float() for p in model.parameters()])).float().mean())


def test_bfloat16_weights_lose_updates_below_their_resolution(byte_tokenizer):
    small, master = moved_fraction(torch.bfloat16, 1e-5, byte_tokenizer), moved_fraction(torch.float32, 1e-5, byte_tokenizer)
    print(f"\none AdamW step at lr 1e-5 moves {small:.1%} of bfloat16 weights, {master:.1%} of float32 ones")
    assert small < 0.1 and master > 0.5  # the documented trade-off: ~lr-sized steps vanish below bf16's spacing
    assert moved_fraction(torch.bfloat16, 1e-2, byte_tokenizer) > 0.5  # unused embedding rows get no gradient


def test_the_cli_trains_in_bf16_with_checkpointing_and_resumes_without_it_but_not_in_float32(
        tiny_model_dir, manifest_file, data_file, tmp_path, capsys):
    from attnpo_train.cli import main

    args = ["run", "--model", str(tiny_model_dir), "--manifest", str(manifest_file), "--data", str(data_file),
            "--out", str(tmp_path / "out"), "--set", "prompts_per_step=1", "--set", "group_size=2",
            "--set", "max_new_tokens=8", "--no-progress"]
    assert main([*args, "--steps", "1", "--dtype", "bfloat16", "--set", "gradient_checkpointing=true"]) == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["dtype"], config["gradient_checkpointing"]) == ("bfloat16", True)
    assert main([*args, "--steps", "2", "--dtype", "bfloat16", "--resume"]) == 0
    assert main([*args, "--steps", "3", "--resume"]) == 2
    assert "dtype: checkpoint 'bfloat16', now 'float32'" in capsys.readouterr().err


def test_a_resumed_float16_run_continues_from_the_checkpointed_loss_scale(tiny_model_dir, manifest_file, data_file,
                                                                           tmp_path):
    config = small_config(tiny_model_dir, manifest_file, data_file, tmp_path / "run", dtype="float16", steps=1)
    loop.train(loop.prepare_run(config), config, progress=False)
    path = latest_checkpoint(config.out) / "state.pt"
    state = torch.load(path, weights_only=False)
    state["scaler"]["scale"] = 1024.0  # a scale the fresh scaler (65536) would not start from
    torch.save(state, path)
    resumed_config = dataclasses.replace(config, steps=2)
    metrics = loop.train(loop.prepare_run(resumed_config), resumed_config, resume=True, progress=False)
    assert metrics[-1]["loss_scale"] in (1024.0, 512.0)  # kept, or halved once by an overflow in the step
