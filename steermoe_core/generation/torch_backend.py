"""The PyTorch backend: a ``SteerMoEModel`` on any device, at the decoding precision `eval` uses
(``runtime.resolve_precision(..., phase="decode")``: fp32 on a CPU under ``auto``)."""

from __future__ import annotations

from pathlib import Path

import torch

from steermoe_core.data.batch import AudioBatch, pad_clips
from steermoe_core.model.lora import base_llm
from steermoe_core.model.steermoe import SteerMoEModel, generation_config
from steermoe_core.runtime import Precision, autocast, pick_device, resolve_precision


class TorchBackend:
    """A ``SteerMoEModel`` in PyTorch, on any device."""

    name = "torch"

    def __init__(self, model: SteerMoEModel, precision: Precision | str | None = None, keep_mode: bool = False):
        """``keep_mode``: leave the model's train/eval mode as it is (training asks the frozen LLM for
        behaviour-alignment targets mid-run); otherwise it is put in eval mode."""
        self.model = model if keep_mode else model.eval()
        self.device = model.device
        self.precision = precision or resolve_precision("auto", self.device, "decode")
        self.max_context = int(getattr(model.llm.config, "max_position_embeddings", 1 << 30))

    @classmethod
    def load(cls, path: str | Path, device: str = "auto", trust_remote_code: bool = False) -> TorchBackend:
        """A checkpoint, run at the precision its recipe asks for, resolved for decoding on this device (as `eval` does)."""
        from steermoe_core.model.checkpoint import load_checkpoint

        dev = pick_device(device)
        model, recipe, _ = load_checkpoint(path, dev, trust_remote_code=trust_remote_code)
        return cls(model, resolve_precision(recipe.train.precision, dev, "decode"))

    @property
    def tokenizer(self):
        return self.model.tokenizer

    text_tokenizer = tokenizer

    @property
    def stop_ids(self) -> list[int]:
        return list(self.model.layout.stop_ids)

    @property
    def pad_id(self) -> int:
        return int(self.model.layout.pad_id)

    def decode(self, rows: list[list[int]]) -> list[str]:
        return self.tokenizer.batch_decode(rows, skip_special_tokens=True)

    def text_streamer(self):
        from transformers import TextStreamer

        return TextStreamer(self.tokenizer, skip_special_tokens=True)

    def audio_token_counts(self, lengths: list[int]) -> list[int]:
        return self.model.audio_token_counts(torch.tensor(lengths, dtype=torch.long))

    def prompt_tokens(self, prompt: str) -> int:
        pre, post = self.model.layout.around_audio(prompt)
        return len(pre) + len(post)

    def generate(self, clips, groups, prompts, max_new_tokens, num_beams, streamer=None, guard=None, temperature: float = 0.0) -> list[str]:
        """``guard``: a ``generation.guards.DecodeGuard`` asked after every step (per-row budgets, loops);
        ``temperature`` > 0 samples (greedy only)."""
        waves, lengths = pad_clips(clips)
        batch = AudioBatch(waves.to(self.device), lengths, prompts, clips_per_example=groups)
        stopping = as_stopping_criteria(guard) if guard is not None else None
        with autocast(self.device, self.precision):
            return self.model.generate(batch, max_new_tokens, num_beams, streamer=streamer, stopping_criteria=stopping,
                                       temperature=temperature)

    def complete(self, prompts: list[list[int]], max_new_tokens: int, guard=None, temperature: float = 0.0, streamer=None) -> list[list[int]]:
        """The frozen LLM alone on token prompts (text chat, the transcript strategy): the new ids per row."""
        return complete_ids(self.model, self.precision, prompts, max_new_tokens, guard, temperature, streamer)


def as_stopping_criteria(guard, prompt_length: int = 0):
    """A transformers ``StoppingCriteriaList`` that asks ``guard`` (only the ids after ``prompt_length``)."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class _Guard(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            stop = guard.check(input_ids[:, prompt_length:].tolist())
            return torch.tensor(stop, dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([_Guard()])


def as_logits_processor(guard, prompt_length: int = 0):
    """A transformers ``LogitsProcessorList`` that masks what ``guard.allowed`` forbids (a tool call
    decoded under its schema)."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class _Mask(LogitsProcessor):
        def __call__(self, input_ids, scores):
            allowed = guard.allowed(input_ids[:, prompt_length:].tolist(), scores.shape[-1])
            if allowed is None:
                return scores
            return scores.masked_fill(~torch.from_numpy(allowed).to(scores.device), float("-inf"))

    return LogitsProcessorList([_Mask()])


@torch.no_grad()
def complete_ids(model: SteerMoEModel, precision: Precision | str, prompts: list[list[int]], max_new_tokens: int,
                 guard=None, temperature: float = 0.0, streamer=None) -> list[list[int]]:
    """Left-padded token prompts through the frozen LLM (no audio, no adapter in the way, LoRA on the
    LLM switched off: ``model.lora.base_llm``); also what training's behaviour alignment runs on a bare model."""
    pad = model.layout.pad_id
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    stopping = as_stopping_criteria(guard, width) if guard is not None else None
    masking = as_logits_processor(guard, width) if guard is not None and guard.constraints is not None else None
    with autocast(model.device, precision), base_llm(model):
        out = model.llm.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                                 generation_config=generation_config(model.layout, max_new_tokens, 1, temperature), streamer=streamer,
                                 stopping_criteria=stopping, logits_processor=masking)
    return out[:, width:].tolist()
