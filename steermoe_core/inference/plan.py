"""The request planner: one place that turns a request about audio into the rows a backend decodes,
and the decoded rows back into a ``Result``.

`steermoe infer`, the Python API (``SteerMoE.stream/ask``) and every `serve` route call it, so the
same request gets the same segments, token budgets, strategy, text, warnings and errors whichever
front end it came through; the front ends only batch rows and present results.

    plan = plan_request([audio], "talk.wav", "Summarize the main points.", backend, policy)
    if plan.refusal: ...                                   # a coded, one-line reason (no speech, too long, ...)
    texts, flags = decode the plan.rows (any batching)    # generation.chat.decode_audio on a backend
    refusal = assemble(plan, texts, flags, result)         # segments, flags, warnings, empty-answer check
    if plan.strategy == "transcript" and refusal is None:  # then the instruction over the transcript
        refusal = answer(plan, result, chat, count, context, answer_tokens)

Rules (``inference.longform`` has the segmentation and map-reduce they use):

- A request whose instruction is the checkpoint's own task prompt (transcribe) is a transcript: its
  segments are decoded directly, never re-asked of the LLM over its own transcript.
- A transcript is one row per segment, each with its duration's token budget (or the caller's cap).
- An instruction runs by ``longform.choose_strategy``: ``direct`` is one row holding every segment
  and the instruction, refused when it is over the LLM's context; ``transcript`` decodes the segments
  as a transcript, then ``answer`` runs the instruction over the text.
- No speech: a transcript is empty with the warning "no speech found"; an instruction is refused.
  An empty answer is an error, never a success.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from steermoe_core.audio.load import SAMPLE_RATE
from steermoe_core.inference.longform import (
    STRATEGIES,
    LongformPolicy,
    answer_over_transcript,
    choose_strategy,
    plan_segments,
)
from steermoe_core.inference.result import Result, Segment

TASK_PROMPTS = {
    "transcribe": "Transcribe the audio.",
    "summarize": "Summarize the main points of the audio.",
    "sentiment": "What is the speaker's sentiment: positive, negative or neutral? Answer with one word.",
}

# what each refusal means to an HTTP client (`serve` answers with this status and the code)
REFUSAL_STATUS = {"no_speech": 400, "context_length_exceeded": 400, "unsupported_strategy": 400, "empty_answer": 500}

FLAG_WORDS = {"budget": "cut at its token budget", "loop": "a repetition loop, one copy kept"}


@dataclass(frozen=True)
class Refusal:
    """Why a request gets no answer: a stable ``code`` (``REFUSAL_STATUS``) and a one-line message naming the input."""

    code: str
    message: str


@dataclass
class Row:
    """One unit a backend decodes: its clips (in order), the prompt after them, its token budget."""

    clips: list[np.ndarray]
    prompt: str
    budget: int

    @property
    def samples(self) -> int:
        return sum(len(c) for c in self.clips)


@dataclass
class Plan:
    """What to decode for one request, and how its texts become a ``Result``."""

    name: str
    audio_s: float
    rows: list[Row] = field(default_factory=list)
    spans: list[tuple[float, float]] = field(default_factory=list)  # each segment's (start, end) in seconds
    strategy: str | None = None  # None: a transcript; "direct" | "transcript": an instruction
    instruction: str = ""  # the transcript strategy's instruction, answered over the transcript
    refusal: Refusal | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def direct(self) -> bool:
        return self.strategy == "direct"


def _norm(text: str) -> str:
    return " ".join(text.lower().replace(".", " ").split())


def is_task_prompt(prompt: str) -> bool:
    """Whether ``prompt`` asks for what the checkpoint was trained to do: transcribe (case, spaces and
    full stops aside). Such a request is decoded directly, as a transcript."""
    return _norm(prompt) == _norm(TASK_PROMPTS["transcribe"])


def plan_request(
    clips: list[np.ndarray],
    name: str,
    prompt: str,
    backend,
    policy: LongformPolicy,
    strategy: str = "auto",
    transcribe: bool | None = None,
    max_new_tokens: int | None = None,
) -> Plan:
    """The plan for ``prompt`` about ``clips`` (one recording, or a chat's audio parts in order).

    ``transcribe``: None = decided by the prompt (``is_task_prompt``). ``max_new_tokens``: a
    transcript's per-segment cap (None: each segment's duration's budget), or a direct answer's
    budget (None: ``policy.answer_tokens``). ``backend`` gives the context and token counts."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy {strategy!r} is not one of {STRATEGIES}")
    transcribe = is_task_prompt(prompt) if transcribe is None else transcribe
    plan = Plan(name, sum(len(c) for c in clips) / SAMPLE_RATE)
    pieces: list[np.ndarray] = []
    offset = 0
    for clip in clips:
        for s, e in plan_segments(clip, policy).spans:
            pieces.append(clip[s:e])
            plan.spans.append(((offset + s) / SAMPLE_RATE, (offset + e) / SAMPLE_RATE))
        offset += len(clip)
    if not pieces:
        plan.warnings.append("no speech found")
        if not transcribe:
            plan.refusal = Refusal("no_speech", f"{name}: no speech found, nothing to answer about")
        return plan
    if transcribe:
        plan.rows = [Row([p], TASK_PROMPTS["transcribe"], max_new_tokens or policy.budget(len(p) / SAMPLE_RATE)) for p in pieces]
        return plan
    can_chat = callable(getattr(backend, "complete", None))
    if strategy == "transcript" and not can_chat:
        plan.refusal = Refusal("unsupported_strategy", f"strategy 'transcript' needs a backend that runs the LLM on text "
                                                       f"alone (this one is {backend.name}); use strategy 'direct' or 'auto'")
        return plan
    need = backend.prompt_tokens(prompt) + sum(backend.audio_token_counts([len(p) for p in pieces]))
    fits = need <= backend.max_context
    plan.strategy = choose_strategy(strategy, policy, fits, can_chat)
    if plan.direct:
        if not fits:
            hint = "use strategy 'transcript' (or 'auto'), or a shorter recording" if can_chat else \
                "transcribe it instead, or use a shorter recording"
            plan.refusal = Refusal("context_length_exceeded",
                                   f"{name}: too long for the LLM's context ({need} tokens > {backend.max_context}); {hint}")
            return plan
        plan.rows = [Row(pieces, prompt, max_new_tokens or policy.answer_tokens)]
        return plan
    plan.instruction = prompt
    plan.rows = [Row([p], TASK_PROMPTS["transcribe"], policy.budget(len(p) / SAMPLE_RATE)) for p in pieces]
    return plan


def _refuse(result: Result, refusal: Refusal) -> Refusal:
    result.error = refusal.message
    return refusal


def assemble(plan: Plan, texts: list[str], flags: list[str | None], result: Result) -> Refusal | None:
    """The decoded rows of ``plan`` (one text and flag per row, in row order) into ``result``:
    its segments with their flags, a warning for every cut or looping row, the joined text; an
    empty direct answer, or a transcript strategy with nothing transcribed, is refused."""
    result.strategy = plan.strategy
    result.audio_s = plan.audio_s
    result.warnings.extend(plan.warnings)
    if plan.refusal is not None:
        return _refuse(result, plan.refusal)
    if plan.direct:
        result.text, flag = texts[0], flags[0]
        result.segments = [Segment(0.0, plan.audio_s, result.text, flag)]
        if flag:
            result.warnings.append(f"the answer was {FLAG_WORDS[flag]}")
        if not result.text:
            return _refuse(result, Refusal("empty_answer", f"{plan.name}: the model gave an empty answer (strategy direct)"))
        return None
    result.segments = []
    for w, ((s, e), text, flag) in enumerate(zip(plan.spans, texts, flags)):
        result.segments.append(Segment(s, e, text, flag))
        if flag:
            result.warnings.append(f"segment {w + 1} ({s:.1f}-{e:.1f} s): {FLAG_WORDS[flag]}")
    result.text = " ".join(seg.text for seg in result.segments if seg.text)
    if plan.strategy == "transcript":
        result.transcript = result.text
        if not result.text:
            return _refuse(result, Refusal("empty_answer", f"{plan.name}: nothing was transcribed, so there is "
                                                                  "nothing to answer about (strategy transcript)"))
    return None


def answer(
    plan: Plan,
    result: Result,
    chat: Callable[[list[dict], int, bool], str],
    count: Callable[[list[dict]], int],
    context: int,
    answer_tokens: int,
    progress: Callable[[int, int], None] | None = None,
) -> Refusal | None:
    """The transcript strategy's second half, after ``assemble``: the instruction over the segments'
    texts in the frozen LLM (``longform.answer_over_transcript``: map-reduce past the context).
    ``chat(messages, max_new_tokens, final)`` runs one guarded text generation (``final``: the answer
    the user sees, e.g. to stream it)."""
    parts = [seg.text for seg in result.segments if seg.text]
    ans = answer_over_transcript(plan.instruction, parts, chat, count, context, answer_tokens, progress=progress)
    result.text, result.rounds = ans.text, ans.rounds
    if ans.truncated:
        result.warnings.append("the transcript was shortened to fit the LLM's context")
    if not result.text:
        return _refuse(result, Refusal("empty_answer", f"{plan.name}: the model gave an empty answer (strategy transcript)"))
    return None
