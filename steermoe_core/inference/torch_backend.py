"""The PyTorch backend: a ``SteerMoEModel`` on any device, at the decoding precision `eval` uses
(``runtime.resolve_precision(..., phase="decode")``: fp32 on a CPU under ``auto``)."""

from __future__ import annotations

from pathlib import Path

import torch

from steermoe_core.data.batch import AudioBatch, pad_clips
from steermoe_core.model.steermoe import SteerMoEModel
from steermoe_core.runtime import Precision, autocast, pick_device, resolve_precision


class TorchBackend:
    """A ``SteerMoEModel`` in PyTorch, on any device."""

    name = "torch"

    def __init__(self, model: SteerMoEModel, precision: Precision | None = None):
        self.model = model.eval()
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

    def text_streamer(self):
        from transformers import TextStreamer

        return TextStreamer(self.tokenizer, skip_special_tokens=True)

    def audio_token_counts(self, lengths: list[int]) -> list[int]:
        return self.model.audio_token_counts(torch.tensor(lengths, dtype=torch.long))

    def prompt_tokens(self, prompt: str) -> int:
        pre, post = self.model.layout.around_audio(prompt)
        return len(pre) + len(post)

    def generate(self, clips, groups, prompts, max_new_tokens, num_beams, streamer=None, stopping_criteria=None) -> list[str]:
        """``stopping_criteria``: transformers stopping criteria per row (``longform.as_stopping_criteria``)."""
        waves, lengths = pad_clips(clips)
        batch = AudioBatch(waves.to(self.device), lengths, prompts, clips_per_example=groups)
        with autocast(self.device, self.precision):
            return self.model.generate(batch, max_new_tokens, num_beams, streamer=streamer, stopping_criteria=stopping_criteria)
