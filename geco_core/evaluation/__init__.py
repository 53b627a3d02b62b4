"""The evaluation layer: the paper's measurements of a trained run (``geco eval``), sweeps over
kappa and objectives (``geco sweep``), and the figures of many runs. Imports the training layer
and below, never the CLI."""

from __future__ import annotations

from geco_core.evaluation.measures import (
    MARGINAL_EXAMPLES,
    average_kl,
    evaluate_run,
    format_report,
    log_aggregate_density,
    log_density_matrix,
    marginal_kl,
    nll_per_pixel,
    quantised_normal_log_prob,
    sigma_opt,
)
from geco_core.evaluation.sweep import plan, sweep, table
from geco_core.figures import plot_curves, plot_information_plane

__all__ = [
    "MARGINAL_EXAMPLES",
    "average_kl",
    "evaluate_run",
    "format_report",
    "log_aggregate_density",
    "log_density_matrix",
    "marginal_kl",
    "nll_per_pixel",
    "quantised_normal_log_prob",
    "sigma_opt",
    "plan",
    "sweep",
    "table",
    "plot_curves",
    "plot_information_plane",
]
