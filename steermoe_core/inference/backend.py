"""The inference seam: what `steermoe infer` and the Python API need from a model, whatever runs it.

A backend turns audio clips + prompts into text. The windowing, batching, timing and output formats
in ``inference.api`` are shared by every backend; a new runtime (onnxruntime, vLLM, ...) implements
``Backend`` and nothing else; this module imports no torch so such a backend need not either.
``inference.torch_backend.TorchBackend`` runs a ``SteerMoEModel`` under the same precision
policy as `steermoe eval`, so both give the same text for the same checkpoint.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Backend(Protocol):
    name: str
    max_context: int  # the LLM's context, in tokens

    def audio_token_counts(self, lengths: list[int]) -> list[int]:
        """Audio tokens each clip of ``lengths`` samples becomes."""

    def prompt_tokens(self, prompt: str) -> int:
        """Text tokens around the audio for ``prompt`` (chat template included)."""

    def text_streamer(self):
        """An object with ``put(token_ids)`` / ``end()`` that prints text as it is generated (``--stream``)."""

    def generate(
        self, clips: list[np.ndarray], groups: list[int], prompts: list[str], max_new_tokens: int, num_beams: int, streamer=None
    ) -> list[str]:
        """One text per example; example i holds the next ``groups[i]`` clips (its windows, in order)."""
