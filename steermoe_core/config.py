"""Typed recipe: the TOML a user writes, loaded into dataclasses that reject anything unexpected.

Every field carries its documentation in ``metadata["doc"]`` so the shipped recipes, the README and
``steermoe train --help-recipe`` can all be generated from one place and never drift.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import tomllib

from steermoe_core.errors import RecipeError, decode_error_text


def doc(default: Any, text: str, **kw: Any) -> Any:
    """A dataclass field with its documentation attached (mutable defaults handled)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"doc": text, **kw})
    return field(default=default, metadata={"doc": text, **kw})


@dataclass
class LoRAConfig:
    """LoRA (through peft) on a frozen backbone's linear layers. The section's presence switches it
    on; leave it out for no LoRA. Only the LoRA matrices train; the base weights stay frozen."""

    rank: int = doc(8, "LoRA rank r: each targeted Linear(in, out) gains r * (in + out) trainable weights.", min=1)
    alpha: float = doc(16.0, "LoRA alpha: the low-rank update is scaled by alpha / rank.", gt=0.0)
    dropout: float = doc(0.0, "Dropout on the LoRA branch's input while training (the backbone itself never drops).", min=0.0, max=0.9)
    target_modules: list[str] = doc(
        ["q_proj", "v_proj"],
        "Names of the Linear layers that get LoRA, matched against the end of each module's name. "
        "Whisper: q_proj, k_proj, v_proj, out_proj, fc1, fc2; Llama/Qwen2: q_proj, k_proj, v_proj, o_proj, "
        "gate_proj, up_proj, down_proj.",
    )


@dataclass
class EncoderConfig:
    kind: Literal["whisper", "conformer"] = doc("whisper", "Audio encoder family (see steermoe_core.encoders): whisper, or conformer = FireRedASR-AED's encoder.")
    path: str = doc("openai/whisper-large-v3", "whisper: hub id, local HF folder, or faster-whisper/CTranslate2 folder (model.bin + config.json); conformer: FireRedASR model folder (model.pth.tar + cmvn.ark) or the model.pth.tar file (cmvn.ark beside it).")
    trim_padding: bool = doc(True, "whisper only: encode only the real frames instead of Whisper's fixed 30 s (masked inside a batch). The conformer always does.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = doc("auto", "Frozen encoder weights dtype; auto = bfloat16 on GPU, float32 on CPU.")
    lora: LoRAConfig | None = doc(None, "[model.encoder.lora]: LoRA on the encoder (the paper's baseline); absent = off.")


@dataclass
class LLMConfig:
    path: str = doc("Qwen/Qwen2.5-7B-Instruct", "Hub id, local HF folder, or a .gguf file (dequantised to a dense module); a .gguf split in byte-parts is `part1 + part2 + ...` (each may be pkg:NAME/path).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = doc("auto", "Frozen LLM weights dtype; auto = bfloat16 on GPU, float32 on CPU.")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = doc("sdpa", "Attention kernel for the LLM (and the encoder).")
    trust_remote_code: bool = doc(False, "Allow the checkpoint's own Python code. Off unless you trust it.")
    system_prompt: str = doc("", "System message before the user turn; empty = whatever the chat template puts there by default.")
    lora: LoRAConfig | None = doc(None, "[model.llm.lora]: LoRA on the LLM; absent = off. `steermoe export` folds it into the LLM's decoder that reads audio and keeps the LLM as released beside it for prompts without audio.")


@dataclass
class SteeringConfig:
    placement: Literal["layer_wise", "post_encoder", "none"] = doc("layer_wise", "layer_wise = SteerMoE; post_encoder = one steering MoE after the last layer; none = linear adapter only.")
    router: Literal["shared", "per_layer"] = doc("shared", "shared = one Linear(D, L*E) sliced per layer (the paper); per_layer = L separate Linear(D, E).")
    num_experts: int = doc(8, "Steering vectors per layer (E).", min=1)
    top_k: int = doc(0, "Keep only the k largest gates and renormalise; 0 = dense softmax.", min=0)
    temperature: float = doc(1.0, "Softmax temperature of the router.", gt=0.0)
    scale_init: float = doc(0.1, "Initial per-layer steering scale s_l.")
    vector_init_std: float = doc(0.01, "Std of the N(0, std^2) init of the steering vectors.", min=0.0)
    load_balance_weight: float = doc(0.0, "Weight of the Switch-style load-balancing auxiliary loss.", min=0.0)
    z_loss_weight: float = doc(0.0, "Weight of the router z-loss (mean squared logsumexp of router logits).", min=0.0)


@dataclass
class ProjectorConfig:
    pooling: Literal["avg", "max", "stack"] = doc("avg", "How k encoder frames become one audio token; stack concatenates (D*k -> H).")
    stride: int = doc(4, "Frames per audio token (4: Whisper's 50 Hz -> 12.5 Hz).", min=1)
    vocab_posterior: bool = doc(False, "The LLM reads each audio token as a mixture of its own input embeddings, weighted by the softmax of the token's dot products with them (the posterior train.ctc_weight trains; LegoSLM): in-distribution inputs close to the spoken words' embeddings, meant to let a frozen LLM follow the audio after fewer steps (on the demo it did not: docs/demo.md, What limits it). Costs two (tokens x vocabulary) matmuls per clip.")
    argmax_embeddings: bool = doc(False, "The LLM reads each audio token as the input embedding of its nearest word piece (the CTC read-out's choice): its input is then text, exactly what a reader trained on text alone reads (train.reader_batch, tools/train_reader.py), and no gradient reaches the adapter through the LLM (the CTC loss trains it). Excludes vocab_posterior; usually with drop_blank.")
    drop_blank: bool = doc(False, "The LLM reads only the audio tokens the CTC read-out keeps: tokens whose nearest word piece is the blank (the space token) are dropped, and of a run of tokens with the same nearest word piece only the first is kept (LegoSLM, TASU). A clip then costs the LLM about as many positions as its transcript has tokens instead of 12.5 a second, and, with vocab_posterior, reads like text. Needs train.ctc_weight > 0 to mean anything; costs one (tokens x vocabulary) matmul per clip.")


@dataclass
class ModelConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    steering: SteeringConfig = field(default_factory=SteeringConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)

    @property
    def reads_text(self) -> bool:
        """The LLM reads the CTC read-out as word pieces and has a LoRA to learn with: what a reader trained
        on text alone needs (``train.reader_batch``, ``training/reader.py``)."""
        return self.projector.argmax_embeddings and self.projector.drop_blank and self.llm.lora is not None


@dataclass
class DataConfig:
    train: str = doc("", "Prepared dataset folder for training (Parquet shards + manifest.json).")
    valid: str = doc("", "Prepared dataset folder for validation; empty = no validation.")
    prompt: str = doc("Transcribe the audio.", "Prompt used when an example has no prompt of its own.")
    batch_size: int = doc(8, "Examples per micro-batch summed over all processes: the global batch, whatever `--gpus N` (each process takes 1/N of it); an optimizer step sees batch_size x train.grad_accum examples.", min=1)
    max_batch_seconds: float = doc(0.0, "If > 0, cap on a micro-batch's padded audio seconds (clips x the longest clip's duration; batches are length-bucketed), over all processes like batch_size.", min=0.0)
    max_duration: float = doc(30.0, "Training clips longer than this (seconds) are skipped and counted.", gt=0.0, max=30.0)
    max_target_tokens: int = doc(256, "Targets are truncated to this many tokens.", min=1)
    num_workers: int = doc(2, "DataLoader worker processes decoding FLAC.", min=0)
    speed_perturb: list[float] = doc([], "Training only: speed factors drawn per example, e.g. [0.9, 1.0, 1.1]; empty = off.")
    noise_snr_db: list[float] = doc([], "Training only: [low, high] SNR in dB of white/pink noise added to noise_prob of the examples; empty = off.")
    noise_prob: float = doc(0.0, "Fraction of training examples that get noise (needs noise_snr_db).", min=0.0, max=1.0)
    reverb_prob: float = doc(0.0, "Fraction of training examples convolved with a synthetic room response (RT60 0.2-0.8 s).", min=0.0, max=1.0)
    band_prob: float = doc(0.0, "Fraction of training examples passed through a channel's band: half a telephone line (300-3,400 Hz), half a codec's low-pass at 3.4-7 kHz; applied after the room and the noise. Synthetic speech fills the whole band, recordings often do not.", min=0.0, max=1.0)
    spec_augment: list[int] = doc([], "Training only: SpecAugment on the encoder's input features, [time masks, their widest (feature frames of 10 ms), frequency masks, their widest (mel / fbank bins)] per clip, each mask set to 0 as HF's Whisper masks, drawn per example like the other augmentations; e.g. [2, 40, 2, 15]; empty = off.")
    concat_seconds: float = doc(0.0, "Training only: join neighbouring utterances of the same source (ids that agree up to their last '-' or '_', in shard order) into one example of at most this many seconds, audio with a 0.3 s pause between them and transcripts with a space, so the model learns to read windows longer than one sentence (what `infer` feeds it from long recordings); 0 = off.", min=0.0, max=30.0)
    concat_prob: float = doc(0.5, "Fraction of training examples that get joined with their neighbours (needs concat_seconds > 0); the rest stay single utterances.", min=0.0, max=1.0)
    align_instructions: list[str] = doc([], "Behaviour alignment (BLSP / DeSTA2 style): instructions (e.g. \"Summarize the audio in one sentence.\", \"What is the main topic?\"); for align_prob of the training examples one is drawn and the target becomes the frozen LLM's own answer to it given the transcript as text (generated once, cached in align_cache), so speech comes to act like its text and the checkpoint follows instructions (`infer --strategy auto` then reads the audio directly). Empty = off.")
    align_prob: float = doc(0.3, "Fraction of training examples trained on an instruction's answer instead of the transcript (needs align_instructions).", min=0.0, max=1.0)
    reader_text: str = doc("", "Text file of sentences (one a line) for text-only reader micro-batches (train.reader_batch): each is corrupted as a CTC read-out errs and the LLM's LoRA learns to write it clean, with no audio (needs model.projector.argmax_embeddings, drop_blank and [model.llm.lora]).")
    reader_fragments: float = doc(0.0, "Fraction of data.reader_text's rows cut to a fragment of 1-4 of their words (capitalised, with a full stop): utterances as short as \"Hello world.\", which 5-20-word sentences never show the reader, so it learns to stop after a short read-out instead of running on. 0 = whole sentences.", min=0.0, max=1.0)
    align_cache: str = doc("", "JSONL file caching the frozen LLM's answers (one line per example id and instruction); empty = align_targets.jsonl in the run folder.")
    align_max_new_tokens: int = doc(64, "Longest answer generated for behaviour alignment (tokens).", min=1)
    pad_multiple_seconds: float = doc(1.0, "Training, and eval and infer with the checkpoint it makes: each batch's audio is padded (masked) to a multiple of this many seconds and its LLM sequence to a multiple of 8 tokens, so batch shapes repeat and the CPU's per-shape kernel cache hits instead of growing the process with every new shape (3.7 -> 9 GB over 1,000 demo steps without it); costs the compute spent on the padding (up to 11% of a step on the demo's full recipe). 0 = pad to the longest clip only.", min=0.0, max=30.0)


@dataclass
class TrainConfig:
    max_steps: int = doc(1000, "Optimizer steps to run.", min=1)
    lr: float = doc(1e-3, "Base learning rate (AdamW).", gt=0.0)
    lr_steering: float = doc(0.0, "LR of the steering vectors; 0 = use lr.", min=0.0)
    lr_router: float = doc(0.0, "LR of the router; 0 = use lr.", min=0.0)
    lr_scales: float = doc(0.0, "LR of the per-layer scales; 0 = use lr.", min=0.0)
    lr_projector: float = doc(0.0, "LR of the projector; 0 = use lr.", min=0.0)
    lr_lora: float = doc(0.0, "LR of the LoRA matrices (encoder and LLM); 0 = use lr. Needs a [model.*.lora] section.", min=0.0)
    weight_decay: float = doc(0.0, "AdamW weight decay (projector weights only).", min=0.0)
    betas: list[float] = doc([0.9, 0.999], "AdamW betas.")
    warmup_steps: int = doc(100, "Linear warmup steps before the cosine decay.", min=0)
    min_lr_ratio: float = doc(0.0, "Cosine decays to lr * min_lr_ratio.", min=0.0, max=1.0)
    decay_steps: int = doc(0, "Step at which the cosine reaches lr * min_lr_ratio and then holds there until max_steps (a long tail at the floor lr, so a run can be made longer without changing its first decay_steps); 0 = max_steps.", min=0)
    grad_accum: int = doc(1, "Micro-batches per optimizer step.", min=1)
    clip_grad: float = doc(1.0, "Global gradient-norm clip; 0 = off.", min=0.0)
    max_bad_steps: int = doc(10, "A step whose loss is NaN/inf on any process is skipped on all of them (logged with its batch ids); after this many such steps the run stops with an error, keeping its last good checkpoint.", min=1)
    ctc_weight: float = doc(0.0, "Weight of an auxiliary CTC loss reading the transcript off the audio tokens through the LLM's frozen input embeddings; ties audio tokens to the words they carry and speeds up alignment. 0 = off.", min=0.0)
    reader_batch: int = doc(0, "Sentences of data.reader_text in one text-only micro-batch added to every step that runs the LLM (averaged with the audio micro-batches): the reader learns from far more sentences than the audio holds. 0 = off.", min=0)
    ctc_only_steps: int = doc(0, "The first N steps train on the CTC loss alone, without running the LLM (several times faster per step): a cheap first stage that aligns audio tokens with word embeddings before the LLM reads them. Needs ctc_weight > 0.", min=0)
    precision: Literal["auto", "bf16", "fp16", "fp32"] = doc("auto", "Autocast precision of train, eval and infer. auto: on a GPU, bf16 where it has bf16, else fp32; on a CPU, training in bf16 where it runs bf16 natively (AVX512-BF16/AMX) and fp32 elsewhere, while decoding (eval, infer, serve, validation WER, the demo's scores) runs fp32 on every CPU. A value other than auto applies to both. The adapter keeps fp32 master weights.")
    gradient_checkpointing: bool = doc(False, "Recompute LLM activations in the backward pass (saves memory, costs time).")
    compile: bool = doc(False, "torch.compile the encoder layers and LLM.")
    seed: int = doc(0, "Seed for init, data order and dropout-free determinism.")
    device: str = doc("auto", "auto, cpu, cuda or cuda:N.")
    log_every: int = doc(10, "Steps between metric lines.", min=1)
    eval_every: int = doc(0, "Steps between validations; 0 = only at the end.", min=0)
    save_every: int = doc(0, "Steps between checkpoints; 0 = only at the end.", min=0)
    keep_checkpoints: int = doc(2, "Checkpoints kept under checkpoints/, the newest by step; 0 = every one (a learning curve scored afterwards).", min=0)


@dataclass
class EvalConfig:
    metric: Literal["wer", "cer", "qa"] = doc("wer", "Headline metric: wer (English normaliser), cer (Chinese rules) or qa.")
    batch_size: int = doc(8, "Examples per generation batch.", min=1)
    max_new_tokens: int = doc(128, "Generation budget per example.", min=1)
    num_beams: int = doc(1, "1 = greedy; >1 = beam search.", min=1)
    max_examples: int = doc(0, "0 = the full set (eval and validation); >0 = a seeded random sample of N examples.", min=0)
    max_segment_seconds: float = doc(0.0, "`infer`: recordings are cut at voice activity into segments of at most this many seconds (what the model trained on reads best); 0 = from the training clip lengths the checkpoint recorded (meta.json training_audio): a clip up to the longest is read whole and speech regions are joined up to the 95th percentile; else 30.", min=0.0, max=30.0)
    tokens_per_second: float = doc(0.0, "`infer`: each segment's decoding stops after 1.5 x this many tokens per second of its audio (+ 8); 0 = the rate the checkpoint recorded from its training transcripts (meta.json training_audio), else 6.", min=0.0)
    vad: Literal["auto", "silero", "energy", "off"] = doc("auto", "`infer`: voice activity detector for long recordings: silero (Silero VAD's ONNX model from the silero-vad wheel), energy (loudness over the noise floor), auto = silero when installed, else energy; off = fixed windows of max_segment_seconds cut at low-energy points, no speech detection.")


@dataclass
class DistributedConfig:
    engine: Literal["ddp", "deepspeed"] = doc("ddp", "Training engine: ddp (one process = plain single-device training) or deepspeed.")
    zero_stage: int = doc(2, "DeepSpeed ZeRO stage (engine = deepspeed only; 3 also shards the frozen LLM and needs data.valid = '': validate with steermoe eval).", min=0, max=3)


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)


def _check_value(key: str, value: Any, hint: Any, meta: dict) -> Any:
    origin = typing.get_origin(hint)
    if origin is Literal:
        if value not in typing.get_args(hint):
            choices = ", ".join(repr(c) for c in typing.get_args(hint))
            raise RecipeError(f"{key}: {value!r} is not one of {choices}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"{key}: expected a list, got {type(value).__name__}")
        (item,) = typing.get_args(hint)
        return [_check_value(f"{key}[{i}]", v, item, {}) for i, v in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{key}: expected an integer, got {value!r}")
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{key}: expected a number, got {value!r}")
        value = float(value)
        if value != value or value in (float("inf"), float("-inf")):  # TOML allows inf and nan; no field means them
            raise RecipeError(f"{key}: {value!r} is not a finite number")
    elif hint is str:
        if not isinstance(value, str):
            raise RecipeError(f"{key}: expected a string, got {value!r}")
    if "min" in meta and value < meta["min"]:
        raise RecipeError(f"{key}: {value!r} is below the minimum {meta['min']}")
    if "max" in meta and value > meta["max"]:
        raise RecipeError(f"{key}: {value!r} is above the maximum {meta['max']}")
    if "gt" in meta and not value > meta["gt"]:
        raise RecipeError(f"{key}: {value!r} must be greater than {meta['gt']}")
    return value


def _section(hint: Any) -> type | None:
    """The dataclass behind a section's type hint: ``Section`` or ``Section | None`` (optional)."""
    if dataclasses.is_dataclass(hint):
        return hint
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if type(None) in typing.get_args(hint) and len(args) == 1 and dataclasses.is_dataclass(args[0]):
        return args[0]
    return None


def _build(cls: type, data: dict, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise RecipeError(f"{prefix or 'recipe'}: expected a table, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise RecipeError(f"{key}: unknown key (known: {', '.join(fields)})")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        hint = hints[name]
        section = _section(hint)
        if section is not None:
            optional = section is not hint
            kwargs[name] = None if optional and value is None else _build(section, value, key)
        else:
            kwargs[name] = _check_value(key, value, hint, dict(fields[name].metadata))
    return cls(**kwargs)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise RecipeError(f"--set {item}: expected key=value, e.g. train.lr=1e-3")
    key, raw = item.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # bare strings need no quotes on the command line
    return key.strip().split("."), value


def recipe_from_dict(data: dict, overrides: list[str] | None = None) -> Recipe:
    """Validate a nested dict (plus ``key=value`` overrides) into a Recipe."""
    data = _deep_copy(data)
    for item in overrides or []:
        path, value = _parse_override(item)
        node = data
        for part in path[:-1]:
            if node.get(part) is None:  # absent, or an optional section that is off
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise RecipeError(f"--set {item}: {part} is not a table")
        node[path[-1]] = value
    recipe = _build(Recipe, data, "")
    _check_consistency(recipe)
    return recipe


def _deep_copy(d: Any) -> Any:
    return {k: _deep_copy(v) for k, v in d.items()} if isinstance(d, dict) else d


def _check_consistency(r: Recipe) -> None:
    if r.model.encoder.kind != "whisper" and not r.model.encoder.trim_padding:
        raise RecipeError(f"model.encoder.trim_padding: Whisper's fixed 30 s layout only; kind {r.model.encoder.kind!r} always encodes only the real frames")
    if r.train.ctc_only_steps and not r.train.ctc_weight:
        raise RecipeError("train.ctc_only_steps: needs train.ctc_weight > 0 (the CTC loss it trains on)")
    if r.model.projector.argmax_embeddings and r.model.projector.vocab_posterior:
        raise RecipeError("model.projector.argmax_embeddings and vocab_posterior: choose one way for the LLM to read audio tokens")
    if r.train.reader_batch or r.data.reader_text:
        if not (r.train.reader_batch and r.data.reader_text):
            raise RecipeError("train.reader_batch and data.reader_text: set both (text-only reader batches on) or neither")
        if not r.model.reads_text:
            raise RecipeError("train.reader_batch: a reader trained on text needs model.projector.argmax_embeddings, drop_blank and [model.llm.lora] (what it reads must be word pieces, and only LoRA learns from text)")
    if r.data.reader_fragments and not r.data.reader_text:
        raise RecipeError("data.reader_fragments: cuts data.reader_text's rows; set data.reader_text (and train.reader_batch) too")
    if r.model.projector.drop_blank and not r.train.ctc_weight:
        raise RecipeError("model.projector.drop_blank: needs train.ctc_weight > 0 (the CTC loss decides which audio tokens are blank)")
    d = r.data
    if d.noise_snr_db and (len(d.noise_snr_db) != 2 or d.noise_snr_db[0] > d.noise_snr_db[1]):
        raise RecipeError(f"data.noise_snr_db: expected [low, high] in dB, got {d.noise_snr_db}")
    if bool(d.noise_snr_db) != (d.noise_prob > 0):
        raise RecipeError("data.noise_prob and data.noise_snr_db: set both (noise on) or neither (off)")
    if d.spec_augment and (len(d.spec_augment) != 4 or min(d.spec_augment) < 0):
        raise RecipeError(f"data.spec_augment: four counts >= 0 (time masks, width, frequency masks, width), got {d.spec_augment}")
    if any(not 0.5 <= f <= 2.0 for f in d.speed_perturb):
        raise RecipeError(f"data.speed_perturb: factors must lie in [0.5, 2.0], got {d.speed_perturb}")
    if r.distributed.engine != "deepspeed" and r.distributed.zero_stage != DistributedConfig.zero_stage:
        raise RecipeError(f"distributed.zero_stage: only used with distributed.engine = 'deepspeed' (engine is {r.distributed.engine!r})")
    if r.distributed.engine == "deepspeed" and r.distributed.zero_stage == 3 and r.data.valid:
        # each rank decodes its own share while ZeRO-3 gathers parameters collectively: the ranks would hang
        raise RecipeError("distributed.zero_stage = 3: in-run validation is not supported; set data.valid = '' and run steermoe eval")
    if r.train.decay_steps and not r.train.warmup_steps < r.train.decay_steps <= r.train.max_steps:
        raise RecipeError(f"train.decay_steps: must lie after train.warmup_steps ({r.train.warmup_steps}) and at most train.max_steps ({r.train.max_steps}), got {r.train.decay_steps}")
    if len(r.train.betas) != 2 or not all(0.0 <= b < 1.0 for b in r.train.betas):
        raise RecipeError(f"train.betas: expected two numbers in [0, 1), got {r.train.betas}")
    for part in ("encoder", "llm"):
        lora = getattr(r.model, part).lora
        if lora is not None and (not lora.target_modules or not all(m.strip() for m in lora.target_modules)):
            raise RecipeError(f"model.{part}.lora.target_modules: list at least one module name, e.g. [\"q_proj\", \"v_proj\"]")
    if r.train.lr_lora and r.model.encoder.lora is None and r.model.llm.lora is None:
        raise RecipeError("train.lr_lora: no [model.encoder.lora] or [model.llm.lora] section, so there is no LoRA to train")
    if r.model.steering.top_k > r.model.steering.num_experts:
        raise RecipeError(
            f"model.steering.top_k: {r.model.steering.top_k} exceeds model.steering.num_experts "
            f"({r.model.steering.num_experts})"
        )


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a TOML recipe; every problem becomes a one-line RecipeError naming file and key."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RecipeError(f"{path}: no such recipe file") from None
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{path}: not valid TOML ({e})") from None
    except UnicodeDecodeError as e:  # TOML is UTF-8 by definition
        raise RecipeError(decode_error_text(e, path)) from None
    try:
        return recipe_from_dict(data, overrides)
    except RecipeError as e:
        raise RecipeError(f"{path}: {e}") from None


def recipe_to_dict(recipe: Recipe) -> dict:
    return dataclasses.asdict(recipe)


# where a run read its data and how fast it loaded it: not what it trained
MACHINE_FIELDS = (("data", "train"), ("data", "valid"), ("data", "num_workers"))


def recipe_fingerprint(recipe: Recipe) -> str:
    """What a recipe trains, as 16 hex digits: every field but ``MACHINE_FIELDS``, so the same recipe run
    on another machine (its data elsewhere, more loader workers) has the same fingerprint. A checkpoint
    started from another records its lineage with these (``training.init_from``)."""
    import hashlib
    import json

    d = recipe_to_dict(recipe)
    for section, key in MACHINE_FIELDS:
        d[section].pop(key, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as TOML, with each field's documentation as a comment."""
    lines: list[str] = []

    def emit(obj: Any, prefix: str) -> None:
        hints = typing.get_type_hints(type(obj))
        scalars = [f for f in dataclasses.fields(obj) if _section(hints[f.name]) is None]
        if scalars:
            lines.append(f"[{prefix}]")
            for f in scalars:
                lines.append(f"# {f.metadata.get('doc', '')}")
                lines.append(f"{f.name} = {_toml_value(getattr(obj, f.name))}")
            lines.append("")
        for f in dataclasses.fields(obj):
            sub, key = getattr(obj, f.name), f"{prefix}.{f.name}" if prefix else f.name
            if dataclasses.is_dataclass(sub):
                emit(sub, key)
            elif _section(hints[f.name]) is not None:  # an optional section left out: shown commented out
                start = len(lines)
                emit(_section(hints[f.name])(), key)
                lines[start:] = [f"# {f.metadata.get('doc', '')}"] + [f"# {x}" if x else x for x in lines[start:]]

    emit(recipe, "")
    return "\n".join(lines)


def iter_fields(cls: type = Recipe, prefix: str = "") -> typing.Iterator[tuple[str, Any, str]]:
    """(dotted key, default, doc) for every leaf field: used by --help output and docs."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        section = _section(hints[f.name])
        if section is not None:
            yield from iter_fields(section, key)
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            yield key, default, f.metadata.get("doc", "")

