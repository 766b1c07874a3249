"""`steermoe export --onnx` and the onnxruntime backend, against the torch backend, on tiny random backbones."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import tiny_recipe_dict, tone_clip
from typer.testing import CliRunner

from steermoe_cli.main import app

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
runner = CliRunner()
PROMPT = "Transcribe the audio."


@pytest.fixture(scope="module")
def ckpt(backbones, tmp_path_factory):
    """A checkpoint with a random adapter: generations are gibberish, but deterministic gibberish
    that the two backends must agree on token for token."""
    from steermoe_core.config import recipe_from_dict
    from steermoe_core.model.build import build_model
    from steermoe_core.model.checkpoint import save_checkpoint

    recipe = recipe_from_dict(tiny_recipe_dict(backbones))
    model = build_model(recipe.model, torch.device("cpu"))
    return save_checkpoint(model, recipe, tmp_path_factory.mktemp("onnx-ckpt") / "ckpt", 0, {})


@pytest.fixture(scope="module")
def exported(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx-export") / "model"
    r = runner.invoke(app, ["export", str(ckpt), "--onnx", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "onnxruntime" in r.stderr
    return out


@pytest.fixture(scope="module")
def backends(ckpt, exported):
    from steermoe_core.inference.onnx_backend import OnnxBackend
    from steermoe_core.generation.torch_backend import TorchBackend

    return TorchBackend.load(ckpt, "cpu"), OnnxBackend.load(exported, "cpu")


def _clips() -> list[np.ndarray]:
    noise = np.random.RandomState(0).randn(16000 * 3).astype(np.float32) * 0.1
    return [tone_clip(i, 0.8 + 0.3 * i) for i in range(4)] + [noise, tone_clip(1, 0.05)]


def test_export_writes_a_checked_folder_whose_graphs_load_with_dynamic_axes(exported):
    import onnx
    import onnxruntime as ort

    manifest = json.loads((exported / "manifest.json").read_text())
    assert manifest["format_version"] == 2 and manifest["opset"] == 18 and manifest["dtype"] == "fp32"
    assert manifest["llm"]["layers"] == 2 and manifest["audio"]["stride"] == 4
    for name in ("audio_tower.onnx", "decoder.onnx"):
        onnx.checker.check_model(str(exported / name))
    dec = ort.InferenceSession(str(exported / "decoder.onnx"), providers=["CPUExecutionProvider"])
    shapes = {i.name: i.shape for i in dec.get_inputs()}
    assert shapes["inputs_embeds"][:2] == ["batch", "seq"] and shapes["inputs_embeds"][2] == 64
    assert shapes["past_key_0"][0] == "batch" and isinstance(shapes["past_key_0"][2], str)  # batch and past length are dynamic
    assert len([n for n in shapes if n.startswith("past_")]) == 4
    assert np.load(exported / "embeddings.npy").shape == (manifest["llm"]["vocab"], 64)


def test_decoder_graph_matches_the_llm_with_an_empty_and_a_filled_cache(backends, exported):
    import onnxruntime as ort

    from steermoe_core.export.graphs import Decoder
    from steermoe_core.inference.onnx_manifest import cache_names

    tb, _ = backends
    sess = ort.InferenceSession(str(exported / "decoder.onnx"), providers=["CPUExecutionProvider"])
    dec = Decoder(tb.model.llm).eval()
    g = torch.Generator().manual_seed(0)
    for b, s, p in [(1, 7, 0), (3, 4, 0), (2, 1, 9), (3, 5, 6)]:
        embeds = torch.randn(b, s, 64, generator=g) * 0.2
        mask = torch.ones(b, p + s, dtype=torch.long)
        mask[-1, :2] = 0 if b > 1 else 1  # left padding in the last row
        pos = torch.where(mask == 1, mask.cumsum(-1) - 1, 0)[:, p:]
        past = [torch.randn(b, 2, p, 16, generator=g) for _ in range(4)]
        with torch.no_grad():
            ref = dec(embeds, mask, pos, past)
        feed = {"inputs_embeds": embeds.numpy(), "attention_mask": mask.numpy(), "position_ids": pos.numpy()}
        out = sess.run(None, {**feed, **{n: t.numpy() for n, t in zip(cache_names(2, "past"), past)}})
        assert out[0].shape == (b, 400) and out[1].shape == (b, 2, p + s, 16)
        real = mask.numpy()[:, None, :, None] == 1  # padded positions hold garbage in both, never read
        for k, (got, want) in enumerate(zip(out, ref)):
            want = want.numpy()
            got, want = (got, want) if k == 0 else (got * real, want * real)
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))


def test_audio_tower_and_numpy_features_match_torch(backends):
    from steermoe_core.data.batch import pad_clips
    from steermoe_core.encoders.log_mel import log_mel

    tb, ob = backends
    clips = _clips()
    for c in clips:
        ref = log_mel(torch.from_numpy(c), 80).numpy()
        feats, _ = ob.features([c])
        np.testing.assert_allclose(feats[0, :, : ref.shape[1]], ref, atol=1e-4)
    waves, lengths = pad_clips(clips)
    with torch.no_grad():
        ref = tb.model.encode_audio(waves, lengths).numpy()
    got = ob.encode_audio(clips)
    assert [len(a) for a in got] == tb.audio_token_counts([len(c) for c in clips]) == ob.audio_token_counts([len(c) for c in clips])
    for i, a in enumerate(got):
        want = ref[i, : len(a)]
        assert np.abs(a - want).max() <= 1e-4 * np.abs(want).max(), i


def test_greedy_generations_equal_torch_alone_and_batched(backends):
    tb, ob = backends
    clips = _clips()
    alone_t = [tb.generate([c], [1], [PROMPT], 12, 1)[0] for c in clips]
    alone_o = [ob.generate([c], [1], [PROMPT], 12, 1)[0] for c in clips]
    batch_o = ob.generate(clips, [1] * len(clips), [PROMPT] * len(clips), 12, 1)
    assert alone_o == alone_t
    assert batch_o == tb.generate(clips, [1] * len(clips), [PROMPT] * len(clips), 12, 1)
    assert len(set(alone_o)) == len(clips)  # the clips really decode differently
    # several windows in one prompt, and a free prompt the exporter never saw
    groups, prompts = [2, 3, 1], ["What is said?", PROMPT, "Summarize the main points of the audio."]
    assert ob.generate(clips, groups, prompts, 10, 1) == tb.generate(clips, groups, prompts, 10, 1)
    assert ob.prompt_tokens("What is said?") == tb.prompt_tokens("What is said?")


def test_rows_that_stop_early_are_padded_and_trimmed_as_torch_does(backends):
    """Random weights never say end-of-turn: make a token that one row produces the stop token."""
    tb, ob = backends
    clips = _clips()[:4]
    rows = ob.greedy(_prompt_rows(ob, clips), 12)
    stop = next(t for t in rows[0][2:8] if all(t not in r[:12] for r in rows[1:]))
    layout = tb.model.layout
    saved = layout.eot_id, ob.stop_ids
    layout.eot_id, ob.stop_ids = stop, [stop, *saved[1][1:]]
    try:
        got = ob.generate(clips, [1] * 4, [PROMPT] * 4, 12, 1)
        assert got == tb.generate(clips, [1] * 4, [PROMPT] * 4, 12, 1)
        assert len(ob.greedy(_prompt_rows(ob, clips), 12)[0]) == 12  # the others run on, row 0 padded
    finally:
        layout.eot_id, ob.stop_ids = saved


def _prompt_rows(ob, clips):
    audio = ob.encode_audio(clips)
    pre, post = ob.prompt["pre_ids"], ob.post_ids(PROMPT)
    return [np.concatenate([ob.embeddings[pre], a, ob.embeddings[post]]).astype(np.float32) for a in audio]


def test_cli_infer_with_onnxruntime_equals_torch(ckpt, exported, tmp_path):
    paths = []
    for i, c in enumerate(_clips()[:4]):
        paths.append(str(tmp_path / f"c{i}.wav"))
        sf.write(paths[-1], c, 16000, subtype="FLOAT")
    common = [*paths, "--format", "json", "--max-new-tokens", "10"]
    r_ort = runner.invoke(app, ["infer", "--backend", "onnxruntime", "--model", str(exported), *common])
    r_torch = runner.invoke(app, ["infer", "--model", str(ckpt), "--device", "cpu", *common])
    assert r_ort.exit_code == 0 == r_torch.exit_code, r_ort.output
    texts = [rec["text"] for rec in json.loads(r_ort.stdout)]
    assert texts == [rec["text"] for rec in json.loads(r_torch.stdout)] and all(texts)
    r = runner.invoke(app, ["infer", "--backend", "onnxruntime", "--model", str(exported), paths[0], "--stream", "--max-new-tokens", "10"])
    assert r.exit_code == 0 and r.stdout.strip()[:3] == texts[0][:3], (r.stdout, texts[0])  # printed as generated
    r = runner.invoke(app, ["infer", "--backend", "onnxruntime", "--model", str(exported), paths[0], "--beams", "2"])
    assert r.exit_code == 2 and "greedily" in r.stderr


def test_the_backend_runs_without_importing_torch(exported, tmp_path):
    wav = tmp_path / "a.wav"
    sf.write(wav, tone_clip(2, 1.0), 16000, subtype="FLOAT")
    code = textwrap.dedent(f"""
        import sys
        from steermoe_core.inference.onnx_backend import OnnxBackend
        from steermoe_core.inference import SteerMoE
        sm = SteerMoE(OnnxBackend.load({str(exported)!r}, "cpu"))
        r = sm.transcribe([{str(wav)!r}], max_new_tokens=5)[0]
        assert r.error is None and r.text, r
        bad = sorted(m for m in ("torch", "transformers") if m in sys.modules)
        print("imported:", bad)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "imported: []" in out.stdout


def test_clear_errors(ckpt, exported, tmp_path, monkeypatch):
    old = tmp_path / "old"
    shutil.copytree(exported, old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["format_version"] = 0
    (old / "manifest.json").write_text(json.dumps(manifest))
    wav = tmp_path / "a.wav"
    sf.write(wav, tone_clip(0), 16000)
    r = runner.invoke(app, ["infer", "--backend", "onnxruntime", "--model", str(old), str(wav)])
    assert r.exit_code == 2 and "format version 0" in r.stderr and "export the checkpoint again" in r.stderr, r.stderr
    r = runner.invoke(app, ["infer", "--backend", "onnxruntime", "--model", str(ckpt), str(wav)])
    assert r.exit_code == 2 and "steermoe export" in r.stderr, r.stderr  # a checkpoint, not an export
    r = runner.invoke(app, ["export", str(ckpt), "--onnx", "--out", str(tmp_path / "x"), "--opset", "13"])
    assert r.exit_code == 2 and "--opset 13 is not supported" in r.stderr
    r = runner.invoke(app, ["export", str(ckpt), "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "--onnx" in r.stderr
    lost = tmp_path / "lost"
    shutil.copytree(ckpt, lost)
    (lost / "recipe.toml").write_text(_point_llm_elsewhere((lost / "recipe.toml").read_text(), tmp_path / "nowhere"))
    r = runner.invoke(app, ["export", str(lost), "--onnx", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and str(lost) in r.stderr and "nowhere" in r.stderr, r.stderr
    assert not (tmp_path / "x").exists()
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    r = runner.invoke(app, ["export", str(ckpt), "--onnx", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and 'pip install "steermoe[onnx]"' in r.stderr, r.stderr


def _point_llm_elsewhere(recipe: str, where) -> str:
    import tomllib

    llm = tomllib.loads(recipe)["model"]["llm"]["path"]
    return recipe.replace(f'"{llm}"', f'"{where}"')


@pytest.mark.slow
@pytest.mark.parametrize("flags", [["--dtype", "fp16"], ["--quantize", "int8"]])
def test_fp16_and_int8_exports_run_close_to_float32(ckpt, backends, tmp_path, flags):
    from steermoe_core.inference.onnx_backend import OnnxBackend

    tb, ob = backends
    r = runner.invoke(app, ["export", str(ckpt), "--onnx", "--out", str(tmp_path / "m"), *flags])
    assert r.exit_code == 0, r.output
    other = OnnxBackend.load(tmp_path / "m", "cpu")
    clips = _clips()[:3]
    for a, b in zip(other.encode_audio(clips), ob.encode_audio(clips)):
        assert np.abs(a - b).max() <= 0.1 * np.abs(b).max()
    assert all(other.generate(clips, [1, 1, 1], [PROMPT] * 3, 8, 1))


@pytest.mark.slow
def test_lora_and_vocab_posterior_fold_into_a_newer_opset_export_past_the_protobuf_limit(backbones, tmp_path, monkeypatch):
    """Six things one export can check (each costs about 23 s on 2 cores): LoRA folded into the
    backbones, the LLM as released beside the folded one for prompts without audio,
    ``vocab_posterior``'s mixture of the LLM's embeddings inside the audio tower, ``drop_blank``'s
    choice of the tokens the LLM reads, opset 21, and a model past protobuf's 2 GB limit, whose graphs
    must keep their weights beside them and still decode exactly as torch does."""
    pytest.importorskip("peft")
    from steermoe_core.config import recipe_from_dict
    from steermoe_core.data.batch import pad_clips
    from steermoe_core.export import onnx_export
    from steermoe_core.inference.onnx_backend import OnnxBackend
    from steermoe_core.generation.torch_backend import TorchBackend
    from steermoe_core.model.build import build_model
    from steermoe_core.model.checkpoint import save_checkpoint
    from steermoe_core.model.lora import lora_parameters

    d = tiny_recipe_dict(backbones)
    d["model"]["encoder"]["lora"] = {"rank": 4, "target_modules": ["q_proj", "v_proj", "fc1"]}
    d["model"]["llm"]["lora"] = {"rank": 2, "alpha": 4.0}
    d["model"]["projector"] = {"vocab_posterior": True, "drop_blank": True}
    d["train"]["ctc_weight"] = 0.5
    recipe = recipe_from_dict(d)
    model = build_model(recipe.model, torch.device("cpu"))
    with torch.no_grad():  # B starts at zero; a trained LoRA does not
        for p in lora_parameters(model.encoder) + lora_parameters(model.llm):
            p.normal_(0, 0.3)
        model.projector.weight.mul_(30.0)  # a peaked posterior, as a trained CTC head gives, not a near-uniform mean
    ckpt = save_checkpoint(model, recipe, tmp_path / "ckpt", 0, {})
    monkeypatch.setattr(onnx_export, "_PROTOBUF_LIMIT", 0)  # as if every graph were over 2 GB
    r = runner.invoke(app, ["export", str(ckpt), "--onnx", "--out", str(tmp_path / "m"), "--opset", "21"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "m" / "manifest.json").read_text())["opset"] == 21
    sizes = {p.name: p.stat().st_size for p in (tmp_path / "m").iterdir() if p.is_file()}
    side = sum(v for k, v in sizes.items() if k.startswith("decoder.onnx") and k != "decoder.onnx")
    assert side > 100_000, sizes  # the weights live beside the graph (decoder: 0.4 MB of 0.7 MB)
    clips = _clips()[:3]
    tb, ob = TorchBackend.load(ckpt, "cpu"), OnnxBackend.load(tmp_path / "m", "cpu")
    waves, lengths = pad_clips(clips)
    with torch.no_grad():
        ref = tb.model.encode_audio(waves, lengths).numpy()
        tokens = tb.model.audio_tokens(waves, lengths)
        read = tb.model.read_positions(tokens, tb.model.audio_token_counts(lengths), tb.model.llm.get_input_embeddings().weight)
    counts = tb.model.audio_token_counts(lengths)
    assert any(len(r) < n for r, n in zip(read, counts))  # some tokens are dropped
    for i, a in enumerate(ob.encode_audio(clips)):  # the graph mixes the embeddings and keeps the tokens torch keeps
        np.testing.assert_allclose(a, ref[i, read[i]], atol=1e-4 * np.abs(ref).max())
    assert ob.generate(clips, [1] * 3, [PROMPT] * 3, 10, 1) == tb.generate(clips, [1] * 3, [PROMPT] * 3, 10, 1)
    # a prompt without audio runs the LLM as released on both backends (torch switches its LoRA off)
    assert (tmp_path / "m" / "base_llm" / "decoder.onnx").is_file()
    assert json.loads((tmp_path / "m" / "manifest.json").read_text())["files"]["base_decoder"] == "base_llm/decoder.onnx"
    prompt = [[5, 9, 13, 2, 7]]
    released = ob.complete(prompt, 8)
    assert released == tb.complete(prompt, 8)
    assert ob.greedy([np.asarray(ob.embeddings[prompt[0]], dtype=np.float32)], 8) != released  # the folded LoRA matters


@pytest.mark.slow
def test_argmax_embeddings_export_hands_the_llm_the_word_pieces_torch_hands_it(backbones, tmp_path):
    """``argmax_embeddings`` + ``drop_blank`` (the reader of text): the audio tower looks up each kept
    token's nearest word piece inside the graph, and decoding gives torch's tokens."""
    from steermoe_core.config import recipe_from_dict
    from steermoe_core.generation.torch_backend import TorchBackend
    from steermoe_core.inference.onnx_backend import OnnxBackend
    from steermoe_core.model.build import build_model
    from steermoe_core.model.checkpoint import save_checkpoint

    d = tiny_recipe_dict(backbones)
    d["model"]["projector"] = {"argmax_embeddings": True, "drop_blank": True}
    d["train"]["ctc_weight"] = 0.5
    recipe = recipe_from_dict(d)
    model = build_model(recipe.model, torch.device("cpu"))
    with torch.no_grad():
        model.adapter.projector.weight.mul_(30.0)  # a peaked read-out, as a trained CTC head gives
    ckpt = save_checkpoint(model, recipe, tmp_path / "ckpt", 0, {})
    r = runner.invoke(app, ["export", str(ckpt), "--onnx", "--out", str(tmp_path / "m")])
    assert r.exit_code == 0, r.output
    clips = _clips()[:4]
    tb, ob = TorchBackend.load(ckpt, "cpu"), OnnxBackend.load(tmp_path / "m", "cpu")
    table = tb.model.llm.get_input_embeddings().weight.detach().numpy()
    for a in ob.encode_audio(clips):  # every row the LLM reads is one of its own embeddings
        assert np.abs(a[:, None, :] - table[None]).max(-1).min(-1).max() < 1e-6
    assert ob.generate(clips, [1] * 4, [PROMPT] * 4, 10, 1) == tb.generate(clips, [1] * 4, [PROMPT] * 4, 10, 1)


# -- the onnxruntime backend as infer's and serve's default on a CPU --
def test_guard_stops_each_row_at_its_own_budget_inside_onnx_decoding(backends):
    """The loop and budget guard runs inside onnxruntime decoding as it does inside torch's."""
    from steermoe_core.generation.guards import DecodeGuard

    tb, ob = backends
    clips = _clips()[:3]
    texts = {}
    for b in (tb, ob):
        guard = DecodeGuard([2, 5, 12], b.stop_ids)
        texts[b.name] = (b.generate(clips, [1] * 3, [PROMPT] * 3, 12, 1, guard=guard), guard.reasons)
    assert texts["onnxruntime"] == texts["torch"]
    rows = ob.greedy(_prompt_rows(ob, clips), 12, guard=DecodeGuard([2, 5, 12], ob.stop_ids))
    assert [len([t for t in r if t != ob.pad_id]) for r in rows][:2] == [2, 5]  # cut at 2 and 5 tokens, padded after


def test_onnx_runs_the_frozen_llm_on_text_like_torch(backends):
    """Text-only chat (the transcript strategy, serve's chat without audio) on the export equals torch's."""
    from steermoe_core.inference import SteerMoE
    from steermoe_core.generation.chat import chat_text, count_chat_tokens

    tb, ob = backends
    msgs = [{"role": "user", "content": "Summarize: the meeting moved to Tuesday at ten."}]
    assert chat_text(ob, msgs, 8) == chat_text(tb, msgs, 8) != ""
    assert count_chat_tokens(ob, msgs) == count_chat_tokens(tb, msgs)
    assert SteerMoE(ob).can_chat
    r = SteerMoE(ob).ask(_clips()[0], "What is the topic?", strategy="transcript", max_new_tokens=6)[0]
    assert r.strategy == "transcript" and r.transcript is not None and r.error is None, r
    sampled = ob.generate(_clips()[:2], [1, 1], [PROMPT] * 2, 6, 1, temperature=0.8)
    assert len(sampled) == 2  # sampling runs (serve's temperature > 0)


def test_auto_backend_exports_a_checkpoint_once_and_decodes_as_torch(ckpt, tmp_path, monkeypatch):
    """`infer` with no --backend on a CPU: the checkpoint's export is built once into the cache, keyed
    by the checkpoint's files, and gives torch's text; beam search stays on torch."""
    from steermoe_core.export.cache import cache_folder
    from steermoe_core.inference.choice import backend_for

    monkeypatch.setenv("STEERMOE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("STEERMOE_BACKEND", raising=False)
    paths = []
    for i, c in enumerate(_clips()[:3]):
        paths.append(str(tmp_path / f"c{i}.wav"))
        sf.write(paths[-1], c, 16000, subtype="FLOAT")
    common = [*paths, "--format", "json", "--max-new-tokens", "10", "--model", str(ckpt), "--device", "cpu"]
    r_auto = runner.invoke(app, ["infer", *common])
    assert r_auto.exit_code == 0, r_auto.output
    assert "exporting" in r_auto.stderr and "backend: onnxruntime" in r_auto.stderr
    r_torch = runner.invoke(app, ["infer", "--backend", "torch", *common])
    texts = [rec["text"] for rec in json.loads(r_auto.stdout)]
    assert texts == [rec["text"] for rec in json.loads(r_torch.stdout)] and all(texts)
    folder = cache_folder(ckpt)
    assert (folder / "manifest.json").is_file() and folder.parent == tmp_path / "cache" / "onnx"
    said: list[str] = []
    assert backend_for(ckpt, "auto", "cpu", say=said.append) == (folder, "onnxruntime")
    assert not any("exporting" in s for s in said)  # built once
    assert backend_for(ckpt, "auto", "cpu", num_beams=2, say=said.append) == (ckpt, "torch")
    assert backend_for(folder, "auto", "cpu") == (folder, "onnxruntime")  # an export as given
    copy = tmp_path / "retrained"
    shutil.copytree(ckpt, copy)
    (copy / "meta.json").write_text((copy / "meta.json").read_text() + " ")
    assert cache_folder(copy) != cache_folder(ckpt)  # new files, new export: never a stale one


@pytest.mark.parametrize("failure, remembered", [("exporter", True), ("full disk", False)])
def test_auto_backend_falls_back_to_torch_when_the_export_fails(ckpt, tmp_path, monkeypatch, failure, remembered):
    """An exporter failure is remembered (not retried on every call); a full disk is not (the next run
    tries again). Either way this run decodes with torch. A path that is not a checkpoint goes straight
    to loading, which says what is wrong."""
    import steermoe_core.export.onnx_export as onnx_export
    from steermoe_core.errors import StorageError
    from steermoe_core.export.cache import cache_folder
    from steermoe_core.inference.choice import backend_for

    monkeypatch.setenv("STEERMOE_CACHE", str(tmp_path / "cache"))
    calls = []

    def broken(*a, **k):
        calls.append(1)
        if failure == "full disk":
            raise StorageError("/cache/onnx/x: could not be written: no space left on the device")
        raise RuntimeError("the exporter met an op it cannot trace")

    monkeypatch.setattr(onnx_export, "export_onnx", broken)
    said: list[str] = []
    for _ in range(2):
        assert backend_for(ckpt, "auto", "cpu", say=said.append) == (ckpt, "torch")
    marker = cache_folder(ckpt).with_name(cache_folder(ckpt).name + ".failed")
    if remembered:
        assert any("export failed: RuntimeError: the exporter met an op" in x for x in said) and "failed before" in said[-1]
        assert len(calls) == 1 and marker.is_file()
    else:
        assert "no space left" in said[-1] and len(calls) == 2 and not marker.exists()
    missing = tmp_path / "no-such-run"
    assert backend_for(missing, "auto", "cpu") == (missing, "torch")


def test_an_export_reads_long_recordings_as_its_checkpoint_does(ckpt, exported, tmp_path):
    """Segment length, token rate and VAD travel in the manifest: an export given no recipe still cuts
    recordings into the segments its checkpoint trained on, not Whisper's 30 s windows."""
    from steermoe_core.inference.longform import policy_from_checkpoint, policy_inputs

    assert json.loads((exported / "manifest.json").read_text())["longform"] == policy_inputs(ckpt)
    assert policy_from_checkpoint(exported) == policy_from_checkpoint(ckpt)
    folder = tmp_path / "export"
    shutil.copytree(exported, folder)
    m = json.loads((folder / "manifest.json").read_text())
    m["longform"]["training_audio"] = {"p50_seconds": 4.0, "p95_seconds": 7.5, "max_seconds": 10.5, "tokens_per_second": 4.0}
    m["longform"]["joined_seconds"] = 6.0  # its checkpoint trained on utterances joined up to 6 s
    (folder / "manifest.json").write_text(json.dumps(m))
    pol = policy_from_checkpoint(folder)
    assert (pol.max_segment_seconds, pol.join_seconds, pol.tokens_per_second) == (10.5, 6.0, 4.0)
