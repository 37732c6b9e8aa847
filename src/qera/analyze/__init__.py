"""Analyses behind ``qera analyze``: calibration size, the independence assumption, rank sweeps.

Each analysis is a library function that returns plain data (rows of dicts); the CLI in
:mod:`qera.cli.analyze` only parses arguments, writes JSON/PNG and prints a table.
"""

from qera.analyze.autocorr import (
    autocorrelation_analysis,
    group_summary,
    normalized_autocorrelation,
    offdiag_share,
    spearman,
)
from qera.analyze.calib_size import calib_size_sweep, crossing, prefix_statistics, split_windows
from qera.analyze.rank_sweep import rank_sweep, solve_layers, truncate_result, truncated_output_errors

__all__ = [
    "autocorrelation_analysis", "group_summary", "normalized_autocorrelation", "offdiag_share", "spearman",
    "calib_size_sweep", "crossing", "prefix_statistics", "split_windows",
    "rank_sweep", "solve_layers", "truncate_result", "truncated_output_errors",
]
