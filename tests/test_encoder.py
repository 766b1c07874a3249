"""Our Whisper forward: equal to HF's at 30 s, and with trim_padding a clip is unchanged by its batch."""

import numpy as np
import pytest
import torch
from conftest import tone_clip
from transformers import WhisperFeatureExtractor
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from steermoe_core.encoders import load_encoder
from steermoe_core.encoders.log_mel import batch_log_mel, log_mel


def test_features_match_whisper_feature_extractor():
    audio = tone_clip(1, 2.0)
    ref = WhisperFeatureExtractor(feature_size=80)(audio, sampling_rate=16000, return_tensors="np").input_features[0]
    padded = np.zeros(480_000, np.float32)
    padded[: len(audio)] = audio
    ours = log_mel(torch.from_numpy(padded), 80).numpy()
    assert ours.shape == ref.shape == (80, 3000)
    np.testing.assert_allclose(ours, ref, atol=2e-3)


def test_full_30s_forward_equals_hf_encoder(backbones):
    enc = load_encoder("whisper", str(backbones["whisper"]), trim_padding=False)
    hf = WhisperEncoder(enc.config)
    hf.load_state_dict(enc.model.state_dict())
    hf.eval()
    torch.manual_seed(0)
    feats = torch.randn(2, 80, 3000)
    ours, mask = enc.forward_layers(feats, torch.tensor([3000, 3000]))
    ours = enc.final_norm(ours)
    ref = hf(feats).last_hidden_state
    assert mask.all()
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seconds", [1.1, 1.11])  # an even and an odd number of mel frames
def test_trimmed_clip_is_the_same_alone_and_beside_a_longer_clip(backbones, seconds):
    enc = load_encoder("whisper", str(backbones["whisper"]), trim_padding=True)
    short, long_ = tone_clip(0, seconds), tone_clip(3, 2.7)
    waves = torch.zeros(2, len(long_))
    waves[0, : len(short)] = torch.from_numpy(short)
    waves[1] = torch.from_numpy(long_)
    feats, frames = batch_log_mel(waves, torch.tensor([len(short), len(long_)]), 80)
    batched, mask = enc.forward_layers(feats, frames)
    f1, n1 = batch_log_mel(torch.from_numpy(short)[None], torch.tensor([len(short)]), 80)
    alone, mask1 = enc.forward_layers(f1, n1)
    t = alone.shape[1]
    assert int(mask[0].sum()) == t == (len(short) // 160 + 1) // 2
    torch.testing.assert_close(batched[0, :t], alone[0], atol=1e-5, rtol=1e-4)
    # without the mask the padding would leak into the short clip's frames
    unmasked, _ = enc.forward_layers(feats, torch.tensor([frames[1], frames[1]]))
    assert (unmasked[0, :t] - alone[0]).abs().max() > 1e-3


def two_clips() -> tuple[np.ndarray, np.ndarray, torch.Tensor, torch.Tensor]:
    """A 1.1 s and a 2.7 s tone, and the right-padded batch of both with its lengths."""
    short, long_ = tone_clip(0, 1.1), tone_clip(3, 2.7)
    waves = torch.zeros(2, len(long_))
    waves[0, : len(short)] = torch.from_numpy(short)
    waves[1] = torch.from_numpy(long_)
    return short, long_, waves, torch.tensor([len(short), len(long_)])


def test_load_encoder_encode_is_the_public_way_to_get_final_states(backbones):
    """`load_encoder(kind, path).encode(waves, lengths)`: final hidden states and frame lengths,
    steering off; a clip's states do not depend on what else is in the batch."""
    enc = load_encoder("whisper", str(backbones["whisper"]))
    short, long_, waves, lengths = two_clips()
    hidden, frames = enc.encode(waves, lengths)
    assert frames.tolist() == [(len(short) // 160 + 1) // 2, (len(long_) // 160 + 1) // 2]
    assert hidden.shape == (2, int(frames.max()), enc.dim)
    alone, n = enc.encode(torch.from_numpy(short)[None], lengths[:1])
    torch.testing.assert_close(hidden[0, : int(n[0])], alone[0], atol=1e-5, rtol=1e-4)


def test_pad_multiple_rounds_the_batch_width_up_and_changes_no_real_frame(backbones):
    """Training pads each batch to a multiple of 1 s (data.pad_multiple_seconds) so shapes repeat;
    the padding is masked, so every clip's states are those it has alone."""
    enc = load_encoder("whisper", str(backbones["whisper"]))
    short, long_, waves, lengths = two_clips()
    plain, frames = enc.encode(waves, lengths)
    enc.pad_multiple = 100
    assert enc.features(waves, lengths)[0].shape[-1] == 300  # 270 mel frames -> 3 s
    assert enc.features(waves[:1, : len(short)], lengths[:1])[0].shape[-1] == 200
    padded, frames_p = enc.encode(waves, lengths)
    assert padded.shape[1] == 150 and frames_p.tolist() == frames.tolist()
    for i, n in enumerate(frames.tolist()):
        torch.testing.assert_close(padded[i, :n], plain[i, :n], atol=1e-5, rtol=1e-4)
    enc.pad_multiple = 1000  # never past Whisper's 30 s
    assert enc.features(torch.zeros(1, 479_000), torch.tensor([479_000]))[0].shape[-1] == 3000


def test_unknown_encoder_kind_is_a_one_line_error(backbones):
    from steermoe_core.errors import UsageError

    with pytest.raises(UsageError, match="encoder kind 'wav2vec': not one of conformer, whisper"):
        load_encoder("wav2vec", str(backbones["whisper"]))
