"""Configs validate once, where they are built; each entry point accepts a config object or a name."""

from __future__ import annotations

import dataclasses

import pytest

import lightning_influence as li
from lightning_influence.config import (
    CALLBACK_DAMPING,
    DEFAULT_DAMPING,
    CorrectionConfig,
    ExplainConfig,
    config_to_dict,
    solver_config,
    solver_name,
)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"top_k": 0}, "`top_k` to be a positive int"),
        ({"val_indices": (3, 3)}, "`val_indices` to be free of duplicates"),
        ({"val_indices": ()}, "`val_indices` to be a non-empty list"),
        ({"scoring": "fast"}, "`scoring` to be 'auto'"),
        ({"num_candidates": 0}, "`num_candidates` to be None or a positive int"),
        ({"knn_backend": "annoy"}, "`knn_backend` to be one of"),
        ({"feature_fn": "pixels"}, "`feature_fn` to be None"),
        ({"feature_fn": "last_layer_grad", "knn_backend": "faiss"}, "FAISS cannot index"),
    ],
)
def test_explain_config_rejects_bad_values_with_the_argument_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ExplainConfig(**kwargs)


def test_correction_config_validates_its_budget_and_selection():
    with pytest.raises(ValueError, match="`selection` to be one of"):
        CorrectionConfig(selection="best")
    with pytest.raises(ValueError, match="`examples_per_iteration` to be a positive int"):
        CorrectionConfig(examples_per_iteration=0)
    assert CorrectionConfig(num_candidates=5).num_candidates == 5
    assert CorrectionConfig().lr == "auto" and CorrectionConfig(lr=0.5).lr == 0.5
    for bad in (0, -1.0, "fast", True):
        with pytest.raises(ValueError, match="`lr` to be a positive number or 'auto'"):
            CorrectionConfig(lr=bad)
    with pytest.raises(ValueError, match="`guard_per_iteration` to be an int >= 0"):
        CorrectionConfig(guard_per_iteration=-1)
    with pytest.raises(ValueError, match="`reuse_s_test` to be a bool"):
        CorrectionConfig(reuse_s_test=1)
    assert CorrectionConfig().project_replay is True
    with pytest.raises(ValueError, match="`project_replay` to be a bool"):
        CorrectionConfig(project_replay="yes")
    assert CorrectionConfig().protect_per_step == 10
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="`protect_per_step` to be an int >= 0"):
            CorrectionConfig(protect_per_step=bad)


def test_a_solver_is_a_config_object_or_a_name_with_options():
    config = li.LissaConfig(depth=7, repeats=2)
    assert solver_config(config) is config
    assert solver_config("lissa", {"depth": 7, "repeats": 2}) == config
    assert solver_name(config) == "lissa" and solver_name(li.CGConfig()) == "cg"
    with pytest.raises(TypeError, match="set them on the config"):
        solver_config(config, {"depth": 3})
    with pytest.raises(TypeError, match="Unexpected option"):
        solver_config("cg", {"depth": 3})
    assert config_to_dict(li.CGConfig(max_iter=5)) == dataclasses.asdict(li.CGConfig(max_iter=5))


def test_the_functional_api_takes_a_solver_config(tiny_problem):
    model, loss_fn, loader, test = tiny_problem
    by_object = li.s_test(model, loss_fn, loader, test, solver=li.CGConfig(max_iter=50), damping=0.5)
    by_name = li.s_test(model, loss_fn, loader, test, solver="cg", damping=0.5, max_iter=50)
    assert by_object.info.solver == "cg" and by_object.info.iterations == by_name.info.iterations
    assert (by_object.vectors == by_name.vectors).all()


def test_each_default_is_defined_once_and_read_by_every_entry_point():
    import inspect

    from lightning_influence.callbacks.influence import InfluenceCallback
    from lightning_influence.correct import correct_errors

    for function in (li.s_test, li.influence, li.top_influences, correct_errors):
        assert inspect.signature(function).parameters["damping"].default == DEFAULT_DAMPING, function
    # the callback can retrain with the training's optimiser: its damping is the self-check's
    assert inspect.signature(InfluenceCallback).parameters["damping"].default == CALLBACK_DAMPING


#: The start of every rejection of a bad ``num_candidates``, whichever entry point got it.
NUM_CANDIDATES_TYPE = r"Expected `num_candidates` to be None or a positive int \(the nearest training examples"


@pytest.mark.parametrize("bad", [0, -1, True, 2.5, "10"])
def test_num_candidates_has_one_check_that_says_what_to_pass(bad):
    from lightning_influence.config import check_num_candidates

    with pytest.raises(ValueError, match=NUM_CANDIDATES_TYPE) as raised:
        check_num_candidates(bad)
    assert f"but got {bad!r}." in str(raised.value) and "num_candidates=None to score every" in str(raised.value)
    for config in (ExplainConfig, CorrectionConfig):  # the configs run the same check when built
        with pytest.raises(ValueError, match=NUM_CANDIDATES_TYPE):
            config(num_candidates=bad)


def test_num_candidates_is_bounded_by_the_training_set_once_it_is_known():
    from lightning_influence.config import check_num_candidates

    assert check_num_candidates(None) is None and check_num_candidates(7) == 7
    assert check_num_candidates(7, n_train=7) == 7 and check_num_candidates(None, n_train=3) is None
    with pytest.raises(ValueError, match=r"`num_candidates` to be at most the training-set size 6, but got 7\."
                                         r" Pass a smaller count, or num_candidates=None"):
        check_num_candidates(7, n_train=6)


def test_num_candidates_is_checked_by_one_function_only():
    """No second definition of the check: every module that validates ``num_candidates`` calls the config's."""
    import pathlib
    import re

    package = pathlib.Path(li.__file__).parent
    checks = [path.relative_to(package).as_posix() for path in package.rglob("*.py")
              if re.search(r"^def check\w*candidates\(", path.read_text(encoding="utf-8"), re.MULTILINE)]
    assert checks == ["config/analysis.py"]
