"""A build writes a plain HF folder, atomically, and is repeatable for a seed."""

from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from kfh_probe.organism.train import OrganismTrainConfig, build

TINY = OrganismTrainConfig(seed=3, steps=2, batch_size=4, tokenizer_traces=200)


@pytest.mark.slow
def test_build_is_deterministic_for_a_seed_and_loads_with_no_flags(tmp_path):
    a = build(tmp_path / "a", TINY)
    b = build(tmp_path / "b", TINY)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # no temporary folder left behind
    model = AutoModelForCausalLM.from_pretrained(str(a))
    tok = AutoTokenizer.from_pretrained(str(a))
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    assert model.config.eos_token_id == tok.eos_token_id and model.config.pad_token_id == tok.pad_token_id


@pytest.mark.slow
def test_a_different_seed_gives_different_weights(tmp_path):
    a = build(tmp_path / "a", TINY)
    b = build(tmp_path / "b", OrganismTrainConfig(seed=4, steps=2, batch_size=4, tokenizer_traces=200))
    assert (a / "model.safetensors").read_bytes() != (b / "model.safetensors").read_bytes()
