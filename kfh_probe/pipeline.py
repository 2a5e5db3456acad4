"""The whole sweep as one call: labeled traces and a model in, the KFH manifest out (``kfh-probe sweep``
is a thin wrapper). It owns what makes a manifest trustworthy: the run key that lets an interrupted
sweep resume only into the same run, the progress reports, and the provenance block.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path

from .errors import InputError
from .io import check_output_path
from .sweep import SweepConfig


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def run_sweep(
    model: str | Path,
    traces: str | Path,
    config: SweepConfig | None = None,
    *,
    out: str | Path | None = None,
    model_name: str | None = None,
    max_traces: int | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    work_dir: str | Path | None = None,
    keep_parts: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = _stderr,
    rank: int = 0,
    world_size: int = 1,
) -> dict | None:
    """Rank every head of ``model`` by Step Ranking Accuracy on the labeled ``traces`` (design page).

    Traces are read, checked and tokenised before the model is loaded, so a bad file fails in seconds.
    With ``out`` the manifest is written there atomically (sorted keys: equal manifests, equal bytes);
    without it, only returned. Finished batches are kept in ``work_dir`` (default ``OUT.parts`` when
    ``out`` is given; in memory only when neither is) under a key of everything that changes the
    scores, so the same call after an interruption continues where it stopped; the folder is removed
    once the manifest is written unless ``keep_parts``. Batch ``j`` runs on rank ``j % world_size``.

    Args:
        model: a Hugging Face model folder (or what ``kfh_probe.loading.load_model`` accepts).
        traces: labeled trace JSONL (``kfh-probe label``); its labeller and step provenance go into
            the manifest (``sweep.provenance``).
        config: the sweep's settings (defaults of :class:`~kfh_probe.sweep.SweepConfig` when None).
        model_name: the name recorded in the manifest (default: ``model`` as given).
        max_traces: use at most this many usable traces, in file order.
        dtype, device: how the weights are loaded (attention rows are float32 whatever the dtype).
        log: where one-line progress reports go (None: nowhere); ``progress``: the tqdm bar.

    Returns:
        the manifest; None on a rank other than 0, once its share is saved in the work folder.

    Raises:
        kfh_probe.traces.TraceFileError: broken traces and ``config.skip_invalid`` is False.
        kfh_probe.errors.InputError: no usable trace, layers the model lacks, or no trace with an essential/redundant pair.
        KeyboardInterrupt: finished batches stay in the work folder.
    """
    from .backends import get_backend
    from .io import atomic_write_json, file_sha256
    from .loading import load_model, load_tokenizer, pad_token_id
    from .manifest import model_record
    from .partials import PartStore
    from .sweep import (
        build_manifest, collect_step_scores, collect_step_scores_resumable, prepare_traces, probed_layers, provenance,
    )
    from .traces import read_traces

    config = SweepConfig() if config is None else config
    if out is not None:
        check_output_path(out)  # fail before the work, not after it
    log = log or (lambda message: None)
    get_backend(config.backend)  # a missing backend package fails here, before any work
    raw, skipped = read_traces(traces, config.marker, config.skip_invalid)
    tokenizer = load_tokenizer(model)
    prepared = prepare_traces(raw, tokenizer, config, source=str(traces))
    skipped += prepared.skipped
    used = slice(None, max_traces)
    kept, tokenized, labels = prepared.traces[used], prepared.tokenized[used], prepared.labels[used]
    if not tokenized:
        raise InputError(f"no usable trace in {traces}")
    origin = provenance(kept, tokenized, str(traces))
    log(f"{len(tokenized)} traces ready ({len(skipped)} skipped); loading {model}")
    loaded = load_model(model, dtype, device)
    config = dataclasses.replace(config, layers=probed_layers(loaded, config.layers))
    trace_sha = file_sha256(traces)
    model_block = model_record(loaded, model_name or str(model))
    if work_dir is None and out is None:
        scores = collect_step_scores(loaded, tokenized, config, pad_token_id(tokenizer), progress, tokenizer)
        store = None
    else:
        run_key = {
            "trace_file_sha256": trace_sha, "fingerprint": model_block["fingerprint"], "layers": config.layers,
            "batch_size": config.batch_size, "marker": config.marker, "backend": config.backend, "dtype": dtype,
            "max_traces": max_traces, "skip_invalid": config.skip_invalid, "world_size": world_size,
        }
        store = PartStore(work_dir or f"{out}.parts", run_key)
        scores = collect_step_scores_resumable(
            loaded, tokenized, config, pad_token_id(tokenizer), store, rank, world_size, progress, tokenizer,
        )
        if scores is None:
            return None
    probe_block = {
        "trace_file": Path(traces).name,
        "trace_file_sha256": trace_sha,
        "traces_skipped": {"count": len(skipped), "reasons": [s.to_dict() for s in skipped]},
        **origin,
        "dtype": dtype,
        "backend": config.backend,
        "max_traces": max_traces,
    }
    step_lengths = [[end - start for start, end in t.step_spans] for t in tokenized]
    manifest = build_manifest(scores, labels, config.layers, model_block, probe_block, config, step_lengths)
    if out is not None:
        atomic_write_json(out, manifest)
    if store is not None and not keep_parts:
        store.remove()
    return manifest
