"""The callback's outputs as TensorBoard itself serves them: a real server on 127.0.0.1, read over HTTP."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
from helpers.lightning_models import TinyDigitsData, TinyDigitsModel
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_influence import InfluenceCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from tensorboard_server import influence_outputs, running_tensorboard

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_tensorboard_serves_the_influence_images_and_tables(tmp_path):
    pl.seed_everything(0)
    callback = InfluenceCallback(num_worst=2, top_k=4, solver="cg", damping=0.5, max_iter=50,
                                 mislabel_candidates=4, mislabel_rank=8, verbose=False)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=TensorBoardLogger(tmp_path, name="digits"),
                         callbacks=[callback], enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False)
    trainer.fit(TinyDigitsModel(), datamodule=TinyDigitsData())
    val_indices = callback.analysed[-1]["val_indices"]

    with running_tensorboard(tmp_path) as url:
        outputs = influence_outputs(url, expected_image_tags=len(val_indices) + 1)
    (run,) = outputs.runs
    assert run == "digits/version_0"
    expected_images = {f"influence/val_{i}/examples" for i in val_indices} | {"influence/mislabel/examples"}
    assert set(outputs.image_tags[run]) == expected_images
    expected_texts = {f"influence/val_{i}/table" for i in val_indices} | {"influence/summary", "influence/mislabel/table"}
    assert {f"{tag}/text_summary" for tag in expected_texts} <= set(outputs.text_tags[run])  # SummaryWriter's suffix
    assert outputs.image_sample.startswith(PNG_MAGIC) and len(outputs.image_sample) > 1000
    assert outputs.image_step == trainer.global_step
    assert "harmful" in outputs.text_sample.lower() and "<table>" in outputs.text_sample  # markdown rendered to HTML
