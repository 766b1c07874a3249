"""Audio in: ``load_audio`` (any format -> float32 mono 16 kHz) and long-audio windows."""

from steermoe_core.audio.load import (
    AUDIO_SUFFIXES,
    SAMPLE_RATE,
    ffmpeg_binary,
    is_audio_file,
    load_audio,
)
from steermoe_core.audio.windows import split_points
from steermoe_core.errors import AudioError

__all__ = ["AUDIO_SUFFIXES", "SAMPLE_RATE", "AudioError", "ffmpeg_binary", "is_audio_file", "load_audio", "split_points"]
