"""A credit strategy defined outside ``attnpo_train`` and registered by name trains through ``attnpo-train run
--method NAME`` and through the TRL adapter: both run its attention observer and hand out its per-token
advantages. The registry refuses a name twice and names the registered ones for an unknown one."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import R1_TRACES, SHORT_55, WRONG_54, crafted_rollouts

from attnpo_train import loop
from attnpo_train.cli import main
from attnpo_train.config import TrainConfig
from attnpo_train.data import Prompt, PromptSource
from attnpo_train.strategies import CreditStrategy, methods, register, strategy_class


class CallCounter:
    """An attention observer that counts, per batch row, the attention calls it saw."""

    def __init__(self, rows: int) -> None:
        self.calls = [0] * rows
        self.started = 0  # rows of the batch seen so far (a batch may arrive in consecutive chunks)

    def __call__(self, module, query, key, attention_mask, kwargs) -> None:
        for b in range(self.started, self.started + query.shape[0]):
            self.calls[b] += 1
        self.started += query.shape[0]

    def check_reported(self, model) -> None:
        assert any(self.calls), "the watched layer never called the attention interface"


@register("late_tokens")
class LateTokens(CreditStrategy):
    """The outcome advantage weighted 2 (t + 1) / (n + 1) on response token t of n (later tokens more), after
    watching layer 0's attention of every rollout (the count of its calls is the reading)."""

    handed: list[torch.Tensor] = []  # every advantage handed out, across instances (the loop builds its own)

    def attach(self, model, tokenizer, gather_params=None) -> None:
        super().attach(model, tokenizer, gather_params)
        self.layers = [0]

    def prepare(self, batch) -> None:
        super().prepare(batch)
        self.wanted = set(range(len(batch.rollouts.response_ids)))

    def recorder(self, indices, shape, offsets, device) -> CallCounter:
        return CallCounter(len(indices))

    def read(self, indices, offsets, recorder: CallCounter) -> dict[int, int]:
        return {i: calls for i, calls in zip(indices, recorder.calls) if self.wants(i)}

    def advantages(self, indices: list[int]) -> list[torch.Tensor]:
        flat = self.batch.advantages.reshape(-1)
        out = []
        for i in indices:
            assert self.readings[i] >= 1  # observed before its advantages are asked for
            n = len(self.batch.rollouts.response_ids[i])
            out.append(float(flat[i]) * torch.arange(1, n + 1, dtype=torch.float32) * 2 / (n + 1))
        LateTokens.handed += out
        return out


def late_tokens(advantage: float, n: int) -> torch.Tensor:
    return advantage * torch.arange(1, n + 1, dtype=torch.float32) * 2 / (n + 1)


def test_a_strategy_registered_outside_the_package_trains_through_the_cli(tiny_model_dir, manifest_file, data_file,
                                                                          tmp_path, byte_tokenizer, monkeypatch):
    prompt = R1_TRACES[0]["prompt"]
    fake = crafted_rollouts(byte_tokenizer, [R1_TRACES[0]["response"], SHORT_55, WRONG_54], prompt)
    monkeypatch.setattr(loop, "generate_rollouts", lambda *args, **kwargs: fake)
    monkeypatch.setattr(PromptSource, "draw", lambda self, rng, k: [Prompt("p", prompt, "55")])
    LateTokens.handed.clear()
    code = main(["run", "--model", str(tiny_model_dir), "--data", str(data_file), "--out", str(tmp_path / "out"),
                 "--method", "late_tokens", "--steps", "1", "--no-progress", "--set", "group_size=3",
                 "--set", "prompts_per_step=1", "--set", "micro_batch_size=2"])
    assert code == 0
    [metrics] = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    # TLMRE rewards of (long correct, short correct, wrong), RLOO: the short one's advantage is the largest
    assert metrics["accuracy"] == pytest.approx(2 / 3) and len(LateTokens.handed) == 3
    lengths = [len(r) for r in fake.response_ids]
    advantages = [float(values.mean()) for values in LateTokens.handed]  # the weights average to 1
    for values, advantage, n in zip(LateTokens.handed, advantages, lengths):
        torch.testing.assert_close(values, late_tokens(advantage, n))
    assert advantages[1] > advantages[0] > 0 > advantages[2]
    # on-policy the loss is -sum of the handed-out advantages / tokens
    assert metrics["loss"] == pytest.approx(-float(torch.cat(LateTokens.handed).sum()) / sum(lengths), abs=1e-6)
    assert metrics["rescaled_responses"] == 0.0 and metrics["mean_gamma"] == 1.0  # the base class's metrics


@pytest.mark.parametrize("num_iterations", [1, 2])
def test_a_strategy_registered_outside_the_package_trains_through_the_trl_adapter(num_iterations, tmp_path,
                                                                                  tiny_model_dir, byte_tokenizer,
                                                                                  monkeypatch):
    """Its attention read in forwards of its own (TRL's defaults), or off TRL's old-logps forward (num_iterations 2)."""
    pytest.importorskip("trl", reason="TRL is not installed (pip install 'kfh-attnpo[trl]')")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from attnpo_train.trl import AttnPOConfig, AttnPOGRPOTrainer

    args = AttnPOConfig(output_dir=str(tmp_path / "out"), attnpo_method="late_tokens", num_generations=3,
                        per_device_train_batch_size=3, max_completion_length=16, report_to="none", use_cpu=True,
                        save_strategy="no", num_iterations=num_iterations, bf16=False)
    dataset = Dataset.from_list([{"prompt": R1_TRACES[0]["prompt"], "answer": "55"}])
    trainer = AttnPOGRPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir), args=args,
                                train_dataset=dataset, processing_class=byte_tokenizer)
    assert trainer.old_logps_forward() == (num_iterations == 2)
    if num_iterations == 2:
        monkeypatch.setattr(trainer, "_scoring_model", lambda: pytest.fail("a forward of its own ran"))
    eos = byte_tokenizer.eos_token_id
    completions = [byte_tokenizer(r, add_special_tokens=False)["input_ids"] + [eos]
                   for r in (R1_TRACES[0]["response"], SHORT_55, WRONG_54)]
    monkeypatch.setattr(trainer, "_generate_single_turn", lambda *a, **k: ([list(c) for c in completions], None))
    trainer.model.train()
    output = trainer._generate_and_score_completions([{"prompt": R1_TRACES[0]["prompt"], "answer": "55"}] * 3)

    strategy = trainer._attnpo_strategy
    assert isinstance(strategy, LateTokens) and all(strategy.readings[i] >= 1 for i in range(3))
    advantages = strategy.batch.advantages.reshape(-1).tolist()
    assert advantages[1] > advantages[0] > 0 > advantages[2]  # TLMRE rewards (the base class's), RLOO
    for b, (advantage, completion) in enumerate(zip(advantages, completions)):
        n = len(completion)
        torch.testing.assert_close(output["advantages"][b, :n], late_tokens(advantage, n).to(output["advantages"].device))
        assert not output["advantages"][b, n:].any()
    assert trainer._metrics["train"]["attnpo/accuracy"] == [pytest.approx(2 / 3)]


def test_the_registry_refuses_a_name_twice_and_lists_the_names_it_has():
    assert {"rloo", "tlmre", "attnpo", "preplan", "anchor", "coupled", "late_tokens"} <= set(methods())
    assert strategy_class("late_tokens") is LateTokens
    assert register("late_tokens")(LateTokens) is LateTokens  # the same class again: nothing changes

    class Other(LateTokens):
        pass

    with pytest.raises(ValueError, match="'late_tokens' is already registered"):
        register("late_tokens")(Other)
    with pytest.raises(ValueError, match="setting 'method' must be one of .*late_tokens"):
        TrainConfig(method="nonesuch")
