"""Checks of attnpo_train.trl: the TRL path's rewards and outcome advantages equal the TLMRE and RLOO formulas worked
by hand, its per-token advantages equal the lightweight trainer's (in one process, and with prompt groups split
across two processes), TRL's loss on them equals the lightweight trainer's loss (value and gradient), and
two-process `accelerate launch` runs of the example script log AttnPO metrics that agree with TRL's own reward
and completions table."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl", reason="TRL is not installed (pip install 'kfh-attnpo[trl]')")

from attnpo_train.advantages import group_advantages  # noqa: E402
from attnpo_train.config import TrainConfig  # noqa: E402
from attnpo_train.loss import policy_gradient_loss  # noqa: E402
from attnpo_train.rewards import rollout_correctness  # noqa: E402
from attnpo_train.strategies import CreditBatch, methods, strategy_class  # noqa: E402
from attnpo_train.trl import TRAIN_SETTINGS, AttnPOConfig, AttnPOGRPOTrainer  # noqa: E402
from kfh_probe import SettingError, help_of  # noqa: E402
from kfh_probe.sampling import Rollouts, decode_responses  # noqa: E402
from conftest import (  # noqa: E402
    R1_TRACES, SHORT_55, WRONG_54, attnpo_strategy, separate_advantages, write_jsonl, write_manifest,
)

REPO = Path(__file__).resolve().parents[1]
PROMPT = R1_TRACES[0]["prompt"]
# Two groups of G = 4: all correct with two lengths (p = 1: both attenuation branches act), then two correct, a
# wrong one and a truncated one (no EOS; incorrect).
RESPONSES = [R1_TRACES[0]["response"], SHORT_55] * 3 + [WRONG_54, SHORT_55]
TRUNCATED = 7
# TLMRE by hand: each group's correct responses have two lengths, the long one (R1) and the short one (SHORT_55),
# equally often, so mu_c is their midpoint, sigma_c half their difference and z = +1 / -1:
LONG = 1 - 0.2 / (1 + math.exp(-1))  # r = 1 - alpha_len * sigmoid(+1)
SHORT = 1 - 0.2 / (1 + math.exp(1))  # r = 1 - alpha_len * sigmoid(-1); LONG + SHORT = 1.8
REWARDS = [[LONG, SHORT, LONG, SHORT], [LONG, SHORT, 0.0, 0.0]]
# RLOO by hand: A_i = r_i - (the mean of the other three rewards of its group)
RLOO = [[2 * (LONG - SHORT) / 3, 2 * (SHORT - LONG) / 3] * 2,
        [LONG - SHORT / 3, SHORT - LONG / 3, -(LONG + SHORT) / 3, -(LONG + SHORT) / 3]]


def trl_args(tmp_path, manifest_file, **changes) -> AttnPOConfig:
    base = dict(output_dir=str(tmp_path / "out"), attnpo_manifest=manifest_file and str(manifest_file), num_generations=4,
                per_device_train_batch_size=8, max_completion_length=16, report_to="none", use_cpu=True,
                logging_steps=1, save_strategy="no", attnpo_horizon=0)
    return AttnPOConfig(**{**base, **changes})


def test_the_trl_settings_are_the_lightweight_trainers_fields():
    train_fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    train_types, trl_types = typing.get_type_hints(TrainConfig), typing.get_type_hints(AttnPOConfig)
    prefixed = [f for f in dataclasses.fields(AttnPOConfig) if f.name.startswith("attnpo_")]
    assert [f.name for f in prefixed] == [f"attnpo_{name}" for name in TRAIN_SETTINGS]
    assert len(prefixed) == 23
    for field in prefixed:
        source = train_fields[field.name[len("attnpo_"):]]
        assert (trl_types[field.name], field.default, help_of(field)) == (
            train_types[source.name], source.default, help_of(source)), field.name


def test_config_converts_to_the_lightweight_trainers(tmp_path, manifest_file):
    args = trl_args(tmp_path, manifest_file, attnpo_horizon=1000)
    train = args.to_train_config(args.num_generations)
    # one default for both; TRL trains on a dataset, so "auto" grades with math-verify there
    assert args.attnpo_grader == TrainConfig().grader == "auto"
    assert dataclasses.replace(train, grader="auto", manifest=None) == TrainConfig(group_size=args.num_generations)
    assert train.grader == "math-verify" and train.method == "attnpo" and train.manifest == str(manifest_file)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"attnpo_delta": 1.5}, "setting 'attnpo_delta' must be in [0, 1]; got 1.5"),
        ({"attnpo_manifest": None},
         "setting 'attnpo_manifest' must be given when attnpo_method's strategy reads it (the KFH manifest of the "
         "policy's base model); got None"),
        ({"attnpo_manifest": None, "attnpo_method": "anchor"},
         "setting 'attnpo_rhythm' must be given when attnpo_method's strategy reads it (the kfh-probe rhythm file "
         "of the policy's base model); got None"),
        ({"num_generations_eval": 1},
         "setting 'num_generations_eval' must be >= 2 or null (AttnPO's group baseline needs two completions); got 1"),
    ],
)
def test_config_errors_name_the_trl_setting(changes, message, tmp_path, manifest_file):
    with pytest.raises(SettingError) as caught:
        trl_args(tmp_path, manifest_file, **changes)
    assert str(caught.value) == message


def test_trl_takes_any_registered_strategy_and_asks_only_for_its_files(tmp_path, manifest_file):
    with pytest.raises(SettingError) as caught:
        trl_args(tmp_path, manifest_file, attnpo_method="ppo")  # not a registered strategy
    assert str(caught.value) == f"setting 'attnpo_method' must be one of {', '.join(methods())}; got 'ppo'"
    assert trl_args(tmp_path, None, attnpo_method="tlmre").to_train_config(4).method == "tlmre"  # reads no file


@pytest.mark.parametrize("num_iterations", [1, 2])
def test_trl_advantages_equal_the_lightweight_trainers(num_iterations, tmp_path, tiny_model_dir, manifest_file,
                                                       byte_tokenizer, monkeypatch):
    """A fixed group through TRL's real _generate_and_score_completions gives the loop's per-token advantages:
    with TRL's defaults from a scoring forward of their own, with num_iterations 2 read off TRL's own
    old-logps forward (no forward added)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    # bf16=False: TRL's forwards run under bf16 autocast otherwise (its default, on CPU too), and the attention
    # read off its old-logps forward is then the autocast one, not the float32 one of the scoring forward
    args = trl_args(tmp_path, manifest_file, num_iterations=num_iterations, bf16=False)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    dataset = Dataset.from_list([{"prompt": PROMPT, "answer": "55"}])
    trainer = AttnPOGRPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=byte_tokenizer)
    assert trainer.old_logps_forward() == (num_iterations == 2)
    if num_iterations == 2:
        monkeypatch.setattr(trainer, "_scoring_model", lambda: pytest.fail("a scoring forward of its own ran"))

    eos = byte_tokenizer.eos_token_id
    completions = [byte_tokenizer(r, add_special_tokens=False)["input_ids"] + [eos] for r in RESPONSES]
    completions[TRUNCATED] = completions[TRUNCATED][:-1]  # cut before EOS: counts as incorrect
    monkeypatch.setattr(trainer, "_generate_single_turn", lambda *a, **k: ([list(c) for c in completions], None))
    trainer.model.train()
    output = trainer._generate_and_score_completions([{"prompt": PROMPT, "answer": "55"} for _ in RESPONSES])

    # the lightweight trainer's functions on the same ids
    prompt_ids = byte_tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    for b in range(len(RESPONSES)):
        assert output["prompt_ids"][b][output["prompt_mask"][b].bool()].tolist() == prompt_ids
    rollouts = Rollouts(4, [list(prompt_ids)] * 8, *decode_responses(byte_tokenizer, completions, {eos}))
    strategy = attnpo_strategy(trainer.model.eval(), byte_tokenizer, manifest_file, group_size=4, horizon=0)
    assert strategy.heads == [(2, 0), (2, 1), (2, 2)]  # the manifest's top 3
    correct = rollout_correctness(rollouts, ["55", "55"], strategy.config)
    rewards = strategy.rewards(correct, rollouts)
    assert correct.tolist() == [[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]]
    torch.testing.assert_close(rewards, torch.tensor(REWARDS), atol=1e-6, rtol=0)
    advantages = group_advantages(rewards, "rloo")
    torch.testing.assert_close(advantages, torch.tensor(RLOO), atol=1e-6, rtol=0)
    expected, stats = separate_advantages(strategy, trainer.model, CreditBatch(rollouts, correct, advantages, 0), eos)
    assert stats["rescaled_responses"] == 6 and 0 < stats["frac_attenuated"] < 1

    got = output["advantages"]
    assert got.shape == output["completion_ids"].shape and got.dtype == torch.float32
    assert ("old_per_token_logps" in output) == (num_iterations == 2)
    for b, values in enumerate(expected):  # TRL's batch of 8 against the scoring batches of 8 rated ones
        torch.testing.assert_close(got[b, : len(values)], values, atol=1e-6, rtol=0)
        assert not got[b, len(values):].any()
    assert any(len(set(v.tolist())) > 1 for v in expected), "no step was rescaled: the check would be vacuous"
    for b in (6, TRUNCATED):  # incorrect responses are not rescaled: -(LONG + SHORT) / 3 on every token
        torch.testing.assert_close(got[b, : len(expected[b])], torch.full((len(expected[b]),), -0.6), atol=1e-6, rtol=0)
    metrics = trainer._metrics["train"]
    assert metrics["attnpo/frac_attenuated"] == [stats["frac_attenuated"]]
    assert metrics["attnpo/mean_gamma"] == [pytest.approx(stats["mean_gamma"], abs=1e-6)]
    assert metrics["attnpo/reward"] == [pytest.approx(3 * 1.8 / 8)] and metrics["attnpo/accuracy"] == [0.75]
    assert list(trainer._logs["advantages"]) == pytest.approx(sum(RLOO, []), abs=1e-6)

    # TRL's loss on these advantages is the lightweight trainer's: at the first update the policy is the sampling
    # policy (ratio 1), so both are -sum_t A_t / (completion tokens), with the same gradient
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # what TRL's training loop sets before compute_loss
    loss = trainer.compute_loss(trainer.model, output)
    mask = output["completion_mask"]
    assert mask.sum(1).tolist() == [len(c) for c in completions]
    assert float(loss.detach()) == pytest.approx(-float(torch.cat(expected).sum()) / sum(map(len, completions)), abs=1e-6)
    trainer.model.zero_grad()
    loss.backward()
    trl_grads = [p.grad.clone() for p in trainer.model.parameters()]
    trainer.model.zero_grad()
    reference, _ = policy_gradient_loss(policy_logprobs(trainer.model, prompt_ids, completions), got, mask.float())
    torch.testing.assert_close(reference, loss.detach(), atol=1e-6, rtol=1e-5)
    reference.backward()
    for trl_grad, p in zip(trl_grads, trainer.model.parameters()):
        torch.testing.assert_close(trl_grad, p.grad, atol=1e-6, rtol=1e-4)


def policy_logprobs(model, prompt_ids: list[int], completions: list[list[int]]) -> torch.Tensor:
    """Log-probabilities [completion, token] of each completion's tokens under ``model``, one unpadded forward per
    completion (zero beyond a completion's end)."""
    width = max(map(len, completions))
    rows = []
    for completion in completions:
        logits = model(input_ids=torch.tensor([prompt_ids + completion])).logits[0, len(prompt_ids) - 1 : -1]
        picked = logits.float().log_softmax(-1).gather(1, torch.tensor(completion)[:, None])[:, 0]
        rows.append(torch.nn.functional.pad(picked, (0, width - len(completion))))
    return torch.stack(rows)


@pytest.mark.parametrize("method,num_iterations,rule", [("preplan", 1, "project"), ("coupled", 1, "project"),
                                                         ("coupled", 2, "project"), ("anchor", 2, "paper")])
def test_trl_rhythm_advantages_equal_the_lightweight_trainers(method, num_iterations, rule, tmp_path, tiny_model_dir,
                                                              byte_tokenizer, rhythm_file, monkeypatch):
    """With TRL's defaults from a forward of their own, with num_iterations 2 read off TRL's old-logps forward."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    args = trl_args(tmp_path, None, attnpo_method=method, attnpo_rhythm=str(rhythm_file), num_iterations=num_iterations,
                    bf16=False, attnpo_rhythm_rule=rule)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    dataset = Dataset.from_list([{"prompt": PROMPT, "answer": "55"}])
    trainer = AttnPOGRPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=byte_tokenizer)
    if num_iterations == 2:
        monkeypatch.setattr(trainer, "_scoring_model", lambda: pytest.fail("a scoring forward of its own ran"))
    eos = byte_tokenizer.eos_token_id
    completions = [byte_tokenizer(r, add_special_tokens=False)["input_ids"] + [eos] for r in RESPONSES]
    completions[TRUNCATED] = completions[TRUNCATED][:-1]
    monkeypatch.setattr(trainer, "_generate_single_turn", lambda *a, **k: ([list(c) for c in completions], None))
    trainer.model.train()
    output = trainer._generate_and_score_completions([{"prompt": PROMPT, "answer": "55"} for _ in RESPONSES])

    prompt_ids = byte_tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    rollouts = Rollouts(4, [list(prompt_ids)] * 8, *decode_responses(byte_tokenizer, completions, {eos}))
    strategy = strategy_class(method)(TrainConfig(method=method, rhythm=str(rhythm_file), rhythm_rule=rule))
    strategy.attach(trainer.model.eval(), byte_tokenizer)
    correct = rollout_correctness(rollouts, ["55", "55"], strategy.config)
    advantages = group_advantages(strategy.rewards(correct, rollouts), "rloo")
    torch.testing.assert_close(advantages, torch.tensor(RLOO), atol=1e-6, rtol=0)  # the same TLMRE reward
    expected, stats = separate_advantages(strategy, trainer.model, CreditBatch(rollouts, correct, advantages, 0), eos)
    assert 0 < stats["amplified_frac"] < 1
    for b, values in enumerate(expected):  # TRL's left-padded old-logps batch against right-padded ones: rounding
        tolerance = 1e-6 if num_iterations == 2 else 0.0
        torch.testing.assert_close(output["advantages"][b, : len(values)], values, atol=tolerance, rtol=0)
        a = advantages.reshape(-1)[b]
        if a < 0 and rule == "project":  # the project's rule leaves negative advantages uniform
            assert torch.equal(values, a.expand(len(values))), b
        else:  # each token keeps A or gets 1.5 A (the paper's anchor rule scales both signs)
            assert (torch.isclose(values, a) | torch.isclose(values, 1.5 * a)).all(), b
    assert any(len(set(v.tolist())) > 1 for v in expected), "no token was amplified: the check would be vacuous"
    assert trainer._metrics["train"]["attnpo/amplified_frac"] == [stats["amplified_frac"]]


def test_trainer_refuses_a_manifest_of_another_model(tmp_path, tiny_model_dir, byte_tokenizer):
    from datasets import Dataset

    from kfh_probe.manifest import ManifestMismatchError

    other = tmp_path / "other.json"
    write_manifest(other, tiny_model_dir, fingerprint="0" * 64)
    dataset = Dataset.from_list([{"prompt": PROMPT, "answer": "55"}])
    with pytest.raises(ManifestMismatchError, match="attnpo_allow_finetuned=True"):
        AttnPOGRPOTrainer(model=str(tiny_model_dir), args=trl_args(tmp_path, other), train_dataset=dataset,
                          processing_class=byte_tokenizer)
    with pytest.raises(ValueError, match="needs an 'answer' column"):
        AttnPOGRPOTrainer(model=str(tiny_model_dir), args=trl_args(tmp_path, other),
                          train_dataset=Dataset.from_list([{"prompt": PROMPT}]), processing_class=byte_tokenizer)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train_two_processes(model_dir, data_file, manifest_file, out, completion_length: int, per_device: int, lr: str) -> list[dict]:
    """Run the example script for 2 steps in 2 CPU processes; return the log lines with AttnPO metrics, each with
    TRL's completions table of its step (``--log_completions``: the 0/1 reward and the logged advantage per row of
    the global batch) under "table"."""
    # `accelerate launch --cpu` starts a single process unless it is given an MPI hostfile; `--multi_gpu` starts
    # the processes through torch.distributed, and the script's `--use_cpu` makes them a gloo (MULTI_CPU) group.
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()),
        str(REPO / "examples" / "train_attnpo_trl.py"),
        "--model", str(model_dir), "--data", str(data_file), "--attnpo_manifest", str(manifest_file),
        "--output_dir", str(out), "--max_steps", "2", "--num_generations", "4",
        "--per_device_train_batch_size", str(per_device), "--max_completion_length", str(completion_length),
        "--logging_steps", "1", "--report_to", "none", "--save_strategy", "no",
        "--use_cpu", "--attnpo_horizon", "0", "--learning_rate", lr, "--log_completions", "true",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    steps = [h for h in history if "attnpo/frac_attenuated" in h]
    assert [h["step"] for h in steps] == [1, 2]
    import pandas as pd

    return [{**h, "table": pd.read_parquet(out / "completions" / f"completions_{h['step']:05d}.parquet")} for h in steps]


def tlmre_rewards_from_rloo(correct: list[float], advantages: list[float], alpha_len: float = 0.2) -> list[float]:
    """The rewards of one group recovered from its 0/1 correctness and its logged RLOO advantages, checked against
    the TLMRE formula r = 1 - alpha_len * sigmoid(z) on the correct responses (z: their standardised lengths, so
    sum z = 0 and sum z^2 = their number, or all z = 0 for equal lengths) and r = 0 on the others.

    RLOO gives A_i = G / (G - 1) * (r_i - mean r), so r_i = mean r + (G - 1) / G * A_i; mean r follows from a
    reward of 0 (an incorrect response) or, in an all-correct group, from sum z = 0.
    """
    g, right = len(correct), [c == 1.0 for c in correct]
    assert set(correct) <= {0.0, 1.0}
    assert sum(advantages) == pytest.approx(0.0, abs=1e-5)  # leave-one-out advantages of a group sum to zero

    def rewards(mean: float) -> list[float]:
        return [mean + (g - 1) / g * a for a in advantages]

    def z_sum(mean: float) -> float:
        return sum(math.log((1 - r) / (alpha_len + r - 1)) for r, c in zip(rewards(mean), right) if c)  # logit((1-r)/a)

    if not all(right):
        mean = -(g - 1) / g * advantages[right.index(False)]
    else:  # z_sum falls as the mean reward rises; bisect where every reward lies in TLMRE's open range
        lo = 1 - alpha_len - (g - 1) / g * min(advantages) + 1e-9
        hi = 1 - (g - 1) / g * max(advantages) - 1e-9
        assert lo < hi, f"advantages {advantages} spread wider than TLMRE rewards of correct responses can"
        for _ in range(60):
            lo, hi = ((lo + hi) / 2, hi) if z_sum((lo + hi) / 2) > 0 else (lo, (lo + hi) / 2)
        mean = (lo + hi) / 2
    got = rewards(mean)
    assert [r for r, c in zip(got, right) if not c] == pytest.approx([0.0] * right.count(False), abs=1e-5)
    if any(right):
        assert all(1 - alpha_len < r < 1 for r, c in zip(got, right) if c), got
        z = [math.log((1 - r) / (alpha_len + r - 1)) for r, c in zip(got, right) if c]
        assert sum(z) == pytest.approx(0.0, abs=1e-3)
        squares = sum(x * x for x in z)
        assert squares == pytest.approx(len(z), abs=1e-3) or squares == pytest.approx(0.0, abs=1e-3), z
    return got


def check_logged_step(h: dict, group_size: int) -> None:
    """An AttnPO log line agrees with TRL's own reward metric and completions table: accuracy is the mean 0/1 reward
    TRL gathered, the logged advantages are RLOO of TLMRE rewards of that correctness, and attnpo/reward and
    attnpo/advantage_abs_mean are their means."""
    correct, advantages = h["table"]["attnpo_correct"].tolist(), h["table"]["advantage"].tolist()
    assert len(correct) == len(advantages) and len(correct) % group_size == 0
    assert h["attnpo/accuracy"] == pytest.approx(sum(correct) / len(correct)) == pytest.approx(h["reward"])
    rewards = [r for i in range(0, len(correct), group_size)
               for r in tlmre_rewards_from_rloo(correct[i : i + group_size], advantages[i : i + group_size])]
    assert h["attnpo/reward"] == pytest.approx(sum(rewards) / len(rewards), abs=1e-5)
    assert h["attnpo/advantage_abs_mean"] == pytest.approx(sum(map(abs, advantages)) / len(advantages), abs=1e-6)


@pytest.mark.slow
def test_two_process_accelerate_run_logs_attnpo_metrics(tmp_path, tiny_model_dir, manifest_file, data_file):
    out = tmp_path / "run"
    steps = train_two_processes(tiny_model_dir, data_file, manifest_file, out, completion_length=16, per_device=2, lr="1e-3")
    for h in steps:
        check_logged_step(h, group_size=4)
        # A random 3-layer model does not write the marker and a boxed 55 within 16 tokens: no correct response, so
        # every reward and advantage is 0, nothing is rescaled (mean gamma 1 without steps) and the loss is 0
        assert h["attnpo/accuracy"] == h["attnpo/reward"] == h["attnpo/advantage_abs_mean"] == 0.0
        assert (h["attnpo/rescaled_responses"], h["attnpo/frac_attenuated"], h["attnpo/mean_gamma"]) == (0, 0.0, 1.0)
        assert h["loss"] == 0.0
    assert (out / "final" / "config.json").is_file()


@pytest.mark.slow
def test_groups_split_across_two_processes_get_the_lightweight_advantages(tmp_path, tiny_model_dir, manifest_file,
                                                                         ):
    """Three groups of 4 over 2 ranks of 6 rows: the middle group has two rows on each rank."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)  # what the launched script loads
    eos = tokenizer.eos_token_id
    responses = RESPONSES + [SHORT_55, R1_TRACES[0]["response"], R1_TRACES[0]["response"], WRONG_54]
    completions = [tokenizer(r, add_special_tokens=False)["input_ids"] + [eos] for r in responses]
    completions[TRUNCATED] = completions[TRUNCATED][:-1]
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"prompt": PROMPT, "answer": "55", "group_size": 4, "completions": completions}))
    out = tmp_path / "ranks.json"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), str(REPO / "tests" / "trl_rank_check.py"),
        str(tiny_model_dir), str(manifest_file), str(out), "6", str(spec),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "ACCELERATE_USE_CPU": "true"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    got = json.loads(out.read_text())

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    prompt_ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    assert got["prompt_ids"] == [prompt_ids] * 12
    rollouts = Rollouts(4, [list(prompt_ids)] * 12, *decode_responses(tokenizer, completions, {eos}))
    strategy = attnpo_strategy(model, tokenizer, manifest_file, group_size=4, horizon=0)
    correct = rollout_correctness(rollouts, ["55"] * 3, strategy.config)
    rewards = strategy.rewards(correct, rollouts)
    assert correct.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]]
    # the third group's correct lengths are short, long, long: z = -sqrt(2), 1/sqrt(2), 1/sqrt(2)
    low, high = 1 - 0.2 / (1 + math.exp(math.sqrt(2))), 1 - 0.2 / (1 + math.exp(-1 / math.sqrt(2)))
    torch.testing.assert_close(rewards, torch.tensor([*REWARDS, [low, high, high, 0.0]]), atol=1e-6, rtol=0)
    advantages = group_advantages(rewards, "rloo")
    expected, stats = separate_advantages(strategy, model, CreditBatch(rollouts, correct, advantages, 0), eos)
    assert stats["frac_attenuated"] > 0
    assert len(got["advantages"]) == 12
    for b, values in enumerate(expected):  # other processes, other thread counts: equal up to float rounding
        torch.testing.assert_close(torch.tensor(got["advantages"][b]), values, rtol=1e-5, atol=1e-6)
    assert got["metrics"]["attnpo/rescaled_responses"] == [stats["rescaled_responses"]]
    assert got["metrics"]["attnpo/frac_attenuated"] == [pytest.approx(stats["frac_attenuated"])]
    assert got["metrics"]["attnpo/mean_gamma"] == [pytest.approx(stats["mean_gamma"])]


@pytest.mark.slow
def test_two_process_accelerate_run_on_the_organism(tmp_path):
    from kfh_probe.organism import default_manifest_path, default_model_dir
    from kfh_probe.organism.task import generate_problems

    rows = [{"id": f"p{i}", "prompt": p.prompt(), "answer": str(p.answer)} for i, p in enumerate(generate_problems(8, 5))]
    data = write_jsonl(tmp_path / "organism.jsonl", rows)
    steps = train_two_processes(default_model_dir(), data, default_manifest_path(), tmp_path / "run",
                                completion_length=200, per_device=4, lr="1e-4")
    for h in steps:
        check_logged_step(h, group_size=4)
    assert sum(h["attnpo/accuracy"] for h in steps) > 0, "no correct response: the reward checks would be vacuous"
