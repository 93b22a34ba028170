"""Bad input gets an error that says what to do (the Lightning-side cases are in test_callback.py and
test_failure_isolation.py; DDP sharding of uneven sets in test_distributed.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import LogisticRegression, cross_entropy_per_example, digits, loader
from torch import nn
from torch.utils.data import Dataset, IterableDataset, TensorDataset

import lightning_influence as li
from lightning_influence.analysis.explain import explain
from lightning_influence.config import CGConfig, ExplainConfig, ProblemConfig
from lightning_influence.core.tensors.data import IndexedData


@pytest.fixture(scope="module")
def data():
    x, y = digits(torch.float64)
    torch.manual_seed(0)
    return LogisticRegression().double(), TensorDataset(x[:40], y[:40]), TensorDataset(x[1500:1510], y[1500:1510])


def _explain(model, train, val, loss_fn=cross_entropy_per_example, **settings):
    options = {"top_k": 3, "num_worst": 2, "diagnose": False, **settings}
    return explain(model, loss_fn, IndexedData(train), IndexedData(val), ProblemConfig(solver=CGConfig(), damping=1.0),
                   ExplainConfig(**options))


def test_loss_of_the_wrong_length_names_the_expected_shape(data):
    model, train, val = data

    def drops_one(m, batch):
        return cross_entropy_per_example(m, batch)[:-1]

    with pytest.raises(ValueError, match=r"per-example losses of shape \[10\].*got shape \[9\]"):
        _explain(model, train, val, drops_one)


def test_non_finite_validation_losses_name_the_examples(data):
    model, train, val = data
    x, y = val.tensors
    poisoned = x.clone()
    poisoned[[2, 7]] = float("nan")
    with pytest.raises(ValueError, match=r"(?s)finite per-example losses.*validation examples \[2, 7\].*isfinite"):
        _explain(model, train, TensorDataset(poisoned, y))


def test_non_finite_training_losses_stop_the_solve_with_the_rows(data):
    model, train, val = data
    x, y = train.tensors
    test = (val.tensors[0][:3].clone(), val.tensors[1][:3])
    test[0][1] = float("inf")
    with pytest.raises(ValueError, match=r"finite per-example losses.*rows \[1\]"):
        li.s_test(model, cross_entropy_per_example, loader(x, y), test, solver="cg", damping=1.0)


def test_no_trainable_parameters_says_to_unfreeze(data):
    _, train, val = data
    frozen = LogisticRegression().double().requires_grad_(False)
    with pytest.raises(ValueError, match="unfreeze"):
        _explain(frozen, train, val)


def test_duplicated_or_out_of_range_val_indices(data):
    model, train, val = data
    with pytest.raises(ValueError, match=r"free of duplicates.*\[1, 4, 1\]"):
        _explain(model, train, val, val_indices=(1, 4, 1))
    with pytest.raises(ValueError, match=r"\[10\].*below 10"):
        _explain(model, train, val, val_indices=(1, 10))


def test_top_k_larger_than_the_training_set(data):
    model, train, val = data
    with pytest.warns(UserWarning, match=r"`top_k`=41 exceeds the training-set size \(40\).*Lower `top_k`"):
        result = _explain(model, train, val, top_k=41)
    point = result.points[0]
    assert len(point.harmful) == len(point.helpful) == 40  # clamped: every example, once per list
    assert sorted(i.train_index for i in point.harmful) == list(range(40))


class _Dicts(Dataset):
    def __init__(self, dataset: TensorDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        x, y = self.dataset[i]
        return {"pixels": x, "digit": y}


def test_items_that_are_not_input_target_pairs_explain_the_loss_fn_to_write(data):
    model, train, val = data
    with pytest.raises(TypeError, match=r"(?s)dict with keys \['digit', 'pixels'\].*must accept the batches.*loss_fn="):
        _explain(model, _Dicts(train), _Dicts(val))

    def dict_loss(m, batch):
        return F.cross_entropy(m(batch["pixels"]), batch["digit"], reduction="none")

    assert len(_explain(model, _Dicts(train), _Dicts(val), dict_loss).points) == 2  # the fix works


def test_iterable_dataset_asks_for_a_map_style_one():
    class Stream(IterableDataset):
        def __iter__(self):
            yield torch.zeros(3), torch.tensor(0)

    with pytest.raises(TypeError, match=r"map-style dataset.*identified.*by index.*train_dataset="):
        IndexedData(Stream())


class _Counting(nn.Module):
    """Counts its forward calls in a buffer, even in eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(64, 10)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.calls += 1
        return self.linear(x.flatten(1))


class _AlwaysTrainingBatchNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(64, 10)
        self.norm = nn.BatchNorm1d(10)

    def forward(self, x):
        self.norm.train()  # overrides eval mode: running statistics move on every call
        return self.norm(self.linear(x.flatten(1)))


@pytest.mark.parametrize(("model", "changed"), [(_Counting(), "buffer calls"), (_AlwaysTrainingBatchNorm(), "norm.")])
def test_a_forward_that_mutates_state_is_refused_with_the_fix(data, model, changed):
    _, train, val = data
    with pytest.raises(ValueError, match=rf"(?s)leave its state unchanged.*{changed}.*if self.training:"):
        _explain(model.double(), train, val)


def test_batchnorm_in_eval_mode_is_fine(data):
    _, train, val = data
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.BatchNorm1d(10)).double()
    model.train()
    result = _explain(model, train, val, diagnose=True)
    assert model.training  # restored after the analysis
    assert [w.code for w in result.trust.warnings if w.severity == "info"] == ["batchnorm_dropout"]
