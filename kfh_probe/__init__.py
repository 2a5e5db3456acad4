"""kfh_probe: find the attention heads whose answer rows single out a reasoning trace's essential steps.

The public API (the CLI, the notebooks, ``label-report`` and ``attnpo_train`` use these names only, a test
checks ``attnpo_train``'s imports;
they are imported on first use, so ``import kfh_probe`` stays cheap):

- the sweep: :func:`run_sweep` (labeled traces and a model in, the manifest out), :class:`SweepConfig`,
  and its steps for callers who need the per-trace scores: :func:`prepare_traces`,
  :func:`collect_step_scores`;
- the Preplan-and-Anchor signals: :func:`run_rhythm` (traces and a model in, the rhythm file's WAAD and
  FAI out), :class:`RhythmConfig`;
- step scores: :class:`StepScorer` (any capture backend; every head of some layers, or the mean over
  given heads, as the trainer's credit assignment uses it);
- manifests: :func:`load_manifest`, :func:`top_heads` (the top-N heads), :func:`manifest_segmenter`
  (the segmenter that cut the manifest's steps), :func:`check_model_matches`;
- traces and models: :func:`read_traces`, :class:`Trace`, :class:`Step`, :class:`SegmenterConfig`,
  :func:`tokenize_trace`, :func:`align_generated`, :func:`generated_char_offsets`, :func:`right_pad`, :func:`load_model`, :func:`load_tokenizer`,
  :func:`pad_token_id`;
- what the notebooks draw with: :func:`per_trace_auc`, :func:`ensemble_sra` (SRA of heads and
  ensembles), :func:`format_table`, :func:`plot_heatmap`, :func:`sra_grid` (views of a manifest), and the
  causal check (:class:`CausalConfig`, :func:`prepare_causal_traces`, :func:`run_causal`,
  :func:`format_causal_table`), and :func:`view_traces`, which returns a :class:`TraceView` (traces'
  steps shaded by the heads' scores, one self-contained HTML page; a notebook shows it inline);
- errors: :class:`KFHError`, the base of every expected failure (bad input, unsupported model, files that
  do not belong together), :class:`InputError`, a bad argument or input file, :class:`ManifestMismatchError`
  (a manifest made for another model); :func:`listed` and :func:`report_error` format them.

- settings declared at their dataclass field (``kfh_probe.settings``): :func:`setting`, the constraints
  :class:`Interval`, :class:`OneOf`, :class:`NonEmpty`, :class:`Relation`, :func:`check_settings` (raises
  :class:`SettingError`), :func:`coerce_setting` and :func:`help_of`.

What the trainer (``attnpo_train``) builds on besides those:

- sampling and grading: :class:`Rollouts` (a step's prompts and responses as token ids),
  :func:`generate_rollouts` (the sampler), :func:`decode_responses`, :func:`is_correct`,
  :func:`resolve_grader`, ``GRADERS``;
- reading attention during a forward: :func:`attention_calls` (an observer on the attention calls of chosen
  layers of a forward the caller runs), :func:`capture_layer_calls` (the same on a no-grad forward of its
  own), :func:`attention_modules`, :func:`model_shape`, :class:`AnswerRowRecorder` and :func:`answer_rows`
  (answer-row attention), :func:`step_scores`, :class:`TokenizedTrace`;
- AttnPO's step bars at p = 1: :func:`uniform_bar` (the paper's |F|/|o|), :func:`relative_step_scores` and
  :func:`margin_for` (the reasoning baseline and the margin the sweep calibrated);
- stepwise attention on key information (attention-guided distillation): :class:`KeyTrace`,
  :func:`key_trace`, :func:`key_batch`, :class:`KeySpanRecorder` (an observer, with or without gradients),
  :func:`key_distribution`, :func:`key_attention` (a model's key mass on traces), and the organism's key
  spans :func:`key_spans`;
- Preplan-and-Anchor signals: :class:`LocalGlobalHeads`, :class:`PreplanAnchorHeads`, :class:`RhythmSignals`,
  :class:`SignalRecorder`, :func:`read_rhythm_header`, :func:`heads_from_header`;
- files and models: :func:`atomic_write_json`, :func:`atomic_write_jsonl`, :func:`jsonl_records`,
  :func:`model_folder`, :func:`model_path`, ``GGUF_FILE_HELP``;
- the embedded organism: :func:`built_model_dir`, :func:`default_manifest_path`, :func:`default_rhythm_path`, :func:`default_traces_path`,
  ``ORGANISMS``, ``DEFAULT_ORGANISM``, :func:`task_of`, :func:`organism_option`, :func:`write_task_file`, ``TASKS``,
  :func:`generate_problem`, :func:`generate_problems`, and its labeler's ground truth: :func:`parse_prompt`,
  :func:`label_trace` (a :class:`LabeledTrace`), :func:`step_accounting`, :func:`credit_shares`, ``REDUNDANT_KINDS``, :class:`TraceFormatError`.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "run_sweep": "sweep",
    "SweepConfig": "sweep",
    "run_rhythm": "preplan_anchor_run",
    "RhythmConfig": "preplan_anchor_run",
    "prepare_traces": "sweep",
    "collect_step_scores": "sweep",
    "StepScorer": "step_scorer",
    "load_manifest": "manifest",
    "top_heads": "manifest",
    "manifest_segmenter": "manifest",
    "check_model_matches": "manifest",
    "read_traces": "traces",
    "Trace": "traces",
    "Step": "traces",
    "SegmenterConfig": "segmentation",
    "tokenize_trace": "alignment",
    "align_generated": "alignment",
    "generated_char_offsets": "alignment",
    "right_pad": "alignment",
    "load_model": "loading",
    "load_tokenizer": "loading",
    "pad_token_id": "loading",
    "per_trace_auc": "scoring",
    "ensemble_sra": "scoring",
    "format_table": "views",
    "plot_heatmap": "views",
    "sra_grid": "views",
    "CausalConfig": "causal",
    "prepare_causal_traces": "causal",
    "run_causal": "causal",
    "format_causal_table": "causal",
    "view_traces": "trace_view",
    "TraceView": "trace_view",
    "KFHError": "errors",
    "InputError": "errors",
    "setting": "settings",
    "Interval": "settings",
    "OneOf": "settings",
    "NonEmpty": "settings",
    "Relation": "settings",
    "SettingError": "settings",
    "check_settings": "settings",
    "coerce_setting": "settings",
    "help_of": "settings",
    "ManifestMismatchError": "manifest",
    "listed": "errors",
    "report_error": "errors",
    # what the trainer builds on
    "Rollouts": "sampling",
    "generate_rollouts": "sampling",
    "decode_responses": "sampling",
    "is_correct": "grading",
    "resolve_grader": "grading",
    "GRADERS": "grading",
    "attention_calls": "capture",
    "capture_layer_calls": "capture",
    "attention_modules": "capture",
    "model_shape": "capture",
    "AnswerRowRecorder": "capture",
    "answer_rows": "capture",
    "step_scores": "scoring",
    "relative_step_scores": "margin",
    "margin_for": "margin",
    "uniform_bar": "margin",
    "TokenizedTrace": "alignment",
    "KeyTrace": "key_information",
    "key_trace": "key_information",
    "key_batch": "key_information",
    "KeySpanRecorder": "key_information",
    "key_distribution": "key_information",
    "key_attention": "key_information",
    "key_spans": "organism.key_spans",
    "LocalGlobalHeads": "preplan_anchor",
    "PreplanAnchorHeads": "preplan_anchor",
    "RhythmSignals": "preplan_anchor",
    "SignalRecorder": "preplan_anchor",
    "read_rhythm_header": "preplan_anchor",
    "heads_from_header": "preplan_anchor",
    "atomic_write_json": "io",
    "atomic_write_jsonl": "io",
    "jsonl_records": "io",
    "model_folder": "loading",
    "model_path": "loading",
    "GGUF_FILE_HELP": "loading",
    "built_model_dir": "organism",
    "default_manifest_path": "organism",
    "default_rhythm_path": "organism",
    "default_traces_path": "organism",
    "ORGANISMS": "organism",
    "DEFAULT_ORGANISM": "organism",
    "task_of": "organism",
    "organism_option": "organism",
    "write_task_file": "organism",
    "TASKS": "organism.task",
    "generate_problem": "organism.task",
    "generate_problems": "organism.task",
    "parse_prompt": "organism.labeler",
    "label_trace": "organism.labeler",
    "LabeledTrace": "organism.labeler",
    "step_accounting": "organism.labeler",
    "credit_shares": "organism.labeler",
    "REDUNDANT_KINDS": "organism.labeler",
    "TraceFormatError": "organism.labeler",
}
__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'kfh_probe' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
