"""faster-whisper / CTranslate2 Whisper folders (model.bin + config.json) as transformers modules.

model.bin layout (docs/design.md#the-ctranslate2-modelbin-layout): u32 version; spec name; u32 revision; u32 variable count,
each (name, u8 rank, u32 dims, u8 dtype, u32 bytes, data); u32 alias count, each (alias, target).
The conversion is done once and cached as an ordinary HF folder, so later loads are plain
safetensors reads.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import numpy as np
import torch

from steermoe_core.atomic import atomic_dir
from steermoe_core.backbones.weights import cache_root, file_key
from steermoe_core.errors import BackboneError

_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}


def read_ct2(path: Path) -> dict[str, np.ndarray]:
    """All variables of a CTranslate2 model.bin, aliases resolved (bf16 widened to float32)."""
    data = path.read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        vals = struct.unpack_from("<" + fmt, data, pos)
        pos += struct.calcsize("<" + fmt)
        return vals

    def string() -> str:
        nonlocal pos
        (n,) = take("H")
        s = data[pos : pos + n].rstrip(b"\0").decode()
        pos += n
        return s

    try:
        (version,) = take("I")
        if version < 5:
            raise ValueError(f"model.bin version {version} is older than this reader supports (5+)")
        string()  # spec name
        take("I")  # revision
        (count,) = take("I")
        out: dict[str, np.ndarray] = {}
        for _ in range(count):
            name = string()
            (rank,) = take("B")
            dims = take("I" * rank)
            dtype, nbytes = take("BI")
            raw = data[pos : pos + nbytes]
            pos += nbytes
            if dtype == 5:  # bfloat16: widen through uint32
                arr = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
            elif dtype in _DTYPES:
                arr = np.frombuffer(raw, _DTYPES[dtype])
            else:
                raise ValueError(f"variable {name}: unknown dtype code {dtype}")
            out[name] = arr.reshape(dims)
        (aliases,) = take("I")
        for _ in range(aliases):
            alias, target = string(), string()
            out[alias] = out[target]
    except (struct.error, ValueError) as e:
        raise BackboneError(f"{path}: not a readable CTranslate2 model.bin ({e})") from None
    return out


def _linear(dst: dict, prefix: str, v: dict, src: str) -> None:
    dst[f"{prefix}.weight"] = v[f"{src}/weight"]
    if f"{src}/bias" in v:
        dst[f"{prefix}.bias"] = v[f"{src}/bias"]


def _norm(dst: dict, prefix: str, v: dict, src: str) -> None:
    dst[f"{prefix}.weight"], dst[f"{prefix}.bias"] = v[f"{src}/gamma"], v[f"{src}/beta"]


def _fused_qkv(dst: dict, prefix: str, v: dict, src: str, parts: tuple[str, ...]) -> None:
    """Split a fused projection; Whisper's k projection has no bias (its fused slice is zero)."""
    w, b = v[f"{src}/weight"], v.get(f"{src}/bias")
    d = w.shape[0] // len(parts)
    for i, name in enumerate(parts):
        dst[f"{prefix}.{name}.weight"] = w[i * d : (i + 1) * d]
        if b is not None and name != "k_proj":
            dst[f"{prefix}.{name}.bias"] = b[i * d : (i + 1) * d]


def ct2_to_hf_state(v: dict[str, np.ndarray]) -> tuple[dict, dict]:
    """(HF WhisperForConditionalGeneration state dict, config kwargs) from CTranslate2 variables."""
    enc_layers = len({m.group(1) for k in v if (m := re.match(r"encoder/layer_(\d+)/", k))})
    dec_layers = len({m.group(1) for k in v if (m := re.match(r"decoder/layer_(\d+)/", k))})
    s: dict[str, np.ndarray] = {}
    for side, n in (("encoder", enc_layers), ("decoder", dec_layers)):
        s[f"model.{side}.embed_positions.weight"] = v[f"{side}/position_encodings/encodings"]
        _norm(s, f"model.{side}.layer_norm", v, f"{side}/layer_norm")
        for i in range(n):
            src, dst = f"{side}/layer_{i}", f"model.{side}.layers.{i}"
            _norm(s, f"{dst}.self_attn_layer_norm", v, f"{src}/self_attention/layer_norm")
            _fused_qkv(s, f"{dst}.self_attn", v, f"{src}/self_attention/linear_0", ("q_proj", "k_proj", "v_proj"))
            _linear(s, f"{dst}.self_attn.out_proj", v, f"{src}/self_attention/linear_1")
            _norm(s, f"{dst}.final_layer_norm", v, f"{src}/ffn/layer_norm")
            _linear(s, f"{dst}.fc1", v, f"{src}/ffn/linear_0")
            _linear(s, f"{dst}.fc2", v, f"{src}/ffn/linear_1")
            if side == "decoder":
                _norm(s, f"{dst}.encoder_attn_layer_norm", v, f"{src}/attention/layer_norm")
                _linear(s, f"{dst}.encoder_attn.q_proj", v, f"{src}/attention/linear_0")
                _fused_qkv(s, f"{dst}.encoder_attn", v, f"{src}/attention/linear_1", ("k_proj", "v_proj"))
                _linear(s, f"{dst}.encoder_attn.out_proj", v, f"{src}/attention/linear_2")
    for k in ("weight", "bias"):
        s[f"model.encoder.conv1.{k}"] = v[f"encoder/conv1/{k}"]
        s[f"model.encoder.conv2.{k}"] = v[f"encoder/conv2/{k}"]
    s["model.decoder.embed_tokens.weight"] = v["decoder/embeddings/weight"]
    d_model = v["encoder/conv1/weight"].shape[0]
    config = dict(
        d_model=d_model, num_mel_bins=v["encoder/conv1/weight"].shape[1],
        encoder_layers=enc_layers, decoder_layers=dec_layers,
        encoder_attention_heads=int(v["encoder/num_heads"]), decoder_attention_heads=int(v["decoder/num_heads"]),
        encoder_ffn_dim=v["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_ffn_dim=v["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        vocab_size=v["decoder/embeddings/weight"].shape[0],
        max_source_positions=v["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=v["decoder/position_encodings/encodings"].shape[0],
    )
    return s, config


def _special_ids(folder: Path) -> dict:
    tok_file = folder / "tokenizer.json"
    if not tok_file.exists():
        return {}
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_file))
    ids = {k: tok.token_to_id(t) for k, t in (("eos_token_id", "<|endoftext|>"), ("decoder_start_token_id", "<|startoftranscript|>"))}
    ids["pad_token_id"] = ids["eos_token_id"]
    ids["bos_token_id"] = ids["eos_token_id"]
    return {k: v for k, v in ids.items() if v is not None}


def convert_ct2_folder(folder: Path, cache: Path) -> Path:
    """Convert ``folder`` once into ``cache/<name>-<key>`` (HF layout, float32) and return it."""
    from safetensors.torch import save_file
    from transformers import WhisperConfig

    model_bin = folder / "model.bin"
    out = cache / f"{folder.resolve().name}-{file_key(model_bin)}"
    if (out / "model.safetensors").exists():
        return out
    state, cfg = ct2_to_hf_state(read_ct2(model_bin))
    config = WhisperConfig(**cfg, **_special_ids(folder))
    with atomic_dir(out, keep_existing=True) as tmp:
        tensors = {k: torch.from_numpy(np.array(a, dtype=np.float32)) for k, a in state.items()}  # a writable copy
        save_file(tensors, str(tmp / "model.safetensors"))
        config.save_pretrained(tmp)
        for name in ("tokenizer.json", "vocabulary.txt", "config.json"):
            if (folder / name).exists():
                (tmp / f"ct2_{name}").write_bytes((folder / name).read_bytes())
        (tmp / "steermoe_source.json").write_text(json.dumps({"ct2_folder": str(folder.resolve())}))
    return out


def whisper_encoder_from_ct2(folder: Path, attn_implementation: str = "sdpa"):
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    from steermoe_core.backbones.weights import load_prefixed_state

    hf = convert_ct2_folder(folder, cache_root() / "ct2")
    config = WhisperConfig.from_pretrained(hf)
    config._attn_implementation = attn_implementation
    encoder = WhisperEncoder(config)
    encoder.load_state_dict(load_prefixed_state(hf, ("model.encoder.",)), strict=True)
    return encoder
