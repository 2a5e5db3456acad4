"""The organism's byte-level BPE survives ``AutoTokenizer`` on a qwen2 folder unchanged."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer, Qwen2Tokenizer

from kfh_probe.organism.tokenizer import save_tokenizer, train_bpe
from kfh_probe.organism.train import model_config
from kfh_probe.organism.traces import teacher_traces

TEXTS = [r["prompt"] + r["response"] for r in teacher_traces(300, seed=21)]
ODD = ["Ünïcode café — 12,345.6\r\n\ttabs  and  spaces", "it's they're I'll", "<think></think><think>", ""]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    raw = train_bpe(TEXTS[:200], vocab_size=500)
    folder = tmp_path_factory.mktemp("tok")
    save_tokenizer(raw, folder)
    model_config(raw.get_vocab_size()).save_pretrained(folder)
    return raw, AutoTokenizer.from_pretrained(str(folder))


def test_auto_tokenizer_is_qwen2_and_reproduces_the_training_ids(saved):
    raw, hf = saved
    assert isinstance(hf, Qwen2Tokenizer)
    for text in TEXTS + ODD:
        assert hf(text)["input_ids"] == raw.encode(text).ids


def test_decode_inverts_encode(saved):
    _, hf = saved
    for text in TEXTS + ODD:
        assert hf.decode(hf(text)["input_ids"]) == text


def test_think_markers_are_single_tokens_kept_in_decoded_text(saved):
    _, hf = saved
    ids = hf("<think>\nx</think>\ny")["input_ids"]
    assert hf.convert_tokens_to_ids("<think>") in ids and hf.convert_tokens_to_ids("</think>") in ids
    assert hf.decode(ids) == "<think>\nx</think>\ny"
    assert hf.decode(ids, skip_special_tokens=True) == "<think>\nx</think>\ny"


def test_eos_and_pad_are_set_and_offsets_are_returned(saved):
    _, hf = saved
    assert (hf.eos_token, hf.pad_token) == ("<|endoftext|>", "<|pad|>")
    assert hf.eos_token_id != hf.pad_token_id
    text = TEXTS[0]
    enc = hf(text, return_offsets_mapping=True)
    assert enc["input_ids"][-1] == hf.eos_token_id
    spans = enc["offset_mapping"]
    assert len(spans) == len(enc["input_ids"]) and spans[-1][1] == len(text)
