"""Randomly initialised backbones saved as ordinary HF folders.

Tests, CPU smoke runs and the speed benchmarks need models at chosen shapes with no hub: these are
written to disk and then loaded through exactly the path a user's folder takes.
"""

from __future__ import annotations

from pathlib import Path

import torch

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_CORPUS = (
    "the quick brown fox jumps over the lazy dog. transcribe the audio. hello world. "
    "a stitch in time saves nine. she sells sea shells by the sea shore. one two three four five six seven eight nine ten. "
    "what is said in this recording? summarize the main points. yes no maybe. good morning and good night."
)


def write_whisper(folder: Path, layers: int = 2, dim: int = 64, heads: int = 4, ffn: int = 128, n_mels: int = 80, seed: int = 0) -> Path:
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(seed)
    cfg = WhisperConfig(
        d_model=dim, encoder_layers=layers, decoder_layers=1, encoder_attention_heads=heads,
        decoder_attention_heads=heads, encoder_ffn_dim=ffn, decoder_ffn_dim=ffn, num_mel_bins=n_mels,
        vocab_size=300, pad_token_id=1, bos_token_id=2, eos_token_id=2, decoder_start_token_id=3,
        max_source_positions=1500, max_target_positions=64,
    )
    WhisperForConditionalGeneration(cfg).save_pretrained(folder)
    return folder


def write_tokenizer(folder: Path, vocab_size: int = 400):
    """A small byte-level BPE with ChatML special tokens and chat template, trained in a blink."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None,
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = CHATML
    fast.save_pretrained(folder)
    return fast


def write_llm(
    folder: Path, layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2, ffn: int = 128,
    vocab_size: int | None = None, seed: int = 0, model_type: str = "qwen2", init_std: float = 0.02,
) -> Path:
    """A Qwen2- (or Llama-) shaped causal LM; with no vocab_size, a small trained tokenizer too.

    Tests raise ``init_std``: at the usual 0.02 a tiny random LM's logits are nearly flat whatever
    its input, so no adapter could make it say anything.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    tok = write_tokenizer(folder) if vocab_size is None else None
    vocab = len(tok) if tok is not None else vocab_size
    cfg = AutoConfig.for_model(
        model_type, vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
        tie_word_embeddings=False, eos_token_id=tok.eos_token_id if tok is not None else 0,
        pad_token_id=tok.pad_token_id if tok is not None else 0, initializer_range=init_std,
    )
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(folder)
    return folder


def write_conformer(
    folder: Path, layers: int = 2, dim: int = 64, heads: int = 4, kernel_size: int = 15, idim: int = 80, seed: int = 0
) -> Path:
    """A FireRedASR-AED-shaped folder: ``model.pth.tar`` ({"args": Namespace, "model_state_dict"}, the
    encoder's weights under ``encoder.`` beside a stand-in decoder weight) and a binary ``cmvn.ark``."""
    import argparse
    import struct

    from steermoe_core.encoders.conformer import build_encoder

    torch.manual_seed(seed)
    args = argparse.Namespace(
        idim=idim, n_layers_enc=layers, n_head=heads, d_model=dim, kernel_size=kernel_size, residual_dropout=0.1,
        dropout_rate=0.1, pe_maxlen=5000, n_layers_dec=1, odim=100, sos_id=3, eos_id=4, pad_id=2,
    )
    enc = build_encoder(vars(args))
    for name, p in enc.named_parameters():  # LayerNorms and pos biases non-trivial, so tests see them used
        if p.ndim == 1 or name.endswith(("pos_bias_u", "pos_bias_v")):
            p.data.normal_(1.0 if name.endswith("weight") else 0.0, 0.1)
    state = {f"encoder.{k}": v for k, v in enc.state_dict().items()}
    state["decoder.tgt_word_emb.weight"] = torch.randn(args.odim, dim)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"args": args, "model_state_dict": state}, folder / "model.pth.tar")
    # Kaldi stats as compute-cmvn-stats writes them (binary double matrix): count 1000, means 8..12, variances 2..6
    count, mean, var = 1000.0, torch.linspace(8, 12, idim, dtype=torch.float64), torch.linspace(2, 6, idim, dtype=torch.float64)
    stats = torch.zeros(2, idim + 1, dtype=torch.float64)
    stats[0, :idim], stats[0, idim], stats[1, :idim] = mean * count, count, (var + mean**2) * count
    header = b"\0BDM \x04" + struct.pack("<i", 2) + b"\x04" + struct.pack("<i", idim + 1)
    (folder / "cmvn.ark").write_bytes(header + stats.numpy().astype("<f8").tobytes())
    return folder
