"""Candidate preselection (FastIF kNN): exact neighbours, chunk/rank invariance, absent non-candidates, errors."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from helpers import SmallCNN, cross_entropy_per_example, digits, loader
from helpers.distributed import explain_on_threads, scored_indices
from torch import nn
from torch.utils.data import TensorDataset

import lightning_influence as li
from lightning_influence.config import ExplainConfig, check_num_candidates
from lightning_influence.core.candidates import (
    CandidateScoreCollector,
    knn,
    knn_torch,
    select_candidates,
)
from lightning_influence.core.per_example.features import last_linear_input
from lightning_influence.core.tensors.data import IndexedData
from lightning_influence.distributed.sharding import block_shard
from lightning_influence.reporting import load_full_scores

N_TRAIN = 180
DAMPING = 1.0  # above |lambda_min| (0.72) of the untrained MLP's Hessian, so the exact solve is well posed


def _mlp() -> nn.Module:
    """610 parameters (the exact solver stays fast); features: the 8 tanh hidden units."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 10)).double()


@pytest.fixture(scope="module")
def cnn():
    x, y = digits(torch.float64)
    return _mlp(), x[:N_TRAIN], y[:N_TRAIN], x[1500:1504], y[1500:1504]


def _features(model, x):
    with torch.no_grad():
        return model[:3](x)


def test_knn_equals_brute_force_nearest_neighbours():
    generator = torch.Generator().manual_seed(0)
    keys, queries = torch.randn(500, 12, generator=generator), torch.randn(7, 12, generator=generator)
    found = knn(queries, keys, 15)
    brute = torch.cdist(queries.double(), keys.double()).argsort(dim=1)[:, :15]
    assert torch.equal(found.indices, brute)
    expected = (queries[:, None, :].double() - keys[found.indices].double()).norm(dim=2)
    torch.testing.assert_close(found.distances, expected, rtol=1e-12, atol=1e-12)
    assert (found.distances.diff(dim=1) >= 0).all()


def test_chunking_does_not_change_the_neighbours_and_ties_go_to_the_smaller_index():
    generator = torch.Generator().manual_seed(1)
    keys = torch.randn(300, 5, generator=generator)
    keys[200:250] = keys[:50]  # exact duplicates: equal distances
    queries = torch.cat([keys[:3], torch.randn(3, 5, generator=generator)])
    reference = knn_torch(queries, keys, 40, chunk_size=300)
    for chunk in (1, 7, 64, 299):
        found = knn_torch(queries, keys, 40, chunk_size=chunk)
        assert torch.equal(found.indices, reference.indices)
        assert torch.equal(found.distances, reference.distances)
    for row in range(3):  # the query itself (distance 0) and its duplicate: the smaller index first
        assert reference.indices[row, :2].tolist() == [row, row + 200]


def test_faiss_backend_agrees_with_torch():
    pytest.importorskip("faiss")
    generator = torch.Generator().manual_seed(2)
    keys, queries = torch.randn(400, 16, generator=generator), torch.randn(5, 16, generator=generator)
    assert torch.equal(knn(queries, keys, 10, backend="faiss").indices, knn(queries, keys, 10).indices)


def test_default_features_are_the_input_of_the_last_linear_layer(cnn):
    model, x, y, _, _ = cnn
    torch.testing.assert_close(last_linear_input(model, (x[:9], y[:9])), _features(model, x[:9]), rtol=0, atol=0)
    cnn_model = SmallCNN().double()  # head registered last and called last
    expected = torch.tanh(cnn_model.conv2(torch.tanh(cnn_model.conv1(x[:9])))).flatten(1)
    torch.testing.assert_close(last_linear_input(cnn_model, (x[:9], y[:9])), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="feature_fn"):
        last_linear_input(nn.Sequential(nn.Conv2d(1, 2, 3)), (x[:2], y[:2]))


def test_candidates_n_train_reproduces_full_scoring(cnn):
    model, x, y, xt, yt = cnn
    train = loader(x, y, 64)
    full = li.influence(model, cross_entropy_per_example, train, (xt, yt), solver="exact", damping=DAMPING)
    every = li.influence(model, cross_entropy_per_example, train, (xt, yt), solver="exact", damping=DAMPING,
                         num_candidates=N_TRAIN, preselect="always")
    torch.testing.assert_close(every, full, rtol=1e-10, atol=1e-12)
    top_full = li.top_influences(model, cross_entropy_per_example, train, (xt, yt), solver="exact", damping=DAMPING,
                                 top_k=5)
    top_every = li.top_influences(model, cross_entropy_per_example, train, (xt, yt), solver="exact", damping=DAMPING,
                                  top_k=5, num_candidates=N_TRAIN, preselect="always")
    assert torch.equal(top_every.harmful_indices, top_full.harmful_indices)
    assert torch.equal(top_every.helpful_indices, top_full.helpful_indices)


def test_non_candidates_are_absent_and_candidates_are_the_feature_space_neighbours(cnn):
    model, x, y, xt, yt = cnn
    k = 25
    train = loader(x, y, 64)
    full = li.influence(model, cross_entropy_per_example, train, (xt, yt), solver="exact", damping=DAMPING)
    sparse = li.influence(model, cross_entropy_per_example, train, (xt, yt), solver="exact", damping=DAMPING,
                          num_candidates=k, feature_fn="activations", preselect="always")
    nearest = torch.cdist(_features(model, xt), _features(model, x)).argsort(dim=1)[:, :k]
    for row in range(len(xt)):
        present = torch.isfinite(sparse[row]).nonzero().flatten()
        assert sorted(present.tolist()) == sorted(nearest[row].tolist())  # exactly its own k candidates
        torch.testing.assert_close(sparse[row, present], full[row, present], rtol=1e-10, atol=1e-12)
    top = li.top_influences(model, cross_entropy_per_example, train, (xt, yt), solver="exact", damping=DAMPING,
                            num_candidates=k, top_k=5, feature_fn="activations", preselect="always")
    for row in range(len(xt)):
        assert set(top.harmful_indices[row].tolist()) <= set(nearest[row].tolist())
        torch.testing.assert_close(top.harmful_scores[row, 0], full[row, nearest[row]].max(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(top.helpful_scores[row, 0], full[row, nearest[row]].min(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("bad", [0, -3, N_TRAIN + 1, True, 2.5])
def test_bad_candidate_counts_give_a_clear_error(cnn, bad):
    model, x, y, xt, yt = cnn
    expected = rf"Expected `num_candidates` to be (at most the training-set size {N_TRAIN}|None or a positive int)"
    with pytest.raises(ValueError, match=expected):
        li.influence(model, cross_entropy_per_example, loader(x, y), (xt, yt), solver="exact", num_candidates=bad)


def test_unknown_or_missing_knn_backend_gives_a_clear_error(cnn, monkeypatch):
    model, x, y, xt, yt = cnn
    with pytest.raises(ValueError, match="Expected `knn_backend`"):
        li.influence(model, cross_entropy_per_example, loader(x, y), (xt, yt), solver="exact", num_candidates=5,
                     knn_backend="annoy")
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss -> ImportError, as when it is not installed
    with pytest.raises(ImportError, match="pip install faiss-cpu"):
        li.influence(model, cross_entropy_per_example, loader(x, y), (xt, yt), solver="exact", num_candidates=5,
                     knn_backend="faiss")


def test_collector_keeps_only_each_rows_own_candidates_from_blocks_in_any_order():
    candidates = torch.tensor([[4, 1, 7], [2, 4, 9]])
    full = torch.arange(20.0).reshape(2, 10)
    collector = CandidateScoreCollector(candidates)
    for part in ([9, 0, 4], [7, 3], [1, 2, 5]):
        index = torch.tensor(part)
        collector.update(full[:, index], index)
    assert torch.equal(collector.scores, full.gather(1, candidates))
    dense = collector.result().dense(10)
    assert torch.isnan(dense).sum() == 2 * 10 - 6


def test_same_candidates_and_scores_on_any_number_of_ranks(cnn):
    model, x, y, _, _ = cnn
    vx, vy = digits(torch.float64)
    train = IndexedData(TensorDataset(x, y), batch_size=16)
    val = IndexedData(TensorDataset(vx[1500:1530], vy[1500:1530]))
    settings = ExplainConfig(top_k=4, num_worst=3, num_candidates=20, keep_full_scores=True, feature_fn="activations",
                             preselect="always")
    single = explain_on_threads(1, model, train, val, settings, DAMPING)[0]
    assert single.full_scores.shape == (3, len(x))
    assert (~single.full_scores.isnan()).sum(dim=1).tolist() == [20, 20, 20]  # non-candidates absent (NaN), not 0
    test_x = vx[1500:1530][[p.val_index for p in single.points]]
    nearest = torch.cdist(_features(model, test_x), _features(model, x)).argsort(dim=1)[:, :20]
    assert torch.equal(scored_indices(single), nearest.sort(1).values)
    for world_size in (2, 3):
        results = explain_on_threads(world_size, model, train, val, settings, DAMPING)
        assert all(result.score_shard is None for result in results[1:])  # rank 0 alone keeps the small table
        torch.testing.assert_close(results[0].full_scores, single.full_scores, rtol=1e-9, atol=1e-12, equal_nan=True)
        for result in results:
            for point, reference in zip(result.points, single.points):
                assert [i.train_index for i in point.harmful] == [i.train_index for i in reference.harmful]
                assert [i.train_index for i in point.helpful] == [i.train_index for i in reference.helpful]
                assert len(point.scores) == 20  # the histogram holds the candidates only


def test_faiss_backend_gives_the_same_candidates_in_explain_on_one_and_two_ranks(cnn):
    pytest.importorskip("faiss")
    model, x, y, _, _ = cnn
    vx, vy = digits(torch.float64)
    train = IndexedData(TensorDataset(x, y), batch_size=16)
    val = IndexedData(TensorDataset(vx[1500:1530], vy[1500:1530]))
    settings = ExplainConfig(top_k=4, num_worst=3, num_candidates=20, keep_full_scores=True, feature_fn="activations",
                             preselect="always")
    reference = scored_indices(explain_on_threads(1, model, train, val, settings, DAMPING)[0])
    for world_size in (1, 2):
        faiss_settings = ExplainConfig(top_k=4, num_worst=3, num_candidates=20, keep_full_scores=True, knn_backend="faiss",
                                       preselect="always")
        faiss_result = explain_on_threads(world_size, model, train, val, faiss_settings, DAMPING)[0]
        assert torch.equal(scored_indices(faiss_result), reference)


def test_feature_blocks_are_the_same_whatever_the_world_size():
    for world_size in (1, 2, 3, 5):
        parts = [block_shard(103, 16, rank, world_size) for rank in range(world_size)]
        assert sorted(i for part in parts for i in part) == list(range(103))
        for part in parts:  # whole blocks only: every example keeps its block mates
            assert all(len({i // 16 for i in part[s : s + 16]}) == 1 for s in range(0, len(part), 16))


def test_check_num_candidates_accepts_the_edges():
    assert check_num_candidates(1, 5) == 1 and check_num_candidates(5, 5) == 5 and check_num_candidates(None, 5) is None


def test_select_candidates_accepts_a_user_feature_function(cnn):
    model, x, y, xt, yt = cnn
    data = IndexedData(TensorDataset(x, y), batch_size=50)

    def label_features(m, batch):
        return torch.nn.functional.one_hot(batch[1], 10).double()

    found = select_candidates(model, (xt, yt), data.batches_with_indices(), 5, label_features)
    for row in range(len(yt)):
        assert (y[found.indices[row]] == yt[row]).all()  # distance 0 only for the same label


def test_callback_with_candidates_writes_only_candidates(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    from helpers.lightning_models import TinyDigitsModel as TinyDigits
    from helpers.lightning_models import read_events as _events
    from helpers.lightning_models import tiny_datasets as _data
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch.loggers import TensorBoardLogger
    from torch.utils.data import DataLoader

    with pytest.raises(MisconfigurationException, match="`num_candidates`"):
        li.InfluenceCallback(num_candidates=0)
    with pytest.raises(MisconfigurationException, match="`knn_backend`"):
        li.InfluenceCallback(num_candidates=5, knn_backend="annoy")
    with pytest.raises(MisconfigurationException, match="knn_backend='torch'"):
        li.InfluenceCallback(num_candidates=5, knn_backend="faiss", feature_fn="last_layer_grad")
    k = 30
    callback = li.InfluenceCallback(num_worst=3, top_k=4, solver="exact", damping=0.5, num_candidates=k, save_scores=True,
                                    verbose=False, feature_fn="activations", preselect="always")
    pl.seed_everything(0)
    train, val = _data()
    model = TinyDigits()
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=TensorBoardLogger(tmp_path, name="run"),
                         callbacks=[callback], enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False)
    trainer.fit(model, DataLoader(train, batch_size=32, shuffle=True), DataLoader(val, batch_size=25))
    log_dir = trainer.logger.log_dir
    report = json.loads(next(path for path in (tmp_path / "run").glob("version_0/influence/epoch=*.json")
                             if not path.name.endswith("-scores.json")).read_text())
    val_indices, full = load_full_scores(next((tmp_path / "run").glob("version_0/influence/epoch=*-scores.json")))
    assert full.shape == (3, len(train)) and (~full.isnan()).sum(dim=1).tolist() == [k] * 3
    train_x = train.tensors[0]
    with torch.no_grad():
        train_features = model.net[:3](train_x)
        val_features = model.net[:3](val.tensors[0][val_indices])
    nearest = torch.cdist(val_features, train_features).argsort(dim=1)[:, :k]
    events = _events(log_dir)
    for row, point in enumerate(report["points"]):
        own = set(nearest[row].tolist())
        assert set((~full[row].isnan()).nonzero().flatten().tolist()) == own
        listed = [index for index, _ in point["harmful"] + point["helpful"]]
        assert listed and set(listed) <= own
        histogram = events.Histograms(f"influence/val_{point['val_index']}/scores")[-1].histogram_value
        assert histogram.num == k
    with pytest.raises(MisconfigurationException, match="at most the training-set size"):
        too_many = li.InfluenceCallback(num_candidates=len(train) + 1, solver="exact", verbose=False)
        pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, callbacks=[too_many],
                   enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False).fit(
            TinyDigits(), DataLoader(train, batch_size=32), DataLoader(val, batch_size=25))
