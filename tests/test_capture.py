"""Answer-row capture equals eager attention in float32, for many architectures, batched or not."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, tiny_model

from kfh_probe.capture import UnsupportedModelError, capture_answer_attention

TOLERANCE = 1e-5


def _batch(seed: int = 0):
    """Two sequences, the second right-padded, with answer rows at their ends."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 400, (2, 40), generator=g)
    attention_mask = torch.ones(2, 40, dtype=torch.long)
    attention_mask[1, 31:] = 0
    answer_mask = torch.zeros(2, 40, dtype=torch.bool)
    answer_mask[0, 30:40] = True
    answer_mask[1, 24:31] = True
    return ids, attention_mask, answer_mask


def _eager_rows(model, ids, attention_mask, answer_mask):
    """Reference: the full eager T x T maps, sliced to the answer rows, per sequence."""
    original = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            maps = model(input_ids=ids, attention_mask=attention_mask, output_attentions=True).attentions
    finally:
        model.set_attn_implementation(original)
    return [[layer_map[b][:, answer_mask[b]] for layer_map in maps] for b in range(ids.shape[0])]


@pytest.mark.parametrize("family", FAMILIES)
def test_answer_rows_equal_eager_attention(family):
    model = tiny_model(family)
    ids, attention_mask, answer_mask = _batch()
    captured = capture_answer_attention(model, ids, attention_mask, answer_mask, reduce="rows")
    reference = _eager_rows(model, ids, attention_mask, answer_mask)
    assert captured.layers == [0, 1, 2]
    for b in range(2):
        count = int(answer_mask[b].sum())
        for position, layer in enumerate(captured.layers):
            got = captured.values[b, position, :, :count]
            assert torch.allclose(got, reference[b][layer].float(), atol=TOLERANCE, rtol=0), family
    # Attention of the tiny models is peaked (uniform would be about 1/30), so the check is not vacuous.
    assert max(m.max().item() for r in reference for m in r) > 0.3


def test_sum_mode_is_the_sum_of_the_rows():
    model = tiny_model("qwen2")
    ids, attention_mask, answer_mask = _batch(1)
    rows = capture_answer_attention(model, ids, attention_mask, answer_mask, reduce="rows")
    sums = capture_answer_attention(model, ids, attention_mask, answer_mask, reduce="sum")
    assert sums.values.shape == (2, 3, 4, 40)
    assert torch.allclose(rows.values.sum(dim=3), sums.values, atol=1e-6)
    # Each answer row is a distribution: the sums equal the number of answer rows.
    assert torch.allclose(sums.values.sum(-1), answer_mask.sum(1).float()[:, None, None].expand(2, 3, 4), atol=1e-4)


def test_capture_does_not_change_the_model_output():
    model = tiny_model("llama")
    ids, attention_mask, answer_mask = _batch(2)
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=attention_mask).logits
    capture_answer_attention(model, ids, attention_mask, answer_mask, stop_early=False)
    with torch.no_grad():
        after = model(input_ids=ids, attention_mask=attention_mask).logits
    assert torch.equal(before, after)
    assert model.config._attn_implementation == "sdpa"
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    assert AttentionInterface._global_mapping["sdpa"] is sdpa_attention_forward  # the wrapper is gone
    assert "eager" not in AttentionInterface._global_mapping


def test_padded_batch_equals_one_trace_at_a_time():
    model = tiny_model("qwen2")
    ids, attention_mask, answer_mask = _batch(3)
    batched = capture_answer_attention(model, ids, attention_mask, answer_mask)
    alone = capture_answer_attention(model, ids[1:, :31], attention_mask[1:, :31], answer_mask[1:, :31])
    assert torch.allclose(batched.values[1, ..., :31], alone.values[0], atol=TOLERANCE)
    assert batched.values[1, ..., 31:].abs().max() == 0  # padding receives no attention


def test_selected_layers_only():
    model = tiny_model("qwen3")
    ids, attention_mask, answer_mask = _batch(4)
    every = capture_answer_attention(model, ids, attention_mask, answer_mask)
    some = capture_answer_attention(model, ids, attention_mask, answer_mask, layers=[2, 0])
    assert some.layers == [0, 2]
    assert torch.allclose(some.values[:, 1], every.values[:, 2], atol=1e-6)


def test_bfloat16_model_rows_are_float32_and_close_to_float32_model():
    model = tiny_model("qwen2")
    ids, attention_mask, answer_mask = _batch(5)
    exact = capture_answer_attention(model, ids, attention_mask, answer_mask)
    half = capture_answer_attention(model.to(torch.bfloat16), ids, attention_mask, answer_mask)
    assert half.values.dtype == torch.float32
    assert (half.values - exact.values).abs().max() < 0.2  # bf16 weights and activations, float32 rows


def test_model_without_attention_interface_is_refused_by_name():
    from transformers import MambaConfig, MambaForCausalLM

    model = MambaForCausalLM(MambaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, state_size=4)).eval()
    ids = torch.ones(1, 5, dtype=torch.long)
    with pytest.raises(UnsupportedModelError, match="MambaForCausalLM"):
        capture_answer_attention(model, ids, torch.ones_like(ids), torch.ones_like(ids, dtype=torch.bool))


def test_training_mode_and_missing_layers_are_refused():
    model = tiny_model("qwen2")
    ids, attention_mask, answer_mask = _batch()
    with pytest.raises(ValueError, match="layer"):
        capture_answer_attention(model, ids, attention_mask, answer_mask, layers=[7])
    model.train()
    with pytest.raises(ValueError, match="eval mode"):
        capture_answer_attention(model, ids, attention_mask, answer_mask)
