"""Train the organism from scratch: a small Qwen2ForCausalLM on fresh teacher traces.

Plain PyTorch: AdamW, linear warm-up then cosine decay, loss on response tokens only (prompt and
padding are masked with -100). Every batch is a new set of problems, so the model never sees the
same problem twice. Deterministic for a seed: Python and torch RNGs are seeded, deterministic
algorithms are requested, and the intra-op thread count is pinned to :data:`THREADS` for the run,
because the order of floating-point reductions (and so the last bits of the weights) can depend on
the number of threads; on the same CPU type and library versions a build is bit-for-bit
repeatable whatever the machine's core count.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer
from tqdm import tqdm
from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

from kfh_probe.alignment import right_pad
from kfh_probe.organism import write_task_file
from kfh_probe.organism.task import TASKS, TaskSpec, generate_problem, teacher_response, teacher_steps
from kfh_probe.organism.tokenizer import EXTRA_TOKENS, save_tokenizer, train_bpe

THREADS = 2


@dataclass(frozen=True)
class OrganismTrainConfig:
    """Hyper-parameters of a build (the defaults make the shipped model)."""

    seed: int = 0
    task: str = "v4"  # the task version (kfh_probe.organism.task.TASKS) the teacher writes
    steps: int = 3200
    batch_size: int = 8
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.05
    tokenizer_traces: int = 2000
    bucket_batches: int = 8  # draw this many batches at once and group them by length (less padding)


def model_config(vocab_size: int) -> Qwen2Config:
    """4 layers, hidden 128 (MLP 384), 8 query heads sharing 4 KV heads (head_dim 16), RoPE.

    Input and output embeddings are untied (and get a wider init, no weight decay, see
    :func:`_init_embeddings`): otherwise the many interchangeable name and item tokens collapse onto
    one direction early and the model never learns to copy them.
    """
    eos, pad = EXTRA_TOKENS.index("<|endoftext|>"), EXTRA_TOKENS.index("<|pad|>")
    return Qwen2Config(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
        rope_theta=10000.0, tie_word_embeddings=False, eos_token_id=eos, pad_token_id=pad,
        bos_token_id=None, attention_dropout=0.0,
    )


def _teacher_text(rng: random.Random, spec: TaskSpec) -> tuple[str, str]:
    problem = generate_problem(rng, spec)
    return problem.prompt(), teacher_response(problem, teacher_steps(problem, rng, spec))


def teacher_batches(rng: random.Random, cfg: OrganismTrainConfig) -> Iterator[list[tuple[str, str]]]:
    """Endless batches of fresh ``(prompt, response)`` pairs, a pure function of ``rng``'s state.

    ``cfg.bucket_batches`` batches are drawn at once, sorted by length, cut into batches and served
    in random order: padding falls from about 27% of the tokens to a few percent, so a build of
    fixed wall time sees about 1.3x more real tokens.
    """
    while True:
        spec = TASKS[cfg.task]
        pool = [_teacher_text(rng, spec) for _ in range(cfg.batch_size * cfg.bucket_batches)]
        pool.sort(key=lambda pair: len(pair[0]) + len(pair[1]))
        batches = [pool[i:i + cfg.batch_size] for i in range(0, len(pool), cfg.batch_size)]
        rng.shuffle(batches)
        yield from batches


def make_batch(tok: Tokenizer, pairs: list[tuple[str, str]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``/``attention_mask``/``labels``, each ``(B, T)``; labels only on responses."""
    prompts = tok.encode_batch([p for p, _ in pairs])
    responses = tok.encode_batch([r for _, r in pairs])
    ids, mask = right_pad([p.ids + r.ids for p, r in zip(prompts, responses)], pad_id)
    labels = torch.full_like(ids, -100)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        labels[i, len(p.ids):len(p.ids) + len(r.ids)] = torch.tensor(r.ids)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _lr_at(step: int, cfg: OrganismTrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def build(out_dir: Path, cfg: OrganismTrainConfig = OrganismTrainConfig()) -> Path:
    """Train tokenizer and model, write an HF folder at ``out_dir`` (replaced atomically), return it."""
    out_dir = Path(out_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)
    try:
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        _train(tmp, cfg)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(False)
    return out_dir


def _init_embeddings(model: Qwen2ForCausalLM, std: float = 0.1) -> None:
    """Wider random init of input and output embeddings, so symmetric tokens start distinguishable."""
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0.0, std)
        model.get_output_embeddings().weight.normal_(0.0, std)


def _train(out: Path, cfg: OrganismTrainConfig) -> None:
    rng = random.Random(cfg.seed)
    tok = train_bpe(p + r for p, r in (_teacher_text(rng, TASKS[cfg.task]) for _ in range(cfg.tokenizer_traces)))
    torch.manual_seed(cfg.seed)
    config = model_config(tok.get_vocab_size())
    model = Qwen2ForCausalLM(config)
    _init_embeddings(model)
    embeddings = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    decay = [p for p in model.parameters() if p.dim() >= 2 and id(p) not in embeddings]
    no_decay = [p for p in model.parameters() if p.dim() < 2 or id(p) in embeddings]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))
    model.train()
    bar = tqdm(range(cfg.steps), desc="organism", file=sys.stderr, dynamic_ncols=True)
    tokens, start = 0, time.perf_counter()
    pairs = teacher_batches(rng, cfg)
    for step in bar:
        batch = make_batch(tok, next(pairs), config.pad_token_id)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += int(batch["attention_mask"].sum())
        bar.set_postfix(loss=f"{loss.item():.4f}", tok_s=f"{tokens / (time.perf_counter() - start):.0f}")
    model.eval()
    model.generation_config = GenerationConfig(
        eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id, do_sample=False)
    model.save_pretrained(out, safe_serialization=True)
    save_tokenizer(tok, out)
    write_task_file(out, cfg.task)
