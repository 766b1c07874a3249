"""What the server asks of a loaded backend beyond ``Backend.generate``: token bookkeeping for the
per-request streams, sampling (temperature > 0) and text-only chat on the frozen LLM.

Greedy audio requests go through ``backend.generate``, the same call `steermoe infer` makes, so
both give the same text for the same clip. The rest needs the torch backend's model: sampling and
text-only chat are torch-only, and say so in one line on the onnxruntime backend.
"""

from __future__ import annotations

import numpy as np

from steermoe_core.errors import UsageError
from steermoe_core.model.decoding import finish_rows


def stop_ids(backend) -> list[int]:
    return list(backend.model.layout.stop_ids) if backend.name == "torch" else list(backend.stop_ids)


def pad_id(backend) -> int:
    return int(backend.model.layout.pad_id) if backend.name == "torch" else int(backend.pad_id)


def decode(backend, ids: list[int]) -> str:
    """Token ids -> text, special tokens dropped (as the backends decode their outputs)."""
    if backend.name == "torch":
        return backend.tokenizer.decode(ids, skip_special_tokens=True)
    return backend.decode([ids])[0]


def _torch_only(backend, what: str) -> None:
    if backend.name != "torch":
        raise UsageError(f"{what} needs the torch backend (this server runs {backend.name})")


def _guard(backend, budgets: list[int]):
    from steermoe_core.inference.longform import DecodeGuard

    return DecodeGuard(budgets, stop_ids(backend))


def _checked(texts: list[str], guard) -> tuple[list[str], list[str | None]]:
    """`infer`'s post-check of each row: a loop keeps one copy; a budget cut is flagged."""
    from steermoe_core.inference.longform import check_text

    reasons = guard.reasons if guard is not None else [None] * len(texts)
    out = [check_text(t, r) for t, r in zip(texts, reasons)]
    return [t for t, _ in out], [flag for _, flag in out]


def generate_audio(backend, clips: list[np.ndarray], groups: list[int], prompts: list[str], budgets: list[int],
                   temperature: float, streamer) -> tuple[list[str], list[str | None]]:
    """One text per example (example i: the next ``groups[i]`` clips) and why it stopped (None,
    "budget", "loop"): greedy at temperature 0 through ``backend.generate`` with each row's own
    budget and loop guard, as `infer` decodes."""
    import inspect

    from steermoe_core.inference.longform import as_stopping_criteria

    if temperature <= 0:
        guard, kwargs = None, {}
        if "stopping_criteria" in inspect.signature(backend.generate).parameters:
            guard = _guard(backend, budgets)
            kwargs["stopping_criteria"] = as_stopping_criteria(guard)
        return _checked(backend.generate(clips, groups, prompts, max(budgets), 1, streamer, **kwargs), guard)
    _torch_only(backend, "temperature > 0")
    from steermoe_core.data.batch import AudioBatch, pad_clips
    from steermoe_core.runtime import autocast

    model = backend.model
    waves, lengths = pad_clips(clips)
    batch = AudioBatch(waves.to(backend.device), lengths, prompts, clips_per_example=groups)
    guard = _guard(backend, budgets)
    with autocast(backend.device, backend.precision):
        ids = _sample(model, batch, max(budgets), temperature, streamer, as_stopping_criteria(guard))
    rows = finish_rows(ids.tolist(), model.layout.stop_ids, model.layout.pad_id)
    return _checked([t.strip() for t in model.tokenizer.batch_decode(rows, skip_special_tokens=True)], guard)


def _sample(model, batch, max_new_tokens: int, temperature: float, streamer, stopping):
    import torch
    from transformers import GenerationConfig

    with torch.no_grad():
        embeds, lb, _, _ = model._embed(batch, None)
        gen = GenerationConfig(do_sample=True, temperature=temperature, top_p=1.0, top_k=0, max_new_tokens=max_new_tokens,
                               eos_token_id=model.layout.stop_ids, pad_token_id=model.layout.pad_id, use_cache=True)
        return model.llm.generate(inputs_embeds=embeds, attention_mask=lb.attention_mask.to(embeds.device),
                                  generation_config=gen, streamer=streamer, stopping_criteria=stopping)


def chat_prompt_ids(backend, messages: list[dict]) -> list[int]:
    """A text-only conversation rendered as `infer`'s transcript strategy renders one for the frozen LLM."""
    from steermoe_core.inference.longform import render_chat

    _torch_only(backend, "a chat without audio")
    return render_chat(backend.tokenizer, messages)


def generate_text(backend, prompts: list[list[int]], budgets: list[int], temperature: float, streamer) -> tuple[list[str], list[str | None]]:
    """The frozen LLM alone on left-padded token prompts (no audio, no adapter in the way), with
    the same per-row budget and loop guard as ``longform.chat_text``."""
    import torch
    from transformers import GenerationConfig

    from steermoe_core.inference.longform import as_stopping_criteria
    from steermoe_core.runtime import autocast

    _torch_only(backend, "a chat without audio")
    model = backend.model
    pad = model.layout.pad_id
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    sample = dict(do_sample=True, temperature=temperature, top_p=1.0, top_k=0) if temperature > 0 else \
        dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    gen = GenerationConfig(num_beams=1, max_new_tokens=max(budgets), eos_token_id=model.layout.stop_ids,
                           pad_token_id=pad, use_cache=True, **sample)
    guard = _guard(backend, budgets)
    with torch.no_grad(), autocast(backend.device, backend.precision):
        out = model.llm.generate(input_ids=ids.to(backend.device), attention_mask=mask.to(backend.device),
                                 generation_config=gen, streamer=streamer, stopping_criteria=as_stopping_criteria(guard, width))
    rows = finish_rows(out[:, width:].tolist(), model.layout.stop_ids, pad)
    return _checked([t.strip() for t in model.tokenizer.batch_decode(rows, skip_special_tokens=True)], guard)
