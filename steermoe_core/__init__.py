"""steermoe: give a frozen LLM ears with a few million trainable parameters (SteerMoE)."""

import os

# OpenMP threads waiting at a barrier sleep instead of spinning, unless the caller chose otherwise. On a
# 2-core CPU that other processes share, a spinning thread holds the core its partner needs: a decode step
# (hundreds of small parallel ops) ran 20-60x slower with libgomp's default spinning (benchmarks/RESULTS.md,
# "CPU decoding"). libgomp reads this once, when torch loads it: it applies when steermoe_core is imported
# before torch (the CLI, the benchmarks; a script that imports torch first keeps its own setting).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.7.0"  # pyproject.toml's version (tests/test_docs.py checks they agree)
