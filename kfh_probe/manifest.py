"""The KFH manifest (design page): reading, checking, and matching it to a model.

The manifest is what training runs, notebooks and other tools consume: every head's SRA with a
bootstrap interval, sorted, the top-k ensemble curve, and enough about the model to refuse the wrong
one. Version 2 adds the controls: per head the SRA over the pairs whose redundant step comes after /
before the essential one, a ``baselines`` block (position, step length, permutation null) and
``probe.reliability`` (split-half agreement). Version 1 files stay readable everywhere.

Provenance (``probe``): ``labeler`` says what produced the labels, ``steps_from`` whether the steps
came with the file or from the segmenter (whose settings ``segmenter`` then holds), ``eos_appended``
how many traces got EOS appended to F. A manifest without ``steps_from`` stays valid; its
``segmenter`` is then the default the sweep recorded whatever cut the steps, so
:func:`manifest_segmenter` treats its step provenance as unknown.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import torch
from torch import nn

from .capture import model_shape
from .segmentation import SegmenterConfig

from .errors import InputError, KFHError, listed
from .io import read_json

FORMAT = "kfh-manifest"
VERSION = 2
READABLE_VERSIONS = (1, 2)
_BASELINES = ("position_later", "position_earlier", "step_length")
_NULL_KEYS = ("draws", "seed", "head_sra_p95", "best_head_sra_p95", "heads_above_head_p95")
_MODEL_KEYS = ("name_or_path", "architecture", "num_layers", "num_heads", "num_kv_heads", "head_dim", "fingerprint")
_SHAPE_KEYS = ("num_layers", "num_heads", "num_kv_heads", "head_dim")

GatherParams = Callable[[list[nn.Parameter]], AbstractContextManager]
"""A context-manager factory that makes sharded parameters readable in full (see ``model_fingerprint``)."""


class ManifestError(InputError):
    """A manifest that is unreadable or breaks the schema."""


class ManifestMismatchError(KFHError, ValueError):
    """A manifest made for another model than the one given."""


def model_fingerprint(model: nn.Module, gather_params: GatherParams | None = None) -> str:
    """SHA-256 over every parameter and buffer (name, shape, values as float32 bytes), in name order.

    Changes whenever any weight changes; independent of device, and of the dtype the weights were
    loaded in as long as the values are the same (a bf16 checkpoint loaded in bf16 or float32 has one
    fingerprint; float32 weights rounded to bf16 have another, since their values differ).

    Args:
        gather_params: for sharded parameters (DeepSpeed ZeRO-3), a context-manager factory that makes
            the full values of the parameters it is given readable inside the block (TRL's
            ``DistributedBackend.gather_params``, ``deepspeed.zero.GatheredParameters``). Parameters are
            gathered one at a time, so no rank holds the whole model; the digest equals the unsharded one.
    """
    digest = hashlib.sha256()
    params = dict(model.named_parameters(remove_duplicate=False)) if gather_params is not None else {}
    for name, tensor in sorted(model.state_dict().items()):
        param = params.get(name)
        with gather_params([param]) if param is not None else contextlib.nullcontext():
            value = tensor if param is None else param.data
            digest.update(f"{name}|{tuple(value.shape)}|".encode())
            flat = value.detach().reshape(-1)
            for start in range(0, flat.numel(), 1 << 24):
                chunk = flat[start : start + (1 << 24)].float().contiguous()
                digest.update(chunk.view(torch.uint8).cpu().numpy().tobytes())
    return digest.hexdigest()


def model_record(model: nn.Module, name_or_path: str) -> dict:
    """The manifest's ``model`` block for ``model``."""
    return {"name_or_path": name_or_path, "architecture": type(model).__name__, **model_shape(model), "fingerprint": model_fingerprint(model)}


_BELOW = ("essential_below", "redundant_below")


def validate_manifest(data: object) -> list[str]:
    """Every schema problem of a decoded manifest, as readable sentences (empty when valid)."""
    if not isinstance(data, dict):
        return ["the manifest must be a JSON object"]
    problems = []
    if data.get("format") != FORMAT:
        problems.append(f"'format' must be {FORMAT!r}, got {data.get('format')!r}")
    version = data.get("version")
    if version not in READABLE_VERSIONS:
        problems.append(f"'version' must be one of {list(READABLE_VERSIONS)}, got {version!r}")
    required = ("model", "probe", "heads", "top_n", "ensemble") + (("baselines",) if version == 2 else ())
    for key in required:
        if key not in data:
            problems.append(f"missing field {key!r}")
    model = data.get("model")
    if isinstance(model, dict):
        problems += [f"model: missing {k!r}" for k in _MODEL_KEYS if k not in model]
        problems += [f"model.{k} must be a positive integer" for k in _SHAPE_KEYS if k in model and not (isinstance(model[k], int) and model[k] > 0)]
    elif "model" in data:
        problems.append("'model' must be an object")
    heads = data.get("heads")
    if isinstance(heads, list) and isinstance(model, dict) and all(isinstance(model.get(k), int) for k in ("num_layers", "num_heads")):
        problems += _validate_heads(heads, model["num_layers"], model["num_heads"], set(data.get("probe", {}).get("layers") or range(model["num_layers"])))
        if version == 2:
            problems += _validate_controls(heads)
    elif "heads" in data and not isinstance(heads, list):
        problems.append("'heads' must be a list")
    top_n = data.get("top_n")
    if "top_n" in data and not (isinstance(top_n, int) and top_n >= 1):
        problems.append(f"'top_n' must be a positive integer, got {top_n!r}")
    ensemble = data.get("ensemble")
    if "ensemble" in data and not (isinstance(ensemble, list) and all(isinstance(e, dict) and {"k", "sra"} <= e.keys() for e in ensemble)):
        problems.append("'ensemble' must be a list of {k, sra, ...} objects")
    if version == 2 and "baselines" in data:
        problems += _validate_baselines(data["baselines"])
    if "margins" in data:
        problems += _validate_margins(data["margins"])
    if version == 2 and isinstance(data.get("probe"), dict) and "reliability" not in data["probe"]:
        problems.append("probe: missing 'reliability' (null when fewer than 2 traces have pairs)")
    if isinstance(data.get("probe"), dict):
        problems += _validate_provenance(data["probe"])
    return problems


def _is_name_or_counts(value: object, names: tuple[str, ...] | None = None) -> bool:
    """A name, or ``{name: positive count}`` (``names``: the allowed names; any when None)."""
    if isinstance(value, str):
        return names is None or value in names
    return isinstance(value, dict) and bool(value) and all(
        (names is None or k in names) and isinstance(n, int) and n > 0 for k, n in value.items()
    )


def _validate_provenance(probe: dict) -> list[str]:
    """The optional provenance keys, when present: ``labeler``, ``steps_from``, ``segmenter``, ``eos_appended``."""
    problems = []
    if "labeler" in probe and not _is_name_or_counts(probe["labeler"]):
        problems.append("probe.labeler must be a labeller's name or a count per labeller")
    if "steps_from" in probe:
        if not _is_name_or_counts(probe["steps_from"], ("file", "segmenter")):
            problems.append("probe.steps_from must be 'file', 'segmenter' or a count of each")
        elif (probe["steps_from"] != "file") != ("segmenter" in probe):
            problems.append("probe.segmenter must be given exactly when the segmenter cut some steps (probe.steps_from)")
    if "segmenter" in probe:
        try:
            SegmenterConfig.from_dict(probe["segmenter"])
        except ValueError as err:
            problems.append(f"probe.segmenter: {err}")
    eos = probe.get("eos_appended", 0)
    if not (isinstance(eos, int) and eos >= 0):
        problems.append(f"probe.eos_appended must be a count, got {eos!r}")
    return problems


def _is_fraction(value: object) -> bool:
    return isinstance(value, (int, float)) and 0.0 <= value <= 1.0


def _validate_controls(heads: list) -> list[str]:
    """Version 2: every head carries ``sra_redundant_after/before`` (a fraction or null) and their intervals."""
    problems = []
    for i, head in enumerate(heads):
        if not isinstance(head, dict):
            continue
        for direction in ("after", "before"):
            key = f"sra_redundant_{direction}"
            if key not in head or f"{key}_ci95" not in head:
                problems.append(f"heads[{i}]: missing {key!r} or {key + '_ci95'!r}")
            elif head[key] is not None and not _is_fraction(head[key]):
                problems.append(f"heads[{i}]: {key} {head[key]!r} is outside [0, 1]")
    return problems


def _validate_baselines(baselines: object) -> list[str]:
    if not isinstance(baselines, dict):
        return ["'baselines' must be an object"]
    problems = []
    for name in _BASELINES:
        entry = baselines.get(name)
        if not (isinstance(entry, dict) and "sra" in entry and (entry["sra"] is None or _is_fraction(entry["sra"]))):
            problems.append(f"baselines.{name} must be an object with 'sra' in [0, 1] (or null)")
    null = baselines.get("permutation_null")
    if not (isinstance(null, dict) and all(k in null for k in _NULL_KEYS)):
        problems.append(f"baselines.permutation_null must have {', '.join(_NULL_KEYS)}")
    return problems


def _validate_margins(margins: object) -> list[str]:
    """The optional ``margins`` block (``kfh_probe.margin.margin_block``): tau per top-k, and both baselines'
    fractions below the bar."""
    entries = margins.get("by_heads") if isinstance(margins, dict) else None
    if not isinstance(entries, list) or not entries:
        return ["'margins' must be an object with a non-empty list 'by_heads'"]
    problems = []
    for i, entry in enumerate(entries):
        ok = (isinstance(entry, dict) and entry.get("heads") == i + 1 and isinstance(entry.get("tau"), (int, float))
              and all(isinstance(entry.get(b), dict) and all(_is_fraction(entry[b].get(f)) for f in _BELOW)
                      for b in ("reasoning", "uniform")))
        if not ok:
            problems.append(f"margins.by_heads[{i}] must be {{heads: {i + 1}, tau: number, reasoning and uniform: "
                            f"{{{', '.join(_BELOW)}: fractions}}}}")
    return problems


def _validate_heads(heads: list, num_layers: int, num_heads: int, layers: set[int]) -> list[str]:
    problems = []
    seen = set()
    previous = math.inf
    for i, head in enumerate(heads):
        if not isinstance(head, dict) or not {"layer", "head", "sra", "ci95", "traces"} <= head.keys():
            problems.append(f"heads[{i}] must have layer, head, sra, ci95, traces")
            continue
        key = (head["layer"], head["head"])
        if not (0 <= head["layer"] < num_layers and 0 <= head["head"] < num_heads):
            problems.append(f"heads[{i}]: ({key[0]}, {key[1]}) is outside {num_layers} layers x {num_heads} heads")
        if key in seen:
            problems.append(f"heads[{i}]: ({key[0]}, {key[1]}) appears twice")
        seen.add(key)
        sra = head["sra"]
        if sra is not None:
            if not 0.0 <= sra <= 1.0:
                problems.append(f"heads[{i}]: sra {sra} is outside [0, 1]")
            if sra > previous + 1e-12:
                problems.append(f"heads[{i}]: not sorted by SRA (descending)")
            previous = sra
    expected = len(layers) * num_heads
    if len(seen) != expected:
        problems.append(f"'heads' has {len(seen)} distinct heads; {len(layers)} probed layers x {num_heads} heads = {expected}")
    return problems


def load_manifest(path: str | Path) -> dict:
    """Read and check a manifest.

    Raises:
        ManifestError: naming the file and every problem.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest not found: {path}")
    data = read_json(path, ManifestError)
    problems = validate_manifest(data)
    if problems:
        raise ManifestError(f"{path} is not a valid KFH manifest: {listed(problems)}")
    return data


def top_heads(manifest: dict, n: int | None = None) -> list[tuple[int, int]]:
    """The ``n`` best heads as ``(layer, head)`` (the manifest's ``top_n`` when None)."""
    n = manifest["top_n"] if n is None else n
    if n < 1 or n > len(manifest["heads"]):
        raise InputError(f"asked for {n} heads; the manifest ranks {len(manifest['heads'])}")
    return [(h["layer"], h["head"]) for h in manifest["heads"][:n]]


def manifest_segmenter(manifest: dict, source: str = "the manifest") -> SegmenterConfig:
    """The segmenter to cut a policy's responses with so that its steps are those the heads were ranked on.

    The manifest's ``probe.segmenter`` (the default segmenter when it records none). Warns
    (``UserWarning``) unless every step of the sweep came from that segmenter: steps that came with the
    trace file may be cut differently from the steps a policy's responses get.

    Args:
        source: how the warning names the manifest (its file name, say).
    """
    probe = manifest["probe"]
    steps_from = probe.get("steps_from")
    recorded = probe.get("segmenter")
    if steps_from != "segmenter":
        how = ("does not record whether the steps its heads were ranked on came from the segmenter" if steps_from is None
               else f"ranked its heads on steps that came with the trace file ({steps_from!r}), not from the segmenter")
        warnings.warn(
            f"{source} {how}; responses are segmented with "
            f"{'its recorded' if recorded is not None else 'the default'} segmenter, which may cut them differently",
            UserWarning, stacklevel=2,
        )
    return SegmenterConfig() if recorded is None else SegmenterConfig.from_dict(recorded)


def check_model_matches(
    manifest: dict, model: nn.Module, allow_finetuned: bool = False, gather_params: GatherParams | None = None
) -> None:
    """Refuse a manifest made for another model.

    The shape must always match; the weight fingerprint too unless ``allow_finetuned`` (the policy
    descends from the probed model, so its weights differ by design). ``gather_params``: see
    ``model_fingerprint`` (sharded models).

    Raises:
        ManifestMismatchError: naming each field that differs.
    """
    expected = manifest["model"]
    actual = model_shape(model)
    differences = [f"{k}: manifest {expected[k]}, model {actual[k]}" for k in _SHAPE_KEYS if expected[k] != actual[k]]
    if differences:
        raise ManifestMismatchError(
            f"the manifest was made for {expected['name_or_path']} ({expected['architecture']}), whose shape differs "
            f"from this {type(model).__name__}: " + "; ".join(differences)
        )
    if not allow_finetuned:
        fingerprint = model_fingerprint(model, gather_params)
        if fingerprint != expected["fingerprint"]:
            raise ManifestMismatchError(
                f"weight fingerprint mismatch: the manifest was made on {expected['name_or_path']} "
                f"(fingerprint {expected['fingerprint'][:12]}...), this model has {fingerprint[:12]}...; "
                "if this policy is a fine-tune of the probed model, use `allow_finetuned`",
                settings=("allow_finetuned",),
            )
