"""`lightning-influence` end to end on a tiny checkpoint, and InfluenceCallback configured from LightningCLI YAML."""

from __future__ import annotations

import csv
import dataclasses
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import lightning.pytorch as pl
import pytest
import torch
from helpers.lightning_models import TinyDigitsData, TinyDigitsModel, cross_entropy_loss
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import lightning_influence as li
from lightning_influence import CGConfig, InfluenceCallback, LissaConfig
from lightning_influence.cli import build_parser, main
from lightning_influence.cli.options import INFLUENCE_OPTIONS, MISLABEL_OPTIONS
from lightning_influence.reporting import load_full_scores
from lightning_influence.reporting.export import report_schema

ROOT = Path(__file__).resolve().parents[2]
MODEL = ["--model", "helpers.lightning_models:TinyDigitsModel", "--datamodule", "helpers.lightning_models:TinyDigitsData"]
ANALYSIS = ["--solver", "exact", "--damping", "0.5", "--num-worst", "2", "--top-k", "3"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny.ckpt"
    pl.seed_everything(0)
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(TinyDigitsModel(), datamodule=TinyDigitsData())
    trainer.save_checkpoint(path)
    return path


def _only(directory: Path, pattern: str) -> dict:
    files = sorted(directory.glob(pattern))
    assert len(files) == 1, files
    return json.loads(files[0].read_text())


def test_help_states_the_callback_defaults_and_lists_subcommands():
    defaults = {name: p.default for name, p in inspect.signature(InfluenceCallback).parameters.items()}
    # the mislabel flags: MislabelCallback's arguments (InfluenceCallback's mislabel_* are deprecated, default None)
    defaults["mislabel_rank"] = inspect.signature(li.MislabelCallback).parameters["rank"].default
    for config in (CGConfig(), LissaConfig()):  # solver flags: the solver configs' defaults
        defaults.update({f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name != "tol"})
    # a checkpoint has no training loop to retrain with: the CLI's damping is the functional API's, not "self_check"
    defaults["damping"] = li.config.DEFAULT_DAMPING
    for option in INFLUENCE_OPTIONS + MISLABEL_OPTIONS:
        if option.dest not in ("mislabel_candidates", "tol"):  # the subcommand's own (the callback's 0 means off)
            assert defaults[option.dest] == option.default, option.flag
    text = build_parser().format_help()
    assert all(name in text for name in ("influence", "mislabel", "correct", "verify-loo", "export"))
    assert "positive = harmful" in text
    from lightning_influence.cli.options import SCORING_METHODS as CLI_SCORING
    from lightning_influence.config import SCORING_METHODS

    assert CLI_SCORING is SCORING_METHODS  # one definition: config.py is torch-free, so --help stays fast
    sub = build_parser()._subparsers._group_actions[0].choices["influence"].format_help()
    assert "--damping" in sub and "(default: auto)" in sub and "--config" in sub
    tomllib = pytest.importorskip("tomllib")
    target = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["lightning-influence"]
    assert target == "lightning_influence.cli:main"  # the console script runs the function tested here


def test_influence_subprocess_matches_core_api(checkpoint, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "lightning_influence.cli", "influence", str(checkpoint), *MODEL, *ANALYSIS,
               "--output-dir", str(out), "--table", str(tmp_path / "top.csv"), "--pif-json", str(tmp_path / "pif.json"),
               "--save-scores"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]

    meta = torch.load(checkpoint, map_location="cpu", weights_only=False)
    report = _only(out / "influence", "epoch=[0-9].json")
    jsonschema.validate(report, report_schema("influence"))
    assert (report["epoch"], report["global_step"], report["stage"]) == (meta["epoch"], meta["global_step"], "posthoc")
    assert len(report["points"]) == 2 and report["train_size"] == 200

    # the same numbers as the core API on the restored model (exact solver: deterministic)
    model = TinyDigitsModel.load_from_checkpoint(checkpoint, map_location="cpu").eval()
    data = TinyDigitsData()
    data.setup("fit")
    val_indices = [p["val_index"] for p in report["points"]]
    test_batch = data.val_set[val_indices]
    train = torch.utils.data.DataLoader(data.train_set, batch_size=64)
    top = li.top_influences(model, cross_entropy_loss, train, test_batch, top_k=3, solver="exact", damping=0.5)
    for row, point in enumerate(report["points"]):
        assert [i for i, _ in point["harmful"]] == top.harmful_indices[row].tolist()
        assert [i for i, _ in point["helpful"]] == top.helpful_indices[row].tolist()
        torch.testing.assert_close(torch.tensor([s for _, s in point["harmful"]]), top.harmful_scores[row].float(),
                                   rtol=1e-4, atol=1e-6)

    events = EventAccumulator(str(out), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    assert {f"influence/val_{i}/examples" for i in val_indices} <= set(events.Tags()["images"])
    assert f"influence/val_{val_indices[0]}/table/text_summary" in events.Tags()["tensors"]

    with open(tmp_path / "top.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 * 2 * 3
    for row in rows:
        assert float(row["loss_change_if_removed"]) == pytest.approx(-float(row["influence"]) / 200)
        assert (float(row["influence"]) > 0) == (row["kind"] == "harmful")
    pif = json.loads((tmp_path / "pif.json").read_text())
    assert list(pif) == [str(i) for i in val_indices]
    assert pif[str(val_indices[0])]["harmful"] == [i for i, _ in report["points"][0]["harmful"]]
    full = pif[str(val_indices[0])]["influence"]  # --save-scores: every training example, index = train index
    assert len(full) == 200 and max(full) == pytest.approx(report["points"][0]["harmful"][0][1], rel=1e-5)
    assert sorted(range(200), key=full.__getitem__)[:3] == [i for i, _ in report["points"][0]["helpful"]]
    _, table = load_full_scores(out / "influence" / f"epoch={meta['epoch']}-scores.json")
    torch.testing.assert_close(table[0], torch.tensor(full, dtype=table.dtype))


def test_influence_with_snapshot_checkpoints_averages_like_the_core_api(checkpoint, tmp_path):
    pl.seed_everything(1)
    early = tmp_path / "early.ckpt"  # another point of the run: here the same model at a fresh initialisation
    torch.save({"state_dict": TinyDigitsModel().state_dict()}, early)
    out = tmp_path / "out"
    assert main(["influence", str(checkpoint), *MODEL, *ANALYSIS, "--output-dir", str(out), "--snapshot", str(early),
                 "--quiet"]) == 0
    report = _only(out / "influence", "epoch=[0-9].json")
    assert [s["converged"] for s in report["solver"]["settings"]["snapshots"]] == [True]
    model = TinyDigitsModel.load_from_checkpoint(checkpoint, map_location="cpu").eval()
    snapshot_model = TinyDigitsModel()
    snapshot_model.load_state_dict(torch.load(early)["state_dict"])
    data = TinyDigitsData()
    data.setup("fit")
    test_batch = data.val_set[[p["val_index"] for p in report["points"]]]
    top = li.top_influences(model, cross_entropy_loss, torch.utils.data.DataLoader(data.train_set, batch_size=64),
                            test_batch, top_k=3, solver="exact", damping=0.5,
                            snapshots=[li.take_snapshot(snapshot_model)])
    for row, point in enumerate(report["points"]):
        assert [i for i, _ in point["harmful"]] == top.harmful_indices[row].tolist()
        torch.testing.assert_close(torch.tensor([s for _, s in point["harmful"]]), top.harmful_scores[row].float(),
                                   rtol=1e-4, atol=1e-6)
    assert main(["influence", str(checkpoint), *MODEL, *ANALYSIS, "--output-dir", str(out),
                 "--snapshot", str(tmp_path / "missing.ckpt"), "--quiet"]) == 2  # a usage error, said in one line


def test_cli_writes_what_the_callback_writes(checkpoint, tmp_path, capsys):
    callback = InfluenceCallback(solver="exact", damping=0.5, num_worst=2, top_k=3, mislabel_candidates=5,
                                 mislabel_rank=16, verbose=False)
    trainer = pl.Trainer(accelerator="cpu", logger=TensorBoardLogger(tmp_path, name="validate"),
                         callbacks=[callback], enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(TinyDigitsModel(), datamodule=TinyDigitsData(), ckpt_path=str(checkpoint), weights_only=False)
    from_callback = Path(trainer.logger.log_dir) / "influence"

    out = tmp_path / "cli"
    assert main(["influence", str(checkpoint), *MODEL, *ANALYSIS, "--output-dir", str(out), "--quiet"]) == 0
    assert main(["mislabel", str(checkpoint), *MODEL, "--candidates", "5", "--rank", "16", "--damping", "0.5",
                 "--output-dir", str(out), "--quiet"]) == 0
    a, b = _only(from_callback, "epoch=*.json"), _only(out / "influence", "epoch=*.json")
    assert [p["val_index"] for p in a["points"]] == [p["val_index"] for p in b["points"]]
    for pa, pb in zip(a["points"], b["points"]):
        for kind in ("harmful", "helpful"):
            assert [i for i, _ in pa[kind]] == [i for i, _ in pb[kind]]
            torch.testing.assert_close(torch.tensor([s for _, s in pa[kind]]), torch.tensor([s for _, s in pb[kind]]))
    ma, mb = _only(from_callback, "mislabel_epoch=*.json"), _only(out / "influence", "mislabel_epoch=*.json")
    jsonschema.validate(mb, report_schema("mislabel"))
    # post hoc: no training signals, and the report says what that costs (JSON field and a console line)
    assert mb["ranking"] == "self_influence" and mb["training_signals"]["recorded"] is False
    assert mb["training_signals"]["note"] in capsys.readouterr().out
    assert [c["train_index"] for c in ma["candidates"]] == [c["train_index"] for c in mb["candidates"]]
    scores = [c["self_influence"] for c in mb["candidates"]]
    assert scores == sorted(scores) and all(s < 0 for s in scores)


def _config(tmp_path: Path, callback_args: dict, name: str) -> Path:
    import yaml

    config = {
        "seed_everything": 0,
        "trainer": {
            "max_epochs": 1, "accelerator": "cpu", "enable_progress_bar": False, "enable_model_summary": False,
            "enable_checkpointing": False,
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": str(tmp_path), "name": name}},
            "callbacks": [{"class_path": "lightning_influence.InfluenceCallback", "init_args": callback_args}],
        },
        "model": {"class_path": "helpers.lightning_models.TinyDigitsModel", "init_args": {"channels": 4}},
        "data": {"class_path": "helpers.lightning_models.TinyDigitsData"},
        "ckpt_path": None,  # as in the config.yaml LightningCLI saves beside its logs
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("loss_fn", [None, "helpers.lightning_models.cross_entropy_loss"])
def test_callback_from_lightningcli_yaml(tmp_path, loss_fn):
    args = {"num_worst": 2, "top_k": 4, "damping": 0.5, "verbose": False,
            "solver": {"class_path": "lightning_influence.CGConfig", "init_args": {"max_iter": 50}}}
    if loss_fn:
        args["loss_fn"] = loss_fn
    path = _config(tmp_path, args, "yaml")
    cli = LightningCLI(args=["fit", "--config", str(path)], save_config_callback=None)
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, InfluenceCallback)]
    assert (callback.loss_fn is None) == (loss_fn is None)
    if loss_fn:
        assert callback.loss_fn is cross_entropy_loss
    assert callback.settings.top_k == 4 and callback.damping == 0.5 and callback.solver_config == CGConfig(max_iter=50)
    report = _only(Path(cli.trainer.logger.log_dir) / "influence", "epoch=*.json")
    assert report["stage"] == "fit_end" and len(report["points"]) == 2
    assert all(len(p["harmful"]) == 4 and p["harmful"][0][1] > 0 > p["helpful"][0][1] for p in report["points"])


def test_cli_takes_settings_from_the_config_and_flags_override(checkpoint, tmp_path):
    path = _config(tmp_path, {"num_worst": 3, "top_k": 4, "solver": "exact", "damping": 0.5,
                              "loss_fn": "helpers.lightning_models.cross_entropy_loss"}, "posthoc")
    assert main(["influence", str(checkpoint), "--config", str(path), "--output-dir", str(tmp_path / "a"),
                 "--quiet"]) == 0
    report = _only(tmp_path / "a" / "influence", "epoch=*.json")
    assert len(report["points"]) == 3 and all(len(p["harmful"]) == 4 for p in report["points"])
    assert report["solver"]["solver"] == "exact" and report["solver"]["damping"] == 0.5
    assert main(["influence", str(checkpoint), "--config", str(path), "--top-k", "2", "--output-dir",
                 str(tmp_path / "b"), "--quiet"]) == 0
    assert all(len(p["harmful"]) == 2 for p in _only(tmp_path / "b" / "influence", "epoch=*.json")["points"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["influence", "missing.ckpt", "--model", "helpers.lightning_models:TinyDigitsModel"], "does not exist"),
        (["influence", "{ckpt}"], "--model package.module:ModelClass"),
        (["influence", "{ckpt}", "--model", "helpers.lightning_models:NoSuchModel"], "has no `NoSuchModel`"),
        (["influence", "{ckpt}", *MODEL, "--top-k", "0"], "Expected `top_k` to be a positive int"),
        (["influence", "{ckpt}", *MODEL, "--datamodule-args", "[1]"], "JSON object"),
        (["influence", "{ckpt}", *MODEL, "--solver", "exact", "--table", "out.xlsx"], ".csv or .parquet"),
        (["export", "{ckpt}.json"], "Nothing to export"),
    ],
)
def test_bad_input_gets_a_clear_error(checkpoint, tmp_path, capsys, argv, message):
    argv = [a.replace("{ckpt}", str(checkpoint)) for a in argv]
    assert main(argv + (["--output-dir", str(tmp_path)] if argv[0] == "influence" else [])) == 2
    assert message in capsys.readouterr().err


def test_correct_subcommand_fixes_misclassified_validation_examples(checkpoint, tmp_path):
    out, saved = tmp_path / "correct", tmp_path / "corrected.ckpt"
    argv = ["correct", str(checkpoint), *MODEL, "--solver", "cg", "--damping", "0.5", "--iterations", "3",
            "--examples-per-iteration", "5", "--lr", "0.05", "--heldout-fraction", "0.25", "--output-dir", str(out),
            "--save-checkpoint", str(saved), "--quiet"]
    assert main(argv) == 0
    report = _only(out / "influence", "correct_*.json")
    assert report["selection"] == li.CorrectionConfig.selection and len(report["iterations"]) == 3
    sampled = {i for step in report["iterations"] for i in step["anchor_indices"]}  # validation indices (#27)
    model = TinyDigitsModel.load_from_checkpoint(checkpoint)
    data = TinyDigitsData()
    data.setup("fit")
    x, y = data.val_set.tensors
    with torch.no_grad():
        wrong = set((model(x).argmax(1) != y).nonzero().flatten().tolist())
    held = round(0.25 * len(wrong))
    assert report["before"]["heldout"]["size"] == held  # a quarter of the misclassified slice is held out
    anchors, heldout = report["settings"]["anchor_dataset_indices"], report["settings"]["heldout_dataset_indices"]
    assert report["before"]["anchors"]["size"] == len(anchors) == len(wrong) - held and len(heldout) == held
    assert sampled <= set(anchors) and set(anchors) | set(heldout) == wrong and not set(anchors) & set(heldout)
    assert report["settings"]["damping_requested"] == 0.5 and report["settings"]["damping"] == 0.5
    assert all(step["damping"] == 0.5 and 0 <= step["residual"] < 1 for step in report["iterations"])
    assert report["before"]["anchors"]["accuracy"] == 0.0  # the anchors are misclassified examples
    assert report["after"]["anchors"]["loss"] < report["before"]["anchors"]["loss"]
    corrected = TinyDigitsModel.load_from_checkpoint(saved)  # a loadable checkpoint with the new weights
    assert not torch.equal(corrected.net[0].weight, model.net[0].weight)
    assert main(["correct", str(checkpoint), *MODEL, "--anchor-indices", "999", "--output-dir", str(out)]) == 2


def test_correct_on_its_defaults_searches_the_lr_and_guards_the_rest_of_validation(checkpoint, tmp_path):
    """No --lr: the line search picks one (recorded in the report); the guard is validation outside the slice."""
    out = tmp_path / "defaults"
    parsed = build_parser().parse_args(["correct", str(checkpoint)])
    defaults = li.CorrectionConfig()
    assert (parsed.lr, parsed.optimizer, parsed.guard_per_iteration, parsed.reuse_s_test, parsed.selection) == (
        defaults.lr, defaults.optimizer, defaults.guard_per_iteration, defaults.reuse_s_test, defaults.selection)
    assert parsed.project_replay is defaults.project_replay
    assert parsed.protect_per_step == defaults.protect_per_step
    assert build_parser().parse_args(["correct", str(checkpoint), "--no-project-replay"]).project_replay is False
    argv = ["correct", str(checkpoint), *MODEL, "--solver", "cg", "--damping", "0.5", "--iterations", "2",
            "--output-dir", str(out), "--quiet"]
    assert main(argv) == 0
    settings = _only(out / "influence", "correct_*.json")["settings"]
    assert settings["lr_requested"] == "auto" and settings["lr"] == settings["lr_search"][-1][0]
    assert settings["guard"] == "given" and settings["guard_per_iteration"] == defaults.guard_per_iteration
    assert settings["project_replay"] is defaults.project_replay
    assert settings["protect_per_step"] == defaults.protect_per_step
    with pytest.raises(SystemExit):  # argparse: "expected a positive number or 'auto'"
        build_parser().parse_args(["correct", str(checkpoint), "--lr", "fast"])


def test_verify_loo_subcommand_writes_predicted_and_actual_changes(checkpoint, tmp_path):
    out = tmp_path / "loo"
    argv = ["verify-loo", str(checkpoint), *MODEL, "--num-points", "5", "--steps", "20", "--damping", "0.5",
            "--output-dir", str(out), "--quiet"]
    assert main(argv) == 0
    record = _only(out / "influence", "loo_epoch=*.json")
    assert len(record["train_indices"]) == len(record["actual_loss_change"]) == 5
    n = record["train_size"]
    torch.testing.assert_close(torch.tensor(record["predicted_loss_change"]), -torch.tensor(record["influence"]) / n)
    assert record["pearson"] is not None and -1 <= record["pearson"] <= 1
    # the default point is the highest-loss validation example
    model = TinyDigitsModel.load_from_checkpoint(checkpoint)
    data = TinyDigitsData()
    data.setup("fit")
    x, y = data.val_set.tensors
    with torch.no_grad():
        assert record["val_index"] == int(model.per_example_loss((x, y)).argmax())
    assert main([*argv[:-3], "--val-index", "999", "--output-dir", str(out)]) == 2


def test_the_cli_passes_the_checkpoints_weight_decay_like_the_callback(checkpoint, tmp_path, monkeypatch):
    from lightning_influence.analysis import explain as explain_module
    from lightning_influence.cli.loading import checkpoint_weight_decay

    # TinyDigitsModel trains with SGD(weight_decay=1e-3): the floor of damping="auto" and the trust report's input
    assert checkpoint_weight_decay(torch.load(checkpoint, map_location="cpu", weights_only=False)) == pytest.approx(1e-3)
    assert checkpoint_weight_decay({"state_dict": {}}) is None
    assert checkpoint_weight_decay({"optimizer_states": [{"param_groups": [{"lr": 0.1}]}]}) is None
    seen: dict = {}
    real = explain_module.explain

    def spy(*args, **kwargs):
        seen["setup"] = args[4]  # the ProblemConfig
        return real(*args, **kwargs)

    monkeypatch.setattr(explain_module, "explain", spy)
    assert main(["influence", str(checkpoint), *MODEL, *ANALYSIS, "--output-dir", str(tmp_path), "--quiet"]) == 0
    assert seen["setup"].weight_decay == pytest.approx(1e-3)
