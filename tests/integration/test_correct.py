"""correct_errors: influence-guided fine-tuning through a Trainer; the model changes only through the chosen examples."""

from __future__ import annotations

import copy
import glob
import json

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from helpers import digits
from helpers.lightning_models import TinyDigitsModel
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, TensorDataset

import lightning_influence as li
from lightning_influence.analysis.correction import influence_weights
from lightning_influence.analysis.correction_lr import search_lr
from lightning_influence.core.per_example.features import factored_similarity, last_layer_gradients

DAMPING = 0.2
N_TRAIN = 300


class TinyDigits(TinyDigitsModel):
    """The command-line tests' tanh conv net (~700 parameters), in float64, trained with SGD + momentum."""

    def __init__(self) -> None:
        super().__init__(channels=4, lr=0.2)
        self.double()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


def _data():
    """Training labels of 3s flipped to 5 (half of them): the 3s of the validation set become the weak slice."""
    x, y = digits(torch.float64)
    y_train = y[:N_TRAIN].clone()
    threes = (y_train == 3).nonzero().flatten()
    y_train[threes[::2]] = 5
    train = TensorDataset(x[:N_TRAIN], y_train)
    val = TensorDataset(x[1400:1600], y[1400:1600])
    slice_idx = (y[1400:1600] == 3).nonzero().flatten()
    anchors = TensorDataset(x[1400:1600][slice_idx], y[1400:1600][slice_idx])
    return train, val, anchors


def _trainer(tmp_path, devices=1, **kwargs):
    return pl.Trainer(accelerator="cpu", devices=devices, logger=TensorBoardLogger(tmp_path, name="run"),
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                      log_every_n_steps=1, **kwargs)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A model fitted on the noisy labels, and its trainer (after fit, as a user would have it)."""
    pl.seed_everything(0)
    train, val, anchors = _data()
    model = TinyDigits()
    trainer = _trainer(tmp_path_factory.mktemp("fit"), max_epochs=15,
                       callbacks=[EarlyStopping("val_loss", patience=100)])
    trainer.fit(model, DataLoader(train, batch_size=32, shuffle=True), DataLoader(val, batch_size=100))
    return trainer, model, train, val, anchors


def _correct(trainer, model, train, val, anchors, **kwargs):
    options = {"train_dataloaders": DataLoader(train, batch_size=64), "val_dataloaders": DataLoader(val, batch_size=100),
               "solver": "exact", "damping": DAMPING, "iterations": 3, "examples_per_iteration": 8,
               "anchors_per_iteration": 6, "lr": 0.1, "guard_per_iteration": 0, "selection": "helpful",
               "verbose": False}  # FastIF's choice: the tests replay it; the default is tested by name
    return li.correct_errors(trainer, model, anchors, **{**options, **kwargs})


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_random_selection_is_reproducible_and_seeded(trained, tmp_path):
    _, model, train, val, anchors = trained
    runs = []
    for seed in (3, 3, 4):
        copy_ = copy.deepcopy(model)
        report = _correct(_trainer(tmp_path), copy_, train, val, anchors, selection="random", seed=seed)
        runs.append(([r.chosen_indices for r in report.iterations], [r.anchor_indices for r in report.iterations],
                     _params(copy_)))
    assert runs[0][0] == runs[1][0] and runs[0][1] == runs[1][1]
    assert all(len(set(chosen)) == 8 for chosen in runs[0][0])
    for key, value in runs[0][2].items():
        assert torch.equal(value, runs[1][2][key])
    assert runs[0][0] != runs[2][0]


def test_zero_iterations_change_nothing(trained, tmp_path):
    _, model, train, val, anchors = trained
    before = _params(model)
    report = _correct(_trainer(tmp_path), model, train, val, anchors, iterations=0)
    assert report.iterations == () and report.after == report.before
    assert set(report.before) == {"anchors", "val"}
    for key, value in _params(model).items():
        assert torch.equal(value, before[key])


def test_model_changes_only_through_chosen_examples(trained, tmp_path):
    """Replaying plain SGD on the reported chosen examples reproduces the corrected parameters."""
    trainer, model, train, val, anchors = trained
    original = copy.deepcopy(model)
    optimizer_state = copy.deepcopy(trainer.optimizers[0].state_dict())
    fit_loop, callbacks = trainer.fit_loop, list(trainer.callbacks)
    corrected = copy.deepcopy(model)
    report = _correct(trainer, corrected, train, val, anchors, selection="helpful", steps_per_iteration=2, lr=0.05)
    # the user's trainer and its optimizer are as they were
    assert trainer.fit_loop is fit_loop and trainer.callbacks == callbacks
    assert trainer.optimizers[0].state_dict()["state"].keys() == optimizer_state["state"].keys()
    for key, value in trainer.optimizers[0].state_dict()["state"].items():
        assert torch.equal(value["momentum_buffer"], optimizer_state["state"][key]["momentum_buffer"])

    replay = copy.deepcopy(original)
    sgd = torch.optim.SGD(replay.parameters(), lr=0.05)
    for round_ in report.iterations:
        batch = train[list(round_.chosen_indices)]
        for _ in range(2):
            sgd.zero_grad()
            replay.per_example_loss(batch).mean().backward()
            sgd.step()
    changed = False
    for key, value in corrected.state_dict().items():
        torch.testing.assert_close(value, replay.state_dict()[key], rtol=1e-10, atol=1e-12)
        changed |= not torch.equal(value, original.state_dict()[key])
    assert changed


def test_helpful_choice_matches_the_core_and_lowers_the_anchor_loss(trained, tmp_path):
    _, model, train, val, anchors = trained
    original = copy.deepcopy(model)
    reports = {}
    for selection in ("helpful", "harmful"):
        copy_ = copy.deepcopy(model)
        reports[selection] = _correct(_trainer(tmp_path), copy_, train, val, anchors, selection=selection, iterations=4)
    helpful, harmful = reports["helpful"], reports["harmful"]

    # round 1: the anchors' mean-loss influence is the mean of their influences (linear in grad L_A)
    first = helpful.iterations[0]
    scores = li.influence(original, lambda m, b: m.per_example_loss(b), DataLoader(train, batch_size=64),
                          anchors[list(first.anchor_indices)], solver="exact", damping=DAMPING).mean(0)
    assert list(first.chosen_indices) == scores.topk(8, largest=False).indices.tolist()
    torch.testing.assert_close(torch.tensor(first.chosen_influence, dtype=torch.float64),
                               scores.topk(8, largest=False).values)
    assert max(first.chosen_influence) < 0 < min(harmful.iterations[0].chosen_influence)

    # helpful steps lower the sampled anchors' loss every round; harmful ones raise it
    assert all(r.anchor_loss_after < r.anchor_loss_before for r in helpful.iterations)
    assert all(r.anchor_loss_after > r.anchor_loss_before for r in harmful.iterations)
    assert helpful.after["anchors"].loss < helpful.before["anchors"].loss < harmful.after["anchors"].loss


def test_candidates_restrict_the_choice_and_outputs_are_written(trained, tmp_path):
    _, model, train, val, anchors = trained
    allowed = list(range(0, N_TRAIN, 3))
    trainer = _trainer(tmp_path)
    report = _correct(trainer, copy.deepcopy(model), train, val, anchors, train_indices=allowed, heldout=anchors,
                      name="restricted")
    assert all(set(r.chosen_indices) <= set(allowed) for r in report.iterations)
    assert set(report.before) == {"anchors", "heldout", "val"}

    log_dir = trainer.logger.log_dir
    with open(f"{log_dir}/influence/correct_restricted.json") as handle:
        saved = json.load(handle)
    assert li.CorrectionReport.from_dict(saved) == report
    events = EventAccumulator(glob.glob(f"{log_dir}/events.*")[0], size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    curve = events.Scalars("influence/correct/restricted/heldout/accuracy")
    assert [e.step for e in curve] == [0, 1, 2, 3]
    assert curve[-1].value == pytest.approx(report.after["heldout"].accuracy)
    assert "influence/correct/restricted/anchor_loss_before" in events.Tags()["scalars"]
    assert "influence/correct/restricted/summary/text_summary" in events.Tags()["tensors"]


def test_nearest_neighbour_candidates_limit_each_round_to_its_anchors_neighbours(trained, tmp_path):
    _, model, train, val, anchors = trained
    k = 5
    working = copy.deepcopy(model)
    report = _correct(_trainer(tmp_path), working, train, val, anchors, num_candidates=k, iterations=2)
    replay = copy.deepcopy(model)  # the weights each round started from, replayed with the chosen examples
    x_train, y_train = train.tensors
    x_anchor, y_anchor = anchors.tensors

    def loss(m, batch):
        return m.per_example_loss(batch)

    for step in report.iterations:  # default candidates: the k largest |<G_anchor, G_i>| of last-layer gradients
        chosen_anchors = list(step.anchor_indices)
        anchor_batch = (x_anchor[chosen_anchors], y_anchor[chosen_anchors])
        similarity = factored_similarity(last_layer_gradients(replay, anchor_batch, loss),
                                         last_layer_gradients(replay, (x_train, y_train), loss))
        nearest = similarity.abs().argsort(dim=1, descending=True)[:, :k]
        assert set(step.chosen_indices) <= set(nearest.flatten().tolist())
        optimizer = torch.optim.SGD(replay.parameters(), lr=0.1)
        chosen = list(step.chosen_indices)
        optimizer.zero_grad()
        F.cross_entropy(replay(x_train[chosen]), y_train[chosen]).backward()
        optimizer.step()
    for a, b in zip(replay.parameters(), working.parameters()):
        torch.testing.assert_close(a, b)  # the replay followed the same path


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_candidates": 0}, "`num_candidates` to be None or a positive int"),
        ({"num_candidates": 1, "anchors_per_iteration": 1}, "`examples_per_iteration` to be at most the 1 nearest"),
        ({"anchors": TensorDataset(torch.zeros(0, 1, 8, 8, dtype=torch.float64), torch.zeros(0, dtype=torch.long))},
         "`anchors` to be a non-empty dataset"),
        ({"examples_per_iteration": N_TRAIN + 1}, f"`examples_per_iteration` to be at most .*{N_TRAIN}"),
        ({"selection": "best"}, "`selection` to be one of"),
        ({"train_indices": [0, N_TRAIN]}, "`train_indices` to be indices into the training set"),
        ({"iterations": -1}, "`iterations` to be an int >= 0"),
        ({"lr": 0.0}, "`lr` to be a positive number"),
        ({"lr": "fast"}, "`lr` to be a positive number or 'auto'"),
        ({"guard_per_iteration": -1}, "`guard_per_iteration` to be an int >= 0"),
        ({"optimizer": "rmsprop"}, "`optimizer` to be 'sgd' or 'adam'"),
    ],
)
def test_bad_arguments_give_clear_errors(trained, tmp_path, kwargs, match):
    _, model, train, val, anchors = trained
    anchors = kwargs.pop("anchors", anchors)
    with pytest.raises(ValueError, match=match):
        _correct(_trainer(tmp_path), model, train, val, anchors, **kwargs)


def _replay(model, train, anchors, report, lr, weighted=False):
    """Plain SGD (one step per round) on the mean loss over the round's chosen training examples (weighted by their
    influence for "weighted") plus, for "anchors+..." selections, the mean loss over the round's anchors, weighted
    (project_replay) by 1 + max(0, -g_A . g_R / |g_A|^2), recomputed here and checked against the report's."""
    replay = copy.deepcopy(model)
    sgd = torch.optim.SGD(replay.parameters(), lr=lr)
    for round_ in report.iterations:
        losses = replay.per_example_loss(train[list(round_.chosen_indices)])
        if weighted:
            losses = losses * torch.tensor(influence_weights(round_.chosen_influence), dtype=losses.dtype)
        loss = losses.mean()
        if report.selection.startswith("anchors+"):
            anchor_loss = replay.per_example_loss(anchors[list(round_.anchor_indices)]).mean()
            weight = 1.0
            if report.settings["project_replay"]:
                g_r = torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(replay.parameters()),
                                                                          retain_graph=True)])
                g_a = torch.cat([g.flatten() for g in torch.autograd.grad(anchor_loss, list(replay.parameters()),
                                                                          retain_graph=True)])
                weight = 1 + max(0.0, -float(g_a @ g_r) / float(g_a @ g_a))
                assert round_.anchor_weights == pytest.approx((weight,), rel=1e-9)
            else:
                assert round_.anchor_weights is None
            loss = loss + weight * anchor_loss
        sgd.zero_grad()
        loss.backward()
        sgd.step()
    return replay


@pytest.mark.parametrize("selection, project", [("anchors+helpful", True), ("anchors+helpful", False),
                                                ("anchors+random", True), ("weighted", True),
                                                ("anchors+protect", True)])
def test_new_selections_step_on_what_they_report(trained, tmp_path, selection, project):
    """anchors+helpful / anchors+random / anchors+protect fine-tune on the anchors' mean loss (weighted so that
    the replay cannot slow the anchors, unless project_replay=False) plus the chosen examples' mean loss;
    weighted on the helpful examples with loss weights proportional to their influence (mean 1). (No guard here:
    anchors+protect then chooses like helpful.)"""
    _, model, train, val, anchors = trained
    corrected = copy.deepcopy(model)
    report = _correct(_trainer(tmp_path), corrected, train, val, anchors, selection=selection,
                      project_replay=project)
    assert all(len(r.chosen_indices) == 8 and max(r.chosen_indices) < N_TRAIN for r in report.iterations)
    if selection != "anchors+random":
        plain = _correct(_trainer(tmp_path), copy.deepcopy(model), train, val, anchors, selection="helpful",
                         iterations=1)
        assert report.iterations[0].chosen_indices == plain.iterations[0].chosen_indices  # the same first choice
        assert max(report.iterations[0].chosen_influence) < 0
    if selection == "anchors+random":  # random replay opposes the anchors here: every step is reweighted
        assert all(r.anchor_weights[0] > 1 for r in report.iterations)
    replay = _replay(model, train, anchors, report, 0.1, weighted=selection == "weighted")
    for key, value in corrected.state_dict().items():
        torch.testing.assert_close(value, replay.state_dict()[key], rtol=1e-10, atol=1e-12)
    assert not torch.equal(corrected.state_dict()["net.0.weight"], model.state_dict()["net.0.weight"])


def _exact_mean_influences(original, train, val, anchors, first):
    """Mean exact influence of every training example on round ``first``'s anchors and on the guard of every
    validation example ``original`` gets right (recomputed with li.influence)."""
    with torch.no_grad():
        right = (original(val.tensors[0]).argmax(1) == val.tensors[1]).nonzero().flatten().tolist()
    loader = DataLoader(train, batch_size=64)

    def loss(m, b):
        return m.per_example_loss(b)

    on_anchors = li.influence(original, loss, loader, anchors[list(first.anchor_indices)], solver="exact",
                              damping=DAMPING).mean(0)
    on_guard = li.influence(original, loss, loader, val[right], solver="exact", damping=DAMPING).mean(0)
    return on_anchors, on_guard


def test_guard_skips_examples_that_would_raise_the_guards_loss(trained, tmp_path):
    """Round 1 with a guard of every validation example the model gets right (guard_per_iteration >= their
    number): the chosen examples are, in order, the most helpful of those whose influence on the guard's mean
    loss is <= 0 (recomputed here with li.influence)."""
    _, model, train, val, anchors = trained
    original = copy.deepcopy(model)
    report = _correct(_trainer(tmp_path), copy.deepcopy(model), train, val, anchors, selection="helpful",
                      guard_per_iteration=len(val), iterations=1, examples_per_iteration=40)
    first = report.iterations[0]
    on_anchors, on_guard = _exact_mean_influences(original, train, val, anchors, first)
    passing = (on_guard <= 0).nonzero().flatten().tolist()
    expected = sorted(passing, key=lambda i: float(on_anchors[i]))[:40]
    assert len(passing) >= 40 and list(first.chosen_indices) == expected
    unguarded = on_anchors.topk(40, largest=False).indices.tolist()
    assert any(on_guard[i] > 0 for i in unguarded)  # without the guard some would raise the guard's loss
    assert report.settings["guard_per_iteration"] == len(val)


def test_anchors_protect_takes_the_examples_most_helpful_to_the_guard_that_do_not_hurt_the_anchors(trained, tmp_path):
    """Round 1 of "anchors+protect" with a guard of every validation example the model gets right: the chosen
    examples are, in order, the most helpful to the guard's mean loss among those whose influence on the anchors
    is <= 0 (recomputed here with li.influence); the report keeps their influence on the anchors."""
    _, model, train, val, anchors = trained
    original = copy.deepcopy(model)
    report = _correct(_trainer(tmp_path), copy.deepcopy(model), train, val, anchors, selection="anchors+protect",
                      guard_per_iteration=len(val), iterations=1, examples_per_iteration=20)
    first = report.iterations[0]
    on_anchors, on_guard = _exact_mean_influences(original, train, val, anchors, first)
    passing = (on_anchors <= 0).nonzero().flatten().tolist()
    expected = sorted(passing, key=lambda i: float(on_guard[i]))[:20]
    assert len(passing) >= 20 and list(first.chosen_indices) == expected
    torch.testing.assert_close(torch.tensor(first.chosen_influence, dtype=torch.float64), on_anchors[expected],
                               rtol=1e-5, atol=1e-9)
    helpful = _correct(_trainer(tmp_path), copy.deepcopy(model), train, val, anchors, selection="anchors+helpful",
                       guard_per_iteration=len(val), iterations=1, examples_per_iteration=20)
    assert set(helpful.iterations[0].chosen_indices) != set(expected)  # a different choice from anchors+helpful


def test_reused_s_test_solves_once_and_keeps_scoring(trained, tmp_path):
    _, model, train, val, anchors = trained
    fresh = _correct(_trainer(tmp_path), copy.deepcopy(model), train, val, anchors, selection="helpful")
    reused = _correct(_trainer(tmp_path), copy.deepcopy(model), train, val, anchors, selection="helpful",
                      reuse_s_test=True)
    assert reused.iterations[0].chosen_indices == fresh.iterations[0].chosen_indices
    assert reused.iterations[0].damping is not None
    assert all(r.damping is None and r.residual is None for r in reused.iterations[1:])  # no solve after round 1
    assert all(r.damping is not None for r in fresh.iterations)
    assert all(max(r.chosen_influence) < 0 for r in reused.iterations)  # rescored at each round's weights


def test_automatic_lr_is_the_line_search_on_the_first_rounds_anchors(trained, tmp_path):
    _, model, train, val, anchors = trained
    corrected = copy.deepcopy(model)
    report = _correct(_trainer(tmp_path), corrected, train, val, anchors, selection="anchors", lr="auto")
    first = list(report.iterations[0].anchor_indices)
    expected, trials = search_lr(copy.deepcopy(model), lambda m, b: m.per_example_loss(b), anchors[first],
                                 len(first), "sgd")
    assert report.settings["lr"] == expected and report.settings["lr_requested"] == "auto"
    assert report.settings["lr_search"] == [list(t) for t in trials]
    replay = copy.deepcopy(model)  # every step used that lr
    sgd = torch.optim.SGD(replay.parameters(), lr=expected)
    for round_ in report.iterations:
        sgd.zero_grad()
        replay.per_example_loss(anchors[list(round_.anchor_indices)]).mean().backward()
        sgd.step()
    for key, value in corrected.state_dict().items():
        torch.testing.assert_close(value, replay.state_dict()[key], rtol=1e-10, atol=1e-12)
    assert report.after["anchors"].loss < report.before["anchors"].loss
    existing = torch.optim.SGD(copy.deepcopy(model).parameters(), lr=0.02)
    assert _correct(_trainer(tmp_path), copy.deepcopy(model), train, val, anchors, selection="anchors", lr="auto",
                    optimizer=existing, iterations=0).settings["lr"] == 0.02  # an optimizer's own lr


def test_the_old_candidates_argument_still_works_with_a_deprecation_warning(trained, tmp_path):
    _, model, train, val, anchors = trained
    with pytest.warns(DeprecationWarning, match="num_candidates"), pytest.raises(ValueError, match="num_candidates"):
        _correct(_trainer(tmp_path), model, train, val, anchors, candidates=0)
    with pytest.warns(DeprecationWarning, match="train_indices"), pytest.raises(ValueError, match="train_indices"):
        _correct(_trainer(tmp_path), model, train, val, anchors, candidates=[0, N_TRAIN])


@pytest.mark.ddp
def test_ddp_spawn_chooses_and_steps_like_one_process(trained, tmp_path):
    """Two gloo ranks (LiSSA repeats and candidate scoring split between them, the guard's scores gathered) give the
    single-process run, on the default selection (anchors + guarded helpful examples)."""
    from datetime import timedelta

    from lightning.pytorch.strategies import DDPStrategy

    _, model, train, val, anchors = trained
    options = {"selection": "anchors+helpful", "solver": "lissa", "iterations": 2, "heldout": anchors,
               "solver_options": {"depth": 40, "repeats": 2, "batch_size": 32},
               "guard_per_iteration": 30}  # the guarded choice gathers every rank's full scores
    local = copy.deepcopy(model)
    expected = _correct(_trainer(tmp_path / "one"), local, train, val, anchors, **options)
    spawned = copy.deepcopy(model)
    # logger=False: outputs go to `trainer.log_dir`, itself a broadcast under DDP (must run on every rank)
    trainer = pl.Trainer(accelerator="cpu", devices=2, logger=False, default_root_dir=tmp_path / "two",
                         strategy=DDPStrategy(start_method="spawn", timeout=timedelta(seconds=60)),
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    report = _correct(trainer, spawned, train, val, anchors, **options)
    assert [r.chosen_indices for r in report.iterations] == [r.chosen_indices for r in expected.iterations]
    for name, metrics in expected.after.items():
        assert report.after[name].size == metrics.size
        assert report.after[name].loss == pytest.approx(metrics.loss, rel=1e-6)
    for key, value in local.state_dict().items():  # rank 0's weights come back to `spawned`
        torch.testing.assert_close(spawned.state_dict()[key], value, rtol=1e-6, atol=1e-9)
    assert len(glob.glob(f"{tmp_path}/two/**/correct_anchors+helpful.json", recursive=True)) == 1


def test_defaults_come_from_the_fitted_trainer_and_survive_a_second_call(trained):
    """Training and validation data default to the trainer's last fit, also after a correction run on it."""
    trainer, model, _, val, anchors = trained
    step, loop = trainer.global_step, trainer.fit_loop
    for _ in range(2):
        report = li.correct_errors(trainer, copy.deepcopy(model), anchors, iterations=1, solver="exact",
                                   damping=DAMPING, verbose=False, name="defaults")
        assert report.settings["train_size"] == N_TRAIN and report.before["val"].size == len(val)
        assert len(report.iterations) == 1
    assert trainer.global_step == step and trainer.fit_loop is loop


def test_protect_projection_removes_the_part_of_each_step_that_would_raise_the_protect_samples_loss(trained, tmp_path):
    """The default selection with a guard and protect_per_step=5: before each step the 5 guard examples the
    model got right before the run and still gets right with the largest loss are the protect sample; when the
    step's gradient g has g . g_P < 0 with g_P their mean loss's gradient, g loses its component along g_P. Replayed
    here by hand (the anchors' weight included), with the cosines the report keeps; after the projection the step
    no longer raises the protect sample's loss to first order, and a step that raised it was projected."""
    _, model, train, val, anchors = trained
    corrected = copy.deepcopy(model)
    report = _correct(_trainer(tmp_path), corrected, train, val, anchors, selection="anchors+helpful",
                      guard=val, guard_per_iteration=len(val), protect_per_step=5, iterations=3)
    assert report.settings["protect_per_step"] == 5
    with torch.no_grad():
        right_before = (model(val.tensors[0]).argmax(1) == val.tensors[1]).nonzero().flatten().tolist()
    replay = copy.deepcopy(model)
    params = list(replay.parameters())
    sgd = torch.optim.SGD(params, lr=0.1)
    projected = 0
    for round_ in report.iterations:
        replay_loss = replay.per_example_loss(train[list(round_.chosen_indices)]).mean()
        anchor_loss = replay.per_example_loss(anchors[list(round_.anchor_indices)]).mean()
        g_r = torch.cat([g.flatten() for g in torch.autograd.grad(replay_loss, params, retain_graph=True)])
        g_a = torch.cat([g.flatten() for g in torch.autograd.grad(anchor_loss, params, retain_graph=True)])
        weight = 1 + max(0.0, -float(g_a @ g_r) / float(g_a @ g_a))
        g = g_r + weight * g_a
        g_p = _protect_gradient(replay, val, right_before, size=5)
        g, was_projected = _protect_projection(g, g_p, round_, rel=1e-6, abs=1e-9)
        projected += was_projected
        if was_projected:
            assert float(g @ g_p) == pytest.approx(0.0, abs=1e-9 * float(g.norm() * g_p.norm()))
        sgd.zero_grad()
        offset = 0
        for p in params:
            p.grad = g[offset:offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        sgd.step()
    assert projected >= 1
    for key, value in corrected.state_dict().items():
        torch.testing.assert_close(value, replay.state_dict()[key], rtol=1e-8, atol=1e-10)
    baseline = _correct(_trainer(tmp_path), copy.deepcopy(model), train, val, anchors, selection="anchors",
                        guard=val, guard_per_iteration=len(val), protect_per_step=5, iterations=1)
    assert baseline.iterations[0].protect_cosines is None  # the baselines never use it


def _protect_sample(model, val, right_before, size):
    """The protect sample: of the validation examples the model got right before the run (``right_before``), those
    it still gets right with the ``size`` largest losses (ties by index)."""
    with torch.no_grad():
        logits = model(val.tensors[0])
        losses = F.cross_entropy(logits, val.tensors[1], reduction="none")
        still = [i for i in right_before if int(logits[i].argmax()) == int(val.tensors[1][i])]
    return sorted(still, key=lambda i: (-float(losses[i]), i))[:size]


def _flat_grad(loss, params):
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])


def _protect_gradient(model, val, right_before, size):
    """The protect sample's mean-loss gradient, flattened."""
    sample = _protect_sample(model, val, right_before, size)
    return _flat_grad(model.per_example_loss(val[sample]).mean(), list(model.parameters()))


def _protect_projection(direction, g_p, round_, rel, abs):
    """The A-GEM projection replayed: the cosine of ``direction`` with the protect gradient ``g_p`` is the one the
    round's report kept (to ``rel``/``abs``), and a negative one removes ``direction``'s component along ``g_p``.
    Returns the direction and whether it was projected."""
    cosine = float(direction @ g_p) / float(direction.norm() * g_p.norm())
    assert round_.protect_cosines == pytest.approx((cosine,), rel=rel, abs=abs)
    if cosine >= 0:
        return direction, False
    return direction - float(direction @ g_p) / float(g_p @ g_p) * g_p, True


def _replayed(projected, corrected, replay, report):
    """A replay ends where the run did: some step was projected, the weights agree, the anchors' loss fell."""
    assert projected >= 1
    for key, value in corrected.state_dict().items():
        torch.testing.assert_close(value, replay.state_dict()[key], rtol=1e-6, atol=1e-8)
    assert report.after["anchors"].loss < report.before["anchors"].loss


def _anchor_gradient(model, anchors, round_):
    """The mean-loss gradient of the round's sampled anchors, flattened."""
    return _flat_grad(model.per_example_loss(anchors[list(round_.anchor_indices)]).mean(), list(model.parameters()))


def _step(params, direction, lr):
    """``p -= lr * direction`` over the flattened parameters."""
    with torch.no_grad():
        offset = 0
        for p in params:
            p.sub_(lr * direction[offset:offset + p.numel()].view_as(p))
            offset += p.numel()


def _anchor_run(trained, tmp_path, selection):
    """A 3-round run of an anchors-only ``selection`` with a 5-example protect sample from the whole validation
    set: the data, the corrected model, its report, the validation examples right before, and a copy of the
    model before the run to replay it on."""
    _, model, train, val, anchors = trained
    corrected = copy.deepcopy(model)
    report = _correct(_trainer(tmp_path), corrected, train, val, anchors, selection=selection, guard=val,
                      guard_per_iteration=len(val), protect_per_step=5, iterations=3)
    assert report.selection == selection and all(r.chosen_indices == r.anchor_indices for r in report.iterations)
    with torch.no_grad():
        right_before = (model(val.tensors[0]).argmax(1) == val.tensors[1]).nonzero().flatten().tolist()
    return train, val, anchors, corrected, report, right_before, copy.deepcopy(model)


def _gauss_newton(model, x):
    """The exact Gauss-Newton matrix of the mean cross-entropy over ``x`` (softmax output Hessian), by torch.func."""
    from torch.func import functional_call, jacrev, vmap

    params = {n: p.detach() for n, p in model.named_parameters()}
    jac = vmap(jacrev(lambda p, xi: functional_call(model, p, (xi[None],))[0]), in_dims=(None, 0))(params, x)
    jac = torch.cat([jac[n].reshape(len(x), 10, -1) for n in params], dim=2)
    with torch.no_grad():
        prob = torch.softmax(model(x), 1)
    h_out = torch.diag_embed(prob) - prob[:, :, None] * prob[:, None, :]
    return torch.einsum("ncp,ncd,ndq->pq", jac, h_out, jac) / len(x)


def test_influence_step_moves_along_the_damped_inverse_curvature_of_the_anchors_gradient(trained, tmp_path):
    """selection="influence": each step moves along s = (G + damping I)^-1 g_A (G: the training set's Gauss-Newton
    matrix at the round's weights, g_A: the sampled anchors' mean-loss gradient), scaled to g_A . d = |g_A|^2 (the
    gradient step's first-order decrease of the anchors' loss); a step that would raise the protect sample's loss is
    projected (A-GEM) and scaled back to that decrease. Replayed by hand with the exact matrix; among steps with
    that decrease it has the smallest d^T (G + damping I) d, so it is below the gradient step's."""
    train, val, anchors, corrected, report, right_before, replay = _anchor_run(trained, tmp_path, "influence")
    params = list(replay.parameters())
    projected = 0
    for round_ in report.iterations:
        g_a = _anchor_gradient(replay, anchors, round_)
        curvature = _gauss_newton(replay, train.tensors[0]) + DAMPING * torch.eye(len(g_a), dtype=g_a.dtype)
        s = torch.linalg.solve(curvature, g_a)
        d = s * float(g_a @ g_a) / float(g_a @ s)
        assert float(d @ curvature @ d) < float(g_a @ curvature @ g_a)
        g_p = _protect_gradient(replay, val, right_before, size=5)
        d, was_projected = _protect_projection(d, g_p, round_, rel=1e-5, abs=1e-8)
        projected += was_projected
        if was_projected:
            d = d * float(g_a @ g_a) / float(g_a @ d)
        assert float(g_a @ d) == pytest.approx(float(g_a @ g_a), rel=1e-6)  # the anchors' first-order decrease
        _step(params, d, 0.1)
    _replayed(projected, corrected, replay, report)


def test_constrained_step_raises_no_protect_examples_loss_and_keeps_the_anchors_decrease(trained, tmp_path):
    """selection="constrained": each step starts from the sampled anchors' mean-loss gradient g_A; when it would raise
    the loss of some example of the protect sample (the 5 guard examples still right with the largest loss), it is
    replaced by the closest d with g_i . d >= 0 for every protect example's gradient g_i (GEM), then scaled back to
    g_A . d = |g_A|^2. Replayed by hand; the report keeps, per step, the smallest cosine between g_A and a g_i."""
    from lightning_influence.analysis.correction_steps import project_each

    train, val, anchors, corrected, report, right_before, replay = _anchor_run(trained, tmp_path, "constrained")
    params = list(replay.parameters())
    projected = 0
    for round_ in report.iterations:
        g_a = _anchor_gradient(replay, anchors, round_)
        sample = _protect_sample(replay, val, right_before, size=5)
        rows = torch.stack([_flat_grad(replay.per_example_loss(val[[i]]).sum(), params) for i in sample])
        cosine = float((rows @ g_a / (rows.norm(dim=1) * g_a.norm())).min())
        assert round_.protect_cosines == pytest.approx((cosine,), rel=1e-6, abs=1e-9)
        d = g_a.clone()
        if cosine < 0:
            projected += 1
            step = [d]
            project_each(step, [(r,) for r in rows])
            d = step[0] * float(g_a @ g_a) / float(g_a @ step[0])
            assert float((rows @ d).min()) >= -1e-8 * float(d.norm() * rows.norm(dim=1).max())
        assert float(g_a @ d) == pytest.approx(float(g_a @ g_a), rel=1e-6)  # the anchors' first-order decrease
        _step(params, d, 0.1)
    _replayed(projected, corrected, replay, report)
