"""The nnsight and lens capture backends give the step scores of the hf path, and fail by name."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from conftest import R1_TRACES, tiny_model

from kfh_probe.alignment import tokenize_trace
from kfh_probe.backends import BackendNotInstalledError, get_backend
from kfh_probe.capture import UnsupportedModelError, capture_answer_attention
from kfh_probe.cli import main
from kfh_probe.sweep import SweepConfig, collect_step_scores

TOLERANCE = 1e-5
PACKAGES = {"nnsight": "nnsight", "lens": "transformer_lens"}
# GQA + biases (qwen2), GQA (llama), sliding window + soft-capping (gemma2), absolute positions + fused qkv (gpt2)
FAMILIES = ["qwen2", "llama", "gemma2", "gpt2"]


def _require(backend: str) -> None:
    pytest.importorskip(PACKAGES[backend], reason=f"the {backend!r} backend's package is not installed")


def _tokenized(tokenizer):
    return [tokenize_trace(tokenizer, r["prompt"], r["response"]) for r in R1_TRACES]


def _step_scores(model, tokenized, backend: str, tokenizer) -> list[torch.Tensor]:
    """Both traces in one right-padded batch, so padding is exercised too."""
    config = SweepConfig(batch_size=2, backend=backend)
    return collect_step_scores(model, tokenized, config, pad_id=0, progress=False, tokenizer=tokenizer)


def _max_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("backend", ["nnsight", "lens"])
def test_step_scores_equal_the_hf_path(backend, family, byte_tokenizer):
    _require(backend)
    tokenized = _tokenized(byte_tokenizer)
    vocab = len(byte_tokenizer)
    reference = _step_scores(tiny_model(family, vocab_size=vocab), tokenized, "hf", byte_tokenizer)
    got = _step_scores(tiny_model(family, vocab_size=vocab), tokenized, backend, byte_tokenizer)
    assert [g.shape for g in got] == [r.shape for r in reference]
    assert _max_difference(got, reference) < TOLERANCE, (backend, family)
    assert max(r.max().item() for r in reference) > 0.05  # far above the tolerance: the check is not vacuous


@pytest.mark.parametrize("backend", ["nnsight", "lens"])
def test_selected_layers_only(backend, byte_tokenizer):
    _require(backend)
    ids = torch.randint(1, 400, (2, 30), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(ids)
    answer_mask = torch.zeros_like(ids, dtype=torch.bool)
    answer_mask[:, 24:] = True
    reference = capture_answer_attention(tiny_model("llama"), ids, attention_mask, answer_mask)
    capture = get_backend(backend)(tiny_model("llama"), byte_tokenizer)
    some = capture(ids, attention_mask, answer_mask, layers=[2, 0])
    assert some.layers == [0, 2] and some.values.shape == (2, 2, 4, 30)
    assert torch.allclose(some.values, reference.values[:, [0, 2]], atol=TOLERANCE, rtol=0)
    with pytest.raises(ValueError, match=f"backend '{backend}'.*layer"):
        capture(ids, attention_mask, answer_mask, layers=[5])


def test_nnsight_trace_runs_through_the_remote_execution_path(byte_tokenizer):
    """``remote="local"`` serialises the trace as for an NDIF server and runs it in this process."""
    _require("nnsight")
    from kfh_probe.backends.nnsight_backend import NNsightCapture

    ids = torch.randint(1, 400, (1, 30), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones_like(ids)
    answer_mask = torch.zeros_like(ids, dtype=torch.bool)
    answer_mask[:, 20:] = True
    reference = capture_answer_attention(tiny_model("qwen2"), ids, attention_mask, answer_mask)
    got = NNsightCapture(tiny_model("qwen2"), byte_tokenizer, remote="local")(ids, attention_mask, answer_mask)
    assert torch.allclose(got.values, reference.values, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("backend", ["nnsight", "lens"])
def test_model_without_attention_is_refused_naming_the_backend(backend, byte_tokenizer):
    _require(backend)
    from transformers import MambaConfig, MambaForCausalLM

    model = MambaForCausalLM(MambaConfig(vocab_size=400, hidden_size=16, num_hidden_layers=1, state_size=4)).eval()
    with pytest.raises(UnsupportedModelError, match=f"backend '{backend}'.*MambaForCausalLM"):
        get_backend(backend)(model, byte_tokenizer)


def _uninstall(monkeypatch, package: str) -> None:
    """Make ``import package`` fail as if it were not installed, and forget the backends imported so far."""
    for name in list(sys.modules):
        if name.startswith(f"{package}.") or name.startswith("kfh_probe.backends."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, package, None)


@pytest.mark.parametrize("backend", ["nnsight", "lens"])
def test_missing_package_error_names_the_backend_and_the_install_command(backend, monkeypatch):
    _uninstall(monkeypatch, PACKAGES[backend])
    with pytest.raises(BackendNotInstalledError) as err:
        get_backend(backend)
    assert f"'{backend}'" in str(err.value)
    assert f"pip install 'kfh-attnpo[{backend}]'" in str(err.value)


def test_sweep_with_a_missing_backend_fails_before_loading_anything(monkeypatch, tmp_path, capsys):
    _uninstall(monkeypatch, "transformer_lens")
    out = tmp_path / "m.json"
    missing_model = tmp_path / "no-model"
    code = main(["sweep", "--model", str(missing_model), "--traces", str(tmp_path / "t.jsonl"), "--out", str(out), "--backend", "lens"])
    assert code == 2 and not out.exists()
    assert "pip install 'kfh-attnpo[lens]'" in capsys.readouterr().err


@pytest.mark.parametrize("backend", ["nnsight", "lens"])
def test_sweep_command_with_a_backend_ranks_heads_like_hf(backend, tiny_model_dir, labeled_trace_file, tmp_path):
    _require(backend)
    traces = labeled_trace_file
    manifests = {}
    for name in ("hf", backend):
        out = tmp_path / f"{name}.json"
        args = ["sweep", "--model", str(tiny_model_dir), "--traces", str(traces), "--out", str(out), "--quiet", "--backend", name]
        assert main(args) == 0
        manifests[name] = json.loads(out.read_text())
    assert manifests[backend]["probe"]["backend"] == backend
    assert [(h["layer"], h["head"]) for h in manifests[backend]["heads"]] == [(h["layer"], h["head"]) for h in manifests["hf"]["heads"]]
    for got, expected in zip(manifests[backend]["heads"], manifests["hf"]["heads"]):
        assert got["sra"] == pytest.approx(expected["sra"], abs=1e-6)


def _organism():
    """The shipped organism model, its tokenizer and a few of its labeled traces (committed: a missing one fails)."""
    from kfh_probe.loading import load_tokenizer
    from kfh_probe.sweep import prepare_traces
    from kfh_probe.traces import read_traces

    from kfh_probe.organism import default_model_dir, default_traces_path

    model_dir, traces_path = default_model_dir(), default_traces_path()
    assert (model_dir / "config.json").is_file() and traces_path.is_file(), "the shipped organism or its traces are missing"
    tokenizer = load_tokenizer(model_dir)
    traces, _ = read_traces(traces_path, "</think>", False)
    prepared = prepare_traces(traces[:6], tokenizer, SweepConfig())
    return model_dir, tokenizer, prepared.tokenized


@pytest.mark.parametrize("backend", ["nnsight", "lens"])
def test_step_scores_on_the_organism_equal_the_hf_path(backend):
    _require(backend)
    from kfh_probe.loading import load_model

    model_dir, tokenizer, tokenized = _organism()
    reference = _step_scores(load_model(model_dir), tokenized, "hf", tokenizer)
    got = _step_scores(load_model(model_dir), tokenized, backend, tokenizer)
    assert _max_difference(got, reference) < TOLERANCE
