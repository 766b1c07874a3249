"""`steermoe infer`: ask a trained model about audio files."""

from __future__ import annotations


def infer() -> None:
    """Ask a trained model about audio files, folders and long recordings."""
    from steermoe_core.errors import UsageError

    raise UsageError("infer is not available yet")
