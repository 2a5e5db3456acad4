"""Checks of attnpo_train.trl: the TRL path's per-token advantages equal the lightweight trainer's (in one
process, and with prompt groups split across two processes), and a two-process `accelerate launch` run of the
example script trains and logs the AttnPO metrics."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl", reason="TRL is not installed (pip install 'kfh-attnpo[trl]')")

from attnpo_train.advantages import group_advantages  # noqa: E402
from attnpo_train.config import TrainConfig  # noqa: E402
from attnpo_train.credit import attnpo_token_advantages, rollout_rewards  # noqa: E402
from attnpo_train.data import Prompt  # noqa: E402
from attnpo_train.rollouts import Rollouts, decode_responses  # noqa: E402
from attnpo_train.trl import AttnPOConfig, AttnPOGRPOTrainer  # noqa: E402
from conftest import R1_TRACES  # noqa: E402
from test_attnpo_loop import SHORT_55, WRONG_54, write_manifest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PROMPT = R1_TRACES[0]["prompt"]
# Two groups of G = 4: all correct with two lengths (p = 1: both attenuation branches act), then two correct, a
# wrong one and a truncated one (no EOS; incorrect).
RESPONSES = [R1_TRACES[0]["response"], SHORT_55] * 3 + [WRONG_54, SHORT_55]
TRUNCATED = 7


@pytest.fixture(scope="module")
def manifest_file(tmp_path_factory, tiny_model_dir):
    path = tmp_path_factory.mktemp("trl-manifest") / "manifest.json"
    write_manifest(path, tiny_model_dir)
    return path


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("trl-data") / "data.jsonl"
    rows = [{"id": r["id"], "prompt": r["prompt"], "answer": r["answer"]} for r in R1_TRACES]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def trl_args(tmp_path, manifest_file, **changes) -> AttnPOConfig:
    base = dict(output_dir=str(tmp_path / "out"), attnpo_manifest=manifest_file and str(manifest_file), num_generations=4,
                per_device_train_batch_size=8, max_completion_length=16, report_to="none", use_cpu=True,
                logging_steps=1, save_strategy="no", attnpo_horizon=0)
    return AttnPOConfig(**{**base, **changes})


def test_config_defaults_match_the_lightweight_trainer(tmp_path, manifest_file):
    args = trl_args(tmp_path, manifest_file, attnpo_horizon=1000)
    train = args.to_train_config(args.num_generations)
    defaults = TrainConfig(group_size=args.num_generations)
    prefixed = [f.name for f in dataclasses.fields(AttnPOConfig) if f.name.startswith("attnpo_")]
    assert len(prefixed) == 22
    for name in prefixed:
        if name not in ("attnpo_manifest", "attnpo_grader"):
            assert getattr(args, name) == getattr(defaults, name[len("attnpo_"):]), name
    # TRL trains on data files, so it grades with math-verify (the trainer's "auto" means: organism -> exact)
    assert args.attnpo_grader == train.grader == "math-verify"
    assert train.method == "attnpo" and train.manifest == str(manifest_file)
    with pytest.raises(ValueError, match="config 'attnpo_delta' must be in \\[0, 1\\]"):
        trl_args(tmp_path, manifest_file, attnpo_delta=1.5)
    with pytest.raises(ValueError, match="needs 'attnpo_manifest'"):
        trl_args(tmp_path, manifest_file, attnpo_manifest=None)
    with pytest.raises(ValueError, match="needs 'attnpo_rhythm'"):
        trl_args(tmp_path, None, attnpo_method="anchor")
    with pytest.raises(ValueError, match="'attnpo_method' must be one of"):
        trl_args(tmp_path, manifest_file, attnpo_method="tlmre")


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
    config = TrainConfig(method="attnpo", group_size=4, horizon=0)
    correct, rewards = rollout_rewards(rollouts, [Prompt("p", PROMPT, "55")] * 2, config)
    assert correct.tolist() == [[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]]
    advantages = group_advantages(rewards, "rloo")
    heads = [(2, 0), (2, 1), (2, 2)]  # the manifest's top 3
    expected, stats = attnpo_token_advantages(
        trainer.model.eval(), byte_tokenizer, rollouts, correct, advantages, heads, 0, config, eos
    )
    assert stats["rescaled_responses"] == 6 and 0 < stats["frac_attenuated"] < 1

    got = output["advantages"]
    assert got.shape == output["completion_ids"].shape and got.dtype == torch.float32
    assert ("old_per_token_logps" in output) == (num_iterations == 2)
    for b, values in enumerate(expected):  # TRL's batch of 8 against the scoring batches of 8 rated ones
        torch.testing.assert_close(got[b, : len(values)], values, atol=1e-6, rtol=0)
        assert not got[b, len(values):].any()
    assert any(len(set(v.tolist())) > 1 for v in expected), "no step was rescaled: the check would be vacuous"
    metrics = trainer._metrics["train"]
    assert metrics["attnpo/frac_attenuated"] == [stats["frac_attenuated"]]
    assert metrics["attnpo/mean_gamma"] == [pytest.approx(stats["mean_gamma"], abs=1e-6)]
    assert metrics["attnpo/reward"] == [float(rewards.mean())]
    assert list(trainer._logs["advantages"]) == advantages.reshape(-1).tolist()


@pytest.mark.parametrize("method,num_iterations,rule", [("preplan", 1, "project"), ("coupled", 1, "project"),
                                                         ("coupled", 2, "project"), ("anchor", 2, "paper")])
def test_trl_rhythm_advantages_equal_the_lightweight_trainers(method, num_iterations, rule, tmp_path, tiny_model_dir,
                                                              byte_tokenizer, monkeypatch):
    """With TRL's defaults from a forward of their own, with num_iterations 2 read off TRL's old-logps forward."""
    from datasets import Dataset
    from test_rhythm_credit import write_rhythm_file
    from transformers import AutoModelForCausalLM

    from attnpo_train.rhythm import RhythmProbe, paper_rule, rhythm_token_advantages

    rhythm = write_rhythm_file(tmp_path / "rhythm.jsonl", tiny_model_dir)
    args = trl_args(tmp_path, None, attnpo_method=method, attnpo_rhythm=str(rhythm), num_iterations=num_iterations,
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
    config = TrainConfig(method=method, group_size=4, rhythm_rule=rule)
    correct, rewards = rollout_rewards(rollouts, [Prompt("p", PROMPT, "55")] * 2, config)
    advantages = group_advantages(rewards, "rloo")
    probe = RhythmProbe.from_file(rhythm, trainer.model)
    expected, stats = rhythm_token_advantages(trainer.model.eval(), rollouts, advantages, probe, method, 0.4, 1.5, eos, 8,
                                              paper_rule(config))
    assert 0 < stats["amplified_frac"] < 1
    for b, values in enumerate(expected):  # TRL's left-padded old-logps batch against right-padded ones: rounding
        tolerance = 1e-6 if num_iterations == 2 else 0.0
        torch.testing.assert_close(output["advantages"][b, : len(values)], values, atol=tolerance, rtol=0)
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
    """Run the example script for 2 steps in 2 CPU processes; return the log lines with AttnPO metrics."""
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
        "--use_cpu", "--attnpo_horizon", "0", "--learning_rate", lr,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    steps = [h for h in history if "attnpo/frac_attenuated" in h]
    assert [h["step"] for h in steps] == [1, 2]
    return steps


def test_two_process_accelerate_run_logs_attnpo_metrics(tmp_path, tiny_model_dir, manifest_file, data_file):
    out = tmp_path / "run"
    steps = train_two_processes(tiny_model_dir, data_file, manifest_file, out, completion_length=16, per_device=2, lr="1e-3")
    for h in steps:
        assert 0.0 <= h["attnpo/frac_attenuated"] <= 1.0 and 0.0 <= h["attnpo/mean_gamma"] <= 1.0
        assert {"attnpo/reward", "attnpo/accuracy", "attnpo/rescaled_responses", "loss"} <= h.keys()
    assert (out / "final" / "config.json").is_file()


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
    config = TrainConfig(method="attnpo", group_size=4, horizon=0)
    correct, rewards = rollout_rewards(rollouts, [Prompt("p", PROMPT, "55")] * 3, config)
    assert correct.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]]
    advantages = group_advantages(rewards, "rloo")
    expected, stats = attnpo_token_advantages(model, tokenizer, rollouts, correct, advantages,
                                                   [(2, 0), (2, 1), (2, 2)], 0, config, eos)
    assert stats["attenuated_steps"] > 0
    assert len(got["advantages"]) == 12
    for b, values in enumerate(expected):  # other processes, other thread counts: equal up to float rounding
        torch.testing.assert_close(torch.tensor(got["advantages"][b]), values, rtol=1e-5, atol=1e-6)
    assert got["metrics"]["attnpo/rescaled_responses"] == [stats["rescaled_responses"]]
    assert got["metrics"]["attnpo/frac_attenuated"] == [pytest.approx(stats["frac_attenuated"])]
    assert got["metrics"]["attnpo/mean_gamma"] == [pytest.approx(stats["mean_gamma"])]


def test_two_process_accelerate_run_on_the_organism(tmp_path):
    from kfh_probe.organism import default_manifest_path, default_model_dir
    from kfh_probe.organism.task import generate_problems

    data = tmp_path / "organism.jsonl"
    rows = [{"id": f"p{i}", "prompt": p.prompt(), "answer": str(p.answer)} for i, p in enumerate(generate_problems(8, 5))]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    steps = train_two_processes(default_model_dir(), data, default_manifest_path(), tmp_path / "run",
                                completion_length=200, per_device=4, lr="1e-4")
    assert all(0.0 <= h["attnpo/accuracy"] <= 1.0 and 0.0 <= h["attnpo/mean_gamma"] <= 1.0 for h in steps)
