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
import errno
import glob
import hashlib
import json
import logging
import os
import shutil
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
from steermoe_core.export.keys import CACHE_REVISION, beside, export_key, locked
from steermoe_core.inference.longform import policy_inputs
from steermoe_core.inference.onnx_manifest import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    PROMPT_MARK,
    cache_names,
    require,
)
from steermoe_core.model.lora import has_lora, merge_lora
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
LLM_FILES = {k: FILES[k] for k in ("decoder", "embeddings", "tokenizer")}  # the LLM's alone: shared between adapters
# A checkpoint with LoRA on the LLM folds it into ``decoder.onnx`` (for prompts with audio) and carries the LLM as
# released beside it, for prompts without audio (the transcript strategy, text chat: ``model.lora.base_llm``)
BASE_DIR = "base_llm"
BASE_DECODER = f"{BASE_DIR}/{FILES['decoder']}"


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
    llm_cache: str | Path | None = None,
) -> dict:
    """Export ``checkpoint`` to the folder ``out`` (written atomically). Returns the manifest.

    ``llm_cache``: a folder of LLM parts shared between exports (the export cache's ``llm/``). The
    LLM's files (``LLM_FILES``: decoder, embeddings, tokenizer) are then exported once per LLM into
    ``llm_cache/<llm_key>/`` and hard-linked into ``out``, which stays a complete folder; the manifest
    names the part in ``shared_llm``. Without it the LLM's files are exported into ``out`` directly."""
    check_options(opset, dtype, quantize)
    require("onnx", "onnxscript", "onnxruntime")
    from steermoe_core.model.checkpoint import load_checkpoint

    say = step or (lambda msg: None)
    say("loading the checkpoint and its backbones")
    try:
        model, recipe, meta = load_checkpoint(checkpoint, torch.device("cpu"), trust_remote_code=trust_remote_code)
    except BackboneError as e:
        raise BackboneError(f"{checkpoint}: cannot load the backbones it was trained on ({e})") from None
    lora_on_llm = has_lora(model, "llm")
    base = _released_llm(recipe, trust_remote_code) if lora_on_llm else None
    model = merge_lora(model.float()).eval()  # LoRA folded into the backbones: plain modules, same function
    if model.encoder.kind != "whisper":
        raise UsageError(f"{checkpoint}: ONNX export supports Whisper encoders only (this one is {model.encoder.kind!r})")
    shared = shared_base = None
    locks = contextlib.ExitStack()
    if llm_cache is not None:
        key = llm_key(model, opset, dtype, quantize, own=export_key(Path(checkpoint)) if lora_on_llm else None)
        shared = Path(llm_cache) / key
        if base is not None:  # the released LLM's part: the one every adapter without LoRA on this LLM shares
            shared_base = Path(llm_cache) / llm_key(base, opset, dtype, quantize)
            locks.enter_context(locked(beside(shared_base, ".lock")))
        locks.enter_context(locked(beside(shared, ".lock")))
    # the LLM parts' locks are held until ``out`` is in place: pruning never sees a part unnamed while it is linked
    with locks, atomic_dir(out) as tmp:
        t0 = time.perf_counter()
        say("exporting the audio tower")
        args, shapes = audio_tower_shapes(model)
        drop_blank = model.cfg.projector.drop_blank
        outputs = ["audio_tokens", "keep"] if drop_blank else ["audio_tokens"]
        _export_graph(AudioTower(model), args, shapes, ["features", "feature_lengths"], outputs, tmp / FILES["audio_tower"], opset, dtype, quantize, say)
        seconds = {"audio_tower": time.perf_counter() - t0}
        parity = _parity(model, tmp, ["audio_tower"], dtype, quantize)
        if shared is None:
            llm = _export_llm(model, tmp, opset, dtype, quantize, say, checkpoint)
        else:
            llm = _shared_llm(model, shared, opset, dtype, quantize, say, checkpoint)
            say(f"linking the LLM's decoder, embeddings and tokenizer from {shared}")
            _link_files(shared, tmp, LLM_FILES)
        seconds["decoder"], parity["decoder"] = llm["seconds"], llm["parity"]
        files = dict(FILES)
        if base is not None:
            say("the LLM as released, for prompts without audio")
            if shared_base is None:
                info = _export_llm(base, tmp / BASE_DIR, opset, dtype, quantize, say, checkpoint, decoder_only=True)
            else:
                info = _shared_llm(base, shared_base, opset, dtype, quantize, say, checkpoint)
                _link_files(shared_base, tmp / BASE_DIR, {"decoder": FILES["decoder"]})
            seconds["base_decoder"], parity["base_decoder"] = info["seconds"], info["parity"]
            files["base_decoder"] = BASE_DECODER
        say("writing mel filters and manifest")
        enc = model.encoder
        layers, heads, head_dim = kv_shape(model.llm)
        np.save(tmp / FILES["mel_filters"], mel_filters(enc.n_mels, torch.device("cpu")).numpy())
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "steermoe_version": __version__,
            "exporter": f"torch.onnx.export(dynamo=True), torch {torch.__version__}",
            "opset": opset,
            "dtype": dtype,
            "quantize": quantize,
            "files": files,
            "export_seconds": {k: round(v, 2) for k, v in seconds.items()},
            "parity": parity,
            "checkpoint": {"path": str(checkpoint), "step": meta.get("step"), "backbones": meta.get("backbones")},
            "audio": {
                "kind": enc.kind, "n_mels": enc.n_mels, "sample_rate": SAMPLE_RATE, "n_fft": N_FFT, "hop": HOP,
                "max_frames": enc.max_frames, "trim_padding": enc.trim_padding, "stride": model.cfg.projector.stride,
                "frame_multiple": frame_multiple(model.cfg.projector.stride), "drop_blank": drop_blank,
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
        if shared is not None:
            manifest["shared_llm"] = shared.name  # the cache's LLM part this folder's LLM files are linked from
        if shared_base is not None:
            manifest["shared_base_llm"] = shared_base.name  # and the released LLM's, for prompts without audio
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False), encoding="utf-8")
    return manifest


def llm_key(model: SteerMoEModel, opset: int, dtype: str, quantize: str | None, own: str | None = None) -> str:
    """What the LLM part of an export is made of, hashed: format, options, the LLM's config, every
    weight's bytes as exported (after ``merge_lora``) and the tokenizer. ``own``: a checkpoint's key,
    mixed in for LoRA on the LLM (that LLM is the checkpoint's alone). About 1 s per GB of weights."""
    h = hashlib.sha256(f"steermoe-onnx-llm-v{FORMAT_VERSION}.{CACHE_REVISION}:{opset}:{dtype}:{quantize}:{own}".encode())
    # where it was loaded from and in which dtype do not change it (the weights' bytes below say what was exported)
    config = {k: v for k, v in model.llm.config.to_dict().items() if k not in ("_name_or_path", "transformers_version", "torch_dtype", "dtype")}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, t in sorted(model.llm.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    tok = model.tokenizer
    h.update(tok.backend_tokenizer.to_str().encode() if getattr(tok, "is_fast", False) else repr(tok).encode())
    h.update(str(getattr(tok, "chat_template", None)).encode())
    return h.hexdigest()[:16]


def _shared_llm(model: SteerMoEModel, folder: Path, opset: int, dtype: str, quantize: str | None, say, checkpoint) -> dict:
    """The LLM part in ``folder`` (its record: export seconds, parity), exported there first when it is
    missing or incomplete. The caller holds its lock."""
    record = folder / "llm.json"
    try:
        info = json.loads(record.read_text(encoding="utf-8"))
        if all((folder / name).exists() for name in LLM_FILES.values()):
            say(f"the LLM's decoder is already exported ({folder}): reusing it")
            return info
    except (OSError, ValueError):
        pass
    with atomic_dir(folder) as tmp:
        info = _export_llm(model, tmp, opset, dtype, quantize, say, checkpoint)
        (tmp / "llm.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    return info


def _released_llm(recipe, trust_remote_code: bool) -> SteerMoEModel:
    """The checkpoint's backbones with its LLM as released (no LoRA): what prompts without audio run
    on. Built afresh from the recipe's backbones (no adapter is loaded: only its LLM is exported)."""
    import dataclasses

    from steermoe_core.model.build import build_model

    cfg = dataclasses.replace(recipe.model, llm=dataclasses.replace(recipe.model.llm, lora=None),
                              encoder=dataclasses.replace(recipe.model.encoder, lora=None))
    return build_model(cfg, torch.device("cpu"), trust_remote_code=trust_remote_code).float().eval()


def _export_llm(model: SteerMoEModel, folder: Path, opset: int, dtype: str, quantize: str | None, say, checkpoint,
                decoder_only: bool = False) -> dict:
    """The LLM's files (``LLM_FILES``) into ``folder``: the decoder graph, compared with torch, the
    embedding table and the tokenizer (``decoder_only``: the graph alone). Returns {"seconds", "parity"}
    of the decoder."""
    t0 = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    say("exporting the LLM decoder with its KV cache")
    layers = kv_shape(model.llm)[0]
    args, shapes = decoder_shapes(model.llm, torch.float32)
    _export_graph(
        Decoder(model.llm), args, shapes, ["inputs_embeds", "attention_mask", "position_ids", *cache_names(layers, "past")],
        ["logits", *cache_names(layers, "present")], folder / FILES["decoder"], opset, dtype, quantize, say,
    )
    seconds = time.perf_counter() - t0
    parity = _parity(model, folder, ["decoder"], dtype, quantize)["decoder"]
    if decoder_only:
        return {"seconds": seconds, "parity": parity}
    say("writing embeddings and tokenizer")
    np.save(folder / FILES["embeddings"], model.llm.get_input_embeddings().weight.detach().float().numpy())
    (folder / "tokenizer").mkdir(exist_ok=True)
    model.tokenizer.save_pretrained(folder / "tokenizer")
    if not (folder / FILES["tokenizer"]).is_file():
        raise CheckpointError(f"{checkpoint}: the LLM's tokenizer has no fast version (tokenizer.json), which the onnxruntime backend needs")
    return {"seconds": seconds, "parity": parity}


def _link_files(src: Path, dst: Path, files: dict[str, str]) -> None:
    """Hard-link each of ``files`` (a graph with its ``.data`` side file; a file's whole folder, as the
    tokenizer's) from ``src`` into ``dst``; a copy where the file system refuses links."""
    paths = set()
    for name in files.values():
        top = Path(name).parts[0]
        if (src / top).is_dir():
            paths.update(p.relative_to(src) for p in (src / top).rglob("*") if p.is_file())
        else:
            paths.update(p.relative_to(src) for p in src.glob(f"{glob.escape(name)}*") if p.is_file())
    for rel in sorted(paths):
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src / rel, dst / rel)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES):
                raise
            shutil.copy2(src / rel, dst / rel)


def _export_graph(module, args, shapes, inputs: list[str], outputs: list[str], path: Path, opset: int, dtype: str, quantize: str | None, say) -> None:
    """One graph: exported, converted as asked, checked."""
    _export(module, args, shapes, inputs, outputs, path, opset)
    name = path.stem.replace("_", " ")
    if dtype == "fp16":
        say(f"converting the {name} to float16")
        _to_fp16(path)
    if quantize == "int8":
        say(f"quantising the {name} to int8")
        _to_int8(path)
    _check(path)


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
def _parity(model: SteerMoEModel, folder: Path, names: list[str], dtype: str, quantize: str | None) -> dict[str, float]:
    """Each graph of ``names`` in onnxruntime against torch on one random example: the largest
    difference relative to the largest value (recorded in the manifest; float32 exports must agree
    to 1e-3, checked here, before a shared LLM part is kept)."""
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
    for name in names:
        module, args, feed = cases[name]
        want = module(*args)
        want = (want if isinstance(want, tuple) else (want,))[0].float()
        sess = ort.InferenceSession(str(folder / FILES[name]), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(sess.run(None, {k: v.numpy() for k, v in feed.items()})[0]).float()
        out[name] = float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))
    if dtype == "fp32" and not quantize and max(out.values()) > 1e-3:
        raise RuntimeError(f"the exported graphs disagree with torch (max relative difference {out}): an exporter bug")
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
    from steermoe_core.inference.plan import TASK_PROMPTS

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
