"""The Conformer encoder (FireRedASR-AED): its checkpoint format, Kaldi fbank + CMVN, padding, steering."""

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tone_clip

from steermoe_core.data.batch import AudioBatch, pad_clips
from steermoe_core.encoders import load_encoder
from steermoe_core.encoders.conformer import ConformerEncoder, build_encoder
from steermoe_core.encoders.fbank import kaldi_fbank, load_cmvn
from steermoe_core.errors import BackboneError
from steermoe_core.testing.random_backbones import write_conformer


@pytest.fixture(scope="module")
def conformer(tmp_path_factory) -> Path:
    return write_conformer(tmp_path_factory.mktemp("conformer") / "FireRedASR-AED-tiny")


def noisy_tone(seed: int, seconds: float) -> np.ndarray:
    """A chord plus noise, on the int16 grid as a WAV file gives it: no digital silence (whose log
    energy any two fbank implementations floor alike but reach through different rounding)."""
    rng = np.random.default_rng(seed)
    wave = tone_clip(seed, seconds) + 0.02 * rng.standard_normal(int(16_000 * seconds)).astype(np.float32)
    return (np.round(np.clip(wave, -1, 1) * 32767) / 32768).astype(np.float32)


# -- the checkpoint's names and shapes, read off FireRedASR's conformer_encoder.py -----------------
def fireredasr_encoder_shapes(idim: int, layers: int, heads: int, d: int, kernel: int) -> dict[str, tuple]:
    """``encoder.*`` of FireRedASR-AED's model_state_dict: Conv2dSubsampling (32 channels, two 3x3
    stride-2 convs at ModuleList indices 0 and 2), RelPositionalEncoding's 2*5000-1 table, and per
    RelPosEmbConformerBlock: two macaron FFNs (Sequential indices 0 LayerNorm, 1 Linear d->4d,
    4 Linear 4d->d), RelPosMultiHeadAttention (bias-free w_qs/w_ks/w_vs/fc/linear_pos, LayerNorms
    on q, k, v, pos_bias_u/v per head), ConformerConvolution (bias-free pointwise 1 and 2,
    depthwise, and a LayerNorm named batch_norm), and a final LayerNorm."""
    shapes = {
        "input_preprocessor.conv.0.weight": (32, 1, 3, 3), "input_preprocessor.conv.0.bias": (32,),
        "input_preprocessor.conv.2.weight": (32, 32, 3, 3), "input_preprocessor.conv.2.bias": (32,),
        "input_preprocessor.out.weight": (d, 32 * (((idim - 1) // 2 - 1) // 2)), "input_preprocessor.out.bias": (d,),
        "positional_encoding.pe": (1, 9999, d),
    }
    for i in range(layers):
        p = f"layer_stack.{i}."
        for ffn in ("ffn1", "ffn2"):
            shapes |= {
                f"{p}{ffn}.net.0.weight": (d,), f"{p}{ffn}.net.0.bias": (d,), f"{p}{ffn}.net.1.weight": (4 * d, d),
                f"{p}{ffn}.net.1.bias": (4 * d,), f"{p}{ffn}.net.4.weight": (d, 4 * d), f"{p}{ffn}.net.4.bias": (d,),
            }
        for w in ("w_qs", "w_ks", "w_vs", "fc", "linear_pos"):
            shapes[f"{p}mhsa.{w}.weight"] = (d, d)
        for n in ("layer_norm_q", "layer_norm_k", "layer_norm_v"):
            shapes |= {f"{p}mhsa.{n}.weight": (d,), f"{p}mhsa.{n}.bias": (d,)}
        shapes |= {f"{p}mhsa.pos_bias_u": (heads, d // heads), f"{p}mhsa.pos_bias_v": (heads, d // heads)}
        shapes |= {
            f"{p}conv.pre_layer_norm.weight": (d,), f"{p}conv.pre_layer_norm.bias": (d,),
            f"{p}conv.pointwise_conv1.weight": (4 * d, d, 1), f"{p}conv.depthwise_conv.weight": (2 * d, 1, kernel),
            f"{p}conv.batch_norm.weight": (2 * d,), f"{p}conv.batch_norm.bias": (2 * d,),
            f"{p}conv.pointwise_conv2.weight": (d, 2 * d, 1),
            f"{p}layer_norm.weight": (d,), f"{p}layer_norm.bias": (d,),
        }
    return shapes


def test_state_dict_names_and_shapes_are_fireredasr_aed_l_s():
    """AED-L (16 layers, d 1280, 20 heads, kernel 33), built on the meta device: every key and shape."""
    with torch.device("meta"):
        enc = ConformerEncoder(idim=80, n_layers_enc=16, n_head=20, d_model=1280, kernel_size=33)
    ours = {k: tuple(v.shape) for k, v in enc.state_dict().items()}
    assert ours == fireredasr_encoder_shapes(80, 16, 20, 1280, 33)
    n_params = sum(p.numel() for p in enc.parameters())
    d, k = 1280, 33  # per block: FFNs 2(8d^2+7d), attention 5d^2+8d, conv 6d^2+6d+2dk, LayerNorm 2d
    stem = (32 * 9 + 32) + (32 * 32 * 9 + 32) + (608 * d + d)
    assert n_params == 16 * (27 * d * d + 30 * d + 2 * d * k) + stem == 710_543_968


def test_random_checkpoint_in_the_released_format_loads(conformer):
    enc = load_encoder("conformer", str(conformer))
    assert (enc.kind, enc.num_layers, enc.dim, enc.default_stride) == ("conformer", 2, 64, 2)
    pkg = torch.load(conformer / "model.pth.tar", weights_only=False)
    for k, v in enc.model.state_dict().items():
        torch.testing.assert_close(v, pkg["model_state_dict"][f"encoder.{k}"], rtol=0, atol=0)
    assert not any(p.requires_grad for p in enc.parameters()) and not enc.train().training
    # the .pth.tar file itself works too (cmvn.ark beside it)
    assert load_encoder("conformer", str(conformer / "model.pth.tar")).dim == 64


class NotAllowed:
    pass


@pytest.mark.parametrize(
    "package,message",
    [
        ({"args": NotAllowed(), "model_state_dict": {}}, "refused, the checkpoint needs test_conformer.NotAllowed"),
        (b"not a pickle at all", "not a readable PyTorch checkpoint"),
        ({"model_state_dict": {}}, "expected a dict with 'args' and 'model_state_dict'"),
        ({"args": argparse.Namespace(idim=80), "model_state_dict": {}}, "'args' lacks n_layers_enc"),
    ],
)
def test_bad_checkpoints_are_one_line_errors(tmp_path, package, message):
    if isinstance(package, bytes):
        (tmp_path / "model.pth.tar").write_bytes(package)
    else:
        torch.save(package, tmp_path / "model.pth.tar")
    with pytest.raises(BackboneError, match=message):
        load_encoder("conformer", str(tmp_path))


def test_weights_that_do_not_fit_the_args_are_refused(conformer, tmp_path):
    pkg = torch.load(conformer / "model.pth.tar", weights_only=False)
    pkg["args"].n_layers_enc = 3
    torch.save(pkg, tmp_path / "model.pth.tar")
    (tmp_path / "cmvn.ark").write_bytes((conformer / "cmvn.ark").read_bytes())
    with pytest.raises(BackboneError, match="do not match its args.*layer_stack.2"):
        load_encoder("conformer", str(tmp_path))
    with pytest.raises(BackboneError, match="no such model folder"):
        load_encoder("conformer", str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(BackboneError, match="no FireRedASR checkpoint here"):
        load_encoder("conformer", str(tmp_path / "empty"))


# -- features -------------------------------------------------------------------------------------
def knf_fbank(wave: np.ndarray) -> np.ndarray:
    """kaldi-native-fbank exactly as FireRedASR's asr_feat.KaldifeatFbank sets it up (int16-scale input)."""
    knf = pytest.importorskip("kaldi_native_fbank")
    opts = knf.FbankOptions()
    opts.frame_opts.dither = 0.0
    opts.frame_opts.snip_edges = True
    opts.mel_opts.num_bins = 80
    opts.mel_opts.debug_mel = False
    fb = knf.OnlineFbank(opts)
    fb.accept_waveform(16000, (wave * 32768).tolist())
    return np.vstack([fb.get_frame(i) for i in range(fb.num_frames_ready)])


def test_fbank_and_cmvn_match_kaldi_native_fbank_batched(conformer):
    enc = load_encoder("conformer", str(conformer))
    clips = [noisy_tone(0, 1.3), noisy_tone(1, 0.52), noisy_tone(2, 2.0)]
    waves, lengths = pad_clips(clips)
    feats, frames = enc.features(waves, lengths)
    assert frames.tolist() == [1 + (len(c) - 400) // 160 for c in clips] == [128, 50, 198]
    mean, istd = load_cmvn(conformer / "cmvn.ark")
    for i, c in enumerate(clips):
        ref = (knf_fbank(c) - mean.double().numpy()) * istd.double().numpy()
        np.testing.assert_allclose(feats[i, : frames[i]].numpy(), ref, atol=1e-3, rtol=0)
        assert not feats[i, frames[i] :].any()  # zero past the clip, as FireRedASR pads
    raw, _ = kaldi_fbank(waves[:1], lengths[:1])
    np.testing.assert_allclose(raw[0].numpy(), knf_fbank(clips[0]), atol=1e-3, rtol=0)


def test_cmvn_reads_kaldi_text_and_binary_matrices_alike(conformer, tmp_path):
    kaldiio = pytest.importorskip("kaldiio")
    mean, istd = load_cmvn(conformer / "cmvn.ark")
    stats = np.zeros((2, 81))
    stats[0, :80], stats[0, 80] = (mean.double().numpy() * 500), 500
    stats[1, :80] = (1 / istd.double().numpy() ** 2 + mean.double().numpy() ** 2) * 500
    kaldiio.save_ark(str(tmp_path / "text.ark"), {"global": stats}, text=True)  # "global  [\n a b ...\n c d ... ]"
    kaldiio.save_mat(str(tmp_path / "float.ark"), stats.astype(np.float32))  # binary FM, no key
    assert (tmp_path / "text.ark").read_bytes().startswith(b"global  [")
    for name in ("text.ark", "float.ark"):
        m, s = load_cmvn(tmp_path / name)
        torch.testing.assert_close(m, mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(s, istd, rtol=1e-4, atol=1e-6)
    (tmp_path / "bad.ark").write_bytes(b"PKL\x80\x04junk")
    with pytest.raises(BackboneError, match="not a Kaldi matrix"):
        load_cmvn(tmp_path / "bad.ark")


# -- the encoder ----------------------------------------------------------------------------------
def test_a_clip_is_the_same_alone_and_beside_a_longer_one(conformer):
    enc = load_encoder("conformer", str(conformer))
    short, long_ = noisy_tone(0, 0.9), noisy_tone(3, 2.3)
    waves, lengths = pad_clips([short, long_])
    hidden, frames = enc.encode(waves, lengths)
    fbank_frames = [1 + (n - 400) // 160 for n in (len(short), len(long_))]
    assert frames.tolist() == [(f - 3) // 4 for f in fbank_frames] == [21, 56]
    assert hidden.shape == (2, 56, 64)
    alone, n = enc.encode(*pad_clips([short]))
    assert n.tolist() == [21] and alone.shape == (1, 21, 64)
    torch.testing.assert_close(hidden[0, :21], alone[0], rtol=1e-4, atol=1e-5)
    alone_long, _ = enc.encode(*pad_clips([long_]))
    torch.testing.assert_close(hidden[1], alone_long[0], rtol=1e-4, atol=1e-5)
    # without the masks the padding would leak into the short clip's frames
    feats, _ = enc.features(waves, lengths)
    unmasked, _ = enc.forward_layers(feats, torch.tensor([fbank_frames[1]] * 2))
    assert (unmasked[0, :21] - alone[0]).abs().max() > 1e-3


def test_pad_multiple_pads_the_batch_and_changes_no_real_frame(conformer):
    enc = load_encoder("conformer", str(conformer))
    waves, lengths = pad_clips([noisy_tone(0, 0.9), noisy_tone(3, 2.3)])
    plain, frames = enc.encode(waves, lengths)
    enc.pad_multiple = 100
    assert enc.features(waves, lengths)[0].shape[1] == 300  # 228 fbank frames -> 3 s
    padded, frames_p = enc.encode(waves, lengths)
    assert padded.shape[1] == (300 - 3) // 4 and frames_p.tolist() == frames.tolist() == [21, 56]
    for i, n in enumerate(frames.tolist()):
        torch.testing.assert_close(padded[i, :n], plain[i, :n], rtol=1e-4, atol=1e-5)


def test_steering_hook_runs_after_every_layer_and_identity_steering_is_the_plain_encoder(conformer):
    enc = load_encoder("conformer", str(conformer))
    waves, lengths = pad_clips([noisy_tone(1, 0.7), noisy_tone(2, 1.2)])
    plain, frames = enc.encode(waves, lengths)
    feats, feat_lengths = enc.features(waves, lengths)
    calls = []

    def hook(i, x, mask):
        calls.append((i, tuple(x.shape), mask.sum(1).tolist()))
        return x

    x, mask = enc.forward_layers(feats, feat_lengths, hook=hook)
    assert calls == [(i, (2, int(frames.max()), 64), frames.tolist()) for i in range(2)]
    torch.testing.assert_close(enc.final_norm(x), plain)
    steered, _ = enc.forward_layers(feats, feat_lengths, hook=lambda i, x, m: x + 0.5)
    assert (steered - x).abs().max() > 1e-2


def test_steermoe_on_the_conformer_trains_only_the_adapter(backbones, conformer):
    """A full SteerMoE model on the tiny Conformer: gradients reach the steering vectors, router,
    scales and projector and nothing else; the loss falls over a few AdamW steps."""
    from steermoe_core.config import recipe_from_dict
    from steermoe_core.model.build import build_model
    from steermoe_core.training.loop import train_step
    from steermoe_core.training.optim import make_optimizer

    recipe = recipe_from_dict({
        "model": {"encoder": {"kind": "conformer", "path": str(conformer)}, "llm": {"path": str(backbones["llm"])},
                  "steering": {"num_experts": 4}, "projector": {"stride": 2}},
        "train": {"lr": 3e-2, "precision": "fp32", "device": "cpu", "warmup_steps": 0},
    })
    model = build_model(recipe.model, torch.device("cpu")).train()
    waves, lengths = pad_clips([noisy_tone(i, 0.6 + 0.25 * i) for i in range(3)])
    batch = AudioBatch(waves, lengths, ["Transcribe the audio."] * 3, ["hello world", "good morning", "one two three"])
    assert model.audio_token_counts(lengths) == [(((1 + (n - 400) // 160) - 3) // 4 + 1) // 2 for n in lengths.tolist()]
    model(batch)["loss"].backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad == {n for n, p in model.named_parameters() if n.startswith(("adapter.steering.", "adapter.projector."))}
    assert any(n.startswith("adapter.steering.vectors") for n in with_grad)
    model.zero_grad(set_to_none=True)
    opt = make_optimizer(model, recipe.train, torch.device("cpu"))
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    losses = [float(train_step(model, opt, [batch], "fp32")["ce"]) for _ in range(8)]
    assert losses[-1] < 0.7 * losses[0], losses
    assert all(torch.equal(v, model.encoder.state_dict()[k]) for k, v in before.items())


# -- once against FireRedASR's own code -----------------------------------------------------------
@pytest.mark.skipif(not os.environ.get("FIREREDASR_SRC"), reason="set FIREREDASR_SRC to a FireRedASR checkout")
def test_equals_fireredasr_own_encoder_on_its_example_clips(tmp_path):
    """A random checkpoint built and saved by FireRedASR's code, its features from its own
    ASRFeatExtractor (kaldi-native-fbank + kaldiio CMVN), its encoder's output: ours within 1e-3."""
    import soundfile as sf

    src = Path(os.environ["FIREREDASR_SRC"])
    sys.path.insert(0, str(src))
    from fireredasr.data.asr_feat import ASRFeatExtractor
    from fireredasr.models.module.conformer_encoder import ConformerEncoder as Reference

    torch.manual_seed(0)
    args = argparse.Namespace(idim=80, n_layers_enc=3, n_head=4, d_model=96, residual_dropout=0.1, dropout_rate=0.1, kernel_size=33, pe_maxlen=5000)
    ref = Reference(args.idim, args.n_layers_enc, args.n_head, args.d_model, 0.1, 0.1, args.kernel_size, args.pe_maxlen).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():  # LayerNorms off their ones/zeros init, so they count
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    torch.save({"args": args, "model_state_dict": {f"encoder.{k}": v for k, v in ref.state_dict().items()}}, tmp_path / "model.pth.tar")
    (tmp_path / "cmvn.ark").write_bytes(write_conformer(tmp_path / "stats").joinpath("cmvn.ark").read_bytes())

    ours = load_encoder("conformer", str(tmp_path))
    wavs = sorted((src / "examples" / "wav").glob("*.wav"))
    feats, feat_lengths, _ = ASRFeatExtractor(str(tmp_path / "cmvn.ark"))([str(w) for w in wavs])
    with torch.no_grad():
        expected, expected_lengths, _ = ref(feats, feat_lengths)
    hidden, frames = ours.encode(*pad_clips([sf.read(w, dtype="float32")[0] for w in wavs]))
    assert frames.tolist() == expected_lengths.tolist()
    for i, n in enumerate(frames.tolist()):
        err = (hidden[i, :n] - expected[i, :n]).norm() / expected[i, :n].norm()
        print(f"{wavs[i].name}: {n} frames, relative error {err:.2e}")
        assert err < 1e-3


def test_build_encoder_reads_sizes_from_args():
    enc = build_encoder({"idim": 40, "n_layers_enc": 1, "n_head": 2, "d_model": 32, "kernel_size": 5})
    assert enc.input_preprocessor.out.in_features == 32 * 9 and enc.layer_stack[0].conv.depthwise_conv.kernel_size == (5,)


# -- recipes and the AISHELL path end to end ------------------------------------------------------
ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", ["aishell_conformer.toml", "librispeech_conformer_qwen7b.toml"])
def test_conformer_recipes_state_the_real_parameter_count_and_the_4_gpu_command(name):
    import re

    from steermoe_core.config import load_recipe
    from steermoe_core.model.adapter import count_adapter_parameters

    path = ROOT / "recipes" / name
    r = load_recipe(path)
    assert (r.model.encoder.kind, r.model.projector.stride, r.model.llm.path) == ("conformer", 2, "Qwen/Qwen2.5-7B-Instruct")
    text = path.read_text()
    stated = int(re.search(r"Trainable: ([\d,]+) parameters", text).group(1).replace(",", ""))
    # FireRedASR-AED-L: 16 layers, d_model 1280; Qwen2.5-7B: hidden 3584
    assert stated == count_adapter_parameters(16, 1280, 3584, r.model)["total"] == 4_918_928
    assert f"steermoe train recipes/{name} --gpus 4" in text


def test_trim_padding_off_is_an_error_for_the_conformer():
    from steermoe_core.config import RecipeError, recipe_from_dict

    with pytest.raises(RecipeError, match="model.encoder.trim_padding: Whisper's fixed 30 s layout only"):
        recipe_from_dict({"model": {"encoder": {"kind": "conformer", "trim_padding": False}}})


@pytest.mark.slow
def test_aishell_recipe_as_a_cpu_smoke_run_preps_trains_and_scores_cer(backbones, conformer, tmp_path):
    """`prep aishell` on a fixture tree, then recipes/aishell_conformer.toml turned by --set into a
    CPU run on the tiny Conformer and LLM, then `eval` scores CER with the Chinese normalisation."""
    import json

    import soundfile as sf
    from typer.testing import CliRunner

    from steermoe_cli.main import app

    texts = ["你好", "早上好", "谢谢你", "再见"]
    src, lines = tmp_path / "aishell", []
    for split, spk in [("train", "S0002"), ("dev", "S0724")]:
        (src / "wav" / split / spk).mkdir(parents=True)
        for k, text in enumerate(texts):
            uid = f"BAC009{spk}W{k:04d}"
            sf.write(src / "wav" / split / spk / f"{uid}.wav", noisy_tone(k, 0.7 + 0.2 * k), 16000, subtype="PCM_16")
            lines.append(f"{uid} {' '.join(text)}")
    (src / "transcript").mkdir()
    (src / "transcript" / "aishell_transcript_v0.8.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    runner = CliRunner()
    r = runner.invoke(app, ["prep", "aishell", str(src), "--out", str(tmp_path / "data")])
    assert r.exit_code == 0, r.output

    sets = {
        "model.encoder.path": conformer, "model.llm.path": backbones["llm"], "model.steering.num_experts": 4,
        "data.train": tmp_path / "data" / "train", "data.valid": tmp_path / "data" / "dev", "data.batch_size": 4,
        "data.max_batch_seconds": 0.0, "data.num_workers": 0, "train.device": "cpu", "train.precision": "fp32",
        "train.max_steps": 60, "train.lr": 3e-2, "train.lr_steering": 0.0, "train.lr_router": 0.0, "train.lr_scales": 0.0,
        "train.lr_projector": 0.0, "train.warmup_steps": 5, "train.log_every": 10, "train.eval_every": 0,
        "train.save_every": 0, "eval.batch_size": 4, "eval.max_new_tokens": 12, "eval.max_examples": 0,
    }
    args = ["train", str(ROOT / "recipes" / "aishell_conformer.toml"), "--out", str(tmp_path / "run")]
    r = runner.invoke(app, args + [x for k, v in sets.items() for x in ("--set", f"{k}={v}")])
    assert r.exit_code == 0, r.output
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert losses[-1] < 0.65 * losses[0], losses  # Chinese is byte-level in the tiny BPE: 3 tokens a character
    assert "cer" in metrics[-1]
    preds = tmp_path / "preds.jsonl"
    r = runner.invoke(app, ["eval", str(tmp_path / "run" / "model"), "--data", str(tmp_path / "data" / "dev"), "--json", "--predictions", str(preds)])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    # CER counts insertions too, so a tiny model's rambling scores above 1: only its presence is a fact here
    assert summary["examples"] == 4 and summary["cer"] >= 0.0 and "wer" not in summary
    assert sorted(json.loads(x)["reference"] for x in preds.read_text().splitlines()) == sorted(texts)
    print("AISHELL smoke run:", losses, summary)
