"""`emulator sweep`: every valid parallel layout of N GPUs for one workload, run (simulated in
parallel as Ray tasks, or emulated one by one), ranked, with each layout's bottleneck named
from its own numbers."""

from emulator.sweep.bottleneck import RunFacts, name_bottleneck, run_facts
from emulator.sweep.layouts import Skipped, enumerate_layouts, layout_name, parse_layout
from emulator.sweep.run import SweepResult, rank_rows, run_one, run_sweep

__all__ = ["RunFacts", "Skipped", "SweepResult", "enumerate_layouts", "layout_name",
           "name_bottleneck", "parse_layout", "rank_rows", "run_facts", "run_one", "run_sweep"]
