"""SteerMoE end to end: frozen encoder -> steering -> pool -> projector -> frozen LLM.

The model takes raw 16 kHz waveforms; the encoder computes its own features on the model's device.
Only ``self.adapter`` (and LoRA matrices, when the recipe asks for them: see ``model.lora``) trains
and is saved; both backbones stay frozen and in eval mode.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from steermoe_core.config import ModelConfig
from steermoe_core.data.batch import AudioBatch
from steermoe_core.data.ctc_noise import TextBatch
from steermoe_core.encoders.base import AudioEncoder, fingerprint
from steermoe_core.model.adapter import Adapter
from steermoe_core.model.ctc import vocab_ctc_loss
from steermoe_core.model.decoding import finish_rows
from steermoe_core.model.lora import (
    load_lora_state_dict,
    lora_parameters,
    lora_state_dict,
    set_lora_training,
)
from steermoe_core.model.prompt import PromptLayout, source_index
from steermoe_core.model.steering import pooled_lengths
from steermoe_core.runtime import to_device

if TYPE_CHECKING:
    from steermoe_core.data.augment import FeatureMasks

PAD_MULTIPLE_TOKENS = 8  # LLM sequences: a handful of widths, and tensor-core friendly on GPUs


class SteerMoEModel(nn.Module):
    def __init__(self, encoder: AudioEncoder, llm: nn.Module, tokenizer, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder, self.llm, self.tokenizer = encoder, llm, tokenizer
        self.layout = PromptLayout(tokenizer, cfg.llm.system_prompt)
        emb = llm.get_input_embeddings().weight
        self.adapter = Adapter(encoder.num_layers, encoder.dim, emb.shape[1], cfg)
        self.adapter.init_projector(emb.float().pow(2).mean().sqrt().item())
        self.max_target_tokens = 256
        self.ctc_weight = 0.0  # set from train.ctc_weight by the training loop
        self.ctc_only = False  # True during the first train.ctc_only_steps steps
        self.pad_multiple_tokens = 0  # LLM sequences padded to a multiple of this: see pad_to_repeated_shapes
        space = tokenizer(" ", add_special_tokens=False)["input_ids"]
        self.ctc_blank_id = space[0] if len(space) == 1 else self.layout.pad_id
        self.grad_checkpointing = False
        self.lora: dict[str, nn.Module] = {}  # part -> peft tuner (a plain dict: not a submodule)
        self.reuse_prefix = True  # the loss reads the chat prefix's keys/values from a cache (see _prefix_kv)
        self._prefix: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def pad_to_repeated_shapes(self, seconds: float) -> None:
        """Pad (masked) each batch's audio to a multiple of ``seconds`` and its LLM sequence to a
        multiple of 8 tokens; 0 = off. The CPU's oneDNN caches kernels per shape: when every batch
        brings new shapes it never hits and the process grows (see ``encoders.base.padded_width``,
        ``benchmarks/train_memory.py``, ``benchmarks/infer_folder.py``). Training sets it from the
        recipe it runs, a loaded checkpoint from the recipe it was trained with
        (``data.pad_multiple_seconds``)."""
        self.encoder.pad_multiple = round(seconds * self.encoder.feature_rate)
        self.pad_multiple_tokens = PAD_MULTIPLE_TOKENS if seconds > 0 else 0

    @property
    def steering(self):
        return self.adapter.steering

    @property
    def projector(self) -> nn.Linear:
        return self.adapter.projector

    @property
    def device(self) -> torch.device:
        return self.adapter.projector.weight.device

    # -- training-mode bookkeeping: the backbones never leave eval mode (no dropout, ever) --
    def train(self, mode: bool = True) -> SteerMoEModel:
        super().train(mode)
        self.encoder.eval()
        self.llm.train(mode and self.grad_checkpointing)
        set_lora_training(self, mode)
        return self

    def enable_gradient_checkpointing(self) -> None:
        """HF checkpoints only modules in training mode, so the LLM must be in it; every dropout in
        it is zeroed first, so "training mode" changes nothing but the checkpointing."""
        for name, m in self.llm.named_modules():
            if isinstance(m, nn.Dropout) and ".lora_dropout." not in name:
                m.p = 0.0
            if isinstance(getattr(m, "attention_dropout", None), float):
                m.attention_dropout = 0.0
        self.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.grad_checkpointing = True

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything that trains: the adapter, plus ``lora.<part>.*`` when there is LoRA."""
        return {**{k: v.detach() for k, v in self.adapter.state_dict().items()}, **lora_state_dict(self)}

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.adapter.load_checked({k: v for k, v in state.items() if not k.startswith("lora.")})
        load_lora_state_dict(self, {k: v for k, v in state.items() if k.startswith("lora.")})

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """The adapter's groups, plus ``lora_encoder`` / ``lora_llm`` when there is LoRA."""
        groups = self.adapter.parameter_groups()
        for part in self.lora:
            groups[f"lora_{part}"] = lora_parameters(getattr(self, part))
        return groups

    def parameter_counts(self) -> dict[str, int]:
        counts = self.adapter.parameter_counts()
        total = counts.pop("total")
        for part in self.lora:
            counts[f"lora_{part}"] = sum(p.numel() for p in lora_parameters(getattr(self, part)))
            total += counts[f"lora_{part}"]
        return {**counts, "total": total}

    # -- audio side --
    def audio_token_counts(self, lengths: torch.Tensor) -> list[int]:
        """Audio tokens per clip, from sample counts alone (host arithmetic, no device sync)."""
        return pooled_lengths(self.encoder.output_lengths(lengths), self.cfg.projector.stride).tolist()

    def audio_tokens(self, waves: torch.Tensor, lengths: torch.Tensor, masks: FeatureMasks | None = None) -> torch.Tensor:
        """(B, S) waveforms -> (B, T', H) projected audio tokens, before ``vocab_posterior`` (the CTC loss's input)."""
        return self.adapter.project(*self.encoder_frames(waves, lengths, masks))

    def encoder_frames(self, waves: torch.Tensor, lengths: torch.Tensor,
                       masks: FeatureMasks | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, S) waveforms -> the steered, final-normed (B, T, D) encoder frames and their (B, T) mask:
        what the projector pools (``benchmarks/ctc_heads.py`` keeps them to train other heads on).
        ``masks`` (SpecAugment) apply in training mode only."""
        feats, feat_lengths = self.encoder.features(waves, lengths)
        if masks is not None and self.training:
            feats = masks.apply(feats, feat_lengths, self.encoder.time_axis)
        x, mask = self.encoder.forward_layers(feats, feat_lengths, hook=self.adapter.layer_hook)
        return self.encoder.final_norm(self.adapter.after_encoder(x, mask)), mask

    def encode_audio(self, waves: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, S) waveforms -> (B, T', H) what the LLM reads for the audio (rows past a clip's length are padding)."""
        return self.adapter.llm_inputs(self.audio_tokens(waves, lengths), self.llm.get_input_embeddings().weight)

    def _embed(self, batch: AudioBatch, targets: list[str] | None, ctc: bool = False):
        """The LLM's input embeddings for ``batch``, its layout, the audio tokens, their counts per clip,
        and the (B, T', V) CTC logits where ``ctc`` (the loss) or ``drop_blank`` needs them (else None):
        computed once, for both."""
        audio = self.audio_tokens(batch.waves, batch.lengths, batch.masks)
        per_clip = self.audio_token_counts(batch.lengths)
        emb_layer = self.llm.get_input_embeddings()
        logits = self.vocab_logits(audio) if ctc or self.adapter.drop_blank else None
        read = self.read_positions(audio, per_clip, emb_layer.weight, logits)
        src_index = source_index(read, audio.shape[1])  # clip-major, so windows stay in order
        groups = batch.clips_per_example or [1] * len(per_clip)
        bounds = [sum(groups[:i]) for i in range(len(groups) + 1)]
        n_audio = [sum(len(p) for p in read[bounds[i] : bounds[i + 1]]) for i in range(len(groups))]
        lb = self.layout.build(n_audio, batch.prompts, targets, self.max_target_tokens, self.pad_multiple_tokens)
        dev = audio.device
        embeds = emb_layer(to_device(lb.input_ids, dev))
        b, s, h = embeds.shape
        src = audio.reshape(-1, h).index_select(0, to_device(src_index, dev))  # real tokens only: padding is never mixed
        src = self.adapter.llm_inputs(src, emb_layer.weight)
        flat = embeds.reshape(-1, h).index_copy(0, to_device(lb.audio_index, dev), src.to(embeds.dtype))
        return flat.view(b, s, h), lb, audio, per_clip, logits

    def vocab_logits(self, audio: torch.Tensor) -> torch.Tensor:
        """(B, T', H) audio tokens -> (B, T', V) dot products with the LLM's input embeddings: the CTC logits."""
        return audio @ self.llm.get_input_embeddings().weight.T.to(audio.dtype)

    def read_positions(self, audio: torch.Tensor, per_clip: list[int], vocab: torch.Tensor,
                       logits: torch.Tensor | None = None) -> list[list[int]]:
        """Which of each clip's audio tokens the LLM reads: all ``per_clip[i]`` of them, or under
        ``projector.drop_blank`` those the CTC read-out keeps (``Adapter.kept``); a clip heard as
        nothing but blanks keeps its first token, so every clip still has a place in the prompt."""
        if not self.adapter.drop_blank:
            return [list(range(n)) for n in per_clip]
        keep = self.adapter.kept(audio, vocab, self.ctc_blank_id, logits).cpu().tolist()
        out = []
        for row, n in zip(keep, per_clip):
            pos = [j for j in range(n) if row[j]]
            out.append(pos or [0])
        return out

    # -- training loss --
    def _prefix_kv(self, ids: list[int], dev: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Each LLM layer's keys and values for the chat prefix every sequence starts with (system
        message, user header: the tokens before the audio), computed once without gradients and kept.

        In a causal LLM those positions see nothing after them, so they are the same for every
        example, and with a frozen LLM no gradient flows into them: running them in every step's
        forward and backward (about a tenth of a demo sequence) is pure waste. None where it cannot be
        reused: LoRA on the LLM (the keys depend on trained weights), gradient checkpointing, or an LLM
        whose forward takes no cache."""
        if not self.reuse_prefix or "llm" in self.lora or self.grad_checkpointing or not ids:
            return None
        key = (tuple(ids), str(dev), torch.is_autocast_enabled(dev.type), torch.get_autocast_dtype(dev.type))
        if key not in self._prefix:
            try:
                with torch.no_grad():
                    emb = self.llm.get_input_embeddings()(torch.tensor([ids], device=dev))
                    out = self.llm.base_model(inputs_embeds=emb, use_cache=True)
                cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
                self._prefix[key] = [(layer.keys, layer.values) for layer in cache.layers]
            except (AttributeError, TypeError):
                self.reuse_prefix = False
                return None
        return self._prefix[key]

    def _llm_hidden(self, embeds: torch.Tensor, lb) -> tuple[torch.Tensor, torch.Tensor]:
        """The LLM's last hidden states and the flat indices of the target positions in them. Where every
        row starts with the same chat prefix its keys and values come from ``_prefix_kv`` and only the
        positions after it run (same loss and gradients: a test compares them)."""
        dev = embeds.device
        mask = to_device(lb.attention_mask, dev)
        target_index = to_device(lb.target_index, dev)
        n = lb.prefix_len
        kv = self._prefix_kv(lb.input_ids[0, :n].tolist(), dev) if n else None
        if kv is None:
            out = self.llm.base_model(inputs_embeds=embeds, attention_mask=mask, use_cache=False)
            return out.last_hidden_state, target_index
        import inspect

        from transformers import DynamicCache

        b, s, _ = embeds.shape
        cache = DynamicCache(ddp_cache_data=[(k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)) for k, v in kv])
        name = "cache" if "cache" in inspect.signature(self.llm.base_model.forward).parameters else "past_key_values"
        out = self.llm.base_model(inputs_embeds=embeds[:, n:], attention_mask=mask, use_cache=False, **{name: cache})
        return out.last_hidden_state, (target_index // s) * (s - n) + target_index % s - n

    def forward(self, batch: AudioBatch | TextBatch) -> dict[str, torch.Tensor]:
        """Cross-entropy on target tokens only: logits are never formed for prompt or audio positions.
        A ``TextBatch`` (text-only reader training) goes to ``text_forward``."""
        if isinstance(batch, TextBatch):
            return self.text_forward(batch.targets, batch.read, batch.prompt)
        if batch.targets is None:
            raise ValueError("forward() needs targets; use generate() for inference")
        self.adapter.reset_aux()
        if self.ctc_only:
            return self._ctc_only_forward(batch)
        want_ctc = self.ctc_weight > 0 and batch.clips_per_example is None
        embeds, lb, audio, audio_lengths, logits = self._embed(batch, batch.targets, ctc=want_ctc)
        ce = self._target_loss(embeds, lb)
        aux = self.adapter.aux_loss
        loss = ce if aux is None else ce + aux
        out = {"ce": ce.detach(), "tokens": torch.tensor(len(lb.target_labels))}
        if want_ctc:
            ctc = self.ctc_loss(audio, audio_lengths, self.ctc_targets(batch.targets), logits)
            loss = loss + self.ctc_weight * ctc
            out["ctc"] = ctc.detach()
        return {"loss": loss, **out}

    def _target_loss(self, embeds: torch.Tensor, lb) -> torch.Tensor:
        """Cross-entropy of the LLM's next-token logits at the target positions only."""
        last, target_index = self._llm_hidden(embeds, lb)
        hidden = last.reshape(-1, embeds.shape[-1]).index_select(0, target_index)
        logits = self.llm.get_output_embeddings()(hidden).float()
        return F.cross_entropy(logits, to_device(lb.target_labels, embeds.device))

    def text_forward(self, targets: list[str], read: list[list[int]], prompt: str) -> dict[str, torch.Tensor]:
        """The reader's loss on text alone: the LLM reads the embeddings of ``read[i]``'s word pieces
        where clip i's audio tokens would be (what ``argmax_embeddings`` hands it: a transcript as a CTC
        read-out heard it, ``data.ctc_noise``) and must write ``targets[i]``. No audio, no encoder: only
        LoRA on the LLM learns from it."""
        lb = self.layout.build([len(r) for r in read], [prompt] * len(read), targets, self.max_target_tokens, self.pad_multiple_tokens)
        emb_layer = self.llm.get_input_embeddings()
        dev = emb_layer.weight.device
        embeds = emb_layer(to_device(lb.input_ids, dev))
        b, s, h = embeds.shape
        src = emb_layer(torch.tensor([t for r in read for t in r], dtype=torch.long, device=dev))
        flat = embeds.reshape(-1, h).index_copy(0, to_device(lb.audio_index, dev), src.to(embeds.dtype))
        ce = self._target_loss(flat.view(b, s, h), lb)
        return {"loss": ce, "ce": ce.detach(), "tokens": torch.tensor(len(lb.target_labels))}

    def _ctc_only_forward(self, batch: AudioBatch) -> dict[str, torch.Tensor]:
        """Stage one of a CTC curriculum: the audio side and the embedding table only, no LLM pass."""
        audio = self.audio_tokens(batch.waves, batch.lengths, batch.masks)
        ids = self.ctc_targets(batch.targets)
        ctc = self.ctc_loss(audio, self.audio_token_counts(batch.lengths), ids)
        aux = self.adapter.aux_loss
        n = sum(len(r) + 1 for r in ids)  # + end of turn, as the LLM's loss counts them
        return {"loss": ctc if aux is None else ctc + aux, "ce": ctc.detach(), "ctc": ctc.detach(), "tokens": torch.tensor(n)}

    def ctc_targets(self, targets: list[str]) -> list[list[int]]:
        """Each transcript's token ids, without the end-of-turn token the LLM's loss adds."""
        return [self.layout.target_ids(t, self.max_target_tokens)[:-1] for t in targets]

    def ctc_loss(self, audio: torch.Tensor, lengths: list[int], ids: list[list[int]], logits: torch.Tensor | None = None) -> torch.Tensor:
        """CTC of each transcript over its audio tokens, read through the LLM's frozen input embeddings.

        Logits are dot products with every token embedding, so minimising it pulls each audio token
        towards the embedding of the word piece it carries: what the LLM must read anyway. The
        blank is the single-space token (``ctc_blank_id``): audio frames between words then look like
        extra spaces to the LLM, not like the end-of-turn token that pad usually is (which makes the
        LLM ignore the audio). Costs one (T' x vocab) matmul.
        """
        logits = self.vocab_logits(audio) if logits is None else logits  # ``_embed``'s, when it made them
        return vocab_ctc_loss(logits, lengths, ids, self.ctc_blank_id)  # no (T' x vocab) log-softmax: model/ctc.py

    @torch.no_grad()
    def ctc_transcribe(self, batch: AudioBatch) -> list[str]:
        """The CTC read-out: each audio token's nearest word piece in the LLM's input embedding table
        (argmax of the CTC logits), repeats merged, no LLM at all. What the CTC loss trains, and the
        floor an LLM reading the same tokens has to beat. The blank is the space token
        (``ctc_blank_id``), so blanks read as the word breaks they are and runs of spaces collapse."""
        audio = self.audio_tokens(batch.waves.to(self.device), batch.lengths)
        return self.ctc_read(audio, self.audio_token_counts(batch.lengths))

    @torch.no_grad()
    def ctc_read(self, audio: torch.Tensor, counts: list[int]) -> list[str]:
        """(B, T', H) audio tokens with ``counts[i]`` real ones each -> the CTC read-out's texts
        (``ctc_transcribe`` from the tokens on; ``benchmarks/ctc_heads.py`` reads other heads' tokens)."""
        ids = self.vocab_logits(audio).argmax(-1).cpu()
        texts = []
        for row, n in zip(ids.tolist(), counts):
            seq = row[:n]
            keep = [t for i, t in enumerate(seq) if i == 0 or t != seq[i - 1]]
            texts.append(" ".join(self.tokenizer.decode(keep, skip_special_tokens=True).split()))
        return texts

    # -- inference --
    @torch.no_grad()
    def generate(
        self, batch: AudioBatch, max_new_tokens: int = 128, num_beams: int = 1, streamer=None, stopping_criteria=None,
        temperature: float = 0.0, **options,
    ) -> list[str]:
        """Decoding: greedy (or beams; or sampling at ``temperature`` > 0), left-padded batch, stop at end of turn.

        A fresh GenerationConfig is used (``generation_config``), so the LLM's own can never switch
        sampling on; ``options`` go into it (e.g. ``cache_implementation="static"``).
        ``stopping_criteria`` (transformers') stop rows early: per-row budgets and loop guards.
        """
        ids = self.generate_ids(batch, max_new_tokens, num_beams, streamer, stopping_criteria, temperature, **options)
        rows = finish_rows(ids.tolist(), self.layout.stop_ids, self.layout.pad_id)
        return [t.strip() for t in self.tokenizer.batch_decode(rows, skip_special_tokens=True)]

    @torch.no_grad()
    def generate_ids(
        self, batch: AudioBatch, max_new_tokens: int = 128, num_beams: int = 1, streamer=None, stopping_criteria=None,
        temperature: float = 0.0, **options,
    ) -> torch.Tensor:
        embeds, lb, *_ = self._embed(batch, None)
        return self.llm.generate(
            inputs_embeds=embeds, attention_mask=to_device(lb.attention_mask, embeds.device),
            generation_config=generation_config(self.layout, max_new_tokens, num_beams, temperature, **options),
            streamer=streamer, stopping_criteria=stopping_criteria,
        )


def generation_config(layout, max_new_tokens: int, num_beams: int = 1, temperature: float = 0.0, **options):
    """A fresh GenerationConfig for the LLM (its own can never switch sampling on): greedy or beams,
    or sampling from the whole distribution at ``temperature`` > 0; stop at ``layout``'s end of turn."""
    from transformers import GenerationConfig

    sample = dict(do_sample=True, temperature=temperature, top_p=1.0, top_k=0) if temperature > 0 else \
        dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    return GenerationConfig(num_beams=num_beams, max_new_tokens=max_new_tokens, eos_token_id=layout.stop_ids,
                            pad_token_id=layout.pad_id, use_cache=True, **sample, **options)


def backbone_identity(model: SteerMoEModel) -> dict:
    """What a checkpoint must match: backbone paths, shape-defining config, and a weight fingerprint."""
    lc = model.llm.config
    enc = {"kind": model.encoder.kind, **model.encoder.identity()}
    llm = {k: getattr(lc, k, None) for k in ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")}
    return {
        "encoder": {"path": model.cfg.encoder.path, "config": enc, "config_hash": _hash(enc), "weights": fingerprint(model.encoder.fingerprint_tensor())},
        "llm": {"path": model.cfg.llm.path, "config": llm, "config_hash": _hash(llm), "weights": fingerprint(model.llm.get_input_embeddings().weight)},
    }


def _hash(d: dict) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]
