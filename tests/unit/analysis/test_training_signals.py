"""Training-signal recorder: schedule, values, resume, assembly by index over ranks, and planted flips."""

from __future__ import annotations

import copy
import io
import threading
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from helpers import digits
from helpers.distributed import run_ranks
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.utils.data import TensorDataset

from lightning_influence.analysis.training_signals import (
    DEFAULT_SCORE,
    TrainingSignalRecorder,
    checkpoint_epochs,
    component_scores,
    example_signals,
    forgetting_score,
    rank_mean,
    relabel_records,
    spread_weighted,
)
from lightning_influence.core.tensors.data import IndexedData
from lightning_influence.reporting.relabel import confusion_records, relabel_csv


def _data(n: int = 200, flip: int = 0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    images, labels = digits(torch.float64)
    x, y = images[:n].flatten(1), labels[:n].clone()
    flipped = torch.zeros(n, dtype=torch.bool)
    if flip:
        generator = torch.Generator().manual_seed(seed)
        chosen = torch.randperm(n, generator=generator)[:flip]
        y[chosen] = (y[chosen] + torch.randint(1, 10, (flip,), generator=generator)) % 10
        flipped[chosen] = True
    return x, y, flipped


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).double()


def _train(model: nn.Module, optimiser: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, epochs: range,
           recorder: TrainingSignalRecorder, data: IndexedData, **record: Any) -> None:
    for epoch in epochs:
        optimiser.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimiser.step()
        recorder.record(model, data, epoch, **record)


def test_example_signals_match_their_definitions():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 3.0, 1.0]])
    labels = torch.tensor([0, 2])
    out = example_signals(logits, labels)
    probs = logits.softmax(1)
    assert torch.allclose(out["loss"], -probs[[0, 1], [0, 2]].log())
    assert torch.allclose(out["margin"], torch.tensor([1.5, -2.0]))
    assert torch.allclose(out["el2n"], (probs - F.one_hot(labels, 3)).norm(dim=1))


def test_records_at_the_scheduled_epochs_with_the_model_of_that_epoch():
    x, y, _ = _data(120)
    data = IndexedData(TensorDataset(x, y), batch_size=50)
    model = _mlp()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    recorder = TrainingSignalRecorder(len(x), every_n_epochs=3, start=2)
    expected = []
    for epoch in range(10):
        optimiser.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimiser.step()
        recorded = recorder.record(model, data, epoch)
        assert recorded == (epoch in (2, 5, 8))
        if recorded:
            with torch.no_grad():
                expected.append(example_signals(model(x), y))
    assert recorder.epochs_recorded == [2, 5, 8]
    assert recorder.signals["loss"].shape == (120, 3)
    for column, values in enumerate(expected):
        for name in ("loss", "margin", "el2n"):
            assert torch.allclose(recorder.signals[name][:, column], values[name])
    assert torch.allclose(recorder.probability_sum, sum(v["probs"] for v in expected))
    assert torch.equal(recorder.labels, y)
    assert not recorder.record(model, data, 8)  # an epoch is recorded once

    explicit = TrainingSignalRecorder(len(x), epochs=[0, 4, 9])
    assert [e for e in range(12) if explicit.due(e)] == [0, 4, 9]


def test_state_dict_round_trip_resumes_to_the_uninterrupted_result():
    x, y, _ = _data(150)
    data = IndexedData(TensorDataset(x, y), batch_size=64)

    model = _mlp()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    straight = TrainingSignalRecorder(len(x), every_n_epochs=2)
    _train(model, optimiser, x, y, range(5), straight, data)
    saved = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimiser": optimiser.state_dict(), "signals": straight.state_dict()},
               saved)
    _train(model, optimiser, x, y, range(5, 12), straight, data)

    saved.seek(0)
    checkpoint = torch.load(saved, weights_only=False)
    resumed_model = _mlp(seed=123)  # different init: everything must come from the checkpoint
    resumed_model.load_state_dict(checkpoint["model"])
    resumed_optimiser = torch.optim.Adam(resumed_model.parameters(), lr=1e-2)
    resumed_optimiser.load_state_dict(checkpoint["optimiser"])
    resumed = TrainingSignalRecorder(len(x), every_n_epochs=5)  # the saved schedule wins
    resumed.load_state_dict(checkpoint["signals"])
    assert resumed.epochs_recorded == [0, 2, 4]
    _train(resumed_model, resumed_optimiser, x, y, range(5, 12), resumed, data)

    assert resumed.epochs_recorded == straight.epochs_recorded == [0, 2, 4, 6, 8, 10]
    for name, table in straight.signals.items():
        assert torch.allclose(resumed.signals[name], table, atol=1e-6)
    assert torch.allclose(resumed.scores(), straight.scores())
    with pytest.raises(ValueError, match="training set changed"):
        TrainingSignalRecorder(len(x) + 1).load_state_dict(checkpoint["signals"])


# -- ranks as threads ------------------------------------------------------------------------------------------
class _Group:
    def __init__(self, world_size: int) -> None:
        self.world_size, self.slots = world_size, [None] * world_size
        self.wait = threading.Barrier(world_size, timeout=60)
        self.full_gathers = [0] * world_size


class _Rank:
    """A thread rank with only the protocol's ``gather_objects`` (every rank receives the list)."""

    def __init__(self, group: _Group, rank: int) -> None:
        self.group, self.rank, self.world_size = group, rank, group.world_size

    def gather_objects(self, obj: Any) -> list[Any]:
        self.group.wait.wait()
        self.group.slots[self.rank] = obj
        self.group.wait.wait()
        gathered = list(self.group.slots)
        self.group.wait.wait()
        self.group.full_gathers[self.rank] += 1
        return gathered

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return torch.stack(self.gather_objects(tensor)).sum(0)

    def barrier(self) -> None:
        self.group.wait.wait()


class _RootRank(_Rank):
    """A thread rank that also offers a gather to rank 0 only: the recorder must use it."""

    def gather_objects_to_root(self, obj: Any) -> list[Any] | None:
        self.group.wait.wait()
        self.group.slots[self.rank] = obj
        self.group.wait.wait()
        gathered = list(self.group.slots) if self.rank == 0 else None
        self.group.wait.wait()
        return gathered


@pytest.mark.parametrize("rank_class", [_Rank, _RootRank])
def test_two_ranks_assemble_by_index_to_the_single_process_result(rank_class):
    x, y, _ = _data(101)  # odd: the shards differ in size
    data = IndexedData(TensorDataset(x, y), batch_size=16)
    model = _mlp()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    snapshots = []
    single = TrainingSignalRecorder(len(x), every_n_epochs=2)
    for epoch in range(6):
        optimiser.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimiser.step()
        snapshots.append(copy.deepcopy(model.state_dict()))
        single.record(model, data, epoch)

    group = _Group(2)
    recorders = [TrainingSignalRecorder(len(x), every_n_epochs=2) for _ in range(2)]
    errors: list[BaseException] = []

    def run(rank: int) -> None:
        try:
            local = _mlp()
            for epoch, state in enumerate(snapshots):
                local.load_state_dict(state)
                recorders[rank].record(local, data, epoch, collectives=rank_class(group, rank))
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)
            group.wait.abort()

    run_ranks(2, run)
    assert not errors, errors
    root, other = recorders
    assert root.epochs_recorded == other.epochs_recorded == single.epochs_recorded == [0, 2, 4]
    for name, table in single.signals.items():
        assert not root.signals[name].isnan().any()
        assert torch.allclose(root.signals[name], table, atol=1e-6)
    assert torch.equal(root.labels, y)
    assert other.signals == {} and other.probability_sum is None  # only rank 0 holds the table
    assert torch.allclose(root.scores(), single.scores())
    assert group.full_gathers == ([3, 3] if rank_class is _Rank else [0, 0])
    with pytest.raises(RuntimeError, match="rank 0"):
        other.scores()


# -- the default ranking on planted flips ----------------------------------------------------------------------
def test_planted_flips_rank_high_with_the_default_score_on_a_memorising_net():
    x, y, flipped = _data(400, flip=40, seed=1)
    data = IndexedData(TensorDataset(x, y), batch_size=400)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10)).double()
    torch.manual_seed(0)
    for layer in model:
        if isinstance(layer, nn.Linear):
            layer.reset_parameters()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4)
    recorder = TrainingSignalRecorder(len(x), every_n_epochs=30, start=29)
    epoch = 0
    while True:
        optimiser.zero_grad()
        logits = model(x)
        F.cross_entropy(logits, y).backward()
        optimiser.step()
        fitted = bool((logits.argmax(1) == y).all()) or epoch == 1999
        recorder.record(model, data, epoch, force=fitted)
        if fitted:
            break
        epoch += 1
    with torch.no_grad():
        assert bool((model(x).argmax(1) == y).all()), "the fixture must memorise its flips"
    scores = recorder.component_scores()
    assert set(scores) >= {DEFAULT_SCORE, "final_loss", "early_el2n", "aum"}
    top = torch.argsort(recorder.scores(), descending=True)[:40]
    auroc = {name: roc_auc_score(flipped.numpy(), score.numpy()) for name, score in scores.items()}
    assert flipped[top].sum() >= 32, int(flipped[top].sum())  # recall at k = number of flips
    assert auroc[DEFAULT_SCORE] > 0.97
    final_top = torch.argsort(scores["final_loss"], descending=True)[:40]
    # the memorised end hides some flips from the final loss; the trajectory does not
    assert auroc[DEFAULT_SCORE] > auroc["final_loss"] + 0.01
    assert flipped[top].sum() > flipped[final_top].sum(), (int(flipped[top].sum()), int(flipped[final_top].sum()))
    suggested = recorder.suggested_labels()
    _, true_labels, _ = _data(400)
    assert (suggested[flipped] == true_labels[flipped]).double().mean() > 0.8


def test_component_scores_use_the_early_checkpoint_and_skip_missing_values():
    loss = torch.tensor([[1.0, 2.0, float("nan"), 4.0], [0.0, 0.0, 0.0, 0.0]])
    signals = {"loss": loss, "margin": -loss, "el2n": loss / 10}
    scores = component_scores(signals, [0, 10, 50, 100], early_fraction=0.1)
    assert torch.allclose(scores["mean_loss"], torch.tensor([7 / 3, 0.0]))
    assert torch.allclose(scores["early_loss"], torch.tensor([2.0, 0.0]))  # epoch 10 = 10% of 0..100
    assert torch.allclose(scores["aum"], torch.tensor([7 / 3, 0.0]))
    assert torch.allclose(scores["final_margin"], torch.tensor([4.0, 0.0]))


def test_relabel_and_confusion_records():
    scores = torch.tensor([0.1, 0.9, float("nan"), 0.5])
    given, predicted = torch.tensor([3, 1, 2, 7]), torch.tensor([3, 7, 2, 1])
    rows = relabel_records(scores, given, predicted, count=2)
    assert rows == [{"rank": 1, "train_index": 1, "given_label": 1, "predicted_label": 7, "score": pytest.approx(0.9)},
                    {"rank": 2, "train_index": 3, "given_label": 7, "predicted_label": 1, "score": pytest.approx(0.5)}]
    assert [r["train_index"] for r in relabel_records(scores, given, predicted)] == [1, 3, 0, 2]  # NaN last
    assert relabel_csv(rows).splitlines()[0] == "rank,train_index,given_label,predicted_label,score"
    assert relabel_csv(rows).splitlines()[1].startswith("1,1,1,7,0.89999")
    table = confusion_records([1, 1, 7, 1, 2], [7, 7, 1, 7, 2])
    assert table[0] == {"given_label": 1, "predicted_label": 7, "count": 3}
    assert sum(r["count"] for r in table) == 5


def test_separation_window_doubles_the_checkpoint_where_el2n_varies_most():
    from lightning_influence.analysis.training_signals import separation_window

    el2n = torch.tensor([[0.5, 0.1, 0.0, 0.0, 0.0, 0.0], [0.5, 1.2, 0.9, 0.3, 0.0, 0.0]])  # spread peaks at 2
    assert separation_window(el2n) == 4
    assert separation_window(el2n[:, :3]) == 3  # capped at the checkpoints there are
    plateau = torch.tensor([[0.5, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1], [0.5, 1.0, 0.95, 0.93, 0.92, 0.5, 0.9]])
    assert separation_window(plateau) == 5  # spread stays >= 80% of its peak through checkpoint 5
    scores = component_scores({"loss": el2n, "margin": -el2n, "el2n": el2n}, list(range(6)))
    assert torch.allclose(scores["el2n_window"], el2n[:, :4].mean(1))


def test_geometric_schedule_is_dense_early_distinct_and_ends_at_the_last_epoch():
    assert checkpoint_epochs(1000, 10) == [0, 1, 4, 9, 21, 45, 99, 214, 463, 999]
    assert checkpoint_epochs(6, 4) == [0, 1, 2, 5]
    assert checkpoint_epochs(12, 10) == [0, 1, 2, 3, 4, 5, 6, 7, 8, 11]  # moved up to stay distinct
    assert checkpoint_epochs(3, 10) == [0, 1, 2] and checkpoint_epochs(5, 1) == [4]
    for max_epochs in (11, 37, 200, 5000):
        epochs = checkpoint_epochs(max_epochs, 10)
        assert len(epochs) == 10 and epochs == sorted(set(epochs)) and epochs[0] == 0 and epochs[-1] == max_epochs - 1
        gaps = [b - a for a, b in zip(epochs, epochs[1:])]
        assert gaps == sorted(gaps) or max_epochs < 40  # never denser late than early
    assert checkpoint_epochs(1000, 10, "even") == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    with pytest.raises(ValueError, match="spacing"):
        checkpoint_epochs(10, 3, "log")
    with pytest.raises(ValueError, match="max_epochs"):
        checkpoint_epochs(0, 3)


def test_forgetting_counts_correct_to_wrong_transitions_and_never_learnt_is_most():
    margin = torch.tensor([
        [1.0, 1.0, 1.0, 1.0],     # learnt at once, never forgotten
        [-1.0, 1.0, -1.0, 1.0],   # learnt at 1, forgotten once
        [1.0, -1.0, 1.0, -1.0],   # learnt at 0, forgotten twice
        [-1.0, -1.0, -1.0, 1.0],  # learnt last
        [-1.0, -1.0, -1.0, -1.0],  # never learnt
    ])
    expected = torch.tensor([0 + 0 / 5, 1 + 1 / 5, 2 + 0 / 5, 0 + 3 / 5, 4 + 4 / 5], dtype=torch.float64)
    assert torch.allclose(forgetting_score(margin), expected)
    assert forgetting_score(margin).argmax() == 4


def test_spread_weighted_el2n_weights_checkpoints_by_their_variance_across_examples():
    el2n = torch.tensor([[0.5, 0.0, 0.1], [0.5, 1.0, 0.3], [0.5, 0.0, 0.2]], dtype=torch.float64)
    variance = el2n.var(dim=0)  # the first checkpoint does not separate anything: weight 0
    expected = (el2n * variance).sum(dim=1) / variance.sum()
    assert torch.allclose(spread_weighted(el2n), expected) and spread_weighted(el2n).argmax() == 1
    ranks = rank_mean(torch.tensor([3.0, 1.0, 2.0]), torch.tensor([1.0, 2.0, 3.0]))
    assert torch.allclose(ranks, torch.tensor([0.5, 0.25, 0.75], dtype=torch.float64))


def test_fitted_weighted_el2n_scales_each_checkpoint_by_the_fraction_predicted_as_labelled():
    from lightning_influence.analysis.signal_scores import fitted_weighted

    el2n = torch.tensor([[1.2, 0.1, 0.1], [1.3, 1.3, 0.2], [0.1, 0.1, 0.1], [1.1, 0.2, 1.0]], dtype=torch.float64)
    margin = torch.tensor([[-1.0, 2.0, 2.0], [-1.0, -1.0, 1.0], [2.0, 2.0, 2.0], [-1.0, 1.0, -0.5]],
                          dtype=torch.float64)
    weight = el2n.var(dim=0) * torch.tensor([0.25, 0.75, 0.75], dtype=torch.float64)  # a_k: margins > 0
    expected = (el2n * weight).sum(dim=1) / weight.sum()
    assert torch.allclose(fitted_weighted(el2n, margin), expected)
    # a checkpoint where no example is predicted as labelled (a_k = 0) drops out: spread_weighted of the rest
    unfitted = margin.clone()
    unfitted[:, 0] = -1.0
    assert torch.allclose(fitted_weighted(el2n, unfitted),
                          (el2n[:, 1:] * weight[1:]).sum(dim=1) / weight[1:].sum())
    assert not torch.allclose(fitted_weighted(el2n, margin), spread_weighted(el2n))
    # no checkpoint predicts any example as labelled: V_k alone, not a ranking of zeros
    nowhere = -margin.abs() - 1.0
    assert torch.allclose(fitted_weighted(el2n, nowhere), spread_weighted(el2n))
    assert fitted_weighted(el2n, nowhere).argmax() == spread_weighted(el2n).argmax() == 1


def test_named_scores_include_the_new_signals():
    recorder_signals = {name: torch.rand(20, 5, generator=torch.Generator().manual_seed(1)) - 0.3
                        for name in ("loss", "margin", "el2n")}
    scores = component_scores(recorder_signals, [0, 1, 3, 7, 15])
    assert {"aum", "aum_window", "forgetting", "el2n_weighted", "el2n_fitted", DEFAULT_SCORE} <= set(scores)
    assert all(score.shape == (20,) for score in scores.values())


def test_a_tensor_dataset_is_recorded_from_slices_to_the_same_tables_as_through_its_loader():
    from torch.utils.data import default_collate

    x, y, _ = _data(130, flip=13)
    sliced = IndexedData(TensorDataset(x, y), batch_size=50)
    loaded = IndexedData(TensorDataset(x, y), collate_fn=lambda rows: default_collate(rows), batch_size=50)
    indices = list(range(1, 130, 2))  # a rank's shard: every other example
    fast, slow = list(sliced.batches_with_indices(indices)), list(loaded.batches_with_indices(indices))
    assert [len(i) for i, _ in fast] == [50, 15] and len(fast) == len(slow)
    for (fast_indices, fast_batch), (slow_indices, slow_batch) in zip(fast, slow):
        assert torch.equal(fast_indices, slow_indices)
        assert type(fast_batch) is type(slow_batch) and all(torch.equal(a, b) for a, b in zip(fast_batch, slow_batch))
    assert list(loaded.batches_with_indices(indices))[0][0].tolist() == indices[:50]  # another collate: its loader

    tables = []
    for data in (sliced, loaded):
        recorder, model = TrainingSignalRecorder(len(x), every_n_epochs=1), _mlp()
        _train(model, torch.optim.Adam(model.parameters(), lr=1e-2), x, y, range(3), recorder, data)
        tables.append(recorder)
    for name in ("loss", "margin", "el2n"):
        assert torch.equal(tables[0].signals[name], tables[1].signals[name]), name
    assert torch.equal(tables[0].probabilities[2], tables[1].probabilities[2])
    assert torch.equal(tables[0].labels, y)


def test_signals_computed_in_row_chunks_equal_those_of_the_whole_shard(monkeypatch):
    import lightning_influence.analysis.training_signals as module

    x, y, _ = _data(90)
    model = _mlp(1)
    data = IndexedData(TensorDataset(x, y), batch_size=40)
    whole = TrainingSignalRecorder(len(x), every_n_epochs=1)
    whole.record(model, data, 0)
    monkeypatch.setattr(module, "_SIGNAL_ELEMENTS", 70)  # 7 rows of 10 classes at a time
    chunked = TrainingSignalRecorder(len(x), every_n_epochs=1)
    chunked.record(model, data, 0)
    for name in ("loss", "margin", "el2n"):
        assert torch.equal(whole.signals[name], chunked.signals[name]), name
    assert torch.equal(whole.probability_sum, chunked.probability_sum)
    with torch.no_grad():
        assert torch.allclose(whole.signals["el2n"][:, 0], example_signals(model(x), y)["el2n"])
    with pytest.raises(ValueError, match="logits of shape"):
        TrainingSignalRecorder(len(x)).record(model, data, 0, outputs_fn=lambda m, b: (m(b[0])[:, 0], b[1]))
