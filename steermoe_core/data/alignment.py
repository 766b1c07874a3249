"""Behaviour alignment (BLSP, DeSTA2): speech that acts like its text, so instructions are followed.

An adapter trained only on "Transcribe the audio." ignores other instructions: a summary request
returns a transcript. Behaviour alignment needs no labelled QA data: for a mix of instructions
(``data.align_instructions``: summarise, answer a question, continue, translate, classify ...) the
training target of an utterance becomes the frozen LLM's own answer to that instruction given the
utterance's transcript as text. Trained on that, the LLM answers about the audio as it would about
the transcript: the model learns to make speech read like its text, and the checkpoint records that
it was trained for instructions (`infer --strategy auto` then reads the audio directly).

The prompt is ``instruction_messages`` — the same one the transcript strategy of `infer` asks the
frozen LLM — so both strategies aim at the same answer. Answers are generated once, greedily, and
cached in a JSONL file (one line per example id and instruction; a killed run resumes from it).
Which examples get which instruction is a function of the id and the seed alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch

from steermoe_core.data.instructions import instruction_messages


def pick(example_id: str, instructions: list[str], prob: float, seed: int) -> str | None:
    """The instruction this example trains on, or None (it stays a transcription example)."""
    if not instructions or prob <= 0:
        return None
    h = int.from_bytes(hashlib.sha256(f"{seed}:{example_id}".encode()).digest()[:8], "big")
    if (h % 1_000_000) / 1_000_000 >= prob:
        return None
    return instructions[(h // 1_000_000) % len(instructions)]


def read_cache(path: Path) -> dict[tuple[str, str], str]:
    """(id, instruction) -> answer; a line cut short by a kill is ignored."""
    out: dict[tuple[str, str], str] = {}
    if not path.is_file():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        out[(rec["id"], rec["instruction"])] = rec["answer"]
    return out


def alignment_targets(
    examples: list[tuple[str, str]],
    instructions: list[str],
    prob: float,
    seed: int,
    chat: Callable[[list[dict], int], str],
    cache: Path,
    max_new_tokens: int = 64,
    write: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, tuple[str, str]]:
    """id -> (instruction, the frozen LLM's answer over the transcript) for the picked examples of
    ``examples`` ((id, transcript) pairs). Answers already in ``cache`` are reused; new ones are
    appended to it (``write``: only the process that writes). An empty answer keeps the example a
    transcription example (nothing to learn from it)."""
    known = read_cache(cache)
    todo = [(i, t, ins) for i, t in examples if (ins := pick(i, instructions, prob, seed)) is not None]
    out: dict[str, tuple[str, str]] = {}
    sink = None
    if write:
        cache.parent.mkdir(parents=True, exist_ok=True)
        sink = open(cache, "a", encoding="utf-8")
    try:
        for k, (ex_id, text, ins) in enumerate(todo, 1):
            ans = known.get((ex_id, ins))
            if ans is None:
                ans = chat(instruction_messages(ins, text), max_new_tokens)
                if sink is not None:
                    sink.write(json.dumps({"id": ex_id, "instruction": ins, "answer": ans}, ensure_ascii=False) + "\n")
                    sink.flush()
            if ans.strip():
                out[ex_id] = (ins, ans)
            if progress:
                progress(k, len(todo))
    finally:
        if sink is not None:
            sink.close()
    return out


class AlignedDataset(torch.utils.data.Dataset):
    """A view of a dataset whose picked examples carry an instruction as prompt and the frozen LLM's
    answer as target; everything else (rows, durations, audio) passes through."""

    def __init__(self, base, targets: dict[str, tuple[str, str]]):
        self.base, self.targets = base, targets
        self.rows, self.durations, self.too_long = base.rows, base.durations, base.too_long
        self.meta = [
            {**m, "prompt": targets[m["id"]][0], "text": targets[m["id"]][1]} if m["id"] in targets else m for m in base.meta
        ]

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        ex = self.base[i]
        t = self.targets.get(ex.id)
        return ex if t is None else dataclasses.replace(ex, prompt=t[0], text=t[1])


def training_view(ds, data_cfg, seed: int, out: Path, chat: Callable[[list[dict], int], str] | None, is_main: bool = True,
                  log: Callable[[str], None] | None = None):
    """The training set as the recipe asks: utterances joined up to ``data.concat_seconds``, then
    behaviour-alignment targets for ``data.align_instructions`` (needs ``chat``: the frozen LLM on text)."""
    from steermoe_core.data.concat import ConcatDataset

    if data_cfg.concat_seconds > 0 and data_cfg.concat_prob > 0:
        ds = ConcatDataset(ds, data_cfg.concat_seconds, data_cfg.concat_prob, seed)
    if data_cfg.align_instructions and data_cfg.align_prob > 0 and chat is not None:
        cache = Path(data_cfg.align_cache) if data_cfg.align_cache else out / "align_targets.jsonl"
        examples = [(m["id"], m["text"]) for m in ds.meta]
        step = max(1, len(examples) // 20)
        targets = alignment_targets(
            examples, list(data_cfg.align_instructions), data_cfg.align_prob, seed, chat, cache,
            data_cfg.align_max_new_tokens, write=is_main,
            progress=(lambda k, n: log(f"behaviour alignment: {k}/{n} answers") if k % step == 0 or k == n else None) if log else None,
        )
        ds = AlignedDataset(ds, targets)
    return ds
