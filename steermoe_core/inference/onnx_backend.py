"""The onnxruntime backend: an exported folder (`steermoe export --onnx`) run without PyTorch.

Imports numpy, onnxruntime and tokenizers only (a test checks that torch never gets imported).
The Whisper log-mel front end runs here in numpy, the same recipe as ``encoders.log_mel`` (and the
same per-clip statistics); the graphs run the rest. The prompt layout comes pre-rendered from the
exporter, and decoding is the torch backend's: greedy, left-padded batch, KV cache, stop at end of
turn, at most ``max_new_tokens`` new tokens, rows finished by ``model.decoding.finish_rows``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from steermoe_core.errors import CheckpointError, MissingDependency, UsageError
from steermoe_core.inference.onnx_manifest import cache_names, read_manifest, require
from steermoe_core.model.decoding import finish_rows


def log_mel(wave: np.ndarray, filters: np.ndarray, n_fft: int, hop: int) -> np.ndarray:
    """(samples,) -> (n_mels, samples // hop): Whisper's features, as ``encoders.log_mel.log_mel``
    computes them (centred reflect-padded periodic-Hann STFT, last frame dropped, per-clip max - 8)."""
    wave = np.asarray(wave, dtype=np.float32)
    if len(wave) < n_fft // 2 + 1:
        wave = np.pad(wave, (0, n_fft // 2 + 1 - len(wave)))
    padded = np.pad(wave, n_fft // 2, mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft)[::hop]
    window = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)).astype(np.float32)
    power = np.abs(np.fft.rfft(frames[:-1] * window, axis=-1)) ** 2
    logspec = np.log10(np.maximum(power.astype(np.float32) @ filters, 1e-10)).T
    logspec = np.maximum(logspec, logspec.max() - 8.0)
    return ((logspec + 4.0) / 4.0).astype(np.float32)


class _PrintStreamer:
    """Prints decoded text as tokens arrive (what ``transformers.TextStreamer`` does, without torch)."""

    def __init__(self, backend: OnnxBackend):
        self.backend, self.ids, self.shown = backend, [], 0

    def put(self, ids) -> None:
        self.ids.extend(int(i) for i in np.asarray(ids).reshape(-1))
        text = self.backend.decode([self.ids])[0]
        if text.endswith("\ufffd"):  # half a multi-byte character: wait for the rest
            return
        sys.stdout.write(text[self.shown :])
        sys.stdout.flush()
        self.shown = len(text)

    def end(self) -> None:
        sys.stdout.write("\n")
        self.ids, self.shown = [], 0


class OnnxBackend:
    """An exported folder on onnxruntime (CPU, or CUDA when onnxruntime-gpu has it)."""

    name = "onnxruntime"

    def __init__(self, folder: str | Path, device: str = "auto", threads: int = 0):
        require("onnxruntime", "tokenizers")
        import onnxruntime as ort
        from tokenizers import Tokenizer

        folder = Path(folder)
        try:  # a manifest with a key missing or of the wrong kind: the folder is damaged, not the code wrong
            self.manifest = m = read_manifest(folder)
            files, self.audio, self.llm, self.prompt = m["files"], m["audio"], m["llm"], m["prompt"]
            self.stop_ids, self.pad_id = m["generation"]["stop_ids"], m["generation"]["pad_id"]
            self.max_context = self.llm["max_context"]
        except (KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{folder / 'manifest.json'}: damaged ONNX manifest (no {e})") from None
        available = ort.get_available_providers()
        if device == "cuda" and "CUDAExecutionProvider" not in available:
            raise UsageError("--device cuda: this onnxruntime has no CUDA provider (pip install onnxruntime-gpu)")
        use_cuda = device in ("cuda", "auto") and "CUDAExecutionProvider" in available
        providers = (["CUDAExecutionProvider"] if use_cuda else []) + ["CPUExecutionProvider"]
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads or int(os.environ.get("STEERMOE_ORT_THREADS", "0"))
        opts.log_severity_level = 3
        # idle threads sleep rather than spin (as steermoe_core sets OpenMP's): on a busy CPU a spinning
        # thread holds the core its partner needs (STEERMOE_ORT_SPIN=1 spins, onnxruntime's default)
        opts.add_session_config_entry("session.intra_op.allow_spinning", os.environ.get("STEERMOE_ORT_SPIN", "0"))
        self.tower = _session(ort, folder / files["audio_tower"], opts, providers)
        self.decoder = _session(ort, folder / files["decoder"], opts, providers)
        # LoRA on the LLM is folded into ``decoder``; prompts without audio run the LLM as released
        # (``base_decoder``), opened on first use: transcription never needs it
        self._base = folder / files["base_decoder"] if "base_decoder" in files else None
        self._base_session = None
        self._session_args = (ort, opts, providers)
        self.embeddings = np.load(folder / files["embeddings"], mmap_mode="r")
        self.filters = np.load(folder / files["mel_filters"]).astype(np.float32)
        self.tokenizer = Tokenizer.from_file(str(folder / files["tokenizer"]))
        self.past_names = cache_names(self.llm["layers"], "past")
        self._post: dict[str, list[int]] = {k: list(v) for k, v in self.prompt["known"].items()}
        self.folder = folder
        self._chat_tokenizer = None
        self._rng = np.random.default_rng()

    @classmethod
    def load(cls, folder: str | Path, device: str = "auto") -> OnnxBackend:
        return cls(folder, device)

    # -- prompt and text --
    def post_ids(self, prompt: str) -> list[int]:
        """Token ids after the audio for ``prompt``: the exporter's for the task prompts, else the
        rendered template with the prompt in its place, tokenised here."""
        if prompt not in self._post:
            template = self.prompt["post_template"]
            if template is None:
                raise UsageError(
                    "this export's chat template cannot take free prompts outside the graph; use --task "
                    "transcribe/summarize or the torch backend"
                )
            self._post[prompt] = self.tokenizer.encode(template.replace(self.prompt["mark"], prompt), add_special_tokens=False).ids
        return self._post[prompt]

    def prompt_tokens(self, prompt: str) -> int:
        return len(self.prompt["pre_ids"]) + len(self.post_ids(prompt))

    def decode(self, rows: list[list[int]]) -> list[str]:
        texts = self.tokenizer.decode_batch(rows, skip_special_tokens=True)
        if self.prompt["clean_up_spaces"]:
            texts = [_clean_up_spaces(t) for t in texts]
        return texts

    def text_streamer(self) -> _PrintStreamer:
        return _PrintStreamer(self)

    # -- audio --
    def audio_token_counts(self, lengths: list[int]) -> list[int]:
        a = self.audio
        frames = [min(int(n) // a["hop"], a["max_frames"]) if a["trim_padding"] else a["max_frames"] for n in lengths]
        return [((f + 1) // 2 + a["stride"] - 1) // a["stride"] for f in frames]

    def features(self, clips: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Zero-padded (B, n_mels, F) features, F a multiple of the graph's frame block, and frame counts."""
        a = self.audio
        if a["trim_padding"]:
            feats = [log_mel(c, self.filters, a["n_fft"], a["hop"])[:, : a["max_frames"]] for c in clips]
        else:  # the reference layout: each clip zero-padded to 30 s before its features
            span = a["max_frames"] * a["hop"]
            feats = [log_mel(np.pad(c[:span], (0, max(0, span - len(c)))), self.filters, a["n_fft"], a["hop"])[:, : a["max_frames"]] for c in clips]
        lengths = np.array([min(len(c) // a["hop"], a["max_frames"]) for c in clips], dtype=np.int64)
        mult = a["frame_multiple"]
        width = max(f.shape[1] for f in feats)
        width = max(mult, -(-width // mult) * mult)
        if width > a["max_frames"]:
            raise UsageError(f"a {width}-frame window exceeds the exported encoder's {a['max_frames']} frames")
        out = np.zeros((len(clips), a["n_mels"], width), dtype=np.float32)
        for i, f in enumerate(feats):
            out[i, :, : f.shape[1]] = f
        return out, lengths

    def encode_audio(self, clips: list[np.ndarray]) -> list[np.ndarray]:
        """One (tokens, H) array of audio embeddings per clip: all of its tokens, or, for a ``drop_blank``
        export, those the graph's ``keep`` output marks (a clip with none keeps its first, as in torch)."""
        feats, lengths = self.features(clips)
        out = self.tower.run(None, {"features": feats, "feature_lengths": lengths})
        counts = self.audio_token_counts([len(c) for c in clips])
        rows = [out[0][i, :n].astype(np.float32) for i, n in enumerate(counts)]
        if not self.audio.get("drop_blank"):
            return rows
        keep = [out[1][i, :n] for i, n in enumerate(counts)]
        return [r[k] if k.any() else r[:1] for r, k in zip(rows, keep)]

    # -- text only: the frozen LLM --
    @property
    def text_tokenizer(self):
        """The export's tokenizer in transformers (its chat template renders text-only chats), loaded on
        first use: the transcript strategy and serve's text chat need it, transcription does not."""
        if self._chat_tokenizer is None:
            try:
                from transformers import AutoTokenizer
            except ImportError:
                raise MissingDependency("a chat without audio on the onnxruntime backend renders its template with transformers: pip install transformers") from None
            self._chat_tokenizer = AutoTokenizer.from_pretrained((self.folder / self.manifest["files"]["tokenizer"]).parent)
        return self._chat_tokenizer

    def complete(self, prompts: list[list[int]], max_new_tokens: int, guard=None, temperature: float = 0.0, streamer=None) -> list[list[int]]:
        """The frozen LLM alone on token prompts (text chat, the transcript strategy): the new ids per row,
        decoded by the LLM as released where the export folded LoRA into its decoder."""
        rows = [np.asarray(self.embeddings[np.asarray(p, dtype=np.int64)], dtype=np.float32) for p in prompts]
        return self.greedy(rows, max_new_tokens, streamer, guard, temperature, decoder=self.base_decoder)

    @property
    def base_decoder(self):
        """The decoder of the LLM as released: ``decoder`` itself, unless LoRA was folded into it."""
        if self._base is None:
            return self.decoder
        if self._base_session is None:
            ort, opts, providers = self._session_args
            self._base_session = _session(ort, self._base, opts, providers)
        return self._base_session

    # -- decoding --
    def generate(self, clips, groups, prompts, max_new_tokens, num_beams, streamer=None, guard=None, temperature: float = 0.0) -> list[str]:
        """``guard``: a ``generation.guards.DecodeGuard`` asked after every step (per-row budgets, loops);
        ``temperature`` > 0 samples."""
        if num_beams != 1:
            raise UsageError("the onnxruntime backend decodes greedily: use --beams 1, or the torch backend for beam search")
        audio = self.encode_audio(list(clips))
        rows, k = [], 0
        for n, prompt in zip(groups, prompts):
            pre, post = self.prompt["pre_ids"], self.post_ids(prompt)
            rows.append(np.concatenate([self.embeddings[pre], *audio[k : k + n], self.embeddings[post]]).astype(np.float32))
            k += n
        ids = self.greedy(rows, max_new_tokens, streamer, guard, temperature)
        return [t.strip() for t in self.decode(finish_rows(ids, self.stop_ids, self.pad_id))]

    def greedy(self, rows: list[np.ndarray], max_new_tokens: int, streamer=None, guard=None, temperature: float = 0.0,
               decoder=None) -> list[list[int]]:
        """Greedy (or, at ``temperature`` > 0, sampled) decoding of left-padded prompt embeddings with
        the KV cache kept in numpy; a row ends at a stop id or when ``guard`` stops it (then padded,
        as transformers pads a row its stopping criteria ended). ``decoder``: default ``self.decoder``."""
        decoder = decoder or self.decoder
        b, width = len(rows), max(len(r) for r in rows)
        embeds = np.broadcast_to(self.embeddings[self.pad_id].astype(np.float32), (b, width, self.llm["hidden"])).copy()
        mask = np.zeros((b, width), dtype=np.int64)
        for i, r in enumerate(rows):
            embeds[i, width - len(r) :] = r
            mask[i, width - len(r) :] = 1
        pos = np.where(mask == 1, mask.cumsum(-1) - 1, 0)
        empty = np.zeros((b, self.llm["kv_heads"], 0, self.llm["head_dim"]), dtype=np.float32)
        past = dict.fromkeys(self.past_names, empty)
        stops = np.array(self.stop_ids)
        done = np.zeros(b, dtype=bool)
        out: list[list[int]] = [[] for _ in range(b)]  # each row's ids so far, what the guard reads every step
        for step in range(max_new_tokens):
            logits, *present = decoder.run(None, {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": pos, **past})
            allowed = guard.allowed(out, logits.shape[-1]) if guard is not None else None
            if allowed is not None:  # rows decoded under a grammar (a tool call under its schema)
                logits = np.where(allowed, logits, -np.inf)
            nxt = np.where(done, self.pad_id, self._pick(logits, temperature))
            for row, tok in zip(out, nxt.tolist()):
                row.append(tok)
            if streamer is not None:
                streamer.put(nxt)
            done |= np.isin(nxt, stops)
            if guard is not None:
                done |= np.array(guard.check(out), dtype=bool)
            if done.all():
                break
            past = dict(zip(self.past_names, present))
            embeds = self.embeddings[nxt][:, None].astype(np.float32)
            mask = np.concatenate([mask, np.ones((b, 1), dtype=np.int64)], axis=1)
            pos = pos[:, -1:] + 1
        if streamer is not None:
            streamer.end()
        return out

    def _pick(self, logits: np.ndarray, temperature: float) -> np.ndarray:
        """(B, V) logits -> (B,) ids: the argmax, or a draw from softmax(logits / temperature)."""
        if temperature <= 0:
            return logits.argmax(-1)
        z = logits.astype(np.float64) / temperature
        p = np.exp(z - z.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        return np.array([self._rng.choice(len(row), p=row) for row in p])


def _session(ort, path: Path, opts, providers: list[str]):
    """An onnxruntime session; a graph file onnxruntime cannot parse (cut short, overwritten, not
    ONNX at all: ``InvalidProtobuf``, ``InvalidGraph``, ...) is one line naming it."""
    try:
        return ort.InferenceSession(str(path), opts, providers=providers)
    except Exception as e:
        if type(e).__module__.startswith("onnxruntime"):
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{path}: damaged ONNX graph ({type(e).__name__}: {first}); export it again") from None
        raise


def _clean_up_spaces(text: str) -> str:
    """transformers' ``clean_up_tokenization`` (for tokenizers whose export says it applies)."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text
