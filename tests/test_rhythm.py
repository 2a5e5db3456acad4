"""The Preplan-and-Anchor signals (kfh_probe.preplan_anchor) equal the same formulas on eager attention maps in float32,
on the capture's architecture families and on the organism, in batches of traces of different lengths."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from conftest import (
    FAMILIES, check_ranks_write_what_one_writes, eager_maps, interrupting, kfh_probe_cli, rhythm_reference, tiny_model,
)

from kfh_probe.errors import InputError
from kfh_probe.preplan_anchor import (
    LocalGlobalHeads, mean_distance, middle_third_layers, rhythm_signals, row_reductions, select_heads, trace_distances,
)

TOLERANCE = 1e-5


def _traces(seed: int = 0) -> tuple[list[list[int]], list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths, starts = [75, 58], [9, 14]  # the second one shorter: right padding in the batch
    return [torch.randint(1, 400, (n,), generator=g).tolist() for n in lengths], starts


def _check_against_eager(model, sequences, starts, chunk):
    distances = mean_distance(list(trace_distances(model, sequences, starts, pad_id=0, chunk=chunk)), [[0, 1]])
    heads = select_heads(distances)
    signals = rhythm_signals(model, sequences, starts, heads, pad_id=0, batch_size=2, chunk=chunk)
    reference_distance = torch.zeros_like(distances)
    for seq, start, got in zip(sequences, starts, signals):
        distance, waad, fai = rhythm_reference(eager_maps(model, seq), start, heads)
        reference_distance += distance / len(sequences)
        assert got.response_start == start
        assert got.waad.shape == waad.shape == (len(seq) - start,)
        # WAAD is a sum of probabilities weighted by distances up to W: compared on its [0, 1] scale (WAAD / W),
        # so a 1e-5 error of the probabilities (the capture's tolerance) stays within 1e-5.
        assert torch.allclose(got.waad / 10, waad / 10, atol=TOLERANCE, rtol=0)
        assert torch.equal(got.fai.isnan(), fai.isnan())
        assert torch.allclose(got.fai[~fai.isnan()], fai[~fai.isnan()], atol=TOLERANCE, rtol=0)
    assert torch.allclose(distances, reference_distance, atol=1e-4, rtol=1e-6)
    return signals


@pytest.mark.parametrize("family", FAMILIES)
def test_signals_equal_eager_attention(family):
    model = tiny_model(family, max_position_embeddings=512)
    sequences, starts = _traces()
    signals = _check_against_eager(model, sequences, starts, chunk=16)  # several row chunks per trace
    # Not vacuous: WAAD varies along the trace and some FAI values are defined and positive (except in mistral,
    # whose every layer has a sliding window of 8 < 10 keys: there FAI is exactly 0, as eager attention says).
    assert float(signals[0].waad.std()) > 0.1
    defined = signals[0].fai[~signals[0].fai.isnan()]
    assert len(defined) > 0 and (float(defined.max()) > 0) == (family != "mistral")


def test_signals_equal_eager_attention_on_the_organism(organism):
    from kfh_probe.organism import default_traces_path
    from kfh_probe.traces import read_traces

    model, tokenizer = organism
    traces, _ = read_traces(default_traces_path())
    sequences, starts = [], []
    for trace in traces[:2]:
        prompt = tokenizer(trace.prompt, add_special_tokens=False)["input_ids"]
        full = tokenizer(trace.prompt + trace.response, add_special_tokens=False)["input_ids"]
        sequences.append(full)
        starts.append(len(prompt))
    _check_against_eager(model, sequences, starts, chunk=32)


def test_results_do_not_depend_on_batch_or_chunk():
    model = tiny_model("qwen2")
    sequences, starts = _traces(1)
    heads = LocalGlobalHeads([(0, 1), (2, 3)], [(1, 0), (1, 2)])
    one = rhythm_signals(model, sequences, starts, heads, pad_id=0, batch_size=1, chunk=7)
    two = rhythm_signals(model, sequences, starts, heads, pad_id=0, batch_size=2, chunk=128)
    for a, b in zip(one, two):
        assert torch.allclose(a.waad, b.waad, atol=1e-6)
        assert torch.allclose(a.fai.nan_to_num(-1), b.fai.nan_to_num(-1), atol=1e-6)


def test_mean_distance_is_the_mean_over_the_traces_whatever_the_batches():
    per_trace = [torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 0.5]]), torch.tensor([[0.25, 4.0]])]
    expected = torch.tensor([[4.25 / 3, 6.5 / 3]])
    assert torch.allclose(mean_distance(per_trace, [[0, 1], [2]]), expected)
    assert torch.allclose(mean_distance(per_trace, [[2], [1], [0]]), expected)


def test_select_heads_takes_the_closest_and_farthest_30_percent_with_ties_by_position():
    distance = torch.tensor([[1.0, 5.0, 2.0], [5.0, 0.5, 9.0]])  # 6 heads: ceil(1.8) = 2 per set
    heads = select_heads(distance)
    assert heads.local == [(1, 1), (0, 0)]
    assert heads.global_ == [(1, 2), (0, 1)]  # (0, 1) and (1, 0) tie at 5.0: (0, 1) first


def test_select_heads_ranks_only_the_layers_given():
    distance = torch.tensor([[1.0, 5.0, 2.0], [5.0, 0.5, 9.0], [0.1, 9.5, 3.0]])
    heads = select_heads(distance, layers=[0, 2])  # 6 candidate heads: ceil(1.8) = 2 per set
    assert heads.local == [(2, 0), (0, 0)] and heads.global_ == [(2, 1), (0, 1)]
    with pytest.raises(InputError, match="`head_layers`: the model has no layer"):
        select_heads(distance, layers=[3])


@pytest.mark.parametrize("num_layers, expected", [(28, [9, 11, 14, 16, 18]), (36, [12, 15, 18, 21, 24]),
                                                  (4, [1, 2]), (2, [0, 1]), (1, [0])])
def test_middle_third_layers_are_five_evenly_spaced_from_l_over_3_to_2l_over_3(num_layers, expected):
    assert middle_third_layers(num_layers) == expected


def test_rhythm_command_ranks_heads_of_the_middle_layers_only(tiny_model_dir, raw_trace_file, tmp_path, capsys):
    import json

    out = tmp_path / "r.jsonl"
    assert _rhythm(tiny_model_dir, raw_trace_file, out, "--head-layers", "middle") == 0  # 3 layers: 1..2
    header = json.loads(out.read_text().splitlines()[0])
    assert {l for l, _ in header["local_heads"] + header["global_heads"]} <= {1, 2}
    assert len(header["local_heads"]) == math.ceil(0.3 * 2 * 4)
    assert _rhythm(tiny_model_dir, raw_trace_file, tmp_path / "x.jsonl", "--head-layers", "0-3-5") == 2
    assert "--head-layers '0-3-5'" in capsys.readouterr().err


def test_row_reductions_by_hand():
    probs = torch.zeros(1, 1, 1, 16)
    probs[0, 0, 0, [15, 12, 2]] = torch.tensor([0.5, 0.3, 0.2])  # row t = 15
    distance, waad, band = row_reductions(probs, torch.tensor([[15]]), window=10, fai_range=(3, 13))
    assert distance.item() == pytest.approx(0.5 * 0 + 0.3 * 3 + 0.2 * 13)
    assert waad.item() == pytest.approx(0.3 * 3 + 0.2 * 10)  # 13 is clipped to the window
    assert band[0, 0, 0, 0].item() == pytest.approx(0.3)  # d = 3 -> key 12
    assert band[0, 0, 0, 10].item() == pytest.approx(0.2)  # d = 13 -> key 2
    assert band.sum().item() == pytest.approx(0.5)


# --- kfh-probe rhythm ---------------------------------------------------------------------------------


_rhythm = functools.partial(kfh_probe_cli, "rhythm")


def test_rhythm_command_writes_the_header_and_one_line_per_trace(tiny_model_dir, raw_trace_file, tmp_path):
    import json

    from conftest import R1_TRACES

    from kfh_probe.alignment import tokenize_response
    from kfh_probe.loading import load_model, load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir)
    out = tmp_path / "r.jsonl"
    assert _rhythm(tiny_model_dir, raw_trace_file, out, "--batch-size", "1") == 0
    header, *records = [json.loads(line) for line in out.read_text().splitlines()]
    assert header["format"] == "kfh-rhythm" and header["version"] == 1
    assert header["window"] == 10 and header["fai_range"] == [10, 50]
    assert len(header["local_heads"]) == len(header["global_heads"]) == math.ceil(0.3 * 3 * 4)
    assert header["model"]["num_layers"] == 3 and "fingerprint" in header["model"]
    assert [r["id"] for r in records] == [t["id"] for t in R1_TRACES]
    model = load_model(tiny_model_dir)
    heads = LocalGlobalHeads([tuple(h) for h in header["local_heads"]], [tuple(h) for h in header["global_heads"]])
    for trace, record in zip(R1_TRACES, records):
        ids, start = tokenize_response(tokenizer, trace["prompt"], trace["response"])
        assert ids[-1] == tokenizer.eos_token_id and record["response_start"] == start
        _, waad, fai = rhythm_reference(eager_maps(model, ids), start, heads)
        assert len(record["waad"]) == len(record["fai"]) == len(ids) - start
        assert torch.allclose(torch.tensor(record["waad"]), waad, atol=1e-4)
        assert all(v is None for v in record["fai"][-10:]) and record["fai"][-11] is not None
        defined = [(a, b) for a, b in zip(record["fai"], fai.tolist()) if a is not None]
        assert torch.allclose(torch.tensor([a for a, _ in defined]), torch.tensor([b for _, b in defined]), atol=1e-5)
    assert not (tmp_path / "r.jsonl.parts").exists()

    again = tmp_path / "again.jsonl"  # --heads-from reuses the heads
    assert _rhythm(tiny_model_dir, raw_trace_file, again, "--heads-from", str(out), "--batch-size", "1") == 0
    assert again.read_text() == out.read_text()


@pytest.mark.parametrize("stage, function", [("distances", "trace_distances"), ("signals", "rhythm_signals")])
def test_interrupted_rhythm_run_leaves_no_file_and_resumes_to_the_same_bytes(
    stage, function, tiny_model_dir, raw_trace_file, tmp_path, monkeypatch
):
    import kfh_probe.preplan_anchor_run as run_module  # where the run calls the head ranking and the signals

    reference = tmp_path / "reference.jsonl"
    assert _rhythm(tiny_model_dir, raw_trace_file, reference, "--batch-size", "1") == 0
    real, calls = getattr(run_module, function), []
    monkeypatch.setattr(run_module, function, interrupting(real, calls, at=2))
    out = tmp_path / "r.jsonl"
    out.write_text("previous")
    assert _rhythm(tiny_model_dir, raw_trace_file, out, "--batch-size", "1") == 130
    assert out.read_text() == "previous"
    assert len(list((tmp_path / "r.jsonl.parts").glob(f"{stage}-*.pt"))) == 1
    calls.clear()
    monkeypatch.setattr(run_module, function, interrupting(real, calls, at=None))
    assert _rhythm(tiny_model_dir, raw_trace_file, out, "--batch-size", "1") == 0
    assert len(calls) == 1  # only the unfinished trace was computed again
    assert out.read_bytes() == reference.read_bytes()


def test_run_rhythm_on_two_ranks_returns_the_lines_of_one_rank(tiny_model_dir, raw_trace_file, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from kfh_probe import RhythmConfig, run_rhythm

    config = RhythmConfig(batch_size=1)
    alone = run_rhythm(tiny_model_dir, raw_trace_file, config, progress=False, log=None)
    with ThreadPoolExecutor(2) as pool:  # two ranks meeting in one work folder
        ranks = [pool.submit(run_rhythm, tiny_model_dir, raw_trace_file, config, work_dir=tmp_path / "parts",
                             progress=False, log=None, rank=r, world_size=2) for r in (1, 0)]
        shared, other = ranks[1].result(), ranks[0].result()
    assert other is None
    assert shared == alone
    assert not (tmp_path / "parts").exists()


@pytest.mark.slow
def test_two_processes_write_the_same_rhythm_file_as_one(tiny_model_dir, raw_trace_file, tmp_path):
    check_ranks_write_what_one_writes("rhythm", 2, tmp_path, "--model", tiny_model_dir, "--traces", raw_trace_file,
                                      "--batch-size", "1")


def test_rhythm_refuses_broken_traces_by_line_and_id_and_writes_nothing(tiny_model_dir, raw_trace_file, tmp_path, capsys):
    from conftest import with_broken_record

    broken = with_broken_record(raw_trace_file, tmp_path)
    out = tmp_path / "r.jsonl"
    assert _rhythm(tiny_model_dir, broken, out) == 2
    err = capsys.readouterr().err
    assert f"{broken}:2 (id 'oops')" in err
    assert not out.exists()
    bad_heads = tmp_path / "heads.jsonl"
    bad_heads.write_text('{"format": "kfh-manifest"}\n')
    assert _rhythm(tiny_model_dir, raw_trace_file, out, "--heads-from", str(bad_heads)) == 2
    assert "not a kfh-rhythm version 1 header" in capsys.readouterr().err
    assert _rhythm(tiny_model_dir, raw_trace_file, out, "--fai-range", "50", "10") == 2
    assert "--fai-range must satisfy 0 < lo <= hi; got [50, 10]" in capsys.readouterr().err
    assert not out.exists()
