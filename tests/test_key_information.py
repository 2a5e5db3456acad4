"""Checks of the stepwise attention on key information: the organism's key spans, the reduction on hand-computed
rows, the key distribution, and the recorder against eager attention maps (values and gradients)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import eager_maps
from kfh_probe import (
    KeySpanRecorder, attention_calls, default_traces_path, key_attention, key_batch, key_distribution, key_spans,
    key_trace,
)
from kfh_probe.key_information import key_mass_of_rows
from kfh_probe.organism.labeler import TraceFormatError

PROMPT = "Question: Ava has two apples. Ben has three more apples than Ava. Cal has one coins. How many apples does Ben have?\nAnswer:\n"
RESPONSE = ("<think>\nFirst, the question says that Ava has two apples, so Ava has two apples right from the start.\n"
            "Then, the question says that Ben has three more apples than Ava, so Ben has two plus three, which is five apples.\n"
            "</think>\nAva has two apples. Ben has two plus three, which is five apples. So the answer is \\boxed{5}.<|endoftext|>")


def test_key_spans_are_the_facts_then_the_claims_of_the_reasoning():
    text = PROMPT + RESPONSE
    spans = key_spans(PROMPT, RESPONSE)
    assert [(s.kind, text[s.start:s.end]) for s in spans] == [
        ("fact", "Ava has two apples."),
        ("fact", "Ben has three more apples than Ava."),
        ("fact", "Cal has one coins."),
        ("computed", "Ava has two apples right from the start"),
        ("computed", "Ben has two plus three, which is five apples"),
    ]


def test_key_spans_refuse_a_prompt_outside_the_grammar():
    with pytest.raises(TraceFormatError, match="not an organism prompt"):
        key_spans("What is 2 + 2?", RESPONSE)


def test_a_claim_is_available_to_the_steps_after_its_own(organism):
    _, tokenizer = organism
    reasoning = RESPONSE.split("</think>")[0]
    steps = reasoning.splitlines(keepends=True)
    steps = [steps[0] + steps[1], steps[2]]  # "<think>\n" belongs to the first step
    keys = [(s.start, s.end) for s in key_spans(PROMPT, RESPONSE)]
    trace = key_trace(tokenizer, PROMPT, RESPONSE, steps, ["essential", "essential"], keys)
    assert len(trace.step_spans) == 3  # two steps, then F
    assert trace.available() == [
        [True, True, True, False, False],
        [True, True, True, True, False],
        [True, True, True, True, True],
    ]


def test_key_mass_of_rows_by_hand():
    # one head, three rows over five keys; rows 0-1 are step 0, row 2 is step 1; key spans {1, 2} and {4}
    probs = torch.tensor([[[[0.5, 0.5, 0.0, 0.0, 0.0],
                            [0.2, 0.3, 0.5, 0.0, 0.0],
                            [0.1, 0.1, 0.2, 0.2, 0.4]]]])
    row_weight = torch.tensor([[[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]])
    key_member = torch.zeros(1, 5, 2)
    key_member[0, 1:3, 0] = 1.0
    key_member[0, 4, 1] = 1.0
    mass = key_mass_of_rows(probs, row_weight, key_member)
    # step 0: span 0 gets (0.5 + 0.8) / 2, span 1 gets 0; step 1: span 0 gets 0.3, span 1 gets 0.4
    assert torch.allclose(mass, torch.tensor([[[[0.65, 0.0], [0.3, 0.4]]]]))


def test_key_distribution_keeps_available_spans_and_puts_the_rest_last():
    mass = torch.tensor([[0.2, 0.3], [0.1, 0.4]])
    available = torch.tensor([[True, False], [True, True]])
    assert torch.allclose(key_distribution(mass, available), torch.tensor([[0.2, 0.0, 0.8], [0.1, 0.4, 0.5]]))


def _organism_traces(tokenizer, n: int):
    records = [json.loads(line) for line in default_traces_path().read_text(encoding="utf-8").splitlines()[:n]]
    out = []
    for r in records:
        keys = [(s.start, s.end) for s in key_spans(r["prompt"], r["response"])]
        out.append(key_trace(tokenizer, r["prompt"], r["response"], [s["text"] for s in r["steps"]],
                             [s["label"] for s in r["steps"]], keys))
    return out


def _eager_mass(maps: torch.Tensor, trace) -> torch.Tensor:
    """``[layer, head, step, key]`` by the definition, from full eager maps ``[layer, head, T, T]``."""
    out = torch.zeros(maps.shape[0], maps.shape[1], len(trace.step_spans), len(trace.key_spans), dtype=maps.dtype)
    for k, (s0, s1) in enumerate(trace.step_spans):
        for j, (c0, c1) in enumerate(trace.key_spans):
            out[:, :, k, j] = maps[:, :, s0:s1, c0:c1].sum(dim=-1).mean(dim=-1)
    return out


def test_key_attention_matches_eager_maps_on_the_organism_in_padded_batches(organism):
    model, tokenizer = organism
    traces = _organism_traces(tokenizer, 3)
    read = key_attention(model, traces, tokenizer.pad_token_id, batch_size=3)
    for trace, mass in zip(traces, read):
        reference = _eager_mass(eager_maps(model, trace.input_ids), trace)
        assert mass.shape == reference.shape
        assert torch.allclose(mass.double(), reference, atol=1e-5)


def test_recorder_with_gradients_gives_the_eager_values_and_gradients(organism):
    from conftest import tiny_model

    _, tokenizer = organism
    trace = _organism_traces(tokenizer, 1)[0]
    model = tiny_model("qwen2", vocab_size=len(tokenizer)).train()
    batch = key_batch([trace], tokenizer.pad_token_id)
    recorder = KeySpanRecorder(batch, [1], grad=True, chunk=16)  # several row blocks, each recomputed in backward
    with attention_calls(model, [1], recorder):
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    weight = model.model.layers[1].self_attn.q_proj.weight
    (grad,) = torch.autograd.grad(recorder.results[1][0, :, :, 0].sum(), weight)

    model.set_attn_implementation("eager")
    maps = model(input_ids=batch.input_ids, output_attentions=True).attentions[1][0]
    k_end = len(trace.step_spans)
    reference = torch.stack([maps[:, s0:s1, c0:c1].sum(-1).mean(-1)
                             for s0, s1 in trace.step_spans for c0, c1 in trace.key_spans[:1]], dim=-1)
    (expected,) = torch.autograd.grad(reference.sum(), weight)
    assert torch.allclose(recorder.results[1][0, :, :k_end, 0], reference, atol=1e-5)
    assert torch.allclose(grad, expected, atol=1e-5)
