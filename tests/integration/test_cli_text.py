"""The BERT text classifier of ``examples/text_classification.py`` (dict batches, a model ``vmap`` cannot trace)
through the command line: a checkpoint after one training step, then ``lightning-influence influence`` and
``mislabel`` with the default analysis settings (LiSSA on Gauss-Newton curvature, damping "auto")."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import lightning.pytorch as pl  # before transformers: importing it first breaks torchvision's operator registration
import pytest

pytest.importorskip("transformers")
# imported by module name from the examples folder: a top-level `examples` package installed by another project
# (kronfluence ships one) would shadow `examples.text_classification`
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

from text_classification import KeywordDataModule, TinyBert  # noqa: E402

from lightning_influence.cli import main  # noqa: E402

DATA_ARGS = '{"n_train": 64, "n_val": 16, "batch_size": 16}'
SOURCE = ["--model", "text_classification:TinyBert",
          "--datamodule", "text_classification:KeywordDataModule", "--datamodule-args", DATA_ARGS]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bert") / "bert.ckpt"
    pl.seed_everything(0)
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(TinyBert(), datamodule=KeywordDataModule(n_train=64, n_val=16, batch_size=16))
    trainer.save_checkpoint(path)
    return path


@pytest.mark.slow  # about 30 s of LiSSA on one core
def test_bert_influence_and_mislabel_through_the_cli_with_defaults(checkpoint, tmp_path):
    out = tmp_path / "out"
    status = main(["influence", str(checkpoint), *SOURCE, "--output-dir", str(out), "--num-worst", "2", "--top-k",
                   "3", "--example-formatter", "text_classification:decode", "--quiet"])
    assert status == 0
    (report_path,) = (out / "influence").glob("epoch=*[0-9].json")
    report = json.loads(report_path.read_text())
    assert report["train_size"] == 64 and len(report["points"]) == 2
    solver = report["solver"]
    assert (solver["solver"], solver["curvature"], solver["damping_requested"]) == ("lissa", "gauss_newton", "auto")
    assert solver["damping"] > 0 and math.isfinite(solver["residual"])
    assert solver["converged"] == (solver["residual"] <= solver["residual_tol"])  # never "converged" beside a miss
    worst = max(p["residual"] for p in report["trust"]["points"])
    assert worst == pytest.approx(solver["residual"], rel=1e-6)
    for point in report["points"]:
        scores = [s for _, s in point["harmful"] + point["helpful"]]
        assert len(scores) == 6 and all(math.isfinite(s) for s in scores)
        assert point["harmful"][0][1] >= point["helpful"][0][1]
        assert report["examples"]["val"][str(point["val_index"])]["text"].startswith("[CLS]")  # the formatter's text

    status = main(["mislabel", str(checkpoint), *SOURCE, "--output-dir", str(out), "--top", "5", "--quiet"])
    assert status == 0
    mislabel = json.loads(next((out / "influence").glob("mislabel_epoch=*.json")).read_text())
    values = [c["self_influence"] for c in mislabel["candidates"]]
    assert len(values) == 5 and all(math.isfinite(v) and v <= 0 for v in values)
    assert mislabel["solver"]["curvature"] == "gauss_newton" and mislabel["solver"]["damping"] > 0


def test_cli_rejects_an_example_formatter_that_does_not_import(checkpoint, tmp_path, capsys):
    status = main(["influence", str(checkpoint), *SOURCE, "--output-dir", str(tmp_path), "--solver", "exact",
                   "--example-formatter", "text_classification:no_such_function", "--quiet"])
    assert status == 2
    assert "no_such_function" in capsys.readouterr().err
