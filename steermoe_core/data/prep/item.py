"""One utterance waiting to be prepared: what every `steermoe prep` source yields."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Item:
    """One utterance to prepare. ``path`` is read with load_audio; ``synth`` is (engine, voice, speed)."""

    id: str
    text: str
    path: str | None = None
    prompt: str | None = None
    language: str | None = None
    synth: tuple[str, str, float] | None = None
    extra: dict | None = None
