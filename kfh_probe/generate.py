"""``kfh-probe generate``: sample reasoning traces from a causal LM on a file of problems.

Problems are JSONL rows ``{"id", "problem" or "prompt", "answer"?}``:

- ``problem``: the question; the model input is the tokenizer's chat template applied to one user
  message (the question, a blank line, ``instruction``), or ``prompt_template`` (a
  :class:`string.Template` with ``$problem``) rendered as the exact model input instead;
- ``prompt``: the exact model input, used as it is;

then ``think_prefix`` is appended (text the response is made to start with, e.g. ``"<think>\\n"`` for
a model whose chat template does not open the thinking block itself). It belongs to the trace's
``prompt``, since the model did not write it.

Every problem gets ``samples`` responses. The (problem, sample) pairs are cut, in file order, into
batches of ``batch_size`` sequences, and batch ``b`` is sampled with the seed ``(seed, b)``
(``batch_seed``), so a run gives the same traces whether it ran in one go or was resumed. Records
are the design page's trace format plus ``problem_id``, ``sample``, ``response_tokens``,
``truncated`` (True: no end-of-sequence token within ``max_new_tokens``; the trace reader refuses such
a record, so a cut-off answer is never taken for a complete one) and ``correct`` (the graded answer,
None without a reference answer).

Output: after every batch the output file is rewritten atomically with every record kept so far,
then ``OUT.run.json`` records the run's key and how many batches and records are done. A rerun of
the same command continues after the last finished batch (records of a batch written after the last
``OUT.run.json`` are dropped and sampled again, with the same seed). ``OUT.run.json`` is removed when
the run completes.
"""

from __future__ import annotations

import json
import string
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm.auto import tqdm

from .errors import InputError, KFHError, NotInstalledError, listed
from .grading import GRADERS, is_correct
from .io import jsonl_records
from .segmentation import split_response
from .settings import Interval, NonEmpty, OneOf, Relation, check_settings, setting

DEFAULT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
"""Appended to a ``problem`` in the chat-template path (DeepSeek-R1's recommended instruction)."""


class OutputExistsError(KFHError, FileExistsError):
    """``--out`` holds another run's output; the message says how to keep it or start afresh."""


class ProblemFileError(InputError):
    """A problems file with rows that cannot be used; the message names each by line and id."""


@dataclass(frozen=True)
class Problem:
    """One problem as the model sees it.

    Attributes:
        id: unique id (``line-N`` when the row has none).
        prompt: the exact model input, think prefix included.
        answer: reference answer, if given.
        line: 1-based line in the problems file.
    """

    id: str
    prompt: str
    answer: str | None
    line: int


@dataclass(frozen=True)
class GenerateConfig:
    """How responses are sampled and kept (recorded in ``OUT.run.json``); each setting's help and constraints
    are declared at its field (``kfh_probe.settings``)."""

    samples: int = setting(
        1, "Responses per problem (K).", Interval(1, None),
        Relation(lambda samples, config: config.temperature > 0 or samples == 1,
                 "1 when temperature is 0 (greedy decoding gives one response per problem)"),
    )
    temperature: float = setting(0.6, "Sampling temperature; 0 is greedy decoding.", Interval(0, None))
    top_p: float = setting(0.95, "Nucleus sampling mass.", Interval(0, 1, closed="right"))
    max_new_tokens: int = setting(
        4096, "Response budget; a response without EOS within it is marked truncated.", Interval(1, None)
    )
    batch_size: int = setting(8, "Sequences per generate call.", Interval(1, None))
    seed: int = setting(0, "Base seed of every batch (batch_seed).")
    marker: str = setting("</think>", "End-of-thinking marker, for grading.", NonEmpty())
    grader: str = setting("math-verify", "Who grades the answers (kfh_probe.grading).", OneOf(GRADERS))
    correct_only: bool = setting(False, "Keep only responses graded correct.")
    engine: str = setting("hf", '"hf" (transformers generate) or "vllm".', OneOf(("hf", "vllm")))

    def __post_init__(self) -> None:
        check_settings(self)


def load_prompt_template(path: str | Path) -> string.Template:
    """A ``$problem`` template from ``path`` (``$$`` for a literal ``$``).

    Raises:
        InputError: no such file, or the template lacks ``$problem`` or names another placeholder.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"prompt template not found: {path}")
    template = string.Template(path.read_text(encoding="utf-8"))
    names = {m.group("named") or m.group("braced") for m in template.pattern.finditer(template.template)} - {None}
    if names != {"problem"}:
        raise InputError(f"{path}: a prompt template must use exactly the placeholder $problem; it has {sorted(names) or 'none'}")
    return template


def model_input(problem: str, tokenizer, template: string.Template | None, instruction: str) -> str:
    """The exact model input for a ``problem`` row (module docstring), before the think prefix."""
    if template is not None:
        return template.substitute(problem=problem)
    if not getattr(tokenizer, "chat_template", None):
        raise InputError("the tokenizer has no chat template: give a prompt template (a file with $problem), "
                         "or each row an exact 'prompt'")
    content = f"{problem}\n\n{instruction}" if instruction else problem
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)


def read_problems(path: str | Path, tokenizer, template: string.Template | None = None,
                  instruction: str = DEFAULT_INSTRUCTION, think_prefix: str = "", need_answers: bool = False) -> list[Problem]:
    """Read and check a problems file (module docstring); every bad row is reported at once.

    Raises:
        InputError: no such file.
        ProblemFileError: naming the file and each bad row by line and id.
    """
    problems: list[Problem] = []
    errors: list[str] = []
    seen: dict[str, int] = {}
    for line_no, row, problem in jsonl_records(path, "problems file"):
        if problem is not None:
            errors.append(f"{path}:{line_no}: {problem}")
            continue
        row_id = row.get("id", f"line-{line_no}")
        try:
            parsed = _problem(row, row_id, line_no, tokenizer, template, instruction, think_prefix, need_answers)
            if row_id in seen:
                raise ValueError(f"duplicate id (first seen on line {seen[row_id]})")
        except ValueError as err:
            errors.append(f"{path}:{line_no} (id {row_id!r}): {err}")
            continue
        seen[row_id] = line_no
        problems.append(parsed)
    if errors:
        raise ProblemFileError(f"{len(errors)} unusable row(s) in {path}: {listed(errors)}")
    if not problems:
        raise ProblemFileError(f"{path}: no problems (the file is empty)")
    return problems


def _problem(row: dict, row_id: object, line: int, tokenizer, template, instruction: str, think_prefix: str,
             need_answers: bool) -> Problem:
    if not isinstance(row_id, str) or not row_id:
        raise ValueError(f"field 'id' must be a non-empty string, got {row_id!r}")
    has_problem, has_prompt = "problem" in row, "prompt" in row
    if has_problem == has_prompt:
        raise ValueError("give exactly one of 'problem' (the question; the chat template is applied) and "
                         "'prompt' (the exact model input)")
    text = row["problem"] if has_problem else row["prompt"]
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"field {'problem' if has_problem else 'prompt'!r} must be a non-empty string")
    answer = row.get("answer")
    if answer is not None and (isinstance(answer, bool) or not isinstance(answer, (str, int, float)) or not str(answer).strip()):
        raise ValueError(f"field 'answer' must be a non-empty string or a number, got {answer!r}")
    if need_answers and answer is None:
        raise ValueError("no 'answer': keeping only correct responses grades every response against its reference answer")
    prompt = model_input(text, tokenizer, template, instruction) if has_problem else text
    return Problem(row_id, prompt + think_prefix, None if answer is None else str(answer).strip(), line)


def batch_seed(seed: int, batch: int) -> int:
    """The seed of batch ``batch``: a pure function of the run's seed and the batch index."""
    return (seed * 1_000_003 + batch) % (2**63 - 1)


def generation_batches(num_problems: int, samples: int, batch_size: int) -> list[list[tuple[int, int]]]:
    """``(problem index, sample index)`` pairs in file order, cut into batches of ``batch_size``."""
    pairs = [(i, k) for i in range(num_problems) for k in range(samples)]
    return [pairs[start : start + batch_size] for start in range(0, len(pairs), batch_size)]


def sample_hf(model, tokenizer, prompts: list[str], config: GenerateConfig, seed: int) -> list[tuple[str, bool, int]]:
    """One batch through transformers ``generate`` (left padding, KV cache): ``kfh_probe.sampling``, the
    trainer's sampler too.

    Returns:
        per prompt ``(response text, truncated, response tokens)``; the text keeps special tokens
        (so the marker survives) and drops the final EOS; tokens count EOS.
    """
    import torch

    from .sampling import generate_rollouts

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        rollouts = generate_rollouts(model, tokenizer, prompts, 1, config.max_new_tokens, config.temperature or None,
                                     top_p=config.top_p)
    return [(text, not done, len(ids)) for text, done, ids in zip(rollouts.texts, rollouts.finished, rollouts.response_ids)]


class VLLMSampler:
    """The same batches through vLLM (``--engine vllm``): token-id prompts (no second BOS), special
    tokens kept in the text, a per-request seed (``batch_seed`` plus the position in the batch)."""

    def __init__(self, folder: str | Path, dtype: str, tokenizer):
        try:
            from vllm import LLM
        except ImportError:
            raise NotInstalledError("`engine` 'vllm' needs vLLM: pip install vllm (on a machine with a GPU it supports)",
                                    settings=("engine",)) from None
        self.llm = LLM(model=str(folder), dtype=dtype)
        self.tokenizer = tokenizer

    def __call__(self, prompts: list[str], config: GenerateConfig, seed: int) -> list[tuple[str, bool, int]]:
        from vllm import SamplingParams

        from .sampling import decode_responses

        requests = [{"prompt_token_ids": self.tokenizer(p, add_special_tokens=False)["input_ids"]} for p in prompts]
        params = [
            SamplingParams(temperature=config.temperature, top_p=config.top_p, max_tokens=config.max_new_tokens,
                           seed=(seed + j) % (2**31 - 1), skip_special_tokens=False)
            for j in range(len(prompts))
        ]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        ids = [list(o.outputs[0].token_ids) for o in outputs]
        trimmed, texts, _ = decode_responses(self.tokenizer, ids, {self.tokenizer.eos_token_id})
        return [(text, o.outputs[0].finish_reason == "length", len(t)) for text, o, t in zip(texts, outputs, trimmed)]


def make_record(problem: Problem, sample: int, text: str, truncated: bool, tokens: int, config: GenerateConfig) -> dict:
    """The trace record of one response (module docstring), graded when the problem has an answer."""
    correct = None
    if problem.answer is not None:
        correct = not truncated and is_correct(text, problem.answer, config.marker, config.grader)
    record = {"id": f"{problem.id}#{sample}", "prompt": problem.prompt, "response": text}
    if problem.answer is not None:
        record["answer"] = problem.answer
    record.update(problem_id=problem.id, sample=sample, response_tokens=tokens, truncated=truncated, correct=correct)
    return record


COUNTS = ("responses", "kept", "truncated", "no_marker", "graded", "correct")
"""What a run counts over every response it sampled (``generate_traces``)."""


@dataclass
class Progress:
    """What ``OUT.run.json`` holds: the run's key, batches finished, records kept in OUT, counts so far."""

    key: dict
    batches: int = 0
    records: int = 0
    counts: dict | None = None

    def __post_init__(self) -> None:
        self.counts = self.counts or dict.fromkeys(COUNTS, 0)

    def count(self, record: dict, kept: bool, marker: str) -> None:
        """Add one sampled response to the counts."""
        finished = not record["truncated"]
        for name, hit in (("responses", True), ("kept", kept), ("truncated", not finished),
                          ("no_marker", finished and split_response(record["response"], marker) is None),
                          ("graded", record["correct"] is not None), ("correct", bool(record["correct"]))):
            self.counts[name] += int(hit)


def resume_state(out: Path, key: dict, overwrite: bool) -> tuple[Progress, list[dict]]:
    """Where a run with ``key`` starts: ``(progress, records kept so far)``.

    Raises:
        OutputExistsError: ``out`` exists and is no unfinished run of the same key, and not ``overwrite``.
    """
    state_file = run_file(out)
    if state_file.is_file():
        saved = json.loads(state_file.read_text(encoding="utf-8"))
        if saved.get("key") == key and out.is_file():
            lines = out.read_text(encoding="utf-8").splitlines()[: saved["records"]]
            print(f"resuming {out}: {saved['batches']} batch(es), {saved['records']} record(s) done", file=sys.stderr)
            return Progress(key, saved["batches"], saved["records"], saved["counts"]), [json.loads(x) for x in lines]
        if not overwrite:
            raise OutputExistsError(f"{state_file} belongs to an unfinished run with other settings; rerun that command "
                                    "to finish it, or use `overwrite` to start afresh", settings=("overwrite",))
    elif out.exists() and not overwrite:
        raise OutputExistsError(f"{out} exists (a finished run); use `overwrite` to generate it again", settings=("overwrite",))
    return Progress(key), []


def run_file(out: Path) -> Path:
    return out.with_name(out.name + ".run.json")


def save_progress(out: Path, progress: Progress, records: list[dict]) -> None:
    """OUT first, then the progress file (a crash in between leaves extra records that resume drops)."""
    from .io import atomic_write_json, atomic_write_jsonl

    atomic_write_jsonl(out, records)
    atomic_write_json(run_file(out), asdict(progress))


Sampler = Callable[[list[str], GenerateConfig, int], list[tuple[str, bool, int]]]
"""``(prompts, config, seed) -> [(response text, truncated, response tokens)]``: ``sample_hf`` or ``VLLMSampler``."""


def generate_traces(problems: list[Problem], sample: Sampler, config: GenerateConfig, out: str | Path, key: dict,
                    overwrite: bool = False, progress: bool = True) -> dict:
    """Sample every batch not done yet, writing ``out`` after each (module docstring).

    Args:
        key: what identifies the run's inputs (model, problems, settings); a rerun with the same key
            resumes.
    Returns:
        counts over every response of the run (resumed batches included): ``responses``, ``kept``,
        ``truncated``, ``no_marker`` (finished responses without exactly one marker), ``graded``,
        ``correct``.
    Raises:
        OutputExistsError: see ``resume_state``.
        KeyboardInterrupt: the batches finished before it are saved.
    """
    out = Path(out)
    state, records = resume_state(out, key, overwrite)
    batches = generation_batches(len(problems), config.samples, config.batch_size)
    bar = tqdm(total=len(problems) * config.samples, initial=sum(len(b) for b in batches[: state.batches]),
               unit="response", desc="generate", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    for b in range(state.batches, len(batches)):
        pairs = batches[b]
        results = sample([problems[i].prompt for i, _ in pairs], config, batch_seed(config.seed, b))
        for (i, k), (text, truncated, tokens) in zip(pairs, results, strict=True):
            record = make_record(problems[i], k, text, truncated, tokens, config)
            kept = not config.correct_only or bool(record["correct"])
            state.count(record, kept, config.marker)
            if kept:
                records.append(record)
        state.batches, state.records = b + 1, len(records)
        save_progress(out, state, records)
        bar.update(len(pairs))
    bar.close()
    run_file(out).unlink(missing_ok=True)
    return dict(state.counts)
