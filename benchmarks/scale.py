#!/usr/bin/env python
"""Cost of the callback's analysis at the sizes users train: growth in the training-set size N and the model size P.

For each configuration (a model, a training-set size N) a child process trains the model for one epoch under
Lightning with the callbacks attached as ``examples/digits.py`` attaches them (``InfluenceCallback()`` with its
defaults: 8 monitored points, LiSSA, Gauss-Newton, ``damping="auto"``; ``MislabelCallback(candidates=32,
rank=16)``), on generated data shaped like what users train:

* ``mlp``: a 64-64-64-10 tanh MLP (about 9k parameters) on 64 generated features, batch 64;
* ``cnn``: a ResNet-style CNN with BatchNorm (three stages of a strided convolution and a residual block, widths
  32-64-128, then a 256-unit dense layer: about 1.0M parameters) on generated 32x32x3 images, batch 128;
* ``bert``: the tiny BERT of ``examples/text_classification.py`` (2 layers, hidden size 32) on the same keyword
  task with sequences of up to 128 tokens instead of 16, batch 32.

Per run it records (process CPU seconds, one thread: other jobs on a shared machine do not inflate them):
``epoch_seconds`` (the training epoch, its 512-example validation included), ``analysis_seconds`` (the
training-signal recording plus everything the callbacks do when training ends), each stage's share (exclusive
times: a nested stage is not counted in its parent), the peak resident memory of training and of the analysis
(``VmHWM``, reset between the two), the report files' sizes, the dashboard's load time for the report, and, in
the same process after the callback, Kronfluence's EK-FAC fit and scores of the same 8 points. A configuration
whose estimate exceeds ``--limit`` seconds is not run: its row holds the extrapolation from the smaller runs of
the same model (``"measured": false``, with how it was made).

Usage::

    python benchmarks/scale.py                    # every configuration; writes benchmarks/scale-results.json
    python benchmarks/scale.py --configs mlp:1000 --json /tmp/out.json
    python benchmarks/scale.py --derive           # add the checks of issue #29 to the results file
    python benchmarks/scale.py --plot docs/images/scale.png
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).with_name("scale-results.json")
CONFIGS = ("mlp:1000", "mlp:10000", "mlp:50000", "cnn:1000", "cnn:10000", "cnn:50000",
           "bert:1000", "bert:10000", "bert:50000")
NUM_VAL = 512
#: A file each timed stage appends ``key seconds peak_mib`` to when it ends (``SCALE_STAGE_LOG``; unset: none).
STAGE_LOG = os.environ.get("SCALE_STAGE_LOG")
#: CPU seconds of analysis after which a child stops at the next timed stage and records what it measured so far
#: (``--stop-after``; the row is then ``"partial": true``, its analysis time a lower bound).
STOP_AFTER = float(os.environ.get("SCALE_STOP_AFTER") or 0.0)
#: The callbacks' ``damping`` when ``--damping`` overrides their default (a deviation, recorded in the row).
DAMPING = os.environ.get("SCALE_DAMPING")
#: LiSSA without its conjugate-gradient finish (``--no-refine``: a deviation, recorded in the row): on the CNN each
#: of its iterations is a pass of curvature products over the whole training set, tens of epochs in all.
NO_REFINE = bool(os.environ.get("SCALE_NO_REFINE"))


class StopAnalysis(BaseException):
    """Raised at a timed stage once the analysis has used ``STOP_AFTER`` CPU seconds (not an ``Exception``: no
    ``except Exception`` in the callbacks turns it into a warning)."""
SEQUENCE_LENGTH = 128


# -- data and models ---------------------------------------------------------------------------------------
import torch  # noqa: E402 - after the thread settings above
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import StackDataset, TensorDataset  # noqa: E402


def make_data(kind: str, n: int, seed: int) -> Any:
    """``n`` generated examples: class means plus noise (features or 32x32x3 images), 5% of labels redrawn."""
    if kind == "bert":
        return keyword_sequences(n, seed)
    g = torch.Generator().manual_seed(seed)
    shape = (64,) if kind == "mlp" else (3, 32, 32)
    means = torch.randn((10, *shape), generator=torch.Generator().manual_seed(1234))
    y = torch.randint(0, 10, (n,), generator=g)
    x = torch.randn((n, *shape), generator=g) + 0.5 * means[y]
    flip = torch.rand(n, generator=g) < 0.05
    y[flip] = torch.randint(0, 10, (int(flip.sum()),), generator=g)
    return TensorDataset(x, y)


def keyword_sequences(n: int, seed: int) -> Any:
    """examples/text_classification.py's keyword task (label 1 iff a keyword token occurs, 5% flipped) with
    sequences of 32-128 tokens, as dict batches."""
    g = torch.Generator().manual_seed(seed)
    keywords = torch.tensor([2, 3, 4, 5])
    lengths = torch.randint(32, SEQUENCE_LENGTH + 1, (n,), generator=g)
    ids = torch.randint(6, 64, (n, SEQUENCE_LENGTH), generator=g)
    labels = (torch.rand(n, generator=g) < 0.5).long()
    rows, where = torch.arange(n), (torch.rand(n, generator=g) * (lengths - 1)).long() + 1
    ids[rows, where] = torch.where(labels == 1, keywords[torch.randint(0, 4, (n,), generator=g)], ids[rows, where])
    ids[:, 0] = 1
    mask = (torch.arange(SEQUENCE_LENGTH)[None, :] < lengths[:, None]).long()
    flip = torch.rand(n, generator=g) < 0.05
    labels[flip] = 1 - labels[flip]
    return StackDataset(input_ids=ids.masked_fill(mask == 0, 0), attention_mask=mask, labels=labels)


class Residual(nn.Module):
    """Two 3x3 convolutions with BatchNorm and an identity shortcut (a ResNet basic block)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                                  nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.body(x))


def make_net(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
    if kind == "cnn":
        def stage(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1, stride=2, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
                    Residual(c_out)]
        return nn.Sequential(*stage(3, 32), *stage(32, 64), *stage(64, 128), nn.Flatten(),
                             nn.Linear(128 * 16, 256), nn.ReLU(), nn.Linear(256, 10))
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=SEQUENCE_LENGTH, num_labels=2, pad_token_id=0)
    return BertForSequenceClassification(config)


def logits_of(net: nn.Module, batch: Any) -> torch.Tensor:
    """Logits of a dict batch (the BERT), of a ``(x, y)`` batch, or of inputs alone (as ``describe_batch`` calls)."""
    if isinstance(batch, torch.Tensor):
        return net(batch)
    if isinstance(batch, dict):
        return net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return net(batch[0])


def labels_of(batch: Any) -> torch.Tensor:
    return batch["labels"] if isinstance(batch, dict) else batch[1]


def per_example_loss(net: nn.Module, batch: Any) -> torch.Tensor:
    return F.cross_entropy(logits_of(net, batch), labels_of(batch), reduction="none")


def signals_outputs(module: Any, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    return module(batch), labels_of(batch)


BATCH_SIZES = {"mlp": 64, "cnn": 128, "bert": 32}


def lightning_module(kind: str) -> Any:
    import lightning.pytorch as pl

    class Model(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_net(kind)

        def forward(self, batch: Any) -> torch.Tensor:
            return logits_of(self.net, batch)

        def per_example_loss(self, batch: Any) -> torch.Tensor:
            return per_example_loss(self.net, batch)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.per_example_loss(batch).mean()

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            self.log("val/loss", self.per_example_loss(batch).mean())

        def configure_optimizers(self) -> Any:
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    return Model()


# -- measuring: CPU clocks per stage, resident memory ------------------------------------------------------
#: Where the child trains and analyses: "cpu" (process CPU seconds) or "cuda" (wall seconds, synchronised).
DEVICE = "cpu"


def clock() -> float:
    """Process CPU seconds on the CPU; on CUDA, wall seconds after the device's queued work has finished."""
    if DEVICE == "cuda":
        torch.cuda.synchronize()
        return time.perf_counter()
    return time.process_time()


def cuda_peak_mib(reset: bool) -> float | None:
    """The CUDA allocator's peak since the last reset (then reset), or None off CUDA."""
    if DEVICE != "cuda":
        return None
    peak = torch.cuda.max_memory_allocated() / 2**20
    if reset:
        torch.cuda.reset_peak_memory_stats()
    return peak


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def reset_peak(collect: bool = True) -> None:
    """Reset the resident high-water mark (Linux) so the next ``VmHWM`` is this section's own."""
    import gc

    if collect:
        gc.collect()
    Path("/proc/self/clear_refs").write_text("5")


class Stages:
    """Exclusive process-CPU seconds of wrapped functions, keyed by the path of wrapped callers
    (``recursion/damping_estimate``): a nested wrapped call is counted under its own key only. ``peak_mib`` is each
    key's highest resident high-water mark read when one of its calls ends (the mark is reset after each reading,
    so a reading covers the time since the previous one); ``highest_kib`` is the highest reading of all."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.peak_mib: dict[str, float] = {}
        self.highest_kib = 0
        self.stack: list[list[Any]] = []
        self.analysis_start: float | None = None

    def read_peak(self) -> int:
        """The high-water mark since the last reading (then reset), folded into ``highest_kib``."""
        hwm = status_kib("VmHWM")
        reset_peak(collect=False)
        self.highest_kib = max(self.highest_kib, hwm)
        return hwm

    def wrap(self, owner: Any, name: str, stage: str, prop: bool = False) -> None:
        original = getattr(owner, name) if not prop else owner.__dict__[name]
        function = original.fget if prop else original
        stages = self

        def timed(*args: Any, **kwargs: Any) -> Any:
            if STOP_AFTER and stages.analysis_start is not None and clock() - stages.analysis_start > STOP_AFTER:
                raise StopAnalysis(stage)
            frame = [stage, clock(), 0.0]
            stages.stack.append(frame)
            try:
                return function(*args, **kwargs)
            finally:
                stages.stack.pop()
                spent = clock() - frame[1]
                path = [f[0] for f in stages.stack] + [stage]
                key = "/".join(name for i, name in enumerate(path) if i == 0 or path[i - 1] != name)
                stages.seconds[key] = stages.seconds.get(key, 0.0) + spent - frame[2]
                stages.peak_mib[key] = max(stages.peak_mib.get(key, 0.0), stages.read_peak() / 1024)
                if stages.stack:
                    stages.stack[-1][2] += spent
                if STAGE_LOG:  # a progress trail that outlives a child stopped at the wall-time limit
                    with open(STAGE_LOG, "a") as log:
                        log.write(f"{key} {spent:.3f} {stages.peak_mib[key]:.1f}\n")

        setattr(owner, name, property(timed) if prop else timed)


def instrument() -> Stages:
    """Time the analysis' stages (the explain pipeline, its damping and scale estimates, the stored Jacobian, the
    mislabel analysis, the training-signal recording, the report writing) in CPU seconds."""
    from lightning_influence.analysis import explain, mislabel, training_signals
    from lightning_influence.callbacks import _damping_check as callback_damping_check
    from lightning_influence.callbacks import influence as influence_callback
    from lightning_influence.callbacks import mislabel as mislabel_callback
    from lightning_influence.core.curvature import training
    from lightning_influence.core.problem import InfluenceProblem
    from lightning_influence.core.solvers.lissa import LissaSolver
    from lightning_influence.core.solvers.lowrank import LowRankSolver

    stages = Stages()
    stages.wrap(explain, "_monitored_points", "select")
    stages.wrap(explain, "solve_s_test_with_halves", "recursion")
    stages.wrap(explain, "_score", "scoring")
    stages.wrap(explain, "_diagnose_safely", "trust")
    stages.wrap(explain, "_explained_points", "describe")
    stages.wrap(InfluenceProblem, "damping_choice", "damping_estimate")
    stages.wrap(InfluenceProblem, "residual", "residual")
    stages.wrap(InfluenceProblem, "check_residual", "stop_check")  # LiSSA's early-stop checks on the check subset
    stages.wrap(InfluenceProblem, "damped_hvp", "whole_set_product")  # CG's products: a pass over every example
    stages.wrap(callback_damping_check, "run_damping_check", "self_check")
    stages.wrap(callback_damping_check, "retrain_on_halves", "retraining")  # imported by name there
    stages.wrap(callback_damping_check, "check_damping", "candidates")
    stages.wrap(LissaSolver, "scale", "scale", prop=True)
    stages.wrap(training, "build_output_jacobian", "stored_jacobian")
    stages.wrap(mislabel, "self_influence_shard", "self_influence")
    stages.wrap(LowRankSolver, "inverse", "lanczos")
    stages.wrap(InfluenceProblem, "gradients", "per_example_gradients")
    stages.wrap(mislabel, "find_mislabel_candidates", "mislabel_other")
    stages.wrap(training_signals.TrainingSignalRecorder, "record", "training_signals")
    stages.wrap(influence_callback, "publish_explanation", "report_writing")
    stages.wrap(influence_callback, "publish_mislabel", "report_writing")
    stages.wrap(mislabel_callback, "publish_mislabel", "report_writing")
    return stages


# -- one configuration (child process) ---------------------------------------------------------------------
def run_one(kind: str, n: int, ekfac: bool, workdir: Path,  # long: one fit, timed in phases
            lissa_depth: int | None = None) -> dict[str, Any]:
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger
    from torch.utils.data import DataLoader

    from lightning_influence import InfluenceCallback, LissaConfig, MislabelCallback

    torch.set_num_threads(1)
    stages = instrument()

    def terminated(signum: int, frame: Any) -> None:  # SIGTERM: record what was measured so far, as --stop-after
        raise StopAnalysis("terminated by SIGTERM")

    signal.signal(signal.SIGTERM, terminated)
    train, val = make_data(kind, n, 0), make_data(kind, NUM_VAL, 1)
    batch = BATCH_SIZES[kind]
    loaders = (DataLoader(train, batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(0)),
               DataLoader(val, batch_size=256))
    model = lightning_module(kind)
    marks: dict[str, float] = {}

    class Marks(pl.Callback):
        def __init__(self, first: bool) -> None:
            self.first = first

        def on_train_epoch_start(self, trainer: Any, module: Any) -> None:
            if self.first:
                marks["epoch_start"] = clock()

        def on_train_epoch_end(self, trainer: Any, module: Any) -> None:
            if self.first:
                marks["epoch_end"] = clock()
                marks["train_hwm_kib"] = status_kib("VmHWM")
                marks["train_cuda_mib"] = cuda_peak_mib(reset=True)
                reset_peak()
                stages.highest_kib = 0
                marks["analysis_start"] = clock()
                stages.analysis_start = marks["analysis_start"]

        def on_train_end(self, trainer: Any, module: Any) -> None:
            if not self.first:
                marks["analysis_end"] = clock()
                marks["analysis_cuda_mib"] = cuda_peak_mib(reset=True)
                marks["analysis_hwm_kib"] = max(stages.read_peak(), stages.highest_kib)

    solver: dict[str, Any] = {}
    if lissa_depth is not None or NO_REFINE:
        solver["solver"] = LissaConfig(depth=lissa_depth or LissaConfig().depth, refine=not NO_REFINE)
    if DAMPING:
        solver["damping"] = DAMPING if DAMPING in ("auto", "self_check") else float(DAMPING)
    callbacks = [Marks(True), InfluenceCallback(verbose=False, strict=True, **solver),
                 MislabelCallback(candidates=32, rank=16, signals_outputs_fn=signals_outputs, verbose=False,
                                 strict=True),  # its own default damping: "auto"
                 Marks(False)]
    logger = TensorBoardLogger(str(workdir), name="run")
    trainer = pl.Trainer(max_epochs=1, accelerator="gpu" if DEVICE == "cuda" else "cpu", devices=1, logger=logger,
                         callbacks=callbacks, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    reset_peak()
    marks["base_rss_kib"] = status_kib("VmRSS")
    try:
        trainer.fit(model, *loaders)
    except StopAnalysis as stop:
        return {"model": kind, "n_train": n, "params": sum(p.numel() for p in model.parameters() if p.requires_grad),
                "batch_size": batch, "measured": False, "partial": True, "device": DEVICE,
                "damping_setting": DAMPING or "default", "lissa_depth": lissa_depth or LissaConfig().depth,
                "note": (f"stopped by SIGTERM ({stop.args[0]})" if "SIGTERM" in str(stop.args[0]) else
                         f"stopped after {STOP_AFTER:.0f} CPU s of analysis, at the start of stage {stop.args[0]!r}")
                        + ": analysis_seconds is a lower bound",
                "epoch_seconds": marks["epoch_end"] - marks["epoch_start"],
                "analysis_seconds": clock() - marks["analysis_start"],
                "stages": {k: round(v, 3) for k, v in sorted(stages.seconds.items())},
                "stage_peak_rss_mib": {k: round(v, 1) for k, v in sorted(stages.peak_mib.items())},
                "base_rss_mib": marks["base_rss_kib"] / 1024, "train_peak_rss_mib": marks["train_hwm_kib"] / 1024,
                "analysis_peak_rss_mib": max(stages.read_peak(), stages.highest_kib) / 1024}
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    influence_dir = Path(logger.log_dir) / "influence"
    files = {f.name: f.stat().st_size for f in sorted(influence_dir.iterdir()) if f.is_file()}
    report = json.loads((influence_dir / "epoch=0.json").read_text())
    row: dict[str, Any] = {
        "model": kind, "n_train": n, "params": params, "batch_size": batch, "measured": True, "device": DEVICE,
        "train_cuda_peak_mib": marks.get("train_cuda_mib"), "analysis_cuda_peak_mib": marks.get("analysis_cuda_mib"),
        "lissa_depth": lissa_depth or LissaConfig().depth, "damping_setting": DAMPING or "default",
        "epoch_seconds": marks["epoch_end"] - marks["epoch_start"],
        "analysis_seconds": marks["analysis_end"] - marks["analysis_start"],
        "stages": {k: round(v, 3) for k, v in sorted(stages.seconds.items())},
        "stage_peak_rss_mib": {k: round(v, 1) for k, v in sorted(stages.peak_mib.items())},
        "base_rss_mib": marks["base_rss_kib"] / 1024, "train_peak_rss_mib": marks["train_hwm_kib"] / 1024,
        "analysis_peak_rss_mib": marks["analysis_hwm_kib"] / 1024,
        "report_files_bytes": files, "report_bytes": files.get("epoch=0.json", 0),
        "mislabel_report_bytes": files.get("mislabel_epoch=0.json", 0),
        "damping": report["solver"].get("damping"), "converged": report["solver"].get("converged"),
        "residual": report["solver"].get("residual"),
        "lissa_steps": report["solver"].get("iterations"), "lissa_retries": len(report["solver"].get("retries") or ()),
        "damping_rule": report["solver"].get("damping_rule"),
        "stored_jacobian_built": any(k.endswith("stored_jacobian") for k in stages.seconds),
        "lissa_refine": not NO_REFINE, "residual_estimate": report["solver"]["settings"].get("residual_estimate"),
    }
    mislabel_report = influence_dir / "mislabel_epoch=0.json"
    if mislabel_report.exists():
        signals = json.loads(mislabel_report.read_text()).get("training_signals") or {}
        row["self_influence_examples"] = signals.get("self_influence_examples")
    row["dashboard_load_seconds"] = dashboard_load(workdir)
    if ekfac:
        val_indices = [p["val_index"] for p in report["points"]]
        row.update(ekfac_cost(kind, model.net, train, torch.utils.data.Subset(val, val_indices), workdir))
    return row


def dashboard_load(workdir: Path) -> float:
    """Wall seconds for a fresh dashboard reader to list the runs and open the report's first page, one point's
    lists and the mislabel page (what the Influence tab loads first)."""
    from lightning_influence.dashboard.data import InfluenceData

    start = time.perf_counter()
    data = InfluenceData(workdir)
    runs = data.runs()["runs"]
    run = runs[0]["run"]
    page = data.points(run, 0)
    data.point(run, 0, page["points"][0]["val_index"])
    data.mislabel(run, 0)
    return time.perf_counter() - start


def ekfac_cost(kind: str, net: nn.Module, train: Any, test: Any, workdir: Path) -> dict[str, Any]:
    """Kronfluence EK-FAC on the trained network: factors on the training set, then scores of the 8 points."""
    import logging

    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    class Classification(Task):
        def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> torch.Tensor:
            logits = logits_of(model, batch)
            if not sample:
                return F.cross_entropy(logits, labels_of(batch), reduction="sum")
            with torch.no_grad():
                target = torch.multinomial(torch.softmax(logits.detach(), -1), 1).flatten()
            return F.cross_entropy(logits, target, reduction="sum")

        def compute_measurement(self, batch: Any, model: nn.Module) -> torch.Tensor:
            return F.cross_entropy(logits_of(model, batch), labels_of(batch), reduction="sum")

    net.eval()
    reset_peak()
    start = clock()
    model = prepare_model(net, Classification())
    analyzer = Analyzer("scale", model, Classification(), cpu=DEVICE != "cuda", disable_tqdm=True,
                        output_dir=str(workdir / "kronfluence"), log_level=logging.WARNING)
    analyzer.fit_all_factors("ekfac", train, per_device_batch_size=BATCH_SIZES[kind],
                             factor_args=FactorArguments(strategy="ekfac"), overwrite_output_dir=True)
    fitted = clock()
    analyzer.compute_pairwise_scores("scores", "ekfac", test, train, per_device_query_batch_size=len(test),
                                     per_device_train_batch_size=BATCH_SIZES[kind], score_args=ScoreArguments(),
                                     overwrite_output_dir=True)
    scored = clock()
    return {"ekfac_fit_seconds": fitted - start, "ekfac_score_seconds": scored - fitted,
            "ekfac_peak_rss_mib": status_kib("VmHWM") / 1024}


# -- stage groups, the checks of issue #29, the plot ----------------------------------------------------------
GROUPS = ("self-check retraining", "self-check solves", "damping estimate", "stored Jacobian", "scale", "recursion",
          "residual verdict", "scoring", "training signals", "self-influence setup", "self-influence", "diagnostics",
          "report writing", "other")


def group_of(key: str) -> str:
    """The stage group of a key of :class:`Stages` (``recursion/damping_estimate`` is the damping estimate)."""
    parts = key.split("/")
    top, last = parts[0], parts[-1]
    if top in ("mislabel_other", "self_influence"):  # the mislabel analysis: its own damping estimate and
        # Lanczos (fixed in N: a check subset, hvp_examples) and the pass over every example's gradient
        return "self-influence setup" if last in ("damping_estimate", "stored_jacobian", "lanczos") else "self-influence"
    if top == "self_check":  # damping="self_check": the retrainings, then the candidates' solves and scoring
        return "self-check retraining" if last == "retraining" else "self-check solves"
    if last == "whole_set_product":
        return "recursion"  # a CG finish's products over every example: part of the solve
    if last == "residual":
        return "residual verdict"  # (C + damping I) x - v over the whole training set: grows with N
    if top == "trust":
        return "diagnostics"
    if last == "stored_jacobian":
        return "stored Jacobian"  # a pass over every training example when it is built: grows with N
    if last == "damping_estimate":
        return "damping estimate"
    named = {"scale": "scale", "recursion": "recursion", "scoring": "scoring", "training_signals": "training signals",
             "report_writing": "report writing"}
    return named.get(last if last == "scale" else top, "other")


def add_groups(row: dict[str, Any]) -> None:
    """The stage groups (from the stage keys of a measured run; kept for an extrapolated one) and the ratios."""
    if "analysis_seconds" not in row:
        return  # a configuration that was stopped with nothing to extrapolate from
    if row["measured"] or row.get("partial"):
        groups = dict.fromkeys(GROUPS, 0.0)
        for key, seconds in row["stages"].items():
            groups[group_of(key)] += seconds
        groups["other"] += max(row["analysis_seconds"] - sum(groups.values()), 0.0)  # Lightning, hooks, gc
        row["groups"] = {k: round(v, 3) for k, v in groups.items()}
    groups = row["groups"]
    row["shares"] = {k: round(v / row["analysis_seconds"], 3) for k, v in groups.items()}
    row["s_test_seconds"] = sum(groups.get(g, 0.0) for g in ("damping estimate", "stored Jacobian", "scale",
                                                              "residual verdict",
                                                              "recursion"))
    row["scoring_seconds"] = groups["scoring"]
    row["analysis_over_epoch"] = row["analysis_seconds"] / row["epoch_seconds"]
    if "analysis_seconds_fixed_as_measured" in row:  # the extrapolation's lower bound
        row["analysis_over_epoch_fixed_as_measured"] = row["analysis_seconds_fixed_as_measured"] / row["epoch_seconds"]
    row["memory_ratio"] = row["analysis_peak_rss_mib"] / row["train_peak_rss_mib"]
    if row.get("ekfac_fit_seconds") is not None:
        row["ekfac_seconds"] = row["ekfac_fit_seconds"] + row["ekfac_score_seconds"]
        row["analysis_over_ekfac"] = row["analysis_seconds"] / row["ekfac_seconds"]
    if row["measured"]:
        row["reports_mib"] = (row["report_bytes"] + row["mislabel_report_bytes"]) / 2**20


def print_tables(payload: dict[str, Any]) -> None:
    """The tables of docs/cost-and-scale.md, from the results file."""
    def num(value: Any, digits: int) -> str:
        return "-" if value is None else f"{value:,.{digits}f}"

    print("| model | params | N | run | epoch (s) | analysis (s) | analysis / epoch | s_test (s) | scoring (s) |"
          " peak RSS, training / analysis (MiB) | memory ratio | EK-FAC fit + score (s) | reports (MiB) |"
          " dashboard (s) |")
    print("|" + "---|" * 14)
    rows = [r for r in payload["results"] if "analysis_seconds" in r]
    for r in rows:
        print(f"| {r['model']} | {r['params']:,} | {r['n_train']:,} | {'measured' if r['measured'] else 'extrapolated'}"
              f" | {num(r['epoch_seconds'], 1)} | {num(r['analysis_seconds'], 1)} | {num(r['analysis_over_epoch'], 2)}"
              f" | {num(r['s_test_seconds'], 1)} | {num(r['scoring_seconds'], 2)}"
              f" | {num(r['train_peak_rss_mib'], 0)} / {num(r['analysis_peak_rss_mib'], 0)} | {num(r['memory_ratio'], 2)}"
              f" | {num(r.get('ekfac_fit_seconds'), 1)} + {num(r.get('ekfac_score_seconds'), 1)}"
              f" | {num(r.get('reports_mib'), 2)} | {num(r.get('dashboard_load_seconds'), 3)} |")
    print()
    print("| model | N | " + " | ".join(GROUPS) + " |")
    print("|" + "---|" * (len(GROUPS) + 2))
    for r in rows:
        print(f"| {r['model']} | {r['n_train']:,} | " + " | ".join(num(r["shares"].get(g), 3) for g in GROUPS) + " |")


def find(rows: list[dict[str, Any]], model: str, n: int) -> dict[str, Any] | None:
    return next((r for r in rows if r["model"] == model and r["n_train"] == n), None)


def checks(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The claims of issue #29, each with the figures behind it and whether they were measured or extrapolated."""
    out: dict[str, Any] = {}
    rows = [r for r in rows if "analysis_seconds" in r]
    cnn = find(rows, "cnn", 50000)
    if cnn is not None:
        out["cnn_50k"] = {
            "measured": cnn["measured"], "params": cnn["params"],
            "analysis_over_epoch": cnn["analysis_over_epoch"], "at_most_3_epochs": cnn["analysis_over_epoch"] <= 3,
            "analysis_over_epoch_fixed_as_measured": cnn.get("analysis_over_epoch_fixed_as_measured"),
            "analysis_over_ekfac": cnn.get("analysis_over_ekfac"),
            "at_most_ekfac": None if cnn.get("ekfac_seconds") is None else cnn["analysis_seconds"] <= cnn["ekfac_seconds"],
            "memory_ratio": cnn["memory_ratio"], "memory_at_most_1_5x": cnn["memory_ratio"] <= 1.5}
        if not cnn["measured"] and len(cnn.get("extrapolated_from", ())) < 2:
            out["cnn_50k"]["at_most_ekfac"] = None  # not established: see the note
            out["cnn_50k"]["ekfac_note"] = ("EK-FAC extrapolated in proportion to N from one run: its fit includes"
                                            " eigendecompositions that do not grow with N, so that overestimates it")
    for model in ("mlp", "cnn", "bert"):
        small, large = find(rows, model, 10000), find(rows, model, 50000)
        if small is None or large is None or not (small["measured"] and large["measured"]):
            continue  # an extrapolated pair holds the fixed stages fixed by construction: no evidence
        s_test_ratio = large["s_test_seconds"] / small["s_test_seconds"]
        per_example = (large["scoring_seconds"] / 50000) / (small["scoring_seconds"] / 10000)
        out[f"{model}_10k_to_50k"] = {
            "measured": small["measured"] and large["measured"],
            "s_test_ratio": s_test_ratio, "s_test_within_20_percent": abs(s_test_ratio - 1) <= 0.2,
            "scoring_ratio": large["scoring_seconds"] / small["scoring_seconds"],
            "scoring_per_example_ratio": per_example, "scoring_linear_within_20_percent": abs(per_example - 1) <= 0.2}
    measured_50k = [r for r in rows if r["n_train"] == 50000 and r["measured"]]
    if measured_50k:
        out["reports_50k"] = {
            "largest_report_mib": max(r["report_bytes"] + r["mislabel_report_bytes"] for r in measured_50k) / 2**20,
            "under_5_mib": all(r["report_bytes"] + r["mislabel_report_bytes"] < 5 * 2**20 for r in measured_50k),
            "slowest_dashboard_load_seconds": max(r["dashboard_load_seconds"] for r in measured_50k),
            "dashboard_under_2_seconds": all(r["dashboard_load_seconds"] < 2 for r in measured_50k)}
    return out


def plot(payload: dict[str, Any], path: Path) -> None:
    """Analysis / epoch and peak memory against N per model, and the 50k runs' stage shares (from the results)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in payload["results"] if "analysis_seconds" in r]
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for model, colour in zip(("mlp", "cnn", "bert"), ("tab:blue", "tab:red", "tab:green")):
        mine = sorted((r for r in rows if r["model"] == model), key=lambda r: r["n_train"])
        if not mine:
            continue
        label = f"{model} ({mine[-1]['params']:,} params)"
        for axis, key in zip(axes[:2], ("analysis_over_epoch", "memory_ratio")):
            axis.plot([r["n_train"] for r in mine], [r[key] for r in mine], "-", color=colour, label=label)
            for r in mine:
                axis.plot(r["n_train"], r[key], "o", color=colour, markerfacecolor=colour if r["measured"] else "white")
    axes[0].axhline(3, color="grey", ls=":", lw=1)
    axes[1].axhline(1.5, color="grey", ls=":", lw=1)
    for axis, title in zip(axes[:2], ("whole analysis / training epoch", "peak memory: analysis / training")):
        axis.set_xscale("log")
        axis.set_yscale("log" if "epoch" in title else "linear")
        axis.set_xlabel("training examples N (open marker: extrapolated)")
        axis.set_title(title)
        axis.legend(fontsize=8)
    big = [r for r in rows if r["n_train"] == max(x["n_train"] for x in rows)]
    bottom = [0.0] * len(big)
    for i, group in enumerate(GROUPS):
        shares = [r["shares"].get(group, 0.0) for r in big]
        axes[2].bar([r["model"] for r in big], shares, bottom=bottom, label=group, color=plt.cm.tab20(i))
        bottom = [b + s for b, s in zip(bottom, shares)]
    axes[2].set_title(f"stage shares of the analysis at N = {big[0]['n_train']:,}")
    axes[2].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1, 1))
    figure.tight_layout()
    figure.savefig(path, dpi=110)


# -- the driver: children, limits, extrapolation -------------------------------------------------------------
def linear_fit(rows: list[dict[str, Any]], key: str, n: int) -> float:
    """``key`` at ``n`` from the two largest measured runs: ``a + b N`` through them (``b N`` from one run)."""
    points = sorted((r["n_train"], r[key]) for r in rows if r.get("measured") and r.get(key) is not None)[-2:]
    if len(points) == 1:
        return points[0][1] * n / points[0][0]
    (n0, y0), (n1, y1) = points
    slope = (y1 - y0) / (n1 - n0)
    return y1 + slope * (n - n1)


#: Stage groups whose work does not grow with N once N exceeds the check subset (``SUBSET_EXAMPLES``, 2,048
#: examples; the low-rank solver's ``hvp_examples`` is the same): the damping and scale estimates, LiSSA's steps and
#: residual checks, the self-influence's damping estimate and Lanczos, the diagnostics. The report writing is fixed
#: too (the reports list a fixed number of examples; measured flat on the MLP from 1k to 50k).
#: The residual verdict is fixed as well since it reads a seeded random sample of the training set until its side of
#: the tolerance is decided (``InfluenceProblem.sampled_residual``): at least the check subset, more only for a
#: residual near the tolerance (at worst the whole set, as before).
FIXED_GROUPS = ("damping estimate", "scale", "recursion", "residual verdict", "self-influence setup", "diagnostics",
                "report writing")
#: Of those, the ones that run over the check subset, so that they grow with min(N, 2,048): from a run below
#: 2,048 examples they are scaled up by the subset's growth (an upper bound: part of them, LiSSA's steps for
#: one, is per minibatch, not per subset example).
SUBSET_GROUPS = ("damping estimate", "recursion", "self-influence setup", "diagnostics")
SUBSET_EXAMPLES = 2048


def data_mib_per_example(kind: str) -> float:
    """MiB of one generated training example's tensors (the data set is in memory in training and analysis)."""
    data = make_data(kind, 2, 0)
    tensors = data.datasets.values() if isinstance(data, StackDataset) else data.tensors
    return sum(t[0].numel() * t.element_size() for t in tensors) / 2**20


def extrapolate(kind: str, n: int, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """A row for a run not made: the fixed stages as in the largest measured run (scaled by the check subset's
    growth when that run was below it), every other stage, the epoch and EK-FAC linear in N through the two
    largest measured runs (proportional to N from one), the memory linear through two runs or, from one, the
    measured peak plus the data set's growth."""
    same = sorted((r for r in rows if r["model"] == kind and r.get("measured")), key=lambda r: r["n_train"])
    if not same:
        return {"model": kind, "n_train": n, "measured": False, "note": "nothing measured to extrapolate from"}
    last = same[-1]
    subset_growth = min(n, SUBSET_EXAMPLES) / min(last["n_train"], SUBSET_EXAMPLES)
    row: dict[str, Any] = {
        "model": kind, "n_train": n, "params": last["params"], "measured": False,
        "extrapolated_from": [r["n_train"] for r in same][-2:], "subset_growth": subset_growth,
        "how": "fixed stages (" + ", ".join(FIXED_GROUPS) + ") as in the largest measured run, those over the check"
               " subset (" + ", ".join(SUBSET_GROUPS) + ") times subset_growth; other stages, the epoch and EK-FAC"
               " linear in N through the two largest measured runs (proportional to N from one); memory linear"
               " through two runs, or from one the measured peak plus the generated data set's growth"}
    for key in ("epoch_seconds", "ekfac_fit_seconds", "ekfac_score_seconds"):
        if any(r.get(key) is not None for r in same):
            row[key] = linear_fit(same, key, n)
    for key in ("train_peak_rss_mib", "analysis_peak_rss_mib"):
        if len(same) > 1:
            row[key] = linear_fit(same, key, n)
        else:
            row[key] = last[key] + data_mib_per_example(kind) * (n - last["n_train"])

    def fixed(group: str) -> float:
        return last["groups"].get(group, 0.0) * (subset_growth if group in SUBSET_GROUPS else 1.0)

    row["groups"] = {g: fixed(g) if g in FIXED_GROUPS else
                     max(linear_fit([{**r, g: r["groups"].get(g, 0.0)} for r in same], g, n), 0.0) for g in GROUPS}
    row["analysis_seconds"] = sum(row["groups"].values())
    row["analysis_seconds_fixed_as_measured"] = row["analysis_seconds"] - sum(
        fixed(g) - last["groups"].get(g, 0.0) for g in SUBSET_GROUPS)
    row["stages"] = {}
    add_groups(row)
    return row


def estimate_seconds(kind: str, n: int, rows: list[dict[str, Any]]) -> float | None:
    same = [r for r in rows if r["model"] == kind and r.get("measured")]
    if not same:
        return None
    guess = extrapolate(kind, n, rows)
    if "analysis_seconds" not in guess:
        return None
    return sum(guess.get(k) or 0.0 for k in ("epoch_seconds", "analysis_seconds", "ekfac_fit_seconds",
                                              "ekfac_score_seconds"))


def run_child(config: str, ekfac: bool, limit: float, depth: int | None, device: str = "cpu") -> dict[str, Any] | None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        command = [sys.executable, __file__, "--one", config, "--out", str(out), "--workdir", tmp, "--device", device]
        if depth is not None:
            command += ["--lissa-depth", str(depth)]
        started = time.perf_counter()
        try:
            done = subprocess.run(command + (["--ekfac"] if ekfac else []), timeout=limit * 2,
                                  capture_output=True, text=True)
        except subprocess.TimeoutExpired:
            print(f"{config}: stopped after {limit * 2:.0f} s of wall time", flush=True)
            return {"stopped": f"stopped after {limit * 2:.0f} s of wall time"}
        if done.returncode != 0 or not out.exists():
            print(f"{config}: failed\n{done.stderr[-3000:]}", flush=True)
            return None
        row = json.loads(out.read_text())
        row["wall_seconds"] = time.perf_counter() - started
        return row


def main() -> None:  # long: argument parsing and the three modes
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=",".join(CONFIGS), help="model:N,... (rows replace those in --json)")
    parser.add_argument("--json", default=str(RESULTS))
    parser.add_argument("--limit", type=float, default=480.0,
                        help="CPU seconds above which a configuration is extrapolated instead of run")
    parser.add_argument("--no-ekfac", action="store_true", help="skip Kronfluence EK-FAC")
    parser.add_argument("--derive", action="store_true", help="recompute the stage groups and checks of --json")
    parser.add_argument("--plot", help="draw the growth curves of --json into this PNG")
    parser.add_argument("--table", action="store_true", help="print the docs tables from --json")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="train and analyse on the CPU (process CPU seconds) or on CUDA (synchronised wall seconds,"
                        " the allocator's peaks beside the resident ones); not yet run on a GPU")
    parser.add_argument("--merge", help="results files (comma-separated) whose rows replace those of the same model"
                        " and N in --json (runs made apart, e.g. with another --lissa-depth); then the checks")
    parser.add_argument("--stop-after", type=float, help="stop a child's analysis after this many CPU seconds (at"
                        " the next timed stage) and record it as partial: its analysis time a lower bound")
    parser.add_argument("--damping", help="the callbacks' damping instead of their default (a deviation, recorded in"
                        " each row as damping_setting): a number, 'auto' or 'self_check'")
    parser.add_argument("--no-refine", action="store_true", help="LiSSA without its conjugate-gradient finish (a"
                        " deviation, recorded in each row as lissa_refine)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--ekfac", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--lissa-depth", type=int, help="cap LiSSA's depth (a deviation from the defaults,"
                        " recorded in each row): the fewest steps the default stops at is its first residual check")
    args = parser.parse_args()
    if args.stop_after:  # the children read these at import
        os.environ["SCALE_STOP_AFTER"] = str(args.stop_after)
    if args.damping:
        os.environ["SCALE_DAMPING"] = args.damping
    if args.no_refine:
        os.environ["SCALE_NO_REFINE"] = "1"
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        parser.error("Expected a CUDA device for --device cuda, but torch.cuda.is_available() is False: run it on a"
                     " machine with a GPU and a CUDA build of torch.")
    if args.one:
        kind, n = args.one.split(":")
        row = run_one(kind, int(n), args.ekfac, Path(args.workdir), args.lissa_depth)
        Path(args.out).write_text(json.dumps(row))
        return
    path = Path(args.json)
    if args.table:
        print_tables(json.loads(path.read_text()))
        return
    if args.merge:
        payload = json.loads(path.read_text()) if path.exists() else {"results": []}
        for other in args.merge.split(","):
            loaded = json.loads(Path(other).read_text())
            extra = loaded["results"]
            keys = {(r["model"], r["n_train"]) for r in extra}
            payload["results"] = [r for r in payload["results"] if (r["model"], r["n_train"]) not in keys] + extra
            record = {"file": Path(other).name, "rows": sorted(f"{m}:{n}" for m, n in keys),
                      "load_average": loaded.get("load_average"), "note": loaded.get("note")}
            payload.setdefault("merged", []).append({k: v for k, v in record.items() if v is not None})
        order = {c: i for i, c in enumerate(CONFIGS)}
        payload["results"].sort(key=lambda r: order.get(f"{r['model']}:{r['n_train']}", len(order)))
        payload["checks"] = checks(payload["results"])
        path.write_text(json.dumps(payload, indent=1) + "\n")
        return
    if args.derive or args.plot:
        payload = json.loads(path.read_text())
        for row in payload["results"]:
            add_groups(row)
        payload["checks"] = checks(payload["results"])
        if args.derive:
            path.write_text(json.dumps(payload, indent=1) + "\n")
        if args.plot:
            plot(payload, Path(args.plot))
        return
    previous = json.loads(path.read_text())["results"] if path.exists() else []
    rows: list[dict[str, Any]] = []
    began = time.perf_counter()
    for config in args.configs.split(","):
        kind, n = config.split(":")
        estimate = estimate_seconds(kind, int(n), rows + previous)
        if estimate is not None and estimate > args.limit:
            row = extrapolate(kind, int(n), rows + previous)
            row["note"] = f"not run: estimated {estimate:.0f} CPU s over the {args.limit:.0f} s limit"
        else:
            row = run_child(config, not args.no_ekfac, args.limit, args.lissa_depth, args.device) or {}
            if not row.get("measured") and not row.get("partial"):
                row = {**extrapolate(kind, int(n), rows + previous), **row}
        if row["measured"] or row.get("partial"):
            add_groups(row)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "stages"}), flush=True)
        print("   stages:", json.dumps(row.get("stages")), flush=True)
    done = {(r["model"], r["n_train"]) for r in rows}
    merged = [r for r in previous if (r["model"], r["n_train"]) not in done] + rows
    order = {c: i for i, c in enumerate(CONFIGS)}
    merged.sort(key=lambda r: order.get(f"{r['model']}:{r['n_train']}", len(order)))
    payload = {"clock": "process CPU seconds, 1 thread (dashboard load: wall seconds)" if args.device == "cpu" else
               "wall seconds, CUDA synchronised at each mark", "device": args.device, "torch": torch.__version__,
               "machine": platform.machine(), "cpu_count": os.cpu_count(), "load_average": os.getloadavg(),
               "wall_seconds": time.perf_counter() - began, "callbacks": "InfluenceCallback() defaults;"
               " MislabelCallback(candidates=32, rank=16)", "results": merged, "checks": checks(merged)}
    if path.exists():  # keep the record of rows merged from runs made apart
        kept = json.loads(path.read_text()).get("merged")
        if kept:
            payload["merged"] = kept
    path.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
