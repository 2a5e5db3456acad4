"""The resumable, multi-rank batch runner (kfh_probe.batch_runner) that the sweep and the rhythm command share:
every trace's result is computed once, in its planned batch, whichever rank runs it and however often the run
is interrupted."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from kfh_probe.batch_runner import PartStore, batches_by_length, consecutive_batches, run_batches, work_folder
from kfh_probe.errors import InputError

LENGTHS = [5, 3, 9, 3, 7, 1, 4]


class Recorder:
    """A batch computation that records the batches it ran and can be told to stop (Ctrl-C) at a call."""

    def __init__(self, stop_at: int | None = None):
        self.calls: list[list[int]] = []
        self.stop_at = stop_at

    def __call__(self, chunk: list[int]) -> list[torch.Tensor]:
        self.calls.append(chunk)
        if len(self.calls) == self.stop_at:
            raise KeyboardInterrupt
        return [torch.tensor([float(i), float(len(chunk))]) for i in chunk]  # depends on the batch, like padding


def _store(tmp_path, rank: int = 0, world_size: int = 1, key: dict | None = None) -> PartStore:
    return PartStore(tmp_path / "parts", key or {"inputs": 1}, rank, world_size).open()


def test_batches_by_length_group_similar_lengths_with_ties_in_input_order():
    assert batches_by_length(LENGTHS, 3) == [[5, 1, 3], [6, 0, 4], [2]]
    assert consecutive_batches(7, 3) == [[0, 1, 2], [3, 4, 5], [6]]


def test_a_stored_run_returns_what_the_in_memory_run_returns(tmp_path):
    batches = batches_by_length(LENGTHS, 3)
    in_memory = run_batches("stage", batches, Recorder(), len(LENGTHS))
    stored = run_batches("stage", batches, Recorder(), len(LENGTHS), _store(tmp_path))
    assert [r.tolist() for r in stored] == [r.tolist() for r in in_memory]
    assert [r.tolist() for r in in_memory][5] == [5.0, 3.0]


def test_an_interrupted_run_resumes_and_computes_each_batch_once(tmp_path):
    batches = batches_by_length(LENGTHS, 2)
    reference = run_batches("stage", batches, Recorder(), len(LENGTHS))
    interrupted = Recorder(stop_at=3)
    with pytest.raises(KeyboardInterrupt):
        run_batches("stage", batches, interrupted, len(LENGTHS), _store(tmp_path))
    assert _store(tmp_path).done("stage") == {0, 1}
    resumed = Recorder()
    results = run_batches("stage", batches, resumed, len(LENGTHS), _store(tmp_path))
    assert resumed.calls == batches[2:]  # the two saved batches are not computed again
    assert [r.tolist() for r in results] == [r.tolist() for r in reference]


def test_a_store_of_other_inputs_is_started_afresh(tmp_path):
    batches = consecutive_batches(len(LENGTHS), 3)
    run_batches("stage", batches, Recorder(), len(LENGTHS), _store(tmp_path, key={"inputs": 1}))
    again = Recorder()
    run_batches("stage", batches, again, len(LENGTHS), _store(tmp_path, key={"inputs": 2}))
    assert again.calls == batches


@pytest.mark.parametrize("everyone", [False, True])
def test_three_ranks_share_the_batches_and_give_the_results_of_one(tmp_path, everyone):
    batches = batches_by_length(LENGTHS, 2)
    reference = [r.tolist() for r in run_batches("stage", batches, Recorder(), len(LENGTHS))]
    recorders = [Recorder() for _ in range(3)]

    def rank(r: int):
        return run_batches("stage", batches, recorders[r], len(LENGTHS), _store(tmp_path, r, 3), everyone=everyone)

    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(rank, [2, 1, 0]))[::-1]  # the last rank starts first
    for r, recorder in enumerate(recorders):
        assert recorder.calls == batches[r::3]
    assert [x.tolist() for x in results[0]] == reference
    for other in results[1:]:
        assert (other is None) != everyone and (other is None or [x.tolist() for x in other] == reference)


def test_work_folder_defaults_beside_the_output_and_refuses_ranks_without_one(tmp_path):
    assert work_folder(None, tmp_path / "m.json", 0, 1) == tmp_path / "m.json.parts"
    assert work_folder(tmp_path / "w", tmp_path / "m.json", 1, 2) == tmp_path / "w"
    assert work_folder(None, None, 0, 1) is None
    with pytest.raises(InputError, match="world_size 2 needs work_dir or out"):
        work_folder(None, None, 0, 2)
    with pytest.raises(InputError, match="rank must be in"):
        work_folder(tmp_path, None, 2, 2)
