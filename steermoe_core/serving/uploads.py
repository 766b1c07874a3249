"""Audio a client sends (a multipart file, or a chat's base64 ``input_audio`` parts) -> 16 kHz mono
float32 through the loader `infer` uses, with the server's upload cap; every error names the upload
(never the temporary file) and what is wrong with it."""

from __future__ import annotations

import base64
import binascii
import os
import tempfile
from pathlib import Path

import numpy as np

from steermoe_core.audio import AudioError, load_audio
from steermoe_core.serving.protocol import ApiError, AudioPart, ChatMessage

AUDIO_FORMATS = ("wav", "mp3", "flac", "ogg", "webm", "m4a", "mp4", "opus", "aac")


def over_cap(name: str, n: int, cap_mb: float) -> None:
    if n > cap_mb * 1024 * 1024:
        raise ApiError(413, f"{name}: {n / 2**20:.1f} MB is over this server's {cap_mb:g} MB upload cap (--max-upload-mb)",
                       code="file_too_large")


def decode_upload(data: bytes, name: str) -> np.ndarray:
    """Upload bytes -> 16 kHz mono float32 (runs on a worker thread: decoding may take a while)."""
    if not data:
        raise ApiError(400, f"{name}: empty file", code="invalid_audio")
    suffix = Path(name).suffix if Path(name).suffix.lower().lstrip(".") in AUDIO_FORMATS else ".audio"
    fd, tmp = tempfile.mkstemp(prefix="steermoe-upload-", suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return load_audio(tmp)
    except AudioError as e:
        raise ApiError(400, str(e).replace(tmp, name), code="invalid_audio") from None
    finally:
        os.unlink(tmp)


def audio_parts(messages: list[ChatMessage], cap_mb: float) -> list[tuple[str, bytes]]:
    """The ``input_audio`` parts' bytes, in order, each named ``messages[i].content[k] (fmt).fmt``."""
    out = []
    for i, m in enumerate(messages):
        for k, part in enumerate(m.content if isinstance(m.content, list) else []):
            if not isinstance(part, AudioPart):
                continue
            fmt = part.input_audio.format.lower()
            name = f"messages[{i}].content[{k}] ({fmt})"
            if fmt not in AUDIO_FORMATS:
                raise ApiError(400, f"{name}: audio format '{fmt}' is not one of {', '.join(AUDIO_FORMATS)}",
                               code="invalid_audio_format")
            try:
                data = base64.b64decode(part.input_audio.data, validate=True)
            except (binascii.Error, ValueError):
                raise ApiError(400, f"{name}: input_audio.data is not base64", code="invalid_audio") from None
            over_cap(name, len(data), cap_mb)
            out.append((f"{name}.{fmt}", data))
    return out


def text_turns(messages: list[ChatMessage]) -> list[dict]:
    """Each message as ``{"role", "content": its text parts joined}`` (developer counts as system), with
    an assistant's ``tool_calls`` and a tool message's ``tool_call_id`` when it has them."""
    turns = []
    for m in messages:
        if isinstance(m.content, list):
            text = "\n".join(p.text for p in m.content if not isinstance(p, AudioPart) and p.text)
        else:
            text = m.content or ""
        turn = {"role": "system" if m.role == "developer" else m.role, "content": text}
        if m.tool_calls:
            turn["tool_calls"] = [c.model_dump(exclude_none=True) for c in m.tool_calls]
        if m.tool_call_id:
            turn["tool_call_id"] = m.tool_call_id
        turns.append(turn)
    return turns
