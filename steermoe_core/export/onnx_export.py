"""`steermoe export CKPT --onnx`: a checkpoint -> a folder onnxruntime runs without torch.

Exporter: ``torch.onnx.export(..., dynamo=True)`` with ``dynamic_shapes`` for both graphs. It
traces the model's own modules (HF's LLM with a ``DynamicCache`` built from flat past tensors,
our Whisper forward with the steering hook), keeps batch, frame, sequence and cache axes symbolic
and writes external data past 2 GB by itself. Whisper's ``forward_layers`` asks whether it is
being exported and then always builds its padding mask (the eager path skips it for uniform
batches, a data-dependent branch torch.export cannot trace).

``--dtype fp16`` converts both graphs' weights and arithmetic to float16 with onnxruntime's
converter, keeping float32 inputs and outputs (the backend's numpy side never changes);
``--quantize int8`` applies onnxruntime's dynamic int8 quantisation to the MatMul weights.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from steermoe_core import __version__
from steermoe_core.atomic import atomic_dir
from steermoe_core.audio.load import SAMPLE_RATE
from steermoe_core.encoders.log_mel import HOP, N_FFT, mel_filters
from steermoe_core.errors import BackboneError, CheckpointError, UsageError
from steermoe_core.export.graphs import (
    AudioTower,
    Decoder,
    audio_tower_shapes,
    decoder_shapes,
    frame_multiple,
    kv_shape,
)
from steermoe_core.inference.longform import policy_inputs
from steermoe_core.inference.onnx_manifest import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    PROMPT_MARK,
    cache_names,
    require,
)
from steermoe_core.model.lora import merge_lora
from steermoe_core.model.steermoe import SteerMoEModel

OPSETS = range(18, 22)  # what the dynamo exporter emits natively and onnxruntime >= 1.17 runs
DEFAULT_OPSET = 18
DTYPES = ("fp32", "fp16")
QUANTIZE = ("int8",)
_PROTOBUF_LIMIT = (1 << 31) - (1 << 26)  # 2 GB less room for the graph itself: weights go to a side file past it
FILES = {
    "audio_tower": "audio_tower.onnx", "decoder": "decoder.onnx", "embeddings": "embeddings.npy",
    "mel_filters": "mel_filters.npy", "tokenizer": "tokenizer/tokenizer.json",
}


def check_options(opset: int, dtype: str, quantize: str | None) -> None:
    if opset not in OPSETS:
        raise UsageError(f"--opset {opset} is not supported: steermoe exports opset {OPSETS.start}..{OPSETS.stop - 1}")
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    if quantize is not None and quantize not in QUANTIZE:
        raise UsageError(f"--quantize {quantize}: only {', '.join(QUANTIZE)} is supported")
    if quantize and dtype != "fp32":
        raise UsageError("--quantize int8 quantises float32 weights: leave --dtype at fp32")


def export_onnx(
    checkpoint: str | Path,
    out: str | Path,
    opset: int = DEFAULT_OPSET,
    dtype: str = "fp32",
    quantize: str | None = None,
    trust_remote_code: bool = False,
    step: Callable[[str], None] | None = None,
) -> dict:
    """Export ``checkpoint`` to the folder ``out`` (written atomically). Returns the manifest."""
    check_options(opset, dtype, quantize)
    require("onnx", "onnxscript", "onnxruntime")
    from steermoe_core.model.checkpoint import load_checkpoint

    say = step or (lambda msg: None)
    say("loading the checkpoint and its backbones")
    try:
        model, recipe, meta = load_checkpoint(checkpoint, torch.device("cpu"), trust_remote_code=trust_remote_code)
    except BackboneError as e:
        raise BackboneError(f"{checkpoint}: cannot load the backbones it was trained on ({e})") from None
    model = merge_lora(model.float()).eval()  # LoRA folded into the backbones: plain modules, same function
    if model.encoder.kind != "whisper":
        raise UsageError(f"{checkpoint}: ONNX export supports Whisper encoders only (this one is {model.encoder.kind!r})")
    seconds = {}
    with atomic_dir(out) as tmp:
        (tmp / "tokenizer").mkdir()
        t0 = time.perf_counter()
        say("exporting the audio tower")
        args, shapes = audio_tower_shapes(model)
        _export(AudioTower(model), args, shapes, ["features", "feature_lengths"], ["audio_tokens"], tmp / FILES["audio_tower"], opset)
        seconds["audio_tower"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        say("exporting the LLM decoder with its KV cache")
        layers, heads, head_dim = kv_shape(model.llm)
        args, shapes = decoder_shapes(model.llm, torch.float32)
        _export(
            Decoder(model.llm), args, shapes, ["inputs_embeds", "attention_mask", "position_ids", *cache_names(layers, "past")],
            ["logits", *cache_names(layers, "present")], tmp / FILES["decoder"], opset,
        )
        seconds["decoder"] = time.perf_counter() - t0
        for name in ("audio_tower", "decoder"):
            if dtype == "fp16":
                say(f"converting the {name} to float16")
                _to_fp16(tmp / FILES[name])
            if quantize == "int8":
                say(f"quantising the {name} to int8")
                _to_int8(tmp / FILES[name])
            _check(tmp / FILES[name])
        say("comparing the graphs with torch")
        parity = _parity(model, tmp)
        if dtype == "fp32" and not quantize and max(parity.values()) > 1e-3:
            raise RuntimeError(f"the exported graphs disagree with torch (max relative difference {parity}): an exporter bug")
        say("writing embeddings, tokenizer and manifest")
        enc = model.encoder
        np.save(tmp / FILES["embeddings"], model.llm.get_input_embeddings().weight.detach().float().numpy())
        np.save(tmp / FILES["mel_filters"], mel_filters(enc.n_mels, torch.device("cpu")).numpy())
        model.tokenizer.save_pretrained(tmp / "tokenizer")
        if not (tmp / FILES["tokenizer"]).is_file():
            raise CheckpointError(f"{checkpoint}: the LLM's tokenizer has no fast version (tokenizer.json), which the onnxruntime backend needs")
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "steermoe_version": __version__,
            "exporter": f"torch.onnx.export(dynamo=True), torch {torch.__version__}",
            "opset": opset,
            "dtype": dtype,
            "quantize": quantize,
            "files": FILES,
            "export_seconds": {k: round(v, 2) for k, v in seconds.items()},
            "parity": parity,
            "checkpoint": {"path": str(checkpoint), "step": meta.get("step"), "backbones": meta.get("backbones")},
            "audio": {
                "kind": enc.kind, "n_mels": enc.n_mels, "sample_rate": SAMPLE_RATE, "n_fft": N_FFT, "hop": HOP,
                "max_frames": enc.max_frames, "trim_padding": enc.trim_padding, "stride": model.cfg.projector.stride,
                "frame_multiple": frame_multiple(model.cfg.projector.stride),
            },
            "llm": {
                "layers": layers, "kv_heads": heads, "head_dim": head_dim, "hidden": model.llm.config.hidden_size,
                "vocab": int(model.llm.get_input_embeddings().weight.shape[0]),
                "max_context": int(getattr(model.llm.config, "max_position_embeddings", 1 << 30)),
            },
            "prompt": _prompt_pieces(model),
            "generation": {"stop_ids": model.layout.stop_ids, "pad_id": model.layout.pad_id, "do_sample": False},
            # how `infer` reads long recordings with this model (segment length, token budget, VAD): what the
            # checkpoint's policy is made of, so the export follows the same rules as the checkpoint
            "longform": policy_inputs(checkpoint),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False), encoding="utf-8")
    return manifest


def _export(module, args, shapes, inputs: list[str], outputs: list[str], path: Path, opset: int) -> None:
    """One dynamo export, saved (external data past 2 GB) with the exporter's chatter silenced."""
    noisy = logging.getLogger("torch.onnx")
    level = noisy.level
    noisy.setLevel(logging.ERROR)
    try:
        with torch.no_grad(), contextlib.redirect_stdout(None), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module.eval(), args, dynamo=True, dynamic_shapes=shapes, input_names=inputs,
                output_names=outputs, opset_version=opset, verbose=False,
            )
        weights = sum(p.numel() * p.element_size() for p in module.parameters())
        program.save(path, external_data=weights > _PROTOBUF_LIMIT)
    finally:
        noisy.setLevel(level)


@torch.no_grad()
def _parity(model: SteerMoEModel, folder: Path) -> dict[str, float]:
    """Each graph in onnxruntime against torch on one random example: the largest difference
    relative to the largest value (recorded in the manifest; float32 exports must agree to 1e-3)."""
    import onnxruntime as ort

    g = torch.Generator().manual_seed(0)
    (feats, lengths), _ = audio_tower_shapes(model)
    feats = torch.randn(feats.shape, generator=g)
    (embeds, mask, pos, past), _ = decoder_shapes(model.llm, torch.float32)
    scale = model.llm.get_input_embeddings().weight.float().pow(2).mean().sqrt()
    embeds = torch.randn(embeds.shape, generator=g) * scale
    layers = kv_shape(model.llm)[0]
    empty = [t[:, :, :0] for t in past]
    cases = {
        "audio_tower": (AudioTower(model), (feats, lengths), {"features": feats, "feature_lengths": lengths}),
        "decoder": (Decoder(model.llm), (embeds, mask[:, 3:], pos, empty), {
            "inputs_embeds": embeds, "attention_mask": mask[:, 3:], "position_ids": pos,
            **dict(zip(cache_names(layers, "past"), empty)),
        }),
    }
    out = {}
    for name, (module, args, feed) in cases.items():
        want = module(*args)
        want = (want if isinstance(want, tuple) else (want,))[0].float()
        sess = ort.InferenceSession(str(folder / FILES[name]), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(sess.run(None, {k: v.numpy() for k, v in feed.items()})[0]).float()
        out[name] = float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))
    return out


def _check(path: Path) -> None:
    """onnx.checker on the saved file (by path, so graphs with external data are checked too)."""
    import onnx

    onnx.checker.check_model(str(path))


def _to_fp16(path: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = OnnxModel(convert_float_to_float16(onnx.load(str(path)), keep_io_types=True))
    model.topological_sort()  # the converter appends its input casts after their users
    _save_onnx(model.model, path)


def _to_int8(path: Path) -> None:
    """Dynamic int8 MatMuls, with 7-bit per-channel weights: the graph runs wherever it is deployed, and on
    x86 CPUs without VNNI (AVX2, plain AVX512) onnxruntime's u8 x s8 kernels saturate full-range 8-bit
    weights (measured on an AVX2-only CPU: audio embeddings 20% off the fp32 graph; ``reduce_range`` is
    onnxruntime's documented remedy, ``per_channel`` wins back the lost bit)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = path.with_suffix(".int8.onnx")
    big = path.with_name(path.name + ".data").exists() or path.stat().st_size > _PROTOBUF_LIMIT
    quantize_dynamic(path, tmp, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"], per_channel=True,
                     reduce_range=True, use_external_data_format=big)
    _drop(path)
    tmp.replace(path)


def _save_onnx(model, path: Path) -> None:
    """Overwrite ``path``; weights in a side file when the model would pass protobuf's 2 GB limit."""
    import onnx

    _drop(path)
    big = sum(len(t.raw_data) for t in model.graph.initializer) > _PROTOBUF_LIMIT
    onnx.save_model(model, str(path), save_as_external_data=big, location=path.name + ".data" if big else None)


def _drop(path: Path) -> None:
    """Remove a graph and its external data (the exporter names it ``<file>.data``)."""
    for p in (path, path.with_name(path.name + ".data")):
        p.unlink(missing_ok=True)


def _prompt_pieces(model: SteerMoEModel) -> dict:
    """The prompt layout, rendered once: token ids before the audio, and the text after it with a
    marker where the prompt goes (the backend tokenises it with ``tokenizers``). The task prompts'
    ids are stored as the torch layout makes them; for any other prompt the marker rendering is
    used, after checking here that it reproduces the template exactly for the task prompts."""
    from steermoe_core.inference.api import TASK_PROMPTS

    layout = model.layout
    pre, post = layout.pieces(PROMPT_MARK)
    known = {}
    exact = PROMPT_MARK in post
    for p in TASK_PROMPTS.values():
        p_pre, p_post = layout.around_audio(p)
        known[p] = p_post
        exact = exact and p_pre == pre and layout._encode(post.replace(PROMPT_MARK, p)) == p_post
    tok = model.tokenizer
    probe = tok("Hello , world . it 's a test ! isn 't it ?", add_special_tokens=False)["input_ids"]
    cleanup = tok.decode(probe, skip_special_tokens=True) != tok.backend_tokenizer.decode(probe, skip_special_tokens=True)
    return {
        "pre_ids": pre, "post_template": post if exact else None, "mark": PROMPT_MARK, "known": known,
        "clean_up_spaces": cleanup,
    }
