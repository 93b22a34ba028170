"""`lightning-influence ... --config`: every YAML a user has (the docs' one, the config.yaml LightningCLI saves
beside a run), with the solver nested as class_path/init_args or flattened to its fields (#27)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import yaml
from helpers.lightning_models import TinyDigitsData, TinyDigitsModel  # noqa: F401  (imported by class_path)
from lightning.pytorch.cli import LightningCLI

from lightning_influence import CGConfig, LissaConfig
from lightning_influence.cli import main
from lightning_influence.cli.settings import analysis_settings

CALLBACK = {"class_path": "lightning_influence.InfluenceCallback",
            "init_args": {"num_worst": 2, "top_k": 3, "damping": 0.5, "verbose": False, "every_n_epochs": 0,
                          "analyse_on_train_end": False,
                          "solver": {"class_path": "lightning_influence.CGConfig", "init_args": {"max_iter": 40}}}}


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory) -> tuple[Path, Path]:
    """A real `LightningCLI fit` (tiny model, 1 epoch) that saves its own config.yaml and a checkpoint."""
    root = tmp_path_factory.mktemp("lightningcli")
    config = {"seed_everything": 0,
              "trainer": {"max_epochs": 1, "accelerator": "cpu", "enable_progress_bar": False,
                          "enable_model_summary": False, "default_root_dir": str(root),
                          "callbacks": [CALLBACK]},
              "model": {"class_path": "helpers.lightning_models.TinyDigitsModel", "init_args": {"channels": 4}},
              "data": {"class_path": "helpers.lightning_models.TinyDigitsData"}}
    given = root / "given.yaml"
    given.write_text(yaml.safe_dump(config))
    cli = LightningCLI(args=["fit", "--config", str(given)])
    log_dir = Path(cli.trainer.log_dir)
    (checkpoint,) = sorted(log_dir.rglob("*.ckpt"))
    return checkpoint, log_dir / "config.yaml"


def _report(out: Path) -> dict:
    (path,) = sorted((out / "influence").glob("epoch=*.json"))
    return json.loads(path.read_text())


def test_the_config_lightningcli_saved_beside_its_run_drives_the_command(saved_run, tmp_path):
    checkpoint, saved = saved_run
    text = saved.read_text()
    assert "ckpt_path" in text  # a fit subcommand's own arguments are in it (and weights_only on Lightning >= 2.5)
    solver = yaml.safe_load(text)["trainer"]["callbacks"][0]["init_args"]["solver"]
    assert "class_path" not in solver and solver["max_iter"] == 40  # LightningCLI flattens the dataclass
    assert main(["influence", str(checkpoint), "--config", str(saved), "--output-dir", str(tmp_path), "--quiet"]) == 0
    report = _report(tmp_path)
    assert report["solver"]["solver"] == "cg" and report["solver"]["settings"]["max_iter"] == 40
    assert report["solver"]["damping"] == 0.5 and len(report["points"]) == 2
    assert all(len(p["harmful"]) == 3 for p in report["points"])


def test_the_docs_config_with_a_nested_solver_runs_from_the_working_directory(saved_run, tmp_path, monkeypatch):
    """As docs/cli.md writes it: class_path/init_args for the solver, model and data by class_path; the working
    directory is importable for the config's class paths as for `--model` (the console script does not add it)."""
    checkpoint, _ = saved_run
    helpers = Path(__file__).resolve().parents[1]
    config = {"trainer": {"max_epochs": 15, "callbacks": [{
        "class_path": "lightning_influence.InfluenceCallback",
        "init_args": {"num_worst": 2, "top_k": 4, "damping": "auto",
                      "solver": {"class_path": "lightning_influence.LissaConfig",
                                 "init_args": {"depth": 60, "repeats": 2}},
                      "every_n_epochs": 5}},
        {"class_path": "lightning_influence.MislabelCallback", "init_args": {"candidates": 16, "rank": 8}}]},
        "model": {"class_path": "helpers.lightning_models.TinyDigitsModel"},
        "data": {"class_path": "helpers.lightning_models.TinyDigitsData"}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.chdir(helpers)  # `helpers.` resolves from here only through the working directory
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(helpers), os.getcwd())])
    monkeypatch.delitem(sys.modules, "helpers.lightning_models")
    monkeypatch.delitem(sys.modules, "helpers")
    assert main(["influence", str(checkpoint), "--config", str(path), "--output-dir", str(tmp_path / "o"),
                 "--quiet"]) == 0
    report = _report(tmp_path / "o")
    assert report["solver"]["solver"] == "lissa" and report["solver"]["settings"]["depth"] == 60
    assert isinstance(report["solver"]["damping"], float) and len(report["points"]) == 2
    assert main(["mislabel", str(checkpoint), "--config", str(path), "--output-dir", str(tmp_path / "m"),
                 "--quiet"]) == 0  # the MislabelCallback entry gives the candidates and the rank
    (written,) = sorted((tmp_path / "m" / "influence").glob("mislabel_epoch=*.json"))
    mislabel = json.loads(written.read_text())
    assert len(mislabel["candidates"]) == 16 and mislabel["solver"]["settings"]["rank"] == 8


def test_a_config_error_names_the_real_cause(saved_run, tmp_path, capsys):
    checkpoint, _ = saved_run
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"model": {"class_path": "no_such_package.Model"}}))
    assert main(["influence", str(checkpoint), "--config", str(path), "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "No module named 'no_such_package'" in err and "PYTHONPATH" in err and "no `class_path`" not in err
    path.write_text(yaml.safe_dump({"model": {"init_args": {"channels": 4}}}))
    assert main(["influence", str(checkpoint), "--config", str(path), "--output-dir", str(tmp_path)]) == 2
    assert "Pass `--model`" in capsys.readouterr().err


@pytest.mark.parametrize(("solver", "expected"), [
    ({"depth": 30, "repeats": 1, "batch_size": 8, "scale": "auto", "seed": 0, "tol": 0.0,
      "hvp_method": "double_backward", "residual_tol": 0.05, "check_every": 50, "max_retries": 3, "average": True},
     LissaConfig(depth=30, repeats=1, batch_size=8)),
    ({"class_path": "lightning_influence.CGConfig", "init_args": {"max_iter": 7}}, CGConfig(max_iter=7)),
    ({"max_iter": 7}, CGConfig(max_iter=7)),
    ("cg", CGConfig()),
])
def test_solver_entries_in_every_form_a_config_holds(solver, expected):
    assert analysis_settings({"solver": solver}, {}).solver == expected
