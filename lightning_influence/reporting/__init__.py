"""Output only (rank 0): the writers that render result records (re-exported here for convenience).

TensorBoard (captioned image grids, markdown tables, histograms, scalars), files (JSON top lists, score
tensors, written atomically) and a rich console summary. No Lightning imports here.
"""

from lightning_influence.reporting._format import SIGN_CONVENTION
from lightning_influence.reporting.console import (
    mislabel_table,
    print_mislabel_summary,
    print_summary,
    summary_table,
)
from lightning_influence.reporting.files import (
    SCHEMA_VERSION,
    load_full_scores,
    mislabel_to_dict,
    report_to_dict,
    save_tensor_atomic,
    write_json_atomic,
    write_mislabel_files,
    write_report_files,
    write_score_index,
    write_score_shard,
)
from lightning_influence.reporting.images import influence_grid_figure, looks_like_image, mislabel_grid_figure
from lightning_influence.reporting.tables import mislabel_markdown, point_markdown, report_markdown
from lightning_influence.reporting.tensorboard import write_mislabel_report, write_report
from lightning_influence.results import (
    ExplainedPoint,
    Influencer,
    InfluenceReport,
    MislabelCandidate,
    MislabelReport,
    SolveInfo,
    SolverSummary,
)

__all__ = [
    "SCHEMA_VERSION",
    "SIGN_CONVENTION",
    "load_full_scores",
    "write_score_index",
    "write_score_shard",
    "ExplainedPoint",
    "InfluenceReport",
    "Influencer",
    "MislabelCandidate",
    "MislabelReport",
    "SolveInfo",
    "SolverSummary",
    "influence_grid_figure",
    "looks_like_image",
    "mislabel_grid_figure",
    "mislabel_markdown",
    "mislabel_table",
    "mislabel_to_dict",
    "point_markdown",
    "print_mislabel_summary",
    "print_summary",
    "report_markdown",
    "report_to_dict",
    "save_tensor_atomic",
    "summary_table",
    "write_json_atomic",
    "write_mislabel_files",
    "write_mislabel_report",
    "write_report",
    "write_report_files",
]
