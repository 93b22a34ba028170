"""explain() across processes: the same answers on 1, 2 and 3 ranks, shards that cover the data once, failures
that reach every rank, and InfluenceCallback under Lightning DDP writing once, on rank 0.

``explain()`` runs in plain ``torch.multiprocessing`` workers on gloo, started by a forkserver (see ``_spawn``);
they never import Lightning (this module builds its LightningModule lazily, see ``__getattr__``). One
``ddp_spawn`` test covers the callback. Never ``strategy="ddp"`` here: its rank 1 would re-run the whole session.
"""

from __future__ import annotations

import glob
import json
import multiprocessing
import multiprocessing.forkserver
import os
import socket
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from helpers import SmallCNN, cross_entropy_per_example, digits, l2_objective
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_influence as li
from lightning_influence.analysis.explain import explain
from lightning_influence.config import CGConfig, ExplainConfig, LissaConfig, ProblemConfig
from lightning_influence.core.tensors.data import IndexedData
from lightning_influence.distributed import SingleProcess, TorchDistributed
from lightning_influence.distributed.sharding import shard
from lightning_influence.reporting import load_full_scores
from lightning_influence.results import Explanation

pytestmark = pytest.mark.ddp  # every test here runs several gloo processes (or their results)

TIMEOUT = timedelta(seconds=60)  # a collective that a rank never joins fails after this, instead of hanging
N_TRAIN, N_VAL, VAL_START = 101, 30, 1500  # 101: shards of 51/50 and 34/34/33
DAMPING = 0.1
LISSA = LissaConfig(depth=50, repeats=3, batch_size=16, scale="auto", seed=0, route="recursion")
CG = CGConfig(max_iter=60, tol=1e-8)
SETTINGS = ExplainConfig(top_k=5, num_worst=4, keep_full_scores=True)
WORLD_SIZES = (1, 2, 3)
#: Imported once by the forkserver (it cannot import this test module itself: tests/ is not on its path).
FORKSERVER_PRELOAD = ("torch._dynamo", "lightning_influence.analysis.explain", "sklearn.datasets", "hypothesis", "pytest")


# -- process plumbing --------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _spawn(worker: Any, world_size: int, *args: Any, timeout: timedelta = TIMEOUT) -> None:
    """``worker(rank, world_size, port, timeout, *args)`` in ``world_size`` fresh processes; raises if one fails.

    Like ``torch.multiprocessing.spawn`` (clean processes, safe in a threaded pytest process) but forked from
    one forkserver that has imported the heavy modules once (torch.func's first call imports torch._dynamo):
    a spawned interpreter costs ~5 s to start and ~2 s to exit on the 2-core CI box, a forked rank well under 1 s.
    """
    _start_forkserver()
    mp.start_processes(worker, args=(world_size, _free_port(), timeout, *args), nprocs=world_size, join=True,
                       start_method="forkserver")


def _start_forkserver() -> None:
    """Start the forkserver now (idempotent): it imports its modules while this process does other work."""
    multiprocessing.get_context("forkserver").set_forkserver_preload(list(FORKSERVER_PRELOAD))
    multiprocessing.forkserver.ensure_running()


def _init(rank: int, world_size: int, port: int, timeout: timedelta) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timeout)


def _data(n_train: int = N_TRAIN) -> tuple[IndexedData, IndexedData]:
    x, y = digits()  # float64: differences across world sizes are summation order only
    val = slice(VAL_START, VAL_START + N_VAL)
    return IndexedData(TensorDataset(x[:n_train], y[:n_train]), batch_size=32), IndexedData(TensorDataset(x[val], y[val]))


def _model(state: dict[str, torch.Tensor]) -> nn.Module:
    model = SmallCNN().double()
    model.load_state_dict(state)
    return model


def _summary(explanation: Explanation) -> dict[str, Any]:
    points = explanation.points
    return {
        "val_indices": [p.val_index for p in points],
        "harmful": [[i.train_index for i in p.harmful] for p in points],
        "helpful": [[i.train_index for i in p.helpful] for p in points],
        "harmful_scores": torch.tensor([[i.influence for i in p.harmful] for p in points], dtype=torch.float64),
        "helpful_scores": torch.tensor([[i.influence for i in p.helpful] for p in points], dtype=torch.float64),
        "kept_scores": [p.scores for p in points],
        "shard_indices": explanation.score_shard.train_indices,
        "shard_scores": explanation.score_shard.scores,
        "trust": torch.tensor([[float("nan") if v is None else v
                                for v in (t.residual, t.repeat_pearson, t.repeat_spearman)]
                               for t in explanation.trust.points], dtype=torch.float64),
        "trace": explanation.solver.trace,
        "scale": explanation.solver.scale,
        "timings": explanation.timings,
    }


# -- workers (module level: spawn pickles them by name) -----------------------------------------------------
def _explain_worker(rank: int, world_size: int, port: int, timeout: timedelta, out: Path, state: dict,
                    early: dict) -> None:
    _init(rank, world_size, port, timeout)
    try:
        train, val = _data()
        explanation = explain(_model(state), cross_entropy_per_example, train, val,
                              ProblemConfig(solver=LISSA, damping=DAMPING), SETTINGS, TorchDistributed())
        record = {"shard": shard(range(N_TRAIN), rank, world_size), **_summary(explanation)}
        # CG splits the test points over ranks (4 points: 2+2 on 2 ranks, 2+1+1 on 3)
        with_cg = explain(_model(state), cross_entropy_per_example, train, val,
                          ProblemConfig(solver=CG, damping=DAMPING), SETTINGS, TorchDistributed())
        record["cg"] = {**_summary(with_cg), "iterations": with_cg.solver.trace.shape[1]}
        # influence averaged with an earlier snapshot: its own solve split over ranks like the final one's (CG: a
        # LiSSA early stop on a residual within rounding of its tolerance would make the comparison flaky)
        averaged = explain(_model(state), cross_entropy_per_example, train, val,
                           ProblemConfig(solver=CG, damping=DAMPING), SETTINGS, TorchDistributed(),
                           snapshots=[li.take_snapshot(_model(early))])
        record["snapshots"] = _summary(averaged)
        torch.save(record, out / f"world{world_size}_rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _edge_case_worker(rank: int, world_size: int, port: int, timeout: timedelta, out: Path, state: dict) -> None:
    """A training set smaller than the world (an empty shard), then a failure on one rank in each phase."""
    _init(rank, world_size, port, timeout)
    try:
        record: dict[str, Any] = {}
        train, val = _data(n_train=2)
        tiny = explain(_model(state), cross_entropy_per_example, train, val,
                       ProblemConfig(solver=LissaConfig(depth=5, batch_size=2, scale=10.0, route="recursion"), damping=DAMPING),
                       ExplainConfig(top_k=3, num_worst=2, keep_full_scores=True), TorchDistributed())
        record["tiny"] = _summary(tiny)
        train, val = _data()

        def fail_on(failing_rank: int) -> Any:
            def hook(*_: Any) -> None:
                if rank == failing_rank:
                    raise RuntimeError(f"simulated failure on rank {rank}")
            return hook

        for phase, hooks in {"s_test": {"on_lissa_step": fail_on(1)}, "scoring": {"on_scored": fail_on(2)}}.items():
            try:
                explain(_model(state), cross_entropy_per_example, train, val,
                        ProblemConfig(solver=LissaConfig(depth=5, repeats=3, batch_size=16, scale=10.0,
                                                         route="recursion"), damping=DAMPING),
                        ExplainConfig(top_k=2, num_worst=1), TorchDistributed(), **hooks)
                record[phase] = "no error"
            except RuntimeError as err:
                record[phase] = str(err)
        total = torch.tensor([float(rank + 1)])
        dist.all_reduce(total)  # the group still works afterwards: training could go on
        record["all_reduce"] = float(total)
        torch.save(record, out / f"edge_rank{rank}.pt")
    finally:
        dist.destroy_process_group()


# -- fixtures -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_state() -> dict[str, torch.Tensor]:
    _start_forkserver()
    x, y = digits()
    torch.manual_seed(0)
    model = SmallCNN().double()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(100):  # full batch: near a minimum is enough, damping 0.1 does the rest
        optimizer.zero_grad()
        l2_objective(model, x[:N_TRAIN], y[:N_TRAIN], l2=1e-3).backward()
        optimizer.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def early_state() -> dict[str, torch.Tensor]:
    """The same model after 30 of the trained state's 100 steps: a weight snapshot of its run."""
    x, y = digits()
    torch.manual_seed(0)
    model = SmallCNN().double()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(30):
        optimizer.zero_grad()
        l2_objective(model, x[:N_TRAIN], y[:N_TRAIN], l2=1e-3).backward()
        optimizer.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def runs(trained_state, early_state, tmp_path_factory) -> dict[int, list[dict[str, Any]]]:
    """Per world size, every rank's record of one ``explain()`` run."""
    out = tmp_path_factory.mktemp("explain")
    for world_size in WORLD_SIZES:
        _spawn(_explain_worker, world_size, out, trained_state, early_state)
    runs = {r: [torch.load(out / f"world{r}_rank{k}.pt", weights_only=False) for k in range(r)] for r in WORLD_SIZES}
    for records in runs.values():
        _assemble_full_scores(records, lambda record: record)
        _assemble_full_scores(records, lambda record: record["cg"])
        _assemble_full_scores(records, lambda record: record["snapshots"])
    return runs


def _assemble_full_scores(records: list[dict[str, Any]], part: Callable[[dict], dict]) -> None:
    """Every rank kept only its own shard of the full scores: put them together in training-index order."""
    indices = torch.cat([part(r)["shard_indices"] for r in records])
    scores = torch.cat([part(r)["shard_scores"] for r in records], dim=1)
    assert sorted(indices.tolist()) == list(range(len(indices)))  # no gap, no duplicate
    for record in records:
        part(record)["full_scores"] = scores[:, indices.argsort()]


@pytest.fixture(scope="module")
def edge_cases(trained_state, tmp_path_factory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("edge")
    _spawn(_edge_case_worker, 3, out, trained_state, timeout=timedelta(seconds=30))
    records = [torch.load(out / f"edge_rank{k}.pt", weights_only=False) for k in range(3)]
    _assemble_full_scores(records, lambda record: record["tiny"])
    return records


# -- explain() on 1, 2, 3 ranks ---------------------------------------------------------------------------
def test_every_rank_gets_the_same_result(runs):
    for world_size, records in runs.items():
        first = records[0]
        for record in records[1:]:
            assert record["val_indices"] == first["val_indices"], world_size
            assert (record["harmful"], record["helpful"]) == (first["harmful"], first["helpful"]), world_size
            torch.testing.assert_close(record["kept_scores"], first["kept_scores"], rtol=0, atol=0)


def test_same_points_and_top_influences_for_any_world_size(runs):
    reference = runs[1][0]
    assert len(reference["val_indices"]) == SETTINGS.num_worst
    for world_size in WORLD_SIZES[1:]:
        record = runs[world_size][0]
        assert record["val_indices"] == reference["val_indices"], world_size
        assert record["harmful"] == reference["harmful"], world_size
        assert record["helpful"] == reference["helpful"], world_size
        for key in ("harmful_scores", "helpful_scores", "full_scores"):
            torch.testing.assert_close(record[key], reference[key], rtol=1e-6, atol=1e-9, msg=f"{key}, R={world_size}")
        for kept, kept_reference in zip(record["kept_scores"], reference["kept_scores"]):
            torch.testing.assert_close(kept, kept_reference, rtol=1e-6, atol=1e-9)
        # repeat r is seeded by (seed, r) alone and traces come back in repeat order, whichever rank ran it
        assert record["scale"] == pytest.approx(reference["scale"], rel=1e-12)
        assert record["trace"].shape == (LISSA.repeats, LISSA.depth)
        torch.testing.assert_close(record["trace"], reference["trace"], rtol=1e-6, atol=1e-9)
        # self-diagnosis: even/odd repeat halves summed in one all-reduce give the same residuals and agreement
        assert not record["trust"].isnan().any()
        torch.testing.assert_close(record["trust"], reference["trust"], rtol=1e-6, atol=1e-9)


def test_cg_split_over_test_points_gives_the_single_process_result(runs):
    reference = runs[1][0]["cg"]
    for world_size in WORLD_SIZES[1:]:
        for record in runs[world_size]:
            cg = record["cg"]
            assert cg["val_indices"] == reference["val_indices"], world_size
            assert (cg["harmful"], cg["helpful"]) == (reference["harmful"], reference["helpful"]), world_size
            torch.testing.assert_close(cg["full_scores"], reference["full_scores"], rtol=1e-6, atol=1e-9)
            # the combined trace is the worst point's residual per step; it ends below tol
            assert cg["trace"].shape[0] == 1 and cg["iterations"] == reference["iterations"]
            assert float(cg["trace"][0, -1]) < CG.tol


def test_each_training_example_is_scored_exactly_once(runs):
    for world_size, records in runs.items():
        shards = [record["shard"] for record in records]
        assert sorted(i for s in shards for i in s) == list(range(N_TRAIN)), world_size
        assert max(map(len, shards)) - min(map(len, shards)) <= 1
        record = records[0]
        assert record["full_scores"].shape == (SETTINGS.num_worst, N_TRAIN)  # merged in index order, no padding
        assert all(kept.shape == (N_TRAIN,) for kept in record["kept_scores"])
        for row, harmful in enumerate(record["harmful"]):  # the merged top-k is the top-k of the merged scores
            assert harmful == record["full_scores"][row].topk(SETTINGS.top_k).indices.tolist()


def test_distributed_result_matches_the_single_process_api(runs, trained_state):
    record = runs[2][0]
    train, val = _data()
    scores = li.influence(_model(trained_state), cross_entropy_per_example, DataLoader(train.dataset, batch_size=32),
                          val.fetch(record["val_indices"]), solver="lissa", damping=DAMPING, depth=LISSA.depth,
                          repeats=LISSA.repeats, batch_size=LISSA.batch_size, seed=LISSA.seed, route=LISSA.route)
    torch.testing.assert_close(record["full_scores"], scores, rtol=1e-6, atol=1e-9)
    local = explain(_model(trained_state), cross_entropy_per_example, train, val,
                    ProblemConfig(solver=LISSA, damping=DAMPING), SETTINGS, SingleProcess())
    assert _summary(local)["harmful"] == record["harmful"]


def test_snapshot_averaged_influence_is_the_same_on_every_world_size(runs, trained_state, early_state):
    reference = runs[1][0]["snapshots"]
    for world_size in WORLD_SIZES[1:]:
        record = runs[world_size][0]["snapshots"]
        assert record["harmful"] == reference["harmful"], world_size
        torch.testing.assert_close(record["full_scores"], reference["full_scores"], rtol=1e-6, atol=1e-9)
    train, val = _data()
    scores = li.influence(_model(trained_state), cross_entropy_per_example, DataLoader(train.dataset, batch_size=32),
                          val.fetch(reference["val_indices"]), solver=CG, damping=DAMPING,
                          snapshots=[li.take_snapshot(_model(early_state))])
    torch.testing.assert_close(reference["full_scores"], scores, rtol=1e-6, atol=1e-9)
    assert not torch.allclose(reference["full_scores"], runs[1][0]["cg"]["full_scores"], rtol=1e-3)


def test_training_set_smaller_than_the_world_leaves_a_rank_without_a_shard(edge_cases):
    for record in edge_cases:
        tiny = record["tiny"]
        assert tiny["full_scores"].shape == (2, 2)
        assert sorted(tiny["harmful"][0]) == [0, 1]  # top_k=3 > 2 examples: both, once


def test_a_failure_on_one_rank_raises_on_every_rank_and_keeps_the_group_usable(edge_cases):
    for rank, record in enumerate(edge_cases):
        expected = {"s_test": 1, "scoring": 2}
        for phase, failing_rank in expected.items():
            if rank == failing_rank:
                assert record[phase] == f"simulated failure on rank {rank}"
            else:
                assert f"failed on rank {failing_rank}" in record[phase], (rank, phase)
                assert "simulated failure" in record[phase]
        assert record["all_reduce"] == 6.0


# -- sharding without padding ---------------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 200), world_size=st.integers(1, 5))
def test_shards_are_disjoint_cover_everything_and_differ_by_at_most_one(n, world_size):
    shards = [shard(range(n), rank, world_size) for rank in range(world_size)]
    flat = [i for s in shards for i in s]
    assert len(flat) == len(set(flat)) == n
    assert set(flat) == set(range(n))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert all(s == sorted(s) for s in shards)


# -- InfluenceCallback under Lightning DDP (spawn) ------------------------------------------------------------
def __getattr__(name: str) -> Any:
    """Build the LightningModule on first use, so the plain-torch workers above never ``import lightning``.

    Pickle finds ``test_distributed.TinyClassifier`` through this hook in the ``ddp_spawn`` workers too.
    """
    if name == "TinyClassifier":
        globals()[name] = _tiny_classifier_class()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _tiny_classifier_class() -> type:
    import lightning.pytorch as pl

    class TinyClassifier(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, stride=2), nn.Tanh(), nn.Flatten(), nn.Linear(64, 10))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def per_example_loss(self, batch: Any) -> torch.Tensor:
            return F.cross_entropy(self(batch[0]), batch[1], reduction="none")

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.per_example_loss(batch).mean()

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            self.log("val_loss", self.per_example_loss(batch).mean(), sync_dist=True)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1, weight_decay=1e-3)

    TinyClassifier.__qualname__ = "TinyClassifier"
    return TinyClassifier


def _influence_tags(path: str) -> list[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(path, size_guidance={"images": 0, "tensors": 0, "scalars": 0, "histograms": 0})
    events.Reload()
    return [tag for tags in events.Tags().values() if isinstance(tags, list) for tag in tags
            if tag.startswith("influence/")]


def _check_training_signals_assembled_by_index(path: str, model: nn.Module, train: TensorDataset) -> None:
    """The callback's training signals (each rank recorded its shard, rank 0 assembled them by dataset index)
    equal the EL2N of the final weights computed in one process, for every training example."""
    from lightning_influence.analysis.training_signals import example_signals

    with open(path) as handle:
        report = json.load(handle)
    assert report["ranking"] == "el2n_separated" and report["training_signals"]["epochs"] == [0]  # max_epochs=1
    assert sorted(c["train_index"] for c in report["candidates"]) == list(range(len(train)))
    x, y = train.tensors
    model.eval()
    with torch.no_grad():
        el2n = example_signals(model(x), y)["el2n"]
    scores = torch.tensor([c["score"] for c in report["candidates"]])
    torch.testing.assert_close(scores, el2n[[c["train_index"] for c in report["candidates"]]], rtol=1e-4, atol=1e-5)


def test_callback_under_ddp_spawn_writes_once_and_matches_a_single_process_analysis(tmp_path):
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger
    from lightning.pytorch.strategies import DDPStrategy

    x, y = digits(torch.float32)
    train, val = TensorDataset(x[:160], y[:160]), TensorDataset(x[1500:1540], y[1500:1540])
    lissa = {"depth": 30, "repeats": 2, "batch_size": 16, "seed": 0}  # repeat 0 on rank 0, repeat 1 on rank 1
    callback = li.InfluenceCallback(num_worst=2, top_k=3, damping=DAMPING, verbose=False, strict=True,
                                    save_scores=True, mislabel_candidates="all", mislabel_rank=8, **lissa)
    pl.seed_everything(0)
    model = sys.modules[__name__].TinyClassifier()
    trainer = pl.Trainer(
        strategy=DDPStrategy(start_method="spawn", timeout=TIMEOUT), accelerator="cpu", devices=2, max_epochs=1,
        logger=TensorBoardLogger(tmp_path, name="run"), callbacks=[callback], enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False, num_sanity_val_steps=0,
    )
    trainer.fit(model, DataLoader(train, batch_size=16, shuffle=True), DataLoader(val, batch_size=16))

    event_files = glob.glob(f"{tmp_path}/**/events.out.tfevents.*", recursive=True)
    with_influence = [path for path in event_files if _influence_tags(path)]
    assert len(with_influence) == 1, event_files  # rank 0 only
    json_files = glob.glob(f"{tmp_path}/**/influence/*.json", recursive=True)
    assert sorted(os.path.basename(path) for path in json_files) == ["epoch=0-scores.json", "epoch=0.json",
                                                                     "mislabel_epoch=0.json"]
    directory = os.path.dirname(json_files[0])
    with open(f"{directory}/epoch=0.json") as handle:
        record = json.load(handle)
    assert record["train_size"] == len(train) and record["solver"]["settings"]["repeats"] == 2
    # full scores: each rank wrote its own shard, rank 0 the index; together they cover the set once
    assert sorted(os.listdir(directory)) == ["epoch=0-scores-rank0.pt", "epoch=0-scores-rank1.pt",
                                             "epoch=0-scores.json", "epoch=0.json", "mislabel_epoch=0.json"]
    assert len(torch.load(f"{directory}/epoch=0-scores-rank1.pt", weights_only=True)["train_indices"]) == 80
    val_indices, full = load_full_scores(f"{directory}/epoch=0-scores.json")
    assert val_indices == [p["val_index"] for p in record["points"]] and not full.isnan().any()
    for row, point in enumerate(record["points"]):
        assert [i for i, _ in point["harmful"]] == full[row].topk(3).indices.tolist()

    # ddp_spawn hands rank 0's final weights back to `model`: recompute on one process with the same settings
    _check_training_signals_assembled_by_index(f"{directory}/mislabel_epoch=0.json", model, train)
    local = explain(model, lambda m, b: m.per_example_loss(b), IndexedData(train), IndexedData(val),
                    ProblemConfig(solver=LissaConfig(**lissa), damping=DAMPING), ExplainConfig(top_k=3, num_worst=2))
    assert [p["val_index"] for p in record["points"]] == [p.val_index for p in local.points]
    for point, expected in zip(record["points"], local.points):
        for role in ("harmful", "helpful"):
            assert [i for i, _ in point[role]] == [i.train_index for i in getattr(expected, role)]
            torch.testing.assert_close(torch.tensor([s for _, s in point[role]]),
                                       torch.tensor([i.influence for i in getattr(expected, role)]),
                                       rtol=1e-4, atol=1e-7)
