"""Recordings of any length, and instructions about them.

A model trained on sentences of a few seconds, asked to read a 30 s window, loses the audio and
loops to its token budget; asked about silence, it invents text. So:

- **Segments like the training clips.** ``plan_segments`` cuts a recording at voice activity
  (``audio.vad``) into segments no longer than the checkpoint trained on (``LongformPolicy``: from
  ``eval.max_segment_seconds``, else the training lengths meta.json records): one segment per speech
  region, joined only for a checkpoint trained on joined utterances. Silence gives no segment, so no text.
- **A decode budget per segment, and a loop guard.** ``DecodeGuard`` stops each row of a batch at
  its own budget (tokens per second of its audio, from the training transcripts) and as soon as
  its tail repeats an n-gram (``loop_length``); after decoding, a text whose zlib compression
  ratio is above 2.4 (Whisper's threshold) is a loop too. A cut or looping segment keeps its text
  trimmed to one copy and is flagged in the result (``Segment.flag``), never silently.
- **Instructions over a whole recording** (``STRATEGIES``): ``direct`` puts the audio tokens and
  the instruction in one LLM prompt; ``transcript`` transcribes (as above) and runs the instruction
  over the transcript as text in the frozen LLM (``chat_text``), map-reduce over groups of segments
  when the transcript does not fit the LLM's context (``answer_over_transcript``); ``auto`` picks
  direct only for a checkpoint trained for instructions (``data.align_instructions``) whose audio
  fits the context.

No torch import at module level: the onnxruntime backend uses this module too.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from steermoe_core.audio.load import SAMPLE_RATE
from steermoe_core.audio.vad import is_silent, segment_speech
from steermoe_core.audio.windows import split_points
from steermoe_core.data.instructions import instruction_messages

STRATEGIES = ("auto", "direct", "transcript")
DEFAULT_MAX_SECONDS = 30.0  # a checkpoint that records nothing: Whisper's window
DEFAULT_TOKENS_PER_SECOND = 6.0  # fast English speech is about 3 words, 4-5 tokens, a second
BUDGET_MARGIN = 1.5
BUDGET_FLOOR = 8


@dataclass
class LongformPolicy:
    """How a checkpoint reads long audio: what its training data looked like, or what the recipe says."""

    max_segment_seconds: float = DEFAULT_MAX_SECONDS  # the longest stretch read as one: a clip up to this is read whole
    join_seconds: float = 0.0  # voice-activity regions are joined up to this; 0 = never joined (one segment per region)
    tokens_per_second: float = DEFAULT_TOKENS_PER_SECOND
    vad: str = "auto"
    trained_for_instructions: bool = False
    answer_tokens: int = 256  # budget of a text-only answer (transcript strategy)

    def budget(self, seconds: float) -> int:
        """Tokens a segment of ``seconds`` may decode: 1.5 x the training rate, + 8."""
        return int(math.ceil(BUDGET_MARGIN * self.tokens_per_second * seconds)) + BUDGET_FLOOR

    def default_max_new_tokens(self) -> int:
        """``infer``'s default budget: a full segment's."""
        return self.budget(self.max_segment_seconds)


def policy_inputs(folder: str | Path) -> dict:
    """What a checkpoint's long-recording policy is made of: meta.json's ``training_audio`` and the
    recipe's ``eval`` settings and instruction training. An exporter copies this into its manifest
    (``longform``), so an exported folder reads recordings as its checkpoint does, by the same rules."""
    folder = Path(folder)
    meta = {}
    if (folder / "meta.json").is_file():
        try:
            meta = json.loads((folder / "meta.json").read_text())
        except ValueError:
            meta = {}
    out: dict = {"training_audio": meta.get("training_audio") or {}}
    if (folder / "recipe.toml").is_file():
        from steermoe_core.config import load_recipe

        recipe = load_recipe(folder / "recipe.toml")
        out["eval"] = {k: getattr(recipe.eval, k) for k in ("max_segment_seconds", "tokens_per_second", "vad")}
        out["trained_for_instructions"] = bool(recipe.data.align_instructions) and recipe.data.align_prob > 0
        out["joined_seconds"] = float(recipe.data.concat_seconds) if recipe.data.concat_prob > 0 else 0.0
    return out


def policy_from_checkpoint(folder: str | Path | None) -> LongformPolicy:
    """The policy a checkpoint folder asks for: ``eval.max_segment_seconds`` / ``eval.tokens_per_second``
    / ``eval.vad`` from its recipe, else what meta.json's ``training_audio`` records about its training
    data (``max_seconds`` read whole, ``p95_seconds`` joined up to; ``tokens_per_second``), else the defaults. An exported
    folder (no recipe) uses what its manifest copied from its checkpoint (``policy_inputs``)."""
    if folder is None:
        return LongformPolicy()
    folder = Path(folder)
    if not (folder / "recipe.toml").is_file() and (folder / "manifest.json").is_file():
        try:
            inputs = json.loads((folder / "manifest.json").read_text()).get("longform") or {}
        except (ValueError, AttributeError):
            inputs = {}
    else:
        inputs = policy_inputs(folder)
    return _policy(inputs)


def _policy(inputs: dict) -> LongformPolicy:
    pol = LongformPolicy()
    seen = inputs.get("training_audio") or {}
    # a clip (or one speech region) up to the longest training clip is read whole; speech regions are
    # joined only for a checkpoint that trained on joined utterances (``data.concat_seconds``), up to that
    # length: a model trained on one sentence per clip, given a segment of two, writes the first and stops
    # (short sentences with 0.6 s pauses joined into 6-7 s segments lost 341 of 813 words)
    longest = seen.get("max_seconds") or seen.get("p95_seconds")
    if longest:
        pol.max_segment_seconds = min(DEFAULT_MAX_SECONDS, float(longest))
    if seen.get("tokens_per_second"):
        pol.tokens_per_second = float(seen["tokens_per_second"])
    ev = inputs.get("eval") or {}
    if ev.get("max_segment_seconds", 0) > 0:  # the recipe's length caps a segment
        pol.max_segment_seconds = float(ev["max_segment_seconds"])
    if inputs.get("joined_seconds", 0) > 0:
        pol.join_seconds = min(pol.max_segment_seconds, float(inputs["joined_seconds"]))
    if ev.get("tokens_per_second", 0) > 0:
        pol.tokens_per_second = float(ev["tokens_per_second"])
    pol.vad = ev.get("vad", pol.vad)
    pol.trained_for_instructions = bool(inputs.get("trained_for_instructions", False))
    return pol


# -- segmentation ------------------------------------------------------------------------------------
@dataclass
class Plan:
    """A recording's segments, in sample spans, and how they were found."""

    spans: list[tuple[int, int]]
    method: str  # silero | energy | windows | silent


def plan_segments(audio: np.ndarray, policy: LongformPolicy) -> Plan:
    """Segments to decode. Silence, low noise and clips too short to hold a word give none; a clip
    that fits one segment is read whole (as the model trained: one utterance per example); a longer
    one is cut at voice activity (``policy.vad``; ``off`` = fixed windows at low-energy points)."""
    if is_silent(audio):
        return Plan([], "silent")
    n, max_len = len(audio), int(policy.max_segment_seconds * SAMPLE_RATE)
    if n <= max_len:
        return Plan([(0, n)], "whole")
    if policy.vad == "off":
        return Plan(split_points(audio, policy.max_segment_seconds, policy.max_segment_seconds * 2 / 3), "windows")
    if policy.join_seconds > 0:
        spans, used = segment_speech(audio, policy.max_segment_seconds, policy.vad, join_seconds=policy.join_seconds)
    else:  # one segment per speech region
        spans, used = segment_speech(audio, policy.max_segment_seconds, policy.vad, merge_gap_s=0.0)
    return Plan(spans, used)


# -- instructions over a transcript: map-reduce ---------------------------------------------------------
def whole_messages(instruction: str, transcript: str) -> list[dict]:
    """The whole transcript and the instruction: the prompt behaviour alignment trains towards too."""
    return instruction_messages(instruction, transcript)


def part_messages(instruction: str, text: str, i: int, n: int) -> list[dict]:
    return [{"role": "user", "content": (
        f"Part {i} of {n} of a recording's transcript:\n\n{text}\n\n{instruction} "
        "Answer from this part only, briefly; say 'nothing relevant' if it has nothing on it."
    )}]


def notes_messages(instruction: str, notes: list[str]) -> list[dict]:
    joined = "\n".join(f"- Part {i}: {t}" for i, t in enumerate(notes, 1))
    return [{"role": "user", "content": f"Notes on the parts of a recording, in order:\n\n{joined}\n\n{instruction}"}]


@dataclass
class Answer:
    text: str
    rounds: int  # map-reduce rounds before the final answer (0 = the transcript fitted)
    truncated: bool  # some text had to be cut to fit even alone


def answer_over_transcript(
    instruction: str,
    parts: list[str],
    chat: Callable[[list[dict], int, bool], str],
    count: Callable[[list[dict]], int],
    context: int,
    answer_tokens: int = 256,
    progress: Callable[[int, int], None] | None = None,
    max_rounds: int = 8,
) -> Answer:
    """The instruction answered over a transcript given in ``parts`` (segment texts, in order).

    When the whole transcript and the answer fit the ``context``, one call. Otherwise map-reduce:
    parts are packed into groups that fit, each group answered on its own, then the answers
    (as notes) are treated as the new parts, until they fit in one prompt. ``chat(messages,
    max_new_tokens, final)`` runs the LLM (``final``: the answer the user sees, e.g. to stream it); ``count(messages)`` counts a prompt's tokens."""
    answer_tokens = max(1, min(answer_tokens, context // 4))
    room = context - answer_tokens
    texts = [p for p in parts if p.strip()]
    truncated, rounds = False, 0
    while True:
        msgs = whole_messages(instruction, " ".join(texts)) if rounds == 0 else notes_messages(instruction, texts)
        if count(msgs) <= room or rounds >= max_rounds:
            if count(msgs) > room:
                msgs, cut = _fit(msgs, count, room)
                truncated = truncated or cut
            if progress:
                progress(1, 1)
            return Answer(chat(msgs, answer_tokens, True), rounds, truncated)
        groups = _pack(texts, lambda g, n: count(part_messages(instruction, " ".join(g), n, n)), room)
        answers = []
        for i, g in enumerate(groups, 1):
            msgs = part_messages(instruction, " ".join(g), i, len(groups))
            if count(msgs) > room:
                msgs, _ = _fit(msgs, count, room)
                truncated = True
            answers.append(chat(msgs, answer_tokens, False))
            if progress:
                progress(i, len(groups) + 1)
        rounds += 1
        texts = [a if a.strip() else "nothing relevant" for a in answers]


def _pack(texts: list[str], cost: Callable[[list[str], int], int], room: int) -> list[list[str]]:
    """Consecutive texts in groups whose prompt fits ``room``; a text too long alone is its own group.
    A group always ends before the last text so every round halves at worst."""
    groups: list[list[str]] = []
    cur: list[str] = []
    for t in texts:
        if cur and cost(cur + [t], 99) > room:
            groups.append(cur)
            cur = []
        cur.append(t)
    if cur:
        groups.append(cur)
    if len(groups) == 1 and len(texts) > 1:  # fits as parts but not as a whole: split in two
        half = len(texts) // 2
        groups = [texts[:half], texts[half:]]
    return groups


def _fit(msgs: list[dict], count: Callable[[list[dict]], int], room: int) -> tuple[list[dict], bool]:
    """Cut the user message's words from the middle of its text until it fits (the instruction stays)."""
    content = msgs[-1]["content"]
    head, sep, tail = content.partition("\n\n")
    body, sep2, instr = tail.rpartition("\n\n")
    words = body.split()
    lo, hi = 0, len(words)
    while lo < hi:  # the most words that fit
        mid = (lo + hi + 1) // 2
        trial = [*msgs[:-1], {**msgs[-1], "content": f"{head}{sep}{' '.join(words[:mid])} ...{sep2}{instr}"}]
        if count(trial) <= room:
            lo = mid
        else:
            hi = mid - 1
    return [*msgs[:-1], {**msgs[-1], "content": f"{head}{sep}{' '.join(words[:lo])} ...{sep2}{instr}"}], lo < len(words)


def choose_strategy(requested: str, policy: LongformPolicy, fits: bool, can_chat: bool) -> str:
    """The strategy that runs: ``auto`` reads the audio directly only when the checkpoint trained for
    instructions and the audio fits the context (or when the backend cannot run text alone)."""
    if requested not in STRATEGIES:
        raise ValueError(f"strategy {requested!r} is not one of {STRATEGIES}")
    if requested != "auto":
        return requested
    if not can_chat:
        return "direct"
    return "direct" if policy.trained_for_instructions and fits else "transcript"
