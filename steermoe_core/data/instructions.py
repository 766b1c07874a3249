"""The chat that asks the frozen LLM an instruction about a transcript.

Shared by behaviour alignment's training targets (``data.alignment``) and `infer`'s transcript strategy
(``inference.longform``), so both aim at the same answer. Kept free of torch: the onnxruntime backend
imports the long-form code and must run without torch installed.
"""

from __future__ import annotations


def instruction_messages(instruction: str, transcript: str) -> list[dict]:
    """The chat the frozen LLM answers: the transcript, then the instruction."""
    return [{"role": "user", "content": f"Transcript of a recording:\n\n{transcript}\n\n{instruction}"}]
