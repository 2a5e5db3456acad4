"""Generate from the organism and measure it: accuracy, response lengths, redundant steps.

Generation is the project's sampler (``kfh_probe.sampling.generate_rollouts``: batched ``model.generate``
with left padding and the KV cache); answers are parsed from the generated text (the last ``\\boxed{}``
after exactly one ``</think>``, ``kfh_probe.grading``), never teacher-forced.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from kfh_probe.loading import load_model, load_tokenizer
from kfh_probe.alignment import right_pad
from kfh_probe.organism.labeler import TraceFormatError, extract_answer, label_trace
from kfh_probe.organism.task import RECHECK_OPENERS, THINK_CLOSE, Problem, generate_problems
from kfh_probe.organism.traces import LABELER
from kfh_probe.sampling import generate_rollouts

REPORT_SEED = 20_250_101  # far from the build seeds, so report problems are fresh
MAX_NEW_TOKENS = 448


@dataclass
class Sample:
    """One generated response: its prompt, text (EOS text included when it stopped), token count."""

    prompt: str
    response: str
    n_tokens: int
    answer: int


def respond(model, tok, problems: list[Problem], seed: int, temperature: float | None = None,
            batch_size: int = 125) -> list[Sample]:
    """The model's responses to ``problems`` (``generate_rollouts`` in batches of ``batch_size``, sampling
    seeded with ``seed``; greedy when ``temperature`` is None). A response that stopped keeps its EOS
    text, as the organism's traces do."""
    torch.manual_seed(seed)
    prompts = [p.prompt() for p in problems]
    rollouts = generate_rollouts(model, tok, prompts, 1, MAX_NEW_TOKENS, temperature, batch_size=batch_size)
    return [Sample(prompt, text + tok.eos_token if done else text, len(ids), problem.answer)
            for problem, prompt, text, done, ids
            in zip(problems, prompts, rollouts.texts, rollouts.finished, rollouts.response_ids, strict=True)]


def sample_labeled_traces(model_dir: str | Path, n: int, seed: int, temperature: float = 1.0) -> list[dict]:
    """Design-format trace dicts (``id``, ``prompt``, ``response``, ``answer``, ``steps``) sampled from the model.

    Samples without exactly one ``</think>`` cannot carry steps and are left out (see
    :func:`labeled_samples` for the counts).
    """
    return labeled_samples(model_dir, n, seed, temperature)[0]


def labeled_samples(model_dir: str | Path, n: int, seed: int, temperature: float | None = 1.0) -> tuple[list[dict], dict]:
    """Labeled trace dicts plus statistics over all ``n`` samples (accuracy, lengths, parse counts,
    redundancy by kind, and the mean probability of opening a re-check at a line start)."""
    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    samples = respond(model, tok, generate_problems(n, seed), seed, temperature)
    records, accounts, unknown, wrong, dropped = [], [], 0, 0, 0
    for i, s in enumerate(samples):
        try:
            labeled = label_trace(s.prompt, s.response)
        except TraceFormatError:
            dropped += 1
            continue
        unknown += labeled.unknown_steps
        wrong += labeled.wrong_claims
        accounts.append(labeled.accounting())
        records.append({"id": f"organism-model-{seed}-{i}", "prompt": s.prompt, "response": s.response,
                        "answer": str(s.answer), "steps": labeled.steps, "labeler": LABELER})
    lengths = [s.n_tokens for s in samples]

    def mean_of(key: str) -> float:
        return statistics.fmean(a[key] for a in accounts) if accounts else 0.0

    stats = {
        "n": n,
        "accuracy": sum(extract_answer(s.response) == s.answer for s in samples) / n,
        "tokens_mean": statistics.fmean(lengths),
        "tokens_std": statistics.pstdev(lengths),
        "tokens_min": min(lengths),
        "tokens_max": max(lengths),
        "redundant_steps_mean": mean_of("redundant_steps"),
        "essential_steps_mean": mean_of("essential_steps"),
        "missing_essential_mean": mean_of("missing_essential"),
        "other_block_fraction": statistics.fmean(a["other"] > 0 for a in accounts) if accounts else 0.0,
        "minimal_fraction": statistics.fmean(a["redundant_steps"] == 0 for a in accounts) if accounts else 0.0,
        "rechecks_mean": mean_of("recheck"),
        "restates_mean": mean_of("restate"),
        "recheck_open_p": recheck_open_probability(model, tok, samples),
        "parseable_fraction": len(records) / n,
        "unlabelable_traces": dropped,
        "unknown_steps": unknown,
        "wrong_claims": wrong,
    }
    return records, stats


@torch.no_grad()
def recheck_open_probability(model, tok, samples: list[Sample], batch_size: int = 50) -> float:
    """The model's mean probability of opening a re-check at a line start of the reasoning.

    At every position of a response's reasoning whose token ends a line (``<think>\n`` included,
    ``</think>`` excluded), the next-token probability of the first token of any re-check opener
    (:data:`kfh_probe.organism.task.RECHECK_OPENERS`; no other step form starts with those tokens),
    teacher-forced on the response itself, averaged over all such line starts of all ``samples``.
    """
    first_ids = sorted({tok(opener, add_special_tokens=False)["input_ids"][0] for opener in RECHECK_OPENERS})
    close_id = tok.convert_tokens_to_ids(THINK_CLOSE)
    ends_line = {i for i in range(len(tok)) if tok.decode([i]).endswith("\n")}
    total, count = 0.0, 0
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        rows = [tok(s.prompt, add_special_tokens=False)["input_ids"] for s in chunk]
        responses = [tok(s.response, add_special_tokens=False)["input_ids"] for s in chunk]
        ids, mask = right_pad([p + r for p, r in zip(rows, responses)], tok.pad_token_id)
        probs = model(input_ids=ids, attention_mask=mask).logits.float().softmax(-1)[..., first_ids].sum(-1)
        for b, (p, r) in enumerate(zip(rows, responses)):
            reasoning = r[:r.index(close_id)] if close_id in r else r
            for k, token in enumerate(reasoning):
                if token in ends_line:
                    total += float(probs[b, len(p) + k])
                    count += 1
    return total / count if count else 0.0


def organism_report(model_dir: str | Path, n: int = 500, seed: int = REPORT_SEED) -> dict:
    """Greedy and temperature-1.0 statistics on ``n`` fresh problems each."""
    return {
        "model_dir": str(model_dir),
        "seed": seed,
        "greedy": labeled_samples(model_dir, n, seed, None)[1],
        "sampled_t1": labeled_samples(model_dir, n, seed + 1, 1.0)[1],
    }
