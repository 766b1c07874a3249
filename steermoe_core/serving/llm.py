"""What the server asks of a loaded backend beyond ``Backend.generate``: token bookkeeping for the
per-request streams, sampling (temperature > 0) and text-only chat on the frozen LLM.

Audio requests go through ``backend.generate``, the same call `steermoe infer` makes, so both give
the same text for the same clip; text-only chat goes through ``backend.complete``, what `infer`'s
transcript strategy runs. Both backends (torch, onnxruntime) have both.
"""

from __future__ import annotations

import numpy as np

from steermoe_core.model.decoding import finish_rows


def stop_ids(backend) -> list[int]:
    return list(backend.stop_ids)


def pad_id(backend) -> int:
    return int(backend.pad_id)


def decode(backend, ids: list[int]) -> str:
    """Token ids -> text, special tokens dropped (as the backends decode their outputs)."""
    return backend.decode([ids])[0]


def _guard(backend, budgets: list[int]):
    from steermoe_core.inference.longform import DecodeGuard

    return DecodeGuard(budgets, stop_ids(backend))


def _checked(texts: list[str], guard) -> tuple[list[str], list[str | None]]:
    """`infer`'s post-check of each row: a loop keeps one copy; a budget cut is flagged."""
    from steermoe_core.inference.longform import check_text

    out = [check_text(t, r) for t, r in zip(texts, guard.reasons)]
    return [t for t, _ in out], [flag for _, flag in out]


def generate_audio(backend, clips: list[np.ndarray], groups: list[int], prompts: list[str], budgets: list[int],
                   temperature: float, streamer) -> tuple[list[str], list[str | None]]:
    """One text per example (example i: the next ``groups[i]`` clips) and why it stopped (None,
    "budget", "loop"): through ``backend.generate`` with each row's own budget and loop guard, as
    `infer` decodes; sampled at ``temperature`` > 0."""
    guard = _guard(backend, budgets)
    texts = backend.generate(clips, groups, prompts, max(budgets), 1, streamer, guard=guard, temperature=temperature)
    return _checked(texts, guard)


def chat_prompt_ids(backend, messages: list[dict]) -> list[int]:
    """A text-only conversation rendered as `infer`'s transcript strategy renders one for the frozen LLM."""
    from steermoe_core.inference.longform import _text_backend, render_chat

    return render_chat(_text_backend(backend).text_tokenizer, messages)


def generate_text(backend, prompts: list[list[int]], budgets: list[int], temperature: float, streamer) -> tuple[list[str], list[str | None]]:
    """The frozen LLM alone on token prompts (no audio, no adapter in the way), with the same
    per-row budget and loop guard as ``longform.chat_text``."""
    guard = _guard(backend, budgets)
    ids = backend.complete(prompts, max(budgets), guard, temperature, streamer)
    rows = finish_rows(ids, stop_ids(backend), pad_id(backend))
    return _checked([t.strip() for t in backend.decode(rows)], guard)
