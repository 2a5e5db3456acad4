"""`kfh-probe causal`: which steps each condition deletes, deletion that keeps a trace well-formed, head
mean-ablation that touches only the ablated slice, the greedy answer loop, and the command end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_model

from kfh_probe.alignment import tokenize_trace
from kfh_probe.causal import (
    CausalConfig,
    HeadAblation, answer_writing_positions, deletion_sets, greedy_answers, random_heads, steps_to_delete,
)
from kfh_probe.capture import edit_attention_outputs
from kfh_probe.cli import main
from kfh_probe.traces import Step, Trace, delete_steps, parse_record

E, R = "essential", "redundant"


def _organism_style_trace() -> Trace:
    steps = ("<think>\nFirst, Ava has seven apples.\n", "Then, Ben has seven plus two, which is nine apples.\n",
             "Wait, let me double-check: seven plus two is nine.\n", "Now, Cal has three coins.\n")
    labels = (E, E, R, R)
    answer = "\nBen has nine apples. So the answer is \\boxed{9}.<|eos|>"
    return Trace("t", "Question: how many apples does Ben have?\nAnswer:\n", "".join(steps) + "</think>" + answer, "9",
                 tuple(Step(t, lab) for t, lab in zip(steps, labels)))


def test_deletion_keeps_the_trace_well_formed_and_the_answer_span_placed(byte_tokenizer):
    trace = _organism_style_trace()
    original = tokenize_trace(byte_tokenizer, trace.prompt, trace.response, [s.text for s in trace.steps])
    for drop in [{0}, {1, 3}, {0, 1, 2}, {2}]:
        shorter = delete_steps(trace, drop)
        again = parse_record(shorter.to_record(), line=1)  # steps still concatenate to the reasoning
        assert [s.label for s in again.steps] == [s.label for k, s in enumerate(trace.steps) if k not in drop]
        assert shorter.response.startswith("<think>\n") and shorter.response.endswith(trace.response.split("</think>")[1])
        tokens = tokenize_trace(byte_tokenizer, shorter.prompt, shorter.response, [s.text for s in shorter.steps])
        a0, a1 = tokens.answer_span
        assert tokens.input_ids[a0:a1] == original.input_ids[original.answer_span[0]:]  # the same answer tokens
        assert len(tokens.step_spans) == len(trace.steps) - len(drop)
    everything = delete_steps(trace, {0, 1, 2, 3})
    assert everything.response.startswith("<think>\n</think>")
    with pytest.raises(ValueError, match="cannot delete"):
        delete_steps(trace, {4})


def test_each_deletion_condition_takes_the_steps_it_names():
    scores = np.array([0.1, 0.9, 0.5, 0.9, 0.2])
    labels = [E, E, R, R, None]
    sets = deletion_sets(scores, labels, k=2, draws=3, rng=np.random.default_rng(0))
    assert sets["delete_top"] == [{1, 3}] and sets["delete_bottom"] == [{0, 4}]
    assert len(sets["delete_random"]) == 3 and all(len(s) == 2 and s <= set(range(5)) for s in sets["delete_random"])
    assert sets["delete_essential"] == [{0, 1}] and sets["delete_redundant"] == [{2, 3}]
    assert "delete_essential" not in deletion_sets(scores, [None] * 5, 2, 1, np.random.default_rng(0))
    # k: the essential steps when labeled, else a fraction; always 1..K-1
    assert steps_to_delete(labels, None, 0.3) == 2
    assert steps_to_delete([None] * 10, None, 0.3) == 3 and steps_to_delete([None] * 2, None, 0.3) == 1
    assert steps_to_delete([E, E, R], 5, 0.3) == 2


def test_random_heads_sit_in_the_top_heads_layers_and_are_never_top_heads():
    top = [(1, 4), (1, 5), (2, 3)]
    draws = random_heads(top, num_heads=8, draws=20, seed=0)
    assert draws == random_heads(top, num_heads=8, draws=20, seed=0)
    for chosen in draws:
        assert sorted(layer for layer, _ in chosen) == [1, 1, 2]
        assert not set(chosen) & set(top) and len(set(chosen)) == 3
    assert len({tuple(c) for c in draws}) > 1
    with pytest.raises(ValueError, match="layer 0 has 2 top heads but only 1"):
        random_heads([(0, 0), (0, 1)], num_heads=3, draws=1, seed=0)


@pytest.mark.parametrize("family", ["qwen2", "llama", "gpt2"])
def test_head_ablation_changes_only_the_ablated_slice(family):
    model = tiny_model(family)
    projection = {"qwen2": "self_attn.o_proj", "llama": "self_attn.o_proj", "gpt2": "attn.c_proj"}[family]
    blocks = model.model.layers if hasattr(model, "model") else model.transformer.h
    heads, dim = model.config.num_attention_heads, model.config.hidden_size // model.config.num_attention_heads
    ids = torch.randint(5, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    positions = torch.zeros(2, 12, dtype=torch.bool)
    positions[0, 7:] = True
    positions[1, 3:5] = True
    means = {1: torch.randn(heads, dim, generator=torch.Generator().manual_seed(2))}
    inputs: dict[str, torch.Tensor] = {}

    def record(name):
        return lambda module, args: inputs.__setitem__(name, args[0].detach().clone())

    def by_hand(module, args):
        x = args[0].clone()
        for b, head in [(0, 2)]:
            x[b, positions[b], head * dim:(head + 1) * dim] = means[1][head]
        return (x,)

    with torch.no_grad():
        hook = blocks[1].get_submodule(projection).register_forward_pre_hook(record("plain"))
        plain = model(input_ids=ids).logits
        hook.remove()
        hooks = [blocks[1].get_submodule(projection).register_forward_pre_hook(by_hand)]
        expected = model(input_ids=ids).logits
        hooks[0].remove()
        ablation = HeadAblation([[(1, 2)], []], means)  # row 0 ablates head 2 of layer 1; row 1 nothing
        ablation.positions = positions
        hook = blocks[1].get_submodule(projection).register_forward_pre_hook(record("ablated"))
        with edit_attention_outputs(model, [1], ablation):
            got = model(input_ids=ids).logits
        hook.remove()
    assert torch.allclose(got, expected, atol=1e-6) and not torch.allclose(got[0], plain[0], atol=1e-3)
    assert torch.equal(got[1], plain[1])  # a row without heads is untouched
    changed = (inputs["ablated"] != inputs["plain"]).reshape(2, 12, heads, dim).any(dim=-1)  # [batch, T, heads]
    assert changed[0, :, 2].tolist() == positions[0].tolist() and not changed[:, :, [0, 1, 3]].any() and not changed[1].any()


def test_greedy_answers_equal_generate_one_prefix_at_a_time():
    model = tiny_model("qwen2")
    prefixes = [[5, 9, 13, 40, 41], [7, 8, 100, 3, 17, 29, 31, 60, 2], [11, 12]]
    written = greedy_answers(model, prefixes, budgets=[6, 9, 4], eos_id=399, pad_id=0)
    for prefix, budget, got in zip(prefixes, [6, 9, 4], written):
        alone = model.generate(torch.tensor([prefix]), max_new_tokens=budget, do_sample=False, eos_token_id=399, pad_token_id=0)
        assert got == alone[0, len(prefix):].tolist()
    mask = answer_writing_positions([tokenize_trace_stub(6, (3, 5)), tokenize_trace_stub(4, (2, 4))], 6)
    assert mask.tolist() == [[False, False, True, True, True, False], [False, True, True, True, False, False]]


def tokenize_trace_stub(length: int, answer_span: tuple[int, int]):
    from kfh_probe.alignment import TokenizedTrace

    return TokenizedTrace(list(range(length)), [(0, 1)], answer_span, 1)


def test_causal_on_the_organism_writes_every_condition(tmp_path, capsys):
    out = tmp_path / "causal.json"
    assert main(["causal", "--max-traces", "2", "--draws", "2", "--json", str(out), "--quiet"]) == 0
    table = capsys.readouterr().out
    result = json.loads(out.read_text())
    for key in ("none", "delete_top", "delete_bottom", "delete_random", "delete_essential", "delete_redundant",
                "ablate_top", "ablate_random"):
        assert key in table and result[key]["n"] == 2
    # the organism's ground truth: its greedy answer needs the essential steps and not the redundant ones
    assert [result[k]["accuracy"] for k in ("none", "delete_redundant", "delete_essential")] == [1.0, 1.0, 0.0]
    for key in ("delete_random", "ablate_random"):
        assert result[key]["accuracy"] == pytest.approx(sum(result[key]["accuracy_per_draw"]) / 2)
    assert result["none"]["answer_logprob_change"] == 0.0 and len(result["delete_random"]["accuracy_per_draw"]) == 2
    assert result["ablate_top"]["heads"] == [[1, 4], [1, 5], [1, 2], [1, 7], [2, 3]]
    assert result["settings"]["traces_used"] == 2 and result["settings"]["traces_left_out"]["count"] == 70


def test_causal_on_any_model_with_unlabeled_traces(tiny_model_dir, labeled_trace_file, raw_trace_file, tmp_path,
                                                    capsys):
    manifest = tmp_path / "m.json"
    assert main(["sweep", "--model", str(tiny_model_dir), "--traces", str(labeled_trace_file), "--out", str(manifest), "--quiet"]) == 0
    raw = raw_trace_file
    assert main(["causal", "--model", str(tiny_model_dir), "--traces", str(raw)]) == 2
    assert "without --manifest" in capsys.readouterr().err
    out = tmp_path / "c.json"
    assert main(["causal", "--model", str(tiny_model_dir), "--traces", str(raw), "--manifest", str(manifest), "--top-n", "2",
                 "--draws", "2", "--max-answer-tokens", "8", "--json", str(out), "--quiet"]) == 0
    result = json.loads(out.read_text())
    assert "delete_essential" not in result and result["delete_top"]["n"] == 2
    assert result["delete_top"]["steps_deleted"] == pytest.approx((1 + 1) / 2)  # round(0.3 * 3) and round(0.3 * 4)


@pytest.mark.parametrize("override, message", [
    ({"draws": 0}, "setting 'draws' must be >= 1; got 0"),
    ({"k": 0}, "setting 'k' must be >= 1 or null; got 0"),
    ({"k_fraction": 1.5}, "setting 'k_fraction' must be in (0, 1]; got 1.5"),
    ({"batch_size": 0}, "setting 'batch_size' must be >= 1; got 0"),
    ({"marker": ""}, "setting 'marker' must be a non-empty string; got ''"),
])
def test_causal_settings_are_checked_at_their_fields(override, message):
    from kfh_probe import SettingError

    with pytest.raises(SettingError) as caught:
        CausalConfig(**override)
    assert str(caught.value) == message


def test_the_causal_command_refuses_an_impossible_setting_before_any_work(tmp_path, monkeypatch, capsys):
    from kfh_probe.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["causal", "--draws", "0", "--json", "c.json"]) == 2
    assert "setting 'draws' must be >= 1; got 0" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
