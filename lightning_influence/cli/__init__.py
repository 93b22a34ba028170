"""``lightning-influence``: analyse a saved checkpoint post hoc, with the callback's outputs.

Subcommands are registered in :data:`SUBCOMMANDS`; adding one is an ``add_arguments(parser)`` function,
a ``run(args) -> int`` function and one :class:`Subcommand` entry (see ``cli/commands.py``; the shared flags
are in ``cli/options.py``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable, Optional

from lightning_influence.cli import commands, retraining
from lightning_influence.cli.loading import UsageError

SIGN = ("Sign convention: I(z, z_test) = -s_test . grad L(z); positive = harmful (up-weighting z raises the"
        " test loss), negative = helpful.")


@dataclass(frozen=True)
class Subcommand:
    """One ``lightning-influence <name>``: its one-line help, its arguments and what it runs."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    description: str = ""


SUBCOMMANDS: list[Subcommand] = [
    Subcommand("influence", "explain the worst validation predictions by training examples",
               commands.add_influence_arguments, commands.run_influence,
               "Restore the checkpoint, compute s_test for the monitored validation points and score every"
               " training example, then write TensorBoard events and influence/epoch=N.json like"
               " InfluenceCallback. " + SIGN),
    Subcommand("mislabel", "rank training examples by self-influence (likely mislabelled first)",
               commands.add_mislabel_arguments, commands.run_mislabel,
               "Rank every training example by |I(z, z)| (low-rank Lanczos inverse of H + damping I) and write"
               " influence/mislabel_epoch=N.json and TensorBoard events under influence/mislabel/."),
    Subcommand("correct", "fine-tune on the training examples most helpful to a slice the model gets wrong",
               retraining.add_correct_arguments, retraining.run_correct,
               "Influence-guided error correction (FastIF Sec. 6.3) with lightning_influence.correct_errors: each"
               " round samples anchors from the slice (misclassified validation examples by default), solves"
               " s_test for their mean loss and takes optimizer steps on the most helpful training examples."
               " Part of the slice is held out to measure the fix; --selection random|anchors|harmful run the"
               " baselines on the same budget. Writes TensorBoard curves under influence/correct/ and"
               " influence/correct_<selection>.json. " + SIGN),
    Subcommand("verify-loo", "check influence against actual leave-one-out retraining",
               retraining.add_verify_loo_arguments, retraining.run_verify_loo,
               "Koh & Liang's check with lightning_influence.verify_leave_one_out: for one validation example,"
               " remove each of the training examples with the largest |I| in turn, retrain from the checkpoint"
               " for a fixed number of steps, and compare the actual change of its loss with the predicted -I/n"
               " (Pearson/Spearman). Writes influence/loo_epoch=N.json and influence/trust/loo_* scalars."),
    Subcommand("export", "convert a JSON report to CSV/Parquet or the pytorch-influence-functions layout",
               commands.add_export_arguments, commands.run_export,
               "Read a report written by the callback or by this command and write it in another layout."
               " " + SIGN),
]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every registered subcommand (imports no Lightning)."""
    parser = argparse.ArgumentParser(
        prog="lightning-influence",
        description="Influence functions on a saved Lightning checkpoint: the same TensorBoard events and JSON"
                    " files as InfluenceCallback, after training. " + SIGN,
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for sub in SUBCOMMANDS:
        sub_parser = subparsers.add_parser(sub.name, help=sub.help, description=sub.description or sub.help)
        sub.add_arguments(sub_parser)
        sub_parser.set_defaults(run=sub.run)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``lightning-influence`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if hasattr(args, "threads"):
            from lightning_influence.cli.threads import apply_threads

            apply_threads(args.threads)
        return int(args.run(args))
    except (UsageError, ImportError, ValueError) as err:
        print(f"lightning-influence {args.command}: error: {err}", file=sys.stderr)
        return 2


__all__ = ["SUBCOMMANDS", "Subcommand", "build_parser", "main"]
