"""The distillation loop (``attnpo-train distill``): a student from scratch on the teacher's traces, with
cross-entropy plus, when ``transfer_weight > 0``, the attention-transfer loss (docs/method.md, section 10).

Each step draws ``batch_size`` traces (an epoch-wise shuffled order from the data generator), runs the
student's forward once with a :class:`~kfh_probe.KeySpanRecorder` on every layer's attention calls (the
student's key mass, with gradients), and minimises ``CE + transfer_weight * KL(target || student)``.
Checkpoints (student, mixture weights, optimiser, scheduler, every RNG, metrics) are written atomically
every ``checkpoint_every`` steps and on Ctrl-C by ``attnpo_train.checkpoint``; a resumed run continues
the same batch order. The student is saved as a Hugging Face folder in ``OUT/final``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from attnpo_train.checkpoint import capture_rng, deferred_interrupt, resume_from, save_checkpoint, save_final
from attnpo_train.distill.config import STUDENT_PRESET, DistillConfig
from attnpo_train.distill.data import lm_labels, load_key_traces, padded_mass, teacher_mass
from attnpo_train.distill.objective import (
    MixtureOfLayers, fixed_layer_weights, layer_targets, shuffled_steps, transfer_loss,
)
from kfh_probe import (
    DEFAULT_ORGANISM, InputError, KeySpanRecorder, KeyTrace, atomic_write_json, atomic_write_jsonl,
    attention_calls, built_model_dir, default_traces_path, key_batch, key_distribution,
    load_model, load_tokenizer, model_folder, model_shape, pad_token_id, task_of,
)

EVAL_SEED = 7_000_001
"""Seed of the organism problems evaluated during training (``attnpo-train eval``'s default problems)."""


@dataclass
class DistillInputs:
    """What ``train_student`` needs besides the config, checked before any training.

    Attributes:
        tokenizer: the teacher's (the student shares it).
        traces: the training traces on tokens.
        teacher_mass: per trace, the teacher's head-mean key mass ``[teacher_layer, step, key]``; None when
            the transfer term is off.
        student_config: the student's model config.
        task: the teacher's organism task (None for another teacher: no evaluation during training).
    """

    tokenizer: object
    traces: list[KeyTrace]
    teacher_mass: list[torch.Tensor] | None
    student_config: object
    task: str | None


class Student(nn.Module):
    """The student and its Mixture of Layers, one module so a checkpoint holds both."""

    def __init__(self, model: nn.Module, mixture: MixtureOfLayers | None):
        super().__init__()
        self.model = model
        self.mixture = mixture


def student_config(teacher_dir: str | Path, path: str | None):
    """The teacher's model config with the fields of the JSON object at ``path`` (or ``STUDENT_PRESET``); a
    new depth without its own ``layer_types`` gets the default ones.

    Raises:
        kfh_probe.InputError: the file is not a JSON object, or names a field the teacher's config lacks.
    """
    config = AutoConfig.from_pretrained(teacher_dir)
    try:
        fields = STUDENT_PRESET if path is None else json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: cannot read the student config ({err})") from None
    if not isinstance(fields, dict):
        raise InputError(f"{path}: a student config must be a JSON object of model-config fields")
    known = config.to_dict()
    unknown = sorted(set(fields) - set(known))
    if unknown:
        raise InputError(f"{path}: {', '.join(map(repr, unknown))} not a field of the teacher's "
                         f"{type(config).__name__} (known: {', '.join(sorted(known))})")
    if "num_hidden_layers" in fields and "layer_types" not in fields:
        known.pop("layer_types", None)  # per-layer list of the teacher's depth; the config derives it again
    return type(config).from_dict({**known, **fields})


def prepare_distill(config: DistillConfig) -> DistillInputs:
    """Load and check everything a run needs: the teacher (default: the embedded organism, with its shipped
    traces), its traces and key spans, its signal.

    Raises:
        kfh_probe.InputError: a missing or broken teacher, trace file or student config, or a teacher without
            traces.
    """
    if config.teacher is not None and config.traces is None:
        raise InputError("--teacher was given without --traces: pass the teacher's traces (JSONL)")
    teacher_dir = model_folder(config.teacher) if config.teacher is not None else built_model_dir(DEFAULT_ORGANISM)
    tokenizer = load_tokenizer(teacher_dir)
    shape = student_config(teacher_dir, config.student_config)
    traces_path = config.traces if config.traces is not None else default_traces_path(DEFAULT_ORGANISM)
    traces = load_key_traces(traces_path, tokenizer, with_keys=config.transfer_weight > 0)
    masses = None
    if config.transfer_weight > 0:
        teacher = load_model(teacher_dir, "float32", config.device)
        masses = teacher_mass(teacher, traces, pad_token_id(tokenizer))
    task = task_of(teacher_dir) if (Path(teacher_dir) / "organism_task.json").is_file() else None
    if config.eval_every and task is None:
        raise InputError(f"eval_every needs an organism teacher (its folder names its task); {teacher_dir} does not")
    return DistillInputs(tokenizer, traces, masses, shape, task)


def new_student(inputs: DistillInputs, config: DistillConfig) -> Student:
    """The student initialised from ``config.seed`` (embeddings drawn with std 0.1, as the organism is built),
    and its Mixture of Layers when the transfer term uses one."""
    torch.manual_seed(config.seed)
    model = AutoModelForCausalLM.from_config(inputs.student_config)
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0.0, 0.1)
        model.get_output_embeddings().weight.normal_(0.0, 0.1)
    mixture = None
    if inputs.teacher_mass is not None and config.layer_map == "mixture":
        mixture = MixtureOfLayers(model_shape(model)["num_layers"], inputs.teacher_mass[0].shape[0])
    return Student(model.to(config.device), None if mixture is None else mixture.to(config.device))


def make_optimizer(student: Student, config: DistillConfig):
    """AdamW over student and mixture; linear warm-up over ``warmup`` steps, then cosine decay to 0."""
    optimizer = torch.optim.AdamW(student.parameters(), lr=config.lr, weight_decay=0.0)

    def factor(done: int) -> float:
        if done < config.warmup:
            return (done + 1) / config.warmup
        progress = (done - config.warmup) / max(1, config.steps - config.warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class BatchOrder:
    """Trace indices in epochs: each epoch a fresh shuffle of all traces by ``rng``."""

    def __init__(self, count: int, rng: random.Random):
        self.count, self.rng, self.queue = count, rng, []

    def draw(self, n: int) -> list[int]:
        out = []
        while len(out) < n:
            if not self.queue:
                self.queue = self.rng.sample(range(self.count), self.count)
            out.append(self.queue.pop())
        return out

    def state(self) -> dict:
        return {"queue": list(self.queue)}

    def restore(self, state: dict) -> None:
        self.queue = list(state["queue"])


def teacher_targets(inputs: DistillInputs, config: DistillConfig) -> list[torch.Tensor] | None:
    """Per trace, the teacher mass the run transfers: as read, or (``teacher_signal: shuffled``) with each
    trace's steps permuted by a generator seeded with ``config.seed``."""
    if inputs.teacher_mass is None or config.teacher_signal == "stepwise":
        return inputs.teacher_mass
    generator = torch.Generator().manual_seed(config.seed)
    return [shuffled_steps(mass, generator) for mass in inputs.teacher_mass]


def step_loss(student: Student, batch_traces: list[KeyTrace], targets: list[torch.Tensor] | None,
              config: DistillConfig, pad_id: int) -> tuple[torch.Tensor, dict]:
    """The objective of one batch (the forward runs here) and its parts for the metrics."""
    model = student.model
    batch = key_batch(batch_traces, pad_id)
    labels = lm_labels(batch_traces, batch.input_ids.shape[1])
    device = config.device
    layers = list(range(model_shape(model)["num_layers"]))
    recorder = KeySpanRecorder(batch, layers, grad=True) if targets is not None else None
    watch = attention_calls(model, layers, recorder) if recorder is not None else contextlib.nullcontext()
    with watch:
        out = model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                    labels=labels.to(device), use_cache=False)
    parts = {"ce": float(out.loss.detach())}
    if recorder is None:
        return out.loss, parts
    available = batch.available[:, None].to(device)
    mass = torch.stack([recorder.results[layer].mean(dim=1) for layer in layers], dim=1)  # [batch, layer, step, key]
    student_dist = key_distribution(mass, available)
    teacher = padded_mass(targets, batch.available.shape[1], batch.available.shape[2]).to(device)
    teacher_dist = key_distribution(teacher, available)
    weights = (student.mixture.weights() if student.mixture is not None
               else fixed_layer_weights(len(layers), teacher.shape[1]).to(device))
    transfer = transfer_loss(student_dist, layer_targets(weights, teacher_dist), batch.step_valid.to(device))
    parts["transfer"] = float(transfer.detach())
    return out.loss + config.transfer_weight * transfer, parts


@torch.no_grad()
def greedy_accuracy(model: nn.Module, tokenizer, task: str, config: DistillConfig) -> float:
    """Greedy accuracy on ``eval_problems`` problems of the organism task (seed :data:`EVAL_SEED`)."""
    from attnpo_train.data import organism_prompts
    from attnpo_train.evaluate import evaluate

    prompts = organism_prompts(config.eval_problems, EVAL_SEED, task, "eval")
    was_training = model.training
    model.eval()
    result = evaluate(model, tokenizer, prompts, config.max_new_tokens, batch_size=50, grader="exact")
    model.train(was_training)
    return result["accuracy"]


def train_student(inputs: DistillInputs, config: DistillConfig, resume: bool = False,
                  progress: bool = True) -> list[dict]:
    """Train for ``config.steps`` steps, writing metrics, checkpoints and the final student under ``config.out``.

    Returns:
        every metrics line of the run (resumed lines included): ``step``, ``loss``, ``ce``, ``transfer`` (with
        the transfer term), ``lr``, ``time_s``, the mixture weights ``layer_weights`` (with a mixture) and
        ``accuracy_greedy`` at evaluation steps.
    Raises:
        ResumeError: ``resume`` without a checkpoint, or with settings that differ from it.
        KeyboardInterrupt: after saving a checkpoint of the last completed step.
    """
    from tqdm.auto import tqdm

    out = Path(config.out)
    pad_id = pad_token_id(inputs.tokenizer)
    student = new_student(inputs, config)
    optimizer, scheduler = make_optimizer(student, config)
    targets = teacher_targets(inputs, config)
    data_rng = random.Random(config.seed)
    order = BatchOrder(len(inputs.traces), data_rng)
    metrics: list[dict] = []
    start = 0
    if resume:
        start, metrics, rng_saved = resume_from(out, config, student, optimizer, scheduler, data_rng)
        order.restore(rng_saved["order"])
    else:
        random.seed(config.seed)
        np.random.seed(config.seed)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "config.json", dataclasses.asdict(config))
    atomic_write_jsonl(out / "metrics.jsonl", metrics)

    def rng_state() -> dict:
        return {**capture_rng(data_rng), "order": order.state()}

    rng = rng_state()
    done = start
    student.train()
    bar = tqdm(total=config.steps, initial=start, disable=not progress, desc="distill", unit="step")
    try:
        for step in range(start, config.steps):
            t0 = time.perf_counter()
            chosen = order.draw(config.batch_size)
            loss, parts = step_loss(student, [inputs.traces[i] for i in chosen],
                                    None if targets is None else [targets[i] for i in chosen], config, pad_id)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            with deferred_interrupt():
                record = {"step": step + 1, "loss": float(loss.detach()), **parts, "lr": optimizer.param_groups[0]["lr"]}
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                if student.mixture is not None:
                    record["layer_weights"] = student.mixture.weights().detach().cpu().tolist()
                done = step + 1
                if config.eval_every and (done % config.eval_every == 0 or done == config.steps):
                    record["accuracy_greedy"] = greedy_accuracy(student.model, inputs.tokenizer, inputs.task, config)
                record["time_s"] = time.perf_counter() - t0
                metrics.append(record)
                rng = rng_state()
            atomic_write_jsonl(out / "metrics.jsonl", metrics)
            bar.update(1)
            bar.set_postfix(ce=f"{parts['ce']:.3f}", **({"kl": f"{parts['transfer']:.3f}"} if "transfer" in parts else {}))
            if done % config.checkpoint_every == 0 or done == config.steps:
                save_checkpoint(out, done, student, optimizer, scheduler, rng, metrics, config)
    except KeyboardInterrupt:
        bar.close()
        if done > start:
            save_checkpoint(out, done, student, optimizer, scheduler, rng, metrics, config)
        raise
    bar.close()
    save_final(student.model.eval(), inputs.tokenizer, out, inputs.task)
    return metrics
