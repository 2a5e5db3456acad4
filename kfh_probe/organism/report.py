"""Generate from the organism and measure it: accuracy, response lengths, redundant steps.

Generation is batched with left padding and the KV cache (``model.generate``); answers are parsed
from the generated text (the last ``\\boxed{}`` after exactly one ``</think>``), never teacher-forced.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kfh_probe.organism.labeler import TraceFormatError, extract_answer, label_trace
from kfh_probe.organism.task import Problem, generate_problems

REPORT_SEED = 20_250_101  # far from the build seeds, so report problems are fresh
MAX_NEW_TOKENS = 448


@dataclass
class Sample:
    """One generated response: its prompt, text (EOS text included when it stopped), token count."""

    prompt: str
    response: str
    n_tokens: int
    answer: int


def load(model_dir: str | Path):
    """``(model, tokenizer)`` loaded from a plain HF folder, model in eval mode."""
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    return model.eval(), tok


def generate(model_dir: str | Path, n: int, seed: int, temperature: float | None = None,
             batch_size: int = 125) -> list[Sample]:
    """Responses to ``n`` fresh problems (``seed``); greedy when ``temperature`` is None."""
    model, tok = load(model_dir)
    return respond(model, tok, generate_problems(n, seed), seed, temperature, batch_size)


@torch.no_grad()
def respond(model, tok, problems: list[Problem], seed: int, temperature: float | None = None,
            batch_size: int = 125) -> list[Sample]:
    """The model's responses to ``problems`` (sampling seeded with ``seed``; greedy when
    ``temperature`` is None)."""
    torch.manual_seed(seed)
    out: list[Sample] = []
    for start in range(0, len(problems), batch_size):
        chunk = problems[start:start + batch_size]
        prompts = [p.prompt() for p in chunk]
        enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left")
        kwargs = ({"do_sample": False} if temperature is None
                  else {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0})
        ids = model.generate(**enc, max_new_tokens=MAX_NEW_TOKENS, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id, **kwargs)
        for problem, prompt, row in zip(chunk, prompts, ids[:, enc["input_ids"].shape[1]:].tolist()):
            if tok.eos_token_id in row:
                row = row[:row.index(tok.eos_token_id) + 1]
            out.append(Sample(prompt, tok.decode(row), len(row), problem.answer))
    return out


def sample_labeled_traces(model_dir: str | Path, n: int, seed: int, temperature: float = 1.0) -> list[dict]:
    """Design-format trace dicts (``id``, ``prompt``, ``response``, ``answer``, ``steps``) sampled from the model.

    Samples without exactly one ``</think>`` cannot carry steps and are left out (see
    :func:`labeled_samples` for the counts).
    """
    return labeled_samples(model_dir, n, seed, temperature)[0]


def labeled_samples(model_dir: str | Path, n: int, seed: int, temperature: float | None = 1.0) -> tuple[list[dict], dict]:
    """Labeled trace dicts plus statistics over all ``n`` samples (accuracy, lengths, parse counts)."""
    samples = generate(model_dir, n, seed, temperature)
    records, redundant, unknown, wrong, dropped = [], [], 0, 0, 0
    for i, s in enumerate(samples):
        try:
            labeled = label_trace(s.prompt, s.response)
        except TraceFormatError:
            dropped += 1
            continue
        unknown += labeled.unknown_steps
        wrong += labeled.wrong_claims
        redundant.append(sum(st["label"] == "redundant" for st in labeled.steps))
        records.append({"id": f"organism-model-{seed}-{i}", "prompt": s.prompt, "response": s.response,
                        "answer": str(s.answer), "steps": labeled.steps})
    lengths = [s.n_tokens for s in samples]
    stats = {
        "n": n,
        "accuracy": sum(extract_answer(s.response) == s.answer for s in samples) / n,
        "tokens_mean": statistics.fmean(lengths),
        "tokens_std": statistics.pstdev(lengths),
        "tokens_min": min(lengths),
        "tokens_max": max(lengths),
        "redundant_steps_mean": statistics.fmean(redundant) if redundant else 0.0,
        "parseable_fraction": len(records) / n,
        "unlabelable_traces": dropped,
        "unknown_steps": unknown,
        "wrong_claims": wrong,
    }
    return records, stats


def organism_report(model_dir: str | Path, n: int = 500, seed: int = REPORT_SEED) -> dict:
    """Greedy and temperature-1.0 statistics on ``n`` fresh problems each."""
    return {
        "model_dir": str(model_dir),
        "seed": seed,
        "greedy": labeled_samples(model_dir, n, seed, None)[1],
        "sampled_t1": labeled_samples(model_dir, n, seed + 1, 1.0)[1],
    }
