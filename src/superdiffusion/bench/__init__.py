"""The benchmark command: methods x labelled fractions x seeds under a named protocol, with tables,
paired statistics, ablations and figures (see runner.py for the output folder's layout)."""

from .protocols import Protocol, load_protocol, shipped_protocols
from .runner import run_bench

__all__ = ["Protocol", "load_protocol", "run_bench", "shipped_protocols"]
