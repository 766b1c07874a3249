"""``POST /v1/audio/transcriptions``: OpenAI's transcription route.

A multipart ``file`` (and ``model``, ``prompt``, ``response_format``, ``temperature``,
``timestamp_granularities[]``, ``stream``; steermoe's ``strategy``) -> json | text | srt | vtt |
verbose_json, or server-sent events (``transcript.text.delta`` ..., one ``transcript.text.done``,
``[DONE]``). Without a prompt, or with the transcription prompt, it is a transcript; another prompt
is an instruction, answered by the strategy `infer` would run (the request planner decides both).
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, StreamingResponse
from pydantic import ValidationError

from steermoe_core.inference.formats import to_srt, to_vtt, verbose_json
from steermoe_core.inference.plan import TASK_PROMPTS
from steermoe_core.inference.result import Result
from steermoe_core.serving.jobs import Outcome
from steermoe_core.serving.protocol import ApiError, TranscriptionRequest, invalid
from steermoe_core.serving.state import authorize, check_length, check_model, ready
from steermoe_core.serving.uploads import decode_upload, over_cap

router = APIRouter()


def how(r: Result) -> dict:
    """An extension to OpenAI's shapes: how an answer about audio was made (the strategy; for the
    transcript strategy, the transcript and the map-reduce rounds); nothing for a plain transcript."""
    if r.strategy is None:
        return {}
    return {"strategy": r.strategy, **({"transcript": r.transcript, "rounds": r.rounds} if r.strategy == "transcript" else {})}


def _usage(out: Outcome) -> dict:
    prompt = out.text_tokens + out.audio_tokens
    return {"type": "tokens", "input_tokens": prompt, "output_tokens": out.output_tokens, "total_tokens": prompt + out.output_tokens,
            "input_token_details": {"text_tokens": out.text_tokens, "audio_tokens": out.audio_tokens},
            "seconds": round(out.result.audio_s, 3)}


def _described(r: Result) -> dict:
    """verbose_json, with how an instruction was answered and the planner's warnings (extensions)."""
    return {**verbose_json(r), **how(r), **({"warnings": r.warnings} if r.warnings else {})}


async def _read_form(request: Request, cap_mb: float) -> tuple[TranscriptionRequest, str, bytes]:
    form = await request.form(max_part_size=1024 * 1024)
    try:
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise ApiError(400, "no audio: send the recording as the multipart field 'file'", code="missing_file")
        fields = {k: v for k, v in form.multi_items() if k != "file" and not k.startswith("timestamp_granularities")}
        grains = [str(g) for g in form.getlist("timestamp_granularities[]") + form.getlist("timestamp_granularities")]
        try:
            body = TranscriptionRequest.model_validate({**fields, "timestamp_granularities": grains})
        except ValidationError as e:
            raise invalid(e) from None
        name = upload.filename or "upload"
        data = await upload.read(int(cap_mb * 1024 * 1024) + 1)
        over_cap(name, len(data), cap_mb)
        return body, name, data
    finally:
        await form.close()


@router.post("/v1/audio/transcriptions")
async def transcriptions(request: Request):
    state = authorize(request)
    settings = state.settings
    check_length(request, int(settings.max_upload_mb * 1024 * 1024) + 1024 * 1024)
    jobs = ready(state)
    body, name, data = await _read_form(request, settings.max_upload_mb)
    check_model(state, body.model)
    if "word" in body.timestamp_granularities:
        raise ApiError(400, "word timestamps are not available: this model times segments (one per stretch of speech); "
                            "ask for timestamp_granularities[]=segment", code="unsupported_granularity")
    audio = await asyncio.to_thread(decode_upload, data, name)
    del data
    prompt = (body.prompt or "").strip() or TASK_PROMPTS["transcribe"]
    plan = state.sm.plan([audio], name, prompt, body.strategy, max_new_tokens=settings.max_new_tokens)
    del audio
    ticket = jobs.start(plan, body.temperature, body.stream, settings.max_new_tokens or state.sm.policy.answer_tokens)
    fmt = body.response_format
    if body.stream:
        def last(out: Outcome) -> list[dict]:
            ev = {"type": "transcript.text.done", "text": out.result.text, "usage": _usage(out)}
            if fmt == "verbose_json":  # an extension the page uses: the segments with their times
                v = _described(out.result)
                ev.update({k: v[k] for k in ("segments", "strategy", "transcript", "rounds", "warnings") if k in v})
            return [ev]

        return StreamingResponse(jobs.events(ticket, list, lambda t: {"type": "transcript.text.delta", "delta": t}, last),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    out = await jobs.outcome(request, ticket)
    r = out.result
    if fmt == "text":
        return PlainTextResponse(r.text + "\n")
    if fmt == "srt":
        return PlainTextResponse(to_srt(r), media_type="application/x-subrip")
    if fmt == "vtt":
        return PlainTextResponse(to_vtt(r), media_type="text/vtt")
    if fmt == "verbose_json":
        return {**_described(r), "usage": _usage(out)}
    return {"text": r.text, "usage": _usage(out)}
