"""steermoe: give a frozen LLM ears with a few million trainable parameters (SteerMoE)."""

__version__ = "0.1.0"
