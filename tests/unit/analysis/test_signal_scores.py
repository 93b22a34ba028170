"""The default mislabel score ``el2n_separated``: the per-class separation ``eta_k`` and its weighting (#30)."""

from __future__ import annotations

import torch

from lightning_influence.analysis.signal_scores import (
    DEFAULT_SCORE,
    component_scores,
    fitted_weighted,
    separated_weighted,
    separation,
)


def _naive_separation(column: torch.Tensor, labels: torch.Tensor) -> float:
    """Otsu's criterion pooled over the classes, one split at a time (the definition, written out)."""
    between = total = 0.0
    for c in labels.unique():
        values = column[labels == c].double().sort().values
        n = len(values)
        total += float(((values - values.mean()) ** 2).sum())
        best = 0.0
        for i in range(1, n):
            low, high = values[:i], values[i:]
            best = max(best, i * (n - i) / n * float(low.mean() - high.mean()) ** 2)
        between += best
    return between / total if total > 0 else 0.0


def test_separation_matches_the_definition_on_unequal_classes():
    generator = torch.Generator().manual_seed(0)
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate((7, 30, 2, 61))])[torch.randperm(100, generator=generator)]
    table = torch.rand(100, 3, generator=generator, dtype=torch.float64)
    table[:, 1] = table[:, 1] ** 4  # skewed
    eta = separation(table, labels)
    expected = torch.tensor([_naive_separation(table[:, k], labels) for k in range(3)], dtype=torch.float64)
    assert torch.allclose(eta, expected, atol=1e-12)


def test_separation_reads_two_groups_as_one_a_constant_column_as_zero_and_a_uniform_one_at_three_quarters():
    generator = torch.Generator().manual_seed(1)
    n = 4000
    labels = torch.randint(0, 5, (n,), generator=generator)
    two_groups = torch.where(torch.rand(n, generator=generator) < 0.2, 1.2, 0.1).double()
    uniform = torch.rand(n, generator=generator, dtype=torch.float64)
    eta = separation(torch.stack([two_groups, torch.full((n,), 0.4, dtype=torch.float64), uniform], dim=1), labels)
    assert abs(float(eta[0]) - 1.0) < 1e-9
    assert float(eta[1]) == 0.0
    assert abs(float(eta[2]) - 0.75) < 0.01  # Otsu's criterion of a uniform distribution is 3/4


def test_separation_within_classes_ignores_a_model_that_predicts_one_class_for_every_input():
    # a constant prediction gives EL2N one value per given label: two clean groups over all the examples, none
    # within a class
    labels = torch.tensor([0] * 60 + [1] * 40)
    el2n = torch.where(labels == 0, 0.3, 0.9).double()[:, None]
    assert abs(float(separation(el2n)[0]) - 1.0) < 1e-9  # pooled over every example: looks perfectly separated
    assert float(separation(el2n, labels)[0]) == 0.0


def _planted(seed: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Four checkpoints of 500 examples, 50 flipped: before any fitting, a loose split, a clean split (checkpoint
    2), then the flips memorised."""
    generator = torch.Generator().manual_seed(seed)
    n, flips = 500, 50
    flipped = torch.zeros(n, dtype=torch.bool)
    flipped[torch.randperm(n, generator=generator)[:flips]] = True
    labels = torch.randint(0, 10, (n,), generator=generator)

    def noise(scale: float) -> torch.Tensor:
        return scale * torch.randn(n, generator=generator, dtype=torch.float64)

    columns = [0.9 + noise(0.05),
               torch.where(flipped, 0.8, 0.5) + noise(0.3),
               torch.where(flipped, 0.7, 0.15) + noise(0.08),
               torch.where(flipped, 0.06, 0.03) + noise(0.01)]
    el2n = torch.stack(columns, dim=1).clamp(min=0.0)
    margin = torch.stack([noise(1.0) - 1.0, 0.7 - el2n[:, 1], 0.7 - el2n[:, 2], torch.ones(n, dtype=torch.float64)], 1)
    return el2n, margin, labels, flipped


def _auroc(score: torch.Tensor, flipped: torch.Tensor) -> float:
    positive, negative = score[flipped], score[~flipped]
    return float((positive[:, None] > negative[None, :]).double().mean())


def test_separated_weighted_reads_the_checkpoint_that_splits_the_flips_cleanly():
    el2n, margin, labels, flipped = _planted()
    eta = separation(el2n, labels)
    assert int(eta.argmax()) == 2
    score = separated_weighted(el2n, margin, labels)
    assert torch.corrcoef(torch.stack([score, el2n[:, 2]]))[0, 1] > 0.999  # (eta_k / eta_2)^24: the rest ~ 0
    fitted = fitted_weighted(el2n, margin)
    assert _auroc(score, flipped) > 0.999 and _auroc(score, flipped) > _auroc(fitted, flipped) + 0.005
    # power 0: every checkpoint weighted by a_k alone, the loose split and the memorised one blur it
    assert _auroc(separated_weighted(el2n, margin, labels, power=0.0), flipped) < _auroc(score, flipped)


def test_separated_weighted_falls_back_to_fitted_weighted_where_nothing_separates():
    el2n, margin, labels, _ = _planted()
    flat = torch.full_like(el2n, 0.5)
    flat[:, 0] = torch.linspace(0.0, 1.0, len(el2n), dtype=torch.float64)
    none_fitted = torch.full_like(margin, -1.0)  # a_k = 0 everywhere: no weight anywhere
    assert torch.allclose(separated_weighted(flat, none_fitted, labels), fitted_weighted(flat, none_fitted))


def test_component_scores_rank_by_el2n_separated_with_the_labels():
    el2n, margin, labels, flipped = _planted()
    signals = {"el2n": el2n, "margin": margin, "loss": el2n}
    scores = component_scores(signals, [0, 1, 3, 7], labels=labels)
    assert DEFAULT_SCORE == "el2n_separated"
    assert torch.allclose(scores[DEFAULT_SCORE], separated_weighted(el2n, margin, labels))
    assert torch.allclose(component_scores(signals, [0, 1, 3, 7])[DEFAULT_SCORE], separated_weighted(el2n, margin))


def test_recorder_keeps_its_scores_until_a_table_changes():
    from torch import nn
    from torch.utils.data import TensorDataset

    from lightning_influence.analysis.training_signals import TrainingSignalRecorder
    from lightning_influence.core.tensors.data import IndexedData

    torch.manual_seed(3)
    n = 40
    x, y = torch.randn(n, 4), torch.randint(0, 3, (n,))
    model = nn.Linear(4, 3)
    recorder = TrainingSignalRecorder(n, epochs=[0, 1])
    data = IndexedData(TensorDataset(x, y), None, n)
    recorder.record(model, data, 0)
    first = recorder.component_scores()
    assert recorder.component_scores()[DEFAULT_SCORE] is first[DEFAULT_SCORE]  # asked again: not recomputed
    with torch.no_grad():
        model.weight.mul_(3.0)
    recorder.record(model, data, 1)
    second = recorder.scores()
    fresh = component_scores(recorder.signals, recorder.epochs_recorded, labels=recorder.labels)[DEFAULT_SCORE]
    assert second is not first[DEFAULT_SCORE] and torch.equal(second, fresh)
    recorder.signals["el2n"][0, 1] += 1.0  # an in-place write to a table
    assert float(recorder.scores()[0]) != float(second[0])
