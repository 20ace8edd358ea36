"""Result JSONs -> markdown tables and matplotlib figures (``sparsecraft report``)."""

from .build import build_report, ppl_table, prune_table, speed_table
from .collect import Collection, collect

__all__ = ["Collection", "build_report", "collect", "ppl_table", "prune_table", "speed_table"]
