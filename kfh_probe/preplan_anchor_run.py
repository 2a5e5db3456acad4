"""The Preplan-and-Anchor signals of a trace file as one call: :func:`run_rhythm` (``kfh-probe rhythm`` is a
thin wrapper) ranks the heads by mean backward distance, or takes them from an earlier rhythm file, then
writes WAAD and FAI of every response token of every trace (the rhythm file, design page).

Both passes over the traces (the head distances, then the signals) go through the resumable batch runner
(:mod:`kfh_probe.batch_runner`), so an interrupted run resumes into the same run only, and several
processes can share the batches, with the same bytes as one process.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .alignment import AlignmentError, tokenize_response
from .batch_runner import PartStore, batches_by_length, consecutive_batches, run_batches, work_folder
from .errors import InputError
from .io import atomic_write_jsonl, check_output_path, file_sha256, to_stderr
from .layers import check_layers
from .loading import load_model, load_tokenizer, pad_token_id
from .manifest import model_record
from .preplan_anchor import (
    FAI_RANGE, HEAD_FRACTION, WINDOW, LocalGlobalHeads, RhythmSignals, check_head_fraction, check_windows,
    heads_from_header, mean_distance, middle_third_layers, read_rhythm_header, rhythm_header, rhythm_record,
    rhythm_signals, select_heads, trace_distances,
)
from .traces import SkippedTrace, TraceFileError, read_traces


@dataclass
class RhythmConfig:
    """Settings of :func:`run_rhythm` (``window`` and ``fai_range`` are recorded in the file's header).

    Attributes:
        window: W of WAAD (distances are clipped at W).
        fai_range: FAI averages the rows t in [s + lo, s + hi].
        head_fraction: share of the candidate heads in each of the local and global sets, in (0, 0.5].
        head_layers: rank only these layers' heads: a list of layers, ``"middle"`` (the paper's five evenly
            spaced layers of the middle third, :func:`~kfh_probe.preplan_anchor.middle_third_layers`), or
            None for all layers.
        batch_size: traces per forward (right-padded; results do not depend on it).
        marker: end-of-thinking marker (traces without exactly one are broken).
        skip_invalid: leave out broken traces instead of failing.
    """

    window: int = WINDOW
    fai_range: tuple[int, int] = FAI_RANGE
    head_fraction: float = HEAD_FRACTION
    head_layers: list[int] | str | None = None
    batch_size: int = 8
    marker: str = "</think>"
    skip_invalid: bool = False

    def __post_init__(self) -> None:
        check_windows(self.window, self.fai_range)
        check_head_fraction(self.head_fraction)
        if self.batch_size < 1:
            raise InputError(f"`batch_size` must be >= 1, got {self.batch_size}", settings=("batch_size",))
        if isinstance(self.head_layers, str) and self.head_layers != "middle":
            raise InputError(f"`head_layers` must be a list of layers, 'middle' or None; got {self.head_layers!r}",
                             settings=("head_layers",))


def run_rhythm(
    model: str | Path,
    traces: str | Path,
    config: RhythmConfig | None = None,
    *,
    out: str | Path | None = None,
    heads_from: str | Path | None = None,
    model_name: str | None = None,
    max_traces: int | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    work_dir: str | Path | None = None,
    keep_parts: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = to_stderr,
    rank: int = 0,
    world_size: int = 1,
) -> list[dict] | None:
    """WAAD and FAI of every response token of the ``traces`` under ``model`` (method page section 8).

    Traces are read and tokenised before the model is loaded. The local and global heads come from
    ``heads_from`` (an earlier rhythm file's header) or from ranking the heads by their mean backward
    distance over these traces (``config.head_fraction``, ``config.head_layers``). With ``out`` the rhythm
    file is written there atomically; without it, only returned. Finished batches are kept in ``work_dir``
    (default ``OUT.parts`` when ``out`` is given; in memory only when neither is) under a key of
    everything that changes the result, so the same call after an interruption continues where it
    stopped; the folder is removed once the file is written unless ``keep_parts``. Batch ``j`` of each
    pass runs on rank ``j % world_size``.

    Args:
        model: a Hugging Face model folder (or what ``kfh_probe.loading.load_model`` accepts).
        traces: trace JSONL (labels not needed).
        config: the settings (defaults of :class:`RhythmConfig` when None).
        model_name: the name recorded in the header (default: ``model`` as given).
        max_traces: use at most this many usable traces, in file order.
        dtype, device: how the weights are loaded (attention rows are float32 whatever the dtype).
        log: where one-line progress reports go (None: nowhere); ``progress``: the progress bars.

    Returns:
        the rhythm file's lines: the header, then one record per trace; None on a rank other than 0,
        once its share is saved in the work folder.

    Raises:
        kfh_probe.traces.TraceFileError: broken traces and ``config.skip_invalid`` is False.
        kfh_probe.errors.InputError: no usable trace, ``head_layers`` together with ``heads_from``, layers the
            model lacks, or a ``heads_from`` file that is no rhythm file of a model of this shape.
        KeyboardInterrupt: finished batches stay in the work folder.
    """
    config = RhythmConfig() if config is None else config
    folder = work_folder(work_dir, out, rank, world_size)
    if out is not None:
        check_output_path(out)  # fail before the work, not after it
    if config.head_layers is not None and heads_from is not None:
        raise InputError("`head_layers` chooses where heads are ranked; `heads_from` takes them ranked: give one",
                         settings=("head_layers", "heads_from"))
    log = log or (lambda message: None)
    raw, skipped = read_traces(traces, config.marker, config.skip_invalid)
    tokenizer = load_tokenizer(model)
    kept, sequences, starts = [], [], []
    for trace in raw:
        try:
            ids, start = tokenize_response(tokenizer, trace.prompt, trace.response)
        except AlignmentError as err:
            skipped.append(SkippedTrace(trace.line, trace.id, str(err)))
            continue
        kept.append(trace)
        sequences.append(ids)
        starts.append(start)
    if skipped and not config.skip_invalid:
        raise TraceFileError(str(traces), skipped)
    kept, sequences, starts = kept[:max_traces], sequences[:max_traces], starts[:max_traces]
    if not kept:
        raise InputError(f"no usable trace in {traces}")
    log(f"{len(kept)} traces ready ({len(skipped)} skipped); loading {model}")
    loaded = load_model(model, dtype, device)
    model_block = model_record(loaded, model_name or str(model))
    pad_id = pad_token_id(tokenizer)
    head_layers = (middle_third_layers(model_block["num_layers"]) if config.head_layers == "middle" else
                   None if config.head_layers is None else check_layers(config.head_layers, model_block["num_layers"],
                                                                       "head_layers"))
    run_key = {
        "trace_file_sha256": file_sha256(traces), "fingerprint": model_block["fingerprint"],
        "batch_size": config.batch_size, "dtype": dtype, "max_traces": max_traces, "window": config.window,
        "fai_range": list(config.fai_range), "head_fraction": config.head_fraction, "head_layers": head_layers,
        "marker": config.marker, "skip_invalid": config.skip_invalid,
        "heads_from": None if heads_from is None else file_sha256(heads_from),
    }
    store = None if folder is None else PartStore(folder, run_key, rank, world_size).open()
    if heads_from is not None:
        heads = heads_from_header(read_rhythm_header(heads_from, model_block))
    else:
        heads = _ranked_heads(loaded, sequences, starts, pad_id, config, head_layers, store, progress, log)

    def signals(chunk: list[int]) -> list:
        found = rhythm_signals(loaded, [sequences[i] for i in chunk], [starts[i] for i in chunk], heads, pad_id,
                               batch_size=len(chunk), window=config.window, fai_range=config.fai_range)
        return [s.stacked() for s in found]

    batches = batches_by_length([len(s) for s in sequences], config.batch_size)
    stacked = run_batches("signals", batches, signals, len(kept), store, progress=progress, log=log)
    if stacked is None:
        return None
    lines = [rhythm_header(heads, config.window, config.fai_range, model_block)] + [
        rhythm_record(trace.id, RhythmSignals.from_stacked(start, values))
        for trace, values, start in zip(kept, stacked, starts)
    ]
    if out is not None:
        atomic_write_jsonl(out, lines)
    if store is not None and not keep_parts:
        store.remove()
    return lines


def _ranked_heads(
    model, sequences: list[list[int]], starts: list[int], pad_id: int, config: RhythmConfig,
    head_layers: list[int] | None, store: PartStore | None, progress: bool, log: Callable[[str], None],
) -> LocalGlobalHeads:
    """The local and global heads by mean backward distance over the traces (every rank gets them)."""
    batches = consecutive_batches(len(sequences), config.batch_size)

    def distances(chunk: list[int]) -> list:
        return list(trace_distances(model, [sequences[i] for i in chunk], [starts[i] for i in chunk], pad_id))

    per_trace = run_batches("distances", batches, distances, len(sequences), store, everyone=True,
                            progress=progress, log=log)
    return select_heads(mean_distance(per_trace, batches), config.head_fraction, head_layers)
