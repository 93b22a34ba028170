"""Log directories with broken files for the dashboard's robustness tests, made from a good callback run.

Every case is one run beside a good copy (``good/version_0``), so a test can check both that the broken
file gets a readable message and that everything else still works. Each case says what it breaks.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

#: run name -> what is wrong in it
CASES = {
    "truncated": "epoch=1.json cut to half its length (a copy still in progress); epoch 0 is fine",
    "not_an_object": "epoch=1.json is a JSON list; epoch 0 is fine",
    "no_global_step": "both reports lack global_step and stage (an older or third-party writer)",
    "nan": "epoch=1.json holds NaN losses and an infinite influence (a hand-edited report)",
    "missing_shard": "the score index of epoch 1 lists a .pt shard that is not there (DDP without shared disk)",
    "bad_mislabel": "mislabel_epoch=1.json truncated; mislabel_epoch=0.json is fine",
    "zero_points": "epoch=1.json has no points",
    "mislabel_only": "only mislabel reports, as `lightning-influence mislabel` writes beside a checkpoint",
}


def _edit(path: Path, change) -> None:
    report = json.loads(path.read_text())
    change(report)
    path.write_text(json.dumps(report))  # allow_nan: NaN and Infinity are written as JSON's extensions


def broken_runs(good_run: Path, root: Path) -> Path:
    """``root`` holding ``good/version_0`` (a copy of ``good_run``) and one run per :data:`CASES` entry."""
    for name in ("good", *CASES):
        shutil.copytree(good_run, root / name / "version_0")
    influence = {name: root / name / "version_0" / "influence" for name in CASES}
    text = (influence["truncated"] / "epoch=1.json").read_text()
    (influence["truncated"] / "epoch=1.json").write_text(text[: len(text) // 2])
    (influence["not_an_object"] / "epoch=1.json").write_text("[1, 2, 3]")
    for epoch in (0, 1):
        _edit(influence["no_global_step"] / f"epoch={epoch}.json", lambda r: (r.pop("global_step"), r.pop("stage")))

    def poison(report: dict) -> None:
        report["points"][0]["loss"] = float("nan")
        report["points"][0]["harmful"][0][1] = float("inf")
        report["examples"]["val"][str(report["points"][0]["val_index"])]["loss"] = float("nan")

    _edit(influence["nan"] / "epoch=1.json", poison)
    for shard in influence["missing_shard"].glob("epoch=1-scores*.pt"):
        shard.unlink()
    text = (influence["bad_mislabel"] / "mislabel_epoch=1.json").read_text()
    (influence["bad_mislabel"] / "mislabel_epoch=1.json").write_text(text[: len(text) // 3])
    _edit(influence["zero_points"] / "epoch=1.json", lambda r: (r.__setitem__("points", []),
                                                               r["trust"].__setitem__("points", [])))
    for report in influence["mislabel_only"].glob("epoch=*"):
        report.unlink()
    return root
