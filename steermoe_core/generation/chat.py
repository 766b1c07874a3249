"""Guarded generation on any backend: audio rows (``decode_audio``) and the frozen LLM on text alone
(``complete_texts``, ``chat_text``), each row stopped at end of turn, at its own budget and at a
repetition loop, with its flag. What `infer`, `serve`, the transcript strategy and training's
behaviour-alignment targets all run, so every generation is guarded the same way.

No torch import at module level: the onnxruntime backend uses this module too.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from steermoe_core.generation.guards import DecodeGuard, check_text
from steermoe_core.model.decoding import finish_rows


def _text_backend(backend):
    """``backend`` if it can run the frozen LLM on text alone (``complete`` + ``text_tokenizer``)."""
    if not callable(getattr(backend, "complete", None)):
        from steermoe_core.errors import UsageError

        raise UsageError(f"the {getattr(backend, 'name', '?')} backend cannot run the LLM on text alone; use --strategy direct")
    return backend


def render_chat(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of ``messages`` ready for the assistant's answer (chat template, or plain lines + 'Answer:')."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    body = "\n\n".join(m["content"] for m in messages) + "\nAnswer:"
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + tokenizer(body, add_special_tokens=False)["input_ids"]


def chat_ids(backend, messages: list[dict]) -> list[int]:
    """``messages`` rendered for the frozen LLM on ``backend`` (its chat template), ready for its answer."""
    return render_chat(_text_backend(backend).text_tokenizer, messages)


def count_chat_tokens(backend, messages: list[dict]) -> int:
    return len(chat_ids(backend, messages))


def _checked(texts: list[str], reasons: list[str | None]) -> tuple[list[str], list[str | None]]:
    """Each row's text and flag after ``check_text``: a loop keeps one copy, a budget cut is flagged."""
    out = [check_text(t.strip(), r) for t, r in zip(texts, reasons)]
    return [t for t, _ in out], [flag for _, flag in out]


def complete_texts(backend, prompts: list[list[int]], budgets: list[int], temperature: float = 0.0,
                   streamer=None, constraints: list | None = None) -> tuple[list[str], list[str | None]]:
    """The frozen LLM alone on token prompts (no audio, no adapter in the way), each row stopped at end
    of turn, at its own budget and at a repetition loop, with its flag: the transcript strategy's and
    `serve`'s text chats, on every backend that has ``complete`` (torch, onnxruntime)."""
    backend = _text_backend(backend)
    guard = DecodeGuard(budgets, backend.stop_ids, constraints)
    ids = backend.complete(prompts, max(budgets), guard, temperature, streamer)
    return _checked(backend.decode(finish_rows(ids, backend.stop_ids, backend.pad_id)), guard.reasons)


def chat_text(backend, messages: list[dict], max_new_tokens: int = 256, streamer=None) -> str:
    """The frozen LLM's greedy answer to chat ``messages`` (text only, no audio, no system prompt of
    the adapter's): what the transcript strategy runs, and what behaviour alignment caches as targets.
    Stops at end of turn, at ``max_new_tokens`` and at a repetition loop (kept as one copy)."""
    if streamer is not None and hasattr(streamer, "skip_prompt"):  # transformers' TextStreamer: print the answer only
        streamer.skip_prompt, streamer.next_tokens_are_prompt = True, True
    return complete_texts(backend, [chat_ids(backend, messages)], [max_new_tokens], 0.0, streamer)[0][0]


def decode_audio(backend, clips: list[np.ndarray], groups: list[int], prompts: list[str], budgets: list[int],
                 num_beams: int = 1, temperature: float = 0.0, streamer=None) -> tuple[list[str], list[str | None]]:
    """One text per example (example i: the next ``groups[i]`` clips) and its flag (None, "budget",
    "loop"): greedy or sampled decoding asks each row's budget and loop guard after every step; beam
    search runs to the largest budget, and only the text check applies. What `infer` and `serve` run."""
    if num_beams != 1:
        texts = backend.generate(clips, groups, prompts, max(budgets), num_beams, streamer)
        return _checked(texts, [None] * len(texts))
    guard = DecodeGuard(budgets, backend.stop_ids)
    texts = backend.generate(clips, groups, prompts, max(budgets), 1, streamer, guard=guard, temperature=temperature)
    return _checked(texts, guard.reasons)


def llm_chat(model, precision: str = "fp32") -> Callable[[list[dict], int], str]:
    """``chat_text`` on a bare ``SteerMoEModel`` (training: behaviour-alignment targets; the model
    keeps its train/eval mode)."""
    from steermoe_core.generation.torch_backend import TorchBackend

    backend = TorchBackend(model, precision, keep_mode=True)
    return lambda messages, max_new_tokens: chat_text(backend, messages, max_new_tokens)
