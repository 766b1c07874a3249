"""The export cache behind ``--backend auto``: the frozen LLM's decoder exported once and shared by
every adapter on that LLM, on tiny random backbones."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import tiny_recipe_dict, tone_clip

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
PROMPT = "Transcribe the audio."


def _checkpoint(backbones, where, seed: int, llm_lora: bool = False):
    """A checkpoint with a random adapter (``seed``) on the session's tiny backbones."""
    from steermoe_core.config import recipe_from_dict
    from steermoe_core.model.build import build_model
    from steermoe_core.model.checkpoint import save_checkpoint

    d = tiny_recipe_dict(backbones)
    if llm_lora:
        d["model"]["llm"]["lora"] = {"rank": 2, "alpha": 4.0}
    recipe = recipe_from_dict(d)
    model = build_model(recipe.model, torch.device("cpu"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # the build is seeded: make each adapter its own
        for p in (p for p in model.parameters() if p.requires_grad):
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return save_checkpoint(model, recipe, where, 0, {})


@pytest.fixture(scope="module")
def adapters(backbones, tmp_path_factory):
    """Two adapters trained (here: drawn) on the same LLM."""
    root = tmp_path_factory.mktemp("onnx-cache-ckpts")
    return _checkpoint(backbones, root / "first", 1), _checkpoint(backbones, root / "second", 2)


@pytest.fixture
def llm_exports(monkeypatch):
    """Counts the LLM decoder exports (the expensive part that sharing saves)."""
    from steermoe_core.export import onnx_export

    calls = []
    real = onnx_export._export_llm

    def counted(*a, **k):
        calls.append(a[1])
        return real(*a, **k)

    monkeypatch.setattr(onnx_export, "_export_llm", counted)
    return calls


def _clips() -> list[np.ndarray]:
    return [tone_clip(i, 0.8 + 0.3 * i) for i in range(3)]


def test_two_adapters_on_one_llm_share_one_decoder_and_decode_as_unshared_exports(adapters, tmp_path, monkeypatch, llm_exports):
    from steermoe_core.export.cache import cache_dir, cached_export
    from steermoe_core.export.onnx_export import export_onnx
    from steermoe_core.inference.onnx_backend import OnnxBackend

    monkeypatch.setenv("STEERMOE_CACHE", str(tmp_path / "cache"))
    first, second = adapters
    said: list[str] = []
    a = cached_export(first, say=said.append)
    assert len(llm_exports) == 1
    b = cached_export(second, say=said.append)
    assert len(llm_exports) == 1, "the second adapter's export exported the LLM's decoder again"
    assert any("reusing" in s for s in said)
    key = json.loads((a / "manifest.json").read_text())["shared_llm"]
    assert json.loads((b / "manifest.json").read_text())["shared_llm"] == key
    part = cache_dir() / "llm" / key
    for name in ("decoder.onnx", "embeddings.npy", "tokenizer/tokenizer.json"):
        inodes = {os.stat(folder / name).st_ino for folder in (a, b, part)}
        assert len(inodes) == 1, name  # one file on disk, linked into both exports
    assert os.stat(a / "audio_tower.onnx").st_ino != os.stat(b / "audio_tower.onnx").st_ino
    assert cached_export(second, say=said.append) == b and len(llm_exports) == 1  # built once

    plain = tmp_path / "plain"
    manifest = export_onnx(second, plain)  # `steermoe export --onnx --out`: no cache, no sharing
    assert "shared_llm" not in manifest and os.stat(plain / "decoder.onnx").st_nlink == 1
    assert json.loads((b / "manifest.json").read_text())["parity"]["decoder"] == pytest.approx(manifest["parity"]["decoder"])
    shared, unshared = OnnxBackend.load(b, "cpu"), OnnxBackend.load(plain, "cpu")
    clips = _clips()
    for x, y in zip(shared.encode_audio(clips), unshared.encode_audio(clips)):
        np.testing.assert_array_equal(x, y)
    want = unshared.generate(clips, [1] * 3, [PROMPT] * 3, 10, 1)
    assert shared.generate(clips, [1] * 3, [PROMPT] * 3, 10, 1) == want and all(want)
    assert OnnxBackend.load(a, "cpu").generate(clips, [1] * 3, [PROMPT] * 3, 10, 1) != want  # a different adapter


def test_pruning_keeps_a_shared_decoder_while_an_export_names_it(adapters, backbones, tmp_path, monkeypatch, llm_exports):
    """Keep 1: the first adapter's export goes when the second's is made, the decoder they share stays;
    an LLM with LoRA folded in gets a decoder of its own and links the shared one (the LLM as released,
    for prompts without audio), which then lives as long as it is named. A pruned export asked for
    again is built again cleanly; its LLM part is exported again once no export names it."""
    pytest.importorskip("peft")
    from steermoe_core.export.cache import cache_dir, cached_export
    from steermoe_core.inference.onnx_backend import OnnxBackend

    monkeypatch.setenv("STEERMOE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("STEERMOE_ONNX_CACHE_KEEP", "1")
    first, second = adapters
    a = cached_export(first, say=lambda s: None)
    key = json.loads((a / "manifest.json").read_text())["shared_llm"]
    b = cached_export(second, say=lambda s: None)
    assert not a.exists() and b.is_dir() and len(llm_exports) == 1
    assert (cache_dir() / "llm" / key / "decoder.onnx").is_file()  # named by the kept export

    lora = cached_export(_checkpoint(backbones, tmp_path / "lora", 3, llm_lora=True), say=lambda s: None)
    manifest = json.loads((lora / "manifest.json").read_text())
    own = manifest["shared_llm"]
    assert own != key and manifest["shared_base_llm"] == key and len(llm_exports) == 2  # its folded LLM is its own
    assert not b.exists() and (cache_dir() / "llm" / key / "decoder.onnx").is_file()  # the released LLM, named by it
    assert (lora / "base_llm" / "decoder.onnx").stat().st_ino == (cache_dir() / "llm" / key / "decoder.onnx").stat().st_ino
    assert (cache_dir() / "llm" / own / "decoder.onnx").is_file()

    again = cached_export(second, say=lambda s: None)
    assert again == b and len(llm_exports) == 2  # the released LLM's part was still there
    assert not lora.exists() and not (cache_dir() / "llm" / own).exists()  # the folded one went with its export
    assert OnnxBackend.load(again, "cpu").generate(_clips()[:1], [1], [PROMPT], 6, 1)[0]


def test_a_pruned_shared_part_leaves_the_exports_that_link_it_whole(adapters, tmp_path, monkeypatch, llm_exports):
    """Hard links: deleting the shared part (by hand, or a crash half-way through a prune) takes no
    file from an export; the next adapter on that LLM exports the part again."""
    import shutil

    from steermoe_core.export.cache import cache_dir, cached_export
    from steermoe_core.inference.onnx_backend import OnnxBackend

    monkeypatch.setenv("STEERMOE_CACHE", str(tmp_path / "cache"))
    first, second = adapters
    a = cached_export(first, say=lambda s: None)
    shutil.rmtree(cache_dir() / "llm")
    assert OnnxBackend.load(a, "cpu").generate(_clips()[:1], [1], [PROMPT], 6, 1)[0]
    b = cached_export(second, say=lambda s: None)
    assert len(llm_exports) == 2 and (b / "decoder.onnx").is_file()
    (b / "decoder.onnx").unlink()  # an export missing a file is built again, not loaded half
    assert cached_export(second, say=lambda s: None) == b and (b / "decoder.onnx").is_file()


def test_two_adapters_on_a_new_llm_exported_at_once_export_its_decoder_once(adapters, tmp_path):
    """Two processes, one per adapter, both first users of an LLM: the LLM part's lock makes one export
    the decoder while the other waits and links it."""
    code = textwrap.dedent("""
        import sys
        from steermoe_core.export.cache import cached_export
        cached_export(sys.argv[1], say=lambda line: print(line, flush=True))
    """)
    env = {**os.environ, "STEERMOE_CACHE": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(ckpt)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for ckpt in adapters]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert sum(o.count("exporting the LLM decoder") for o in outs) == 1, outs
    from steermoe_core.export.cache import cache_folder

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STEERMOE_CACHE", str(tmp_path / "cache"))
        a, b = (cache_folder(c) for c in adapters)
    assert os.stat(a / "decoder.onnx").st_ino == os.stat(b / "decoder.onnx").st_ino


def test_choosing_the_backend_imports_no_torch():
    code = ("import sys, steermoe_core.inference.choice, steermoe_core.export.cache; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
