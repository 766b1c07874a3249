"""The inference seam: what `steermoe infer` and the Python API need from a model, whatever runs it.

A backend turns audio clips + prompts into text. The windowing, batching, timing and output formats
in ``inference.api`` are shared by every backend; a new runtime (onnxruntime, vLLM, ...) implements
``Backend`` and nothing else; this module imports no torch so such a backend need not either.
``generation.torch_backend.TorchBackend`` runs a ``SteerMoEModel`` under the same precision
policy as `steermoe eval`, so both give the same text for the same checkpoint.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Backend(Protocol):
    name: str
    max_context: int  # the LLM's context, in tokens
    stop_ids: list[int]  # token ids that end a turn
    pad_id: int  # what a finished row is padded with

    def audio_token_counts(self, lengths: list[int]) -> list[int]:
        """Audio tokens each clip of ``lengths`` samples becomes."""

    def prompt_tokens(self, prompt: str) -> int:
        """Text tokens around the audio for ``prompt`` (chat template included)."""

    def text_streamer(self):
        """An object with ``put(token_ids)`` / ``end()`` that prints text as it is generated (``--stream``)."""

    def decode(self, rows: list[list[int]]) -> list[str]:
        """Generated ids per row -> text, special tokens dropped."""

    def generate(
        self, clips: list[np.ndarray], groups: list[int], prompts: list[str], max_new_tokens: int, num_beams: int,
        streamer=None, guard=None, temperature: float = 0.0,
    ) -> list[str]:
        """One text per example; example i holds the next ``groups[i]`` clips (its windows, in order).
        ``guard`` (``generation.guards.DecodeGuard``, greedy only) is asked after every step which rows stop
        (per-row budgets, loops); ``temperature`` > 0 samples instead of greedy (`serve`)."""


class TextBackend(Backend, Protocol):
    """A backend that can also run the frozen LLM on text alone: the transcript strategy and
    `serve`'s chat without audio need it (both built-in backends are one)."""

    text_tokenizer: object  # a transformers tokenizer: its chat template renders text-only chats

    def complete(
        self, prompts: list[list[int]], max_new_tokens: int, guard=None, temperature: float = 0.0, streamer=None
    ) -> list[list[int]]:
        """The new token ids per left-padded token prompt."""
