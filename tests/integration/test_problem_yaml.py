"""One ProblemConfig for the callback from LightningCLI YAML (class_path/init_args, the solver nested in it), and
MislabelCallback configured the same way."""

from __future__ import annotations

from pathlib import Path

import yaml
from lightning.pytorch.cli import LightningCLI

from lightning_influence import CGConfig, InfluenceCallback, MislabelCallback, ProblemConfig


def _config(tmp_path: Path, callbacks: list) -> Path:
    config = {
        "seed_everything": 0,
        "trainer": {
            "max_epochs": 1, "accelerator": "cpu", "enable_progress_bar": False, "enable_model_summary": False,
            "enable_checkpointing": False, "callbacks": callbacks,
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": str(tmp_path), "name": "yaml"}},
        },
        "model": {"class_path": "helpers.lightning_models.TinyDigitsModel", "init_args": {"channels": 4}},
        "data": {"class_path": "helpers.lightning_models.TinyDigitsData"},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_problem_config_from_lightningcli_yaml(tmp_path):
    problem = {"class_path": "lightning_influence.ProblemConfig",
               "init_args": {"solver": {"class_path": "lightning_influence.CGConfig", "init_args": {"max_iter": 50}},
                             "damping": 0.5, "parameters": ["net.3"]}}
    callbacks = [{"class_path": "lightning_influence.InfluenceCallback",
                  "init_args": {"num_worst": 2, "top_k": 3, "verbose": False, "problem": problem}},
                 {"class_path": "lightning_influence.MislabelCallback",
                  "init_args": {"candidates": 5, "rank": 4, "verbose": False, "problem": problem}}]
    cli = LightningCLI(args=["fit", "--config", str(_config(tmp_path, callbacks))], save_config_callback=None)
    (influence,) = [c for c in cli.trainer.callbacks if isinstance(c, InfluenceCallback)]
    (mislabel,) = [c for c in cli.trainer.callbacks if isinstance(c, MislabelCallback)]
    expected = ProblemConfig(solver=CGConfig(max_iter=50), damping=0.5, parameters=("net.3",))
    assert influence.problem == expected and mislabel.problem == expected
    assert influence.last_explanation.solver.damping == 0.5 and influence.last_explanation.solver.solver == "cg"
    assert mislabel.last_report is not None and len(mislabel.last_report.candidates) == 5


def test_the_command_line_reads_the_callbacks_problem_config_and_flags_override_it():
    from lightning_influence.cli.settings import analysis_settings

    problem = {"class_path": "lightning_influence.ProblemConfig",
               "init_args": {"solver": {"class_path": "lightning_influence.CGConfig", "init_args": {"max_iter": 50}},
                             "damping": 0.5, "parameters": ["net.3"], "weight_decay": 0.01}}
    settings = analysis_settings({"num_worst": 2, "problem": problem}, {})
    assert settings.problem(weight_decay=1e-3) == ProblemConfig(solver=CGConfig(max_iter=50), damping=0.5,
                                                                parameters=("net.3",), weight_decay=0.01)
    saved = analysis_settings({"problem": {"solver": "exact", "damping": "auto", "parameters": None}}, {"damping": 0.2})
    assert saved.problem(weight_decay=1e-3) == ProblemConfig(solver="exact", damping=0.2, weight_decay=1e-3)


def test_the_command_lines_help_imports_no_torch():
    import subprocess
    import sys

    code = ("import sys; from lightning_influence.cli import build_parser; build_parser().format_help();"
            " print(sorted(m for m in ('torch', 'lightning') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"  # --help answers without the seconds that importing torch costs
