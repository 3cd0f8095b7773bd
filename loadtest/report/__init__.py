"""Reports for a load-test ``Run``: the terminal table, a live line per window, files and plots.

Everything here is pure: it reads a ``Run`` (see ``results.py``) and writes text, JSON, CSV,
HdrHistogram interval logs (``.hlog``), percentile distributions (``.hgrm``) and PNG plots.

Conventions kept throughout:

- the headline latency is the *corrected* one (from the intended send time, so coordinated
  omission is included); the *uncorrected* one (from the actual send) is always shown next to
  it, never instead of it;
- percentiles always come from merged histograms, never from averaging window percentiles;
- every percentile is printed with how many samples lie above it, so thin tails are visible;
- missing data (an empty histogram, a step without windows, no successes) prints as ``-`` and
  plots as a gap: nothing here raises on it.

The parts live in ``text`` (the table and the live line), ``files`` (JSON, CSV, interval logs and
``write_all``) and ``plots``. matplotlib is imported only by the plotting functions (it is an
optional dependency), and only its object-oriented API with the Agg canvas is used: no pyplot, no
global backend switch.
"""

from ..jsonsafe import json_safe
from .files import (
    CSV_COLUMNS,
    FORMAT,
    FORMAT_VERSION,
    HISTS,
    csv_rows,
    read_json,
    to_dict,
    write_all,
    write_csv,
    write_intervals,
    write_json,
)
from .plots import (
    plot_spectrum,
    plot_sweep,
    plot_timeline,
    spectrum_figure,
    spectrum_steps,
    sweep_figure,
    timeline_figure,
)
from .text import LEGEND, progress_line, table

__all__ = [
    "CSV_COLUMNS",
    "FORMAT",
    "FORMAT_VERSION",
    "HISTS",
    "LEGEND",
    "csv_rows",
    "json_safe",
    "plot_spectrum",
    "plot_sweep",
    "plot_timeline",
    "progress_line",
    "read_json",
    "spectrum_figure",
    "spectrum_steps",
    "sweep_figure",
    "table",
    "timeline_figure",
    "to_dict",
    "write_all",
    "write_csv",
    "write_intervals",
    "write_json",
]
