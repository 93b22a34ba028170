"""What the post-hoc subcommands accept: the flags that mirror the callbacks' arguments and the arguments every
subcommand shares (the checkpoint, model and data, output).

Analysis flags are the ``InfluenceCallback``'s own constructor arguments (the same config classes validate
them), so the command line and the callback cannot drift apart: ``--top-k 5`` is ``InfluenceCallback(top_k=5)``.
Torch-free, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

from lightning_influence.cli.loading import import_object
from lightning_influence.cli.threads import AUTO, parse_threads
from lightning_influence.config import (
    CURVATURES,
    DEFAULT_CHUNK_SIZE,
    DEFAULT_CURVATURE,
    DEFAULT_DAMPING,
    DEFAULT_SCORING,
    DEFAULT_SOLVER,
    SCORING_METHODS,
    SOLVERS,
    CGConfig,
    LissaConfig,
    LowRankConfig,
)


@dataclass(frozen=True)
class Option:
    """A command-line flag that sets the ``InfluenceCallback`` argument ``dest`` (unset flags keep its default)."""

    flag: str
    dest: str
    default: Any
    help: str
    type: Optional[Callable[[str], Any]] = None
    choices: Optional[tuple[str, ...]] = None
    nargs: Optional[str] = None
    switch: bool = False
    aliases: tuple[str, ...] = ()  # older spellings still accepted (not shown in --help)

    def add_to(self, parser: Union[argparse.ArgumentParser, argparse._ArgumentGroup]) -> None:
        text = f"{self.help} (default: {self.default})"
        if self.switch:
            parser.add_argument(self.flag, dest=self.dest, action="store_true", default=argparse.SUPPRESS, help=text)
        else:
            parser.add_argument(self.flag, dest=self.dest, type=self.type or str, choices=self.choices,
                                nargs=self.nargs, default=argparse.SUPPRESS, help=text)
        for alias in self.aliases:
            parser.add_argument(alias, dest=self.dest, type=self.type or str, default=argparse.SUPPRESS,
                                help=argparse.SUPPRESS)


def number_or_auto(text: str) -> Union[float, str]:
    """``--damping`` and ``--scale``: a number, or ``"auto"``."""
    return text if text == "auto" else float(text)


def _top(text: str) -> Union[int, str]:
    return text if text == "all" else int(text)


INFLUENCE_OPTIONS = (
    Option("--val-indices", "val_indices", None, "validation dataset indices to explain (else the worst ones)",
           type=int, nargs="+"),
    Option("--num-worst", "num_worst", 8, "how many highest-loss validation examples to explain", type=int),
    Option("--misclassified-only", "misclassified_only", False, "pick the worst among misclassified examples only",
           switch=True),
    Option("--top-k", "top_k", 10, "harmful and helpful training examples listed per point", type=int),
    Option("--solver", "solver", DEFAULT_SOLVER, "inverse-Hessian solver for s_test", choices=SOLVERS),
    Option("--damping", "damping", DEFAULT_DAMPING, "lambda added to the curvature, or 'auto' (a fraction of its top"
           " eigenvalue)", type=number_or_auto),
    Option("--curvature", "curvature", DEFAULT_CURVATURE, "the curvature C of (C + damping I) s = grad L",
           choices=CURVATURES),
    Option("--depth", "depth", LissaConfig.depth, "LiSSA recursion steps J per repeat", type=int),
    Option("--repeats", "repeats", LissaConfig.repeats, "LiSSA independent repeats T, averaged", type=int),
    Option("--batch-size", "batch_size", LissaConfig.batch_size, "LiSSA minibatch size B of each curvature product",
           type=int),
    Option("--scale", "scale", LissaConfig.scale, "LiSSA scale (a number above the top minibatch-Hessian eigenvalue, or"
           " 'auto' to estimate it)", type=number_or_auto),
    Option("--seed", "seed", LissaConfig.seed, "LiSSA sampling seed", type=int),
    Option("--tol", "tol", None, "LiSSA early-stop or CG tolerance (None: the solver's own)", type=float),
    Option("--max-iter", "max_iter", CGConfig.max_iter, "CG iterations", type=int),
    Option("--scoring", "scoring", DEFAULT_SCORING, "how training examples are scored",
           choices=SCORING_METHODS),
    Option("--chunk-size", "chunk_size", DEFAULT_CHUNK_SIZE, "training examples scored at once (bounds memory)", type=int),
    Option("--num-candidates", "num_candidates", None, "score each point only against its N nearest training examples"
           " (FastIF; None: every training example)", type=int),
    Option("--example-formatter", "example_formatter", None, "import path of a function example -> str (e.g. a"
           " tokenizer's decode) shown beside each example in the tables and the JSON"),
    Option("--save-scores", "save_scores", False, "also write the full [points, n_train] score table"
           " (epoch=N-scores.json index + epoch=N-scores-rank0.pt)", switch=True),
)

MISLABEL_OPTIONS = (
    Option("--top", "mislabel_candidates", 20, "training examples to list, largest |I(z, z)| first, or 'all' (the"
           " JSON ranks the whole training set)", type=_top, aliases=("--candidates",)),
    Option("--rank", "mislabel_rank", LowRankConfig.rank, "eigenpairs of H (Lanczos) used for self-influence", type=int),
    Option("--damping", "damping", DEFAULT_DAMPING, "lambda added to the curvature, or 'auto'", type=number_or_auto),
    Option("--curvature", "curvature", DEFAULT_CURVATURE, "the curvature C of (C + damping I)", choices=CURVATURES),
    Option("--chunk-size", "chunk_size", DEFAULT_CHUNK_SIZE, "training examples per batch of gradients", type=int),
)


def add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments every post-hoc subcommand shares: what to load and where to write."""
    parser.add_argument("checkpoint", help="the Lightning checkpoint (.ckpt) to analyse")
    source = parser.add_argument_group("model and data")
    source.add_argument("--model", help="LightningModule class as an import path, e.g. examples.digits:DigitsCNN;"
                        " restored with Model.load_from_checkpoint (saved hyperparameters)")
    source.add_argument("--model-args", metavar="JSON", help="JSON object of keyword arguments overriding the"
                        " checkpoint's hyperparameters, e.g. '{\"lr\": 0.01}'")
    source.add_argument("--datamodule", help="LightningDataModule class as an import path; its train_dataloader()"
                        " is scored and its val_dataloader() explained (default: the model's own loader hooks)")
    source.add_argument("--datamodule-args", metavar="JSON", help="JSON object of keyword arguments for the"
                        " DataModule's constructor")
    source.add_argument("--config", help="a LightningCLI config file (model:, data:, trainer.callbacks: ...). Model"
                        " and data are built from it; an InfluenceCallback under trainer.callbacks gives the"
                        " analysis settings, which flags override. --model/--datamodule name the classes when"
                        " the config has no class_path for them")
    source.add_argument("--loss-fn", help="per-example loss as an import path to a callable (module, batch) ->"
                        " Tensor[B] (default: the model's per_example_loss(batch) method)")
    source.add_argument("--device", default="cpu", help="torch device to run on, e.g. cpu or cuda:0 (default: cpu)")
    source.add_argument("--threads", type=parse_threads, default=AUTO, help="CPU threads for torch: a number, or"
                        " 'auto' (default): OMP_NUM_THREADS when set, else the cores that the machine's load leaves"
                        " idle (at least 1). More threads than idle cores make the analysis several times slower")
    out = parser.add_argument_group("output")
    out.add_argument("--output-dir", help="run directory for TensorBoard events and influence/*.json (default:"
                     " <checkpoint dir>/<checkpoint name>-influence)")
    out.add_argument("--table", metavar="PATH", help="also export the results as a long table, .csv or .parquet"
                     " (needs pandas; Parquet also pyarrow)")
    out.add_argument("--quiet", action="store_true", help="do not print the summary table")


def flags_of(args: argparse.Namespace, options: tuple[Option, ...]) -> dict[str, Any]:
    flags = {o.dest: getattr(args, o.dest) for o in options if hasattr(args, o.dest)}
    if getattr(args, "loss_fn", None):
        flags["loss_fn"] = import_object(args.loss_fn, "`--loss-fn`")
    return flags
