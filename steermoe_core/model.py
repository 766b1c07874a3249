"""SteerMoE end to end: frozen encoder -> steering -> pool -> projector -> frozen LLM.

The model takes raw 16 kHz waveforms: log-mel features are computed on the model's device.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .decoding import trim_loops
from .encoders.whisper import encode, final_norm, whisper_dims
from .features import MAX_FRAMES, batch_log_mel, num_frames
from .prompt import PromptLayout, source_index
from .steering import SteeringMoE, pool_frames, pooled_lengths
from .weights import to_device


@dataclass
class AudioBatch:
    waves: torch.Tensor  # (N, S) float32 clips, right-padded with zeros
    lengths: torch.Tensor  # (N,) samples, on the host
    prompts: list[str]  # one per example
    targets: list[str] | None = None
    clips_per_example: list[int] | None = None  # long audio: an example's windows, in order; None = 1 each

    def pin_memory(self) -> AudioBatch:
        """Called by DataLoader(pin_memory=True): lets the step copy waveforms without a stream sync."""
        self.waves = self.waves.pin_memory()
        return self


def pad_clips(clips: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 mono clips -> right-padded (N, S) waveforms and their (N,) lengths, as AudioBatch wants."""
    lengths = torch.tensor([len(c) for c in clips], dtype=torch.long)
    waves = torch.zeros(len(clips), int(lengths.max()))
    for i, c in enumerate(clips):
        waves[i, : len(c)] = torch.from_numpy(c)
    return waves, lengths


def build_adapter(num_layers: int, dim: int, hidden: int, cfg: ModelConfig) -> tuple[SteeringMoE | None, nn.Linear]:
    """The trainable part for an encoder of ``num_layers`` x ``dim`` and an LLM of width ``hidden``."""
    place = cfg.steering.placement
    steering = None if place == "none" else SteeringMoE(num_layers if place == "layer_wise" else 1, dim, cfg.steering)
    in_dim = dim * cfg.projector.stride if cfg.projector.pooling == "stack" else dim
    return steering, nn.Linear(in_dim, hidden)


def parameter_groups(steering: SteeringMoE | None, projector: nn.Linear) -> dict[str, list[nn.Parameter]]:
    """Named groups so each can take its own learning rate (and be counted apart)."""
    groups = {"projector": list(projector.parameters())}
    if steering is not None:
        groups["steering_vectors"] = [steering.vectors]
        groups["router"] = list(steering.router.parameters())
        groups["scales"] = [steering.scales]
    return groups


def parameter_counts(steering: SteeringMoE | None, projector: nn.Linear) -> dict[str, int]:
    counts = {k: sum(p.numel() for p in ps) for k, ps in parameter_groups(steering, projector).items()}
    out = {k: counts.get(k, 0) for k in ("steering_vectors", "router", "scales", "projector")}
    out["total"] = sum(out.values())
    return out


class SteerMoEModel(nn.Module):
    def __init__(self, encoder: nn.Module, llm: nn.Module, tokenizer, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder, self.llm, self.tokenizer = encoder, llm, tokenizer
        self.layout = PromptLayout(tokenizer, cfg.llm.system_prompt)
        layers, dim, self.n_mels = whisper_dims(encoder)
        self.steering, self.projector = build_adapter(layers, dim, llm.get_input_embeddings().embedding_dim, cfg)
        self._init_projector()
        self.max_target_tokens = 256
        self.grad_checkpointing = False

    @torch.no_grad()
    def _init_projector(self) -> None:
        """Start audio tokens at the loudness of the LLM's own token embeddings.

        The encoder's layer-normed output has unit scale; PyTorch's default init would make audio
        tokens several times louder than text tokens (SmolLM2's embeddings have RMS 0.14), and the
        adapter would spend its first hundreds of steps just turning them down.
        """
        emb = self.llm.get_input_embeddings().weight
        rms = emb.float().pow(2).mean().sqrt().item()
        self.projector.weight.normal_(0.0, rms / self.projector.in_features**0.5)
        self.projector.bias.zero_()

    # -- training-mode bookkeeping: the backbones never leave eval mode (no dropout, ever) --
    def train(self, mode: bool = True) -> SteerMoEModel:
        super().train(mode)
        self.encoder.eval()
        self.llm.train(mode and self.grad_checkpointing)
        return self

    def enable_gradient_checkpointing(self) -> None:
        """HF checkpoints only modules in training mode, so the LLM must be in it; every dropout in
        it is zeroed first, so "training mode" changes nothing but the checkpointing."""
        for m in self.llm.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0
            if isinstance(getattr(m, "attention_dropout", None), float):
                m.attention_dropout = 0.0
        self.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.grad_checkpointing = True

    def adapter_modules(self) -> dict[str, nn.Module]:
        return {k: m for k, m in (("steering", self.steering), ("projector", self.projector)) if m is not None}

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{name}.{k}": v.detach() for name, m in self.adapter_modules().items() for k, v in m.state_dict().items()}

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        own = self.adapter_state_dict()
        missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or extra:
            raise ValueError(f"adapter weights do not match the recipe (missing {missing[:3]}, unexpected {extra[:3]})")
        for k, v in state.items():
            if own[k].shape != v.shape:
                raise ValueError(f"adapter weight {k}: shape {tuple(v.shape)} but the recipe builds {tuple(own[k].shape)}")
        for name, m in self.adapter_modules().items():
            m.load_state_dict({k[len(name) + 1 :]: v for k, v in state.items() if k.startswith(name + ".")})

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return parameter_groups(self.steering, self.projector)

    def parameter_counts(self) -> dict[str, int]:
        return parameter_counts(self.steering, self.projector)

    # -- audio side --
    def audio_token_counts(self, lengths: torch.Tensor) -> list[int]:
        """Audio tokens per clip, from sample counts alone (host arithmetic, no device sync)."""
        k = self.cfg.projector.stride
        if not self.cfg.encoder.trim_padding:
            return [pooled_lengths(torch.tensor(MAX_FRAMES // 2), k).item()] * len(lengths)
        frames = torch.tensor([min(num_frames(int(n)), MAX_FRAMES) for n in lengths])
        return pooled_lengths((frames + 1) // 2, k).tolist()

    def encode_audio(self, waves: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, S) waveforms -> (B, T', H) audio embeddings (padded positions are garbage-free zeros)."""
        trim = self.cfg.encoder.trim_padding
        feats, frames = batch_log_mel(waves, lengths, self.n_mels, pad_to=None if trim else MAX_FRAMES)
        place = self.cfg.steering.placement
        hook = self.steering if place == "layer_wise" else None
        x, mask = encode(self.encoder, feats, frames, trim_padding=trim, hook=hook)
        if place == "post_encoder":
            x = self.steering(0, x, mask)
        z = final_norm(self.encoder, x)
        pooled, _ = pool_frames(z, mask, self.cfg.projector.stride, self.cfg.projector.pooling)
        return self.projector(pooled)

    def _embed(self, batch: AudioBatch, targets: list[str] | None):
        audio = self.encode_audio(batch.waves, batch.lengths)
        per_clip = self.audio_token_counts(batch.lengths)
        src_index = source_index(per_clip, audio.shape[1])  # clip-major, so windows stay in order
        groups = batch.clips_per_example or [1] * len(per_clip)
        bounds = [sum(groups[:i]) for i in range(len(groups) + 1)]
        n_audio = [sum(per_clip[bounds[i] : bounds[i + 1]]) for i in range(len(groups))]
        lb = self.layout.build(n_audio, batch.prompts, targets, self.max_target_tokens)
        dev = audio.device
        emb_layer = self.llm.get_input_embeddings()
        embeds = emb_layer(to_device(lb.input_ids, dev))
        b, s, h = embeds.shape
        src = audio.reshape(-1, h).index_select(0, to_device(src_index, dev))
        flat = embeds.reshape(-1, h).index_copy(0, to_device(lb.audio_index, dev), src.to(embeds.dtype))
        return flat.view(b, s, h), lb

    # -- training loss --
    def forward(self, batch: AudioBatch) -> dict[str, torch.Tensor]:
        """Cross-entropy on target tokens only: logits are never formed for prompt or audio positions."""
        if batch.targets is None:
            raise ValueError("forward() needs targets; use generate() for inference")
        if self.steering is not None:
            self.steering.reset_aux()
        embeds, lb = self._embed(batch, batch.targets)
        dev = embeds.device
        out = self.llm.base_model(inputs_embeds=embeds, attention_mask=to_device(lb.attention_mask, dev), use_cache=False)
        hidden = out.last_hidden_state.reshape(-1, embeds.shape[-1]).index_select(0, to_device(lb.target_index, dev))
        logits = self.llm.get_output_embeddings()(hidden).float()
        ce = F.cross_entropy(logits, to_device(lb.target_labels, dev))
        aux = self.steering.aux_loss if self.steering is not None and self.steering.aux_loss is not None else None
        loss = ce if aux is None else ce + aux
        return {"loss": loss, "ce": ce.detach(), "tokens": torch.tensor(len(lb.target_labels))}

    # -- inference --
    @torch.no_grad()
    def generate(
        self, batch: AudioBatch, max_new_tokens: int = 128, num_beams: int = 1, streamer=None, **options
    ) -> list[str]:
        """Deterministic decoding: greedy (or beams), left-padded batch, stop at end of turn.

        A fresh GenerationConfig is used, so the LLM's own generation_config can never switch
        sampling on; ``options`` go into it (e.g. ``cache_implementation="static"``).
        """
        ids = self.generate_ids(batch, max_new_tokens, num_beams, streamer, **options)
        stops, pad = set(self.layout.stop_ids), self.layout.pad_id
        rows = []
        for row in ids.tolist():
            while row and row[-1] == pad and pad not in stops:
                row.pop()
            # an output that never reached end-of-turn ran out of budget: cut a runaway loop
            rows.append(row if row and row[-1] in stops else trim_loops(row))
        return [t.strip() for t in self.tokenizer.batch_decode(rows, skip_special_tokens=True)]

    @torch.no_grad()
    def generate_ids(self, batch: AudioBatch, max_new_tokens: int = 128, num_beams: int = 1, streamer=None, **options) -> torch.Tensor:
        from transformers import GenerationConfig

        embeds, lb = self._embed(batch, None)
        gen = GenerationConfig(
            do_sample=False, num_beams=num_beams, max_new_tokens=max_new_tokens,
            eos_token_id=self.layout.stop_ids, pad_token_id=self.layout.pad_id,
            temperature=None, top_p=None, top_k=None, use_cache=True, **options,
        )
        return self.llm.generate(
            inputs_embeds=embeds, attention_mask=to_device(lb.attention_mask, embeds.device), generation_config=gen, streamer=streamer
        )


def autocast(device: torch.device, precision: str):
    """bf16/fp16 autocast on the model's device; fp32 means no autocast."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def backbone_identity(model: SteerMoEModel) -> dict:
    """What a checkpoint must match: backbone paths, shape-defining config, and a weight fingerprint."""
    ec, lc = model.encoder.config, model.llm.config
    enc = {k: getattr(ec, k, None) for k in ("d_model", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim", "num_mel_bins")}
    llm = {k: getattr(lc, k, None) for k in ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")}

    def fingerprint(t: torch.Tensor) -> str:  # rounded to bf16: the same weights in any load dtype
        return hashlib.sha256(t.detach().flatten()[:4096].to(torch.bfloat16).float().cpu().numpy().tobytes()).hexdigest()[:16]

    return {
        "encoder": {"path": model.cfg.encoder.path, "config": enc, "config_hash": _hash(enc), "weights": fingerprint(model.encoder.conv1.weight)},
        "llm": {"path": model.cfg.llm.path, "config": llm, "config_hash": _hash(llm), "weights": fingerprint(model.llm.get_input_embeddings().weight)},
    }


def _hash(d: dict) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def count_adapter_parameters(num_layers: int, dim: int, hidden: int, cfg: ModelConfig) -> dict[str, int]:
    """The parameter breakdown for any backbone shapes, without loading a backbone (meta tensors)."""
    with torch.device("meta"):
        return parameter_counts(*build_adapter(num_layers, dim, hidden, cfg))
