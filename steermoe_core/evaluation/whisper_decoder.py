"""Whisper's own decoder as the yardstick: the same encoder, decoded the way Whisper does it.

Greedy, no timestamps, 30 s padded features, through the generic transformers generate loop (HF's
Whisper-specific generate wants generation-config fields that converted checkpoints lack).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from steermoe_core.data.batch import pad_clips
from steermoe_core.encoders.log_mel import MAX_FRAMES, batch_log_mel
from steermoe_core.errors import BackboneError


class WhisperDecoderBaseline:
    def __init__(self, folder: str | Path):
        from tokenizers import Tokenizer
        from transformers import WhisperForConditionalGeneration

        from steermoe_core.backbones.ctranslate2 import convert_ct2_folder
        from steermoe_core.backbones.weights import cache_root, resolve_model_dir

        src = resolve_model_dir(str(folder))
        hf = convert_ct2_folder(src, cache_root() / "ct2") if (src / "model.bin").exists() else src
        self.model = WhisperForConditionalGeneration.from_pretrained(hf).eval()
        tok_file = next((p for p in (hf / "tokenizer.json", hf / "ct2_tokenizer.json") if p.exists()), None)
        if tok_file is None:
            raise BackboneError(f"{src}: no tokenizer.json for Whisper's decoder")
        self.tok = Tokenizer.from_file(str(tok_file))
        ids = [self.tok.token_to_id("<|startoftranscript|>")]
        if self.model.config.vocab_size > 51864:  # multilingual: English, transcribe
            ids += [self.tok.token_to_id("<|en|>"), self.tok.token_to_id("<|transcribe|>")]
        self.prompt = ids + [self.tok.token_to_id("<|notimestamps|>")]
        self.n_mels = self.model.config.num_mel_bins

    @torch.no_grad()
    def transcribe(self, audios: list[np.ndarray], max_new_tokens: int = 96) -> list[str]:
        from transformers.generation.utils import GenerationMixin

        feats, _ = batch_log_mel(*pad_clips(audios), self.n_mels, pad_to=MAX_FRAMES)  # Whisper's 30 s layout
        ids = GenerationMixin.generate(
            self.model, input_features=feats,
            decoder_input_ids=torch.tensor([self.prompt] * len(audios)),
            max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
            eos_token_id=self.model.config.eos_token_id, pad_token_id=self.model.config.eos_token_id,
        )
        return [self.tok.decode(row[len(self.prompt) :].tolist(), skip_special_tokens=True).strip() for row in ids]
