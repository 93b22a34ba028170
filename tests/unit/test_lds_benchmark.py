"""The linear datamodeling score of ``benchmarks/lds.py`` on cases with a known answer (#25)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("benchmarks_lds", ROOT / "benchmarks" / "lds.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["benchmarks_lds"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def _case(seed: int = 0, n: int = 40, subsets: int = 30, tests: int = 5):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(tests, n, generator=g, dtype=torch.float64)
    masks = torch.zeros(subsets, n, dtype=torch.float64)
    for m in range(subsets):
        masks[m, torch.randperm(n, generator=g)[: n // 2]] = 1
    return scores, masks


def test_additive_target_gives_one_and_reversed_gives_minus_one(bench) -> None:
    scores, masks = _case()
    exact = masks @ scores.T  # a linear datamodel: the subset's loss is exactly the sum of kept influences
    assert torch.allclose(bench.lds(scores, masks, exact + 3.0), torch.ones(5, dtype=torch.float64))
    assert torch.allclose(bench.lds(scores, masks, -exact), -torch.ones(5, dtype=torch.float64))
    # any increasing map of the target keeps the ranks: Spearman, not Pearson
    assert torch.allclose(bench.lds(scores, masks, torch.exp(exact)), torch.ones(5, dtype=torch.float64))


def test_sign_convention_positive_is_harmful(bench) -> None:
    """Keeping a harmful example (positive score) must predict a larger loss: flipping the scores flips the LDS."""
    scores, masks = _case(1)
    target = masks @ scores.T + 0.1 * torch.randn(masks.shape[0], scores.shape[0], generator=torch.Generator().manual_seed(2),
                                                  dtype=torch.float64)
    forward = bench.lds(scores, masks, target)
    assert forward.mean() > 0.9
    assert torch.allclose(bench.lds(-scores, masks, target), -forward)


def test_spearman_matches_scipy_with_ties(bench) -> None:
    from scipy.stats import spearmanr

    g = torch.Generator().manual_seed(3)
    a = torch.randint(0, 6, (25, 4), generator=g).double()  # many ties
    b = torch.randn(25, 4, generator=g, dtype=torch.float64)
    ours = bench.spearman_per_column(a, b)
    for col in range(4):
        assert ours[col].item() == pytest.approx(spearmanr(a[:, col], b[:, col]).statistic, abs=1e-12)


def test_bootstrap_interval_brackets_the_mean_and_collapses_on_constants(bench) -> None:
    values = torch.linspace(-0.2, 0.9, 60, dtype=torch.float64)
    low, high = bench.bootstrap_ci(values)
    assert low < float(values.mean()) < high
    assert high - low < 0.2
    assert bench.bootstrap_ci(torch.full((30,), 0.5, dtype=torch.float64)) == pytest.approx((0.5, 0.5))


def test_rule_choice_takes_the_smallest_worst_gap_on_the_choice_models(bench) -> None:
    def model(best: float, rules: dict[str, float]) -> dict:
        entries = {rule: {"lds": rules.get(rule, 0.0)} for rule in bench.RULES}
        return {"best_fixed": {"lds": best}, "rows": {"rules": entries, "default": {"lds": 0.0},
                                                       "cg_default_damping": {"lds": 0.0}}}

    results = {"logreg": model(0.8, {"mean_1": 0.79, "top_0.03": 0.8}),
               "cnn_bn": model(0.6, {"mean_1": 0.59, "top_0.03": 0.3}),
               "tabular_mlp": model(0.7, {"mean_1": 0.65, "top_0.03": 0.7})}
    choice = bench.choose_rule(results, None)
    assert choice["recommended"] == "mean_1"
    assert choice["chosen_on"] == ["logreg", "cnn_bn"] and choice["checked_on"] == ["tabular_mlp"]
    assert choice["recommended_worst_gap_on_checked"] == pytest.approx(0.05)
    assert not choice["recommended_within_0.02_everywhere"]


def test_degrees_of_freedom_rule_solves_its_equation(bench) -> None:
    """With every eigenvalue 1, sum w / (w + d) = P / (1 + d) = f n gives d = P / (f n) - 1."""
    facts = bench.Facts(top=1.0, mean=1.0, weight_decay=0.0, eigenvalues=torch.ones(200, dtype=torch.float64),
                        n_train=1000)
    assert bench.rule_dof(0.1)(facts) == pytest.approx(200 / 100 - 1, rel=1e-6)
    assert bench.rule_dof(0.1)(bench.Facts(top=1.0, mean=1.0, weight_decay=0.0)) is None  # no spectrum, no answer


def test_self_check_rule_takes_the_best_held_out_damping(bench) -> None:
    table = {1e-4: 0.2, 1e-3: 0.5, 3e-3: 0.7, 1e-2: 0.6, 1e-1: 0.1}
    facts = bench.Facts(top=1.0, mean=1.0, weight_decay=0.0, self_check=table)
    assert bench.RULES["self_check"](facts) == 3e-3
    assert bench.RULES["self_check_coarse"](facts) == 1e-2  # 3e-3 is not a decade


def test_trak_on_dict_batches_matches_trak_on_tuples(bench, tmp_path) -> None:
    """The text model's TRAK path (dict batches, traker's per-example loop) gives the scores of traker's own vmapped
    path on the same weights fed as tuples: the margin, its loss weighting and the batch order are right."""
    pytest.importorskip("trak")
    from torch import nn

    class DictLinear(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, batch: dict) -> torch.Tensor:
            return self.lin(batch["x"])

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 4, generator=g), torch.randint(0, 3, (24,), generator=g)
    states = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        states.append(nn.Linear(4, 3).state_dict())

    def spec(build):
        return bench.Spec(None, build, bench.ce_loss, "adam", 1e-3, 1, 8, 20, 4)

    tuples = bench.trak_scores(spec(lambda: nn.Linear(4, 3)), states, (x[:20], y[:20]), (x[20:], y[20:]),
                               str(tmp_path / "tuples"))
    dicts = bench.trak_scores(spec(DictLinear), [{f"lin.{k}": v for k, v in s.items()} for s in states],
                              {"x": x[:20], "labels": y[:20]}, {"x": x[20:], "labels": y[20:]}, str(tmp_path / "dicts"))
    assert set(dicts) == {"trak_1", "trak_2"} and dicts["trak_2"].shape == (4, 20)
    for key in dicts:
        assert torch.allclose(dicts[key], tuples[key], rtol=1e-4, atol=1e-6)
        assert dicts[key].abs().max() > 0


def test_snapshot_study_merge_adds_new_fields_and_refuses_disagreeing_runs() -> None:
    spec = importlib.util.spec_from_file_location("benchmarks_lds_snapshots", ROOT / "benchmarks" / "lds_snapshots.py")
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    mine = {"m": {"rules": {"decades/final/K3": {"lds": 0.5}},
                  "schedules": {"3": {"lds": {"0.1": 0.5}}, "8": {"lds": {"0.1": 0.4}}}}}
    other = {"m": {"rules": {"decades/final/K3": {"lds": 0.5}, "decades/final_scaled/K3": {"lds": 0.6}},
                   "schedules": {"3": {"lds": {"0.1": 0.9}, "lds_scaled": {"0.1": 0.6}}}},
             "n": {"rules": {}, "schedules": {}}}
    study.merge(mine, other)
    assert mine["m"]["rules"]["decades/final_scaled/K3"] == {"lds": 0.6} and "n" in mine
    assert mine["m"]["schedules"]["3"] == {"lds": {"0.1": 0.5}, "lds_scaled": {"0.1": 0.6}}  # kept, then added
    assert mine["m"]["schedules"]["8"] == {"lds": {"0.1": 0.4}}
    with pytest.raises(AssertionError):
        study.merge(mine, {"m": {"rules": {"decades/final/K3": {"lds": 0.7}}, "schedules": {}}})


def test_rule_choice_without_any_choice_model_lets_the_check_models_decide(bench) -> None:
    """``--quick --models tiny_bert``: no choice model ran, so every rule ties and the check models pick."""
    entries = {rule: {"lds": 0.5} for rule in bench.RULES}
    entries["mean_1"] = {"lds": 0.69}
    results = {"tabular_mlp": {"best_fixed": {"lds": 0.7}, "rows": {"rules": entries, "default": {"lds": 0.0},
                                                                    "cg_default_damping": {"lds": 0.0}}}}
    choice = bench.choose_rule(results, None)
    assert choice["recommended"] == "mean_1" and choice["recommended_worst_gap_on_checked"] == pytest.approx(0.01)
