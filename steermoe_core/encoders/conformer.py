"""FireRedASR-AED's Conformer encoder in plain PyTorch, with SteerMoE's hook after every block.

Architecture and parameter names follow FireRedASR's ``conformer_encoder.py`` exactly, so the
``encoder.*`` part of the released ``model.pth.tar`` loads with strict key checking:

    input_preprocessor   Conv2d(1,32,3,s2) ReLU Conv2d(32,32,3,s2) ReLU, Linear(32*19 -> d)  (4x, 40 ms)
    positional_encoding  a (1, 2*5000-1, d) sinusoidal table of relative positions (a buffer)
    layer_stack[i]       x/2 + ffn1/2 -> rel-pos MHSA -> conv module -> x/2 + ffn2/2 -> LayerNorm

Its details, kept: the features are right-padded by 6 frames before the stem and output lengths
are ``(L-3)//2+1`` twice from the unpadded length; q, k and v each get their own pre-LayerNorm;
attention is Transformer-XL style (``linear_pos``, ``pos_bias_u/v``, scores scaled after the sum);
the conv module is pointwise(2x, GLU) -> depthwise(kernel 33) -> a LayerNorm the checkpoint calls
``batch_norm`` -> swish -> pointwise, with padded frames zeroed on the way in and out.

Ours differs only where the result cannot: attention runs through SDPA with the positional term
as an additive bias, and the relative shift is a strided view instead of pad-and-reshape.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from steermoe_core.encoders.base import AudioEncoder, LayerHook, padded_width
from steermoe_core.encoders.fbank import (
    FRAME_LENGTH,
    FRAME_SHIFT,
    SAMPLE_RATE,
    kaldi_fbank,
    load_cmvn,
    num_frames,
)
from steermoe_core.errors import BackboneError
from steermoe_core.runtime import to_device

ARGS = ("idim", "n_layers_enc", "n_head", "d_model", "kernel_size")  # the Namespace fields that shape the encoder
STEM_CONTEXT = 7  # 3 frames left + current + 3 right: the stem pads 6 zero frames on the right


def subsampled_lengths(feat_lengths: torch.Tensor) -> torch.Tensor:
    """Fbank frames -> encoder frames: two kernel-3 stride-2 convolutions, FireRedASR's arithmetic."""
    n = torch.as_tensor(feat_lengths)
    return (((n - 3) // 2 + 1) - 3) // 2 + 1


class Conv2dSubsampling(nn.Module):
    def __init__(self, idim: int, d_model: int, channels: int = 32):
        super().__init__()
        self.conv = nn.ModuleList([nn.Conv2d(1, channels, 3, 2), nn.ReLU(), nn.Conv2d(channels, channels, 3, 2), nn.ReLU()])
        self.out = nn.Linear(channels * (((idim - 1) // 2 - 1) // 2), d_model)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        x = feats.unsqueeze(1)  # (B, 1, F, idim)
        for layer in self.conv:
            x = layer(x)
        b, c, t, d = x.shape
        return self.out(x.transpose(1, 2).reshape(b, t, c * d))


class RelPositionalEncoding(nn.Module):
    """Sinusoids for relative positions +(max_len-1) ... 0 ... -(max_len-1), stored (the checkpoint has it)."""

    def __init__(self, d_model: int, max_len: int = 5000):
        super().__init__()
        pos = torch.arange(max_len - 1, -max_len, -1, dtype=torch.float32)[:, None]
        log_base = float(torch.tensor(10000.0, device="cpu").log())  # float32's log, as FireRedASR rounds it
        freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * -(log_base / d_model))
        pe = torch.zeros(2 * max_len - 1, d_model)
        pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * freq), torch.cos(pos * freq)
        self.register_buffer("pe", pe[None])

    @property
    def max_frames(self) -> int:
        return (self.pe.shape[1] + 1) // 2

    def forward(self, t: int) -> torch.Tensor:
        """(1, 2t-1, d): relative positions t-1 ... -(t-1)."""
        mid = self.pe.shape[1] // 2
        return self.pe[:, mid - t + 1 : mid + t]


class FeedForward(nn.Module):
    """LayerNorm -> Linear(d, 4d) -> swish -> Linear(4d, d), plus the residual. Indices as the checkpoint's ``net.N``."""

    def __init__(self, d_model: int):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(d_model), nn.Linear(d_model, 4 * d_model), nn.SiLU(), nn.Identity(), nn.Linear(4 * d_model, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class RelPosSelfAttention(nn.Module):
    def __init__(self, n_head: int, d_model: int):
        super().__init__()
        if d_model % n_head:
            raise BackboneError(f"d_model {d_model} is not divisible by n_head {n_head}")
        self.n_head, self.d_k = n_head, d_model // n_head
        self.w_qs = nn.Linear(d_model, d_model, bias=False)
        self.w_ks = nn.Linear(d_model, d_model, bias=False)
        self.w_vs = nn.Linear(d_model, d_model, bias=False)
        self.layer_norm_q = nn.LayerNorm(d_model)
        self.layer_norm_k = nn.LayerNorm(d_model)
        self.layer_norm_v = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, d_model, bias=False)
        self.linear_pos = nn.Linear(d_model, d_model, bias=False)
        self.pos_bias_u = nn.Parameter(torch.zeros(n_head, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.zeros(n_head, self.d_k))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], self.n_head, self.d_k).transpose(1, 2)  # (B, H, T, d_k)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """``keep``: (B, 1, 1, T) True at real keys, or None when nothing is padded."""
        b, t, _ = x.shape
        q = self._heads(self.w_qs(self.layer_norm_q(x)))
        k = self._heads(self.w_ks(self.layer_norm_k(x)))
        v = self._heads(self.w_vs(self.layer_norm_v(x)))
        p = self.linear_pos(pos).view(1, 2 * t - 1, self.n_head, self.d_k).transpose(1, 2)  # (1, H, 2T-1, d_k)
        scale = self.d_k**-0.5
        bd = torch.matmul((q + self.pos_bias_v[:, None]) * scale, p.transpose(-2, -1)).contiguous()  # (B, H, T, 2T-1)
        # Row i needs relative position i-j at column j, i.e. table index (t-1) - i + j: a strided view.
        s = bd.stride()
        bias = bd.as_strided((b, self.n_head, t, t), (s[0], s[1], s[2] - 1, s[3]), bd.storage_offset() + t - 1)
        q = q + self.pos_bias_u[:, None]
        bias = bias.to(q.dtype)
        if keep is not None:
            bias = bias.masked_fill(~keep, torch.finfo(bias.dtype).min)
        out = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=bias, scale=scale)
        return x + self.fc(out.transpose(1, 2).reshape(b, t, -1))


class ConvModule(nn.Module):
    def __init__(self, d_model: int, kernel_size: int):
        super().__init__()
        if kernel_size % 2 != 1:
            raise BackboneError(f"kernel_size {kernel_size} must be odd")
        self.pre_layer_norm = nn.LayerNorm(d_model)
        self.pointwise_conv1 = nn.Conv1d(d_model, 4 * d_model, 1, bias=False)
        self.depthwise_conv = nn.Conv1d(2 * d_model, 2 * d_model, kernel_size, padding=kernel_size // 2, groups=2 * d_model, bias=False)
        self.batch_norm = nn.LayerNorm(2 * d_model)  # a LayerNorm, named batch_norm in the checkpoint
        self.pointwise_conv2 = nn.Conv1d(2 * d_model, d_model, 1, bias=False)

    def forward(self, x: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
        """``pad``: (B, T, 1) True at padded frames (zeroed so the depthwise conv sees zeros there)."""
        y = self.pre_layer_norm(x)
        if pad is not None:
            y = y.masked_fill(pad, 0.0)
        y = F.glu(self.pointwise_conv1(y.transpose(1, 2)), dim=1)
        y = F.silu(self.batch_norm(self.depthwise_conv(y).transpose(1, 2)))
        y = self.pointwise_conv2(y.transpose(1, 2)).transpose(1, 2)
        if pad is not None:
            y = y.masked_fill(pad, 0.0)
        return x + y


class ConformerBlock(nn.Module):
    def __init__(self, d_model: int, n_head: int, kernel_size: int):
        super().__init__()
        self.ffn1 = FeedForward(d_model)
        self.mhsa = RelPosSelfAttention(n_head, d_model)
        self.conv = ConvModule(d_model, kernel_size)
        self.ffn2 = FeedForward(d_model)
        self.layer_norm = nn.LayerNorm(d_model)

    def forward(self, x, pos, keep, pad):
        x = 0.5 * x + 0.5 * self.ffn1(x)  # macaron half step (the residual is inside ffn1)
        x = self.conv(self.mhsa(x, pos, keep), pad)
        return self.layer_norm(0.5 * x + 0.5 * self.ffn2(x))


class ConformerEncoder(nn.Module):
    """The network alone: ``state_dict()`` keys equal FireRedASR's ``encoder.*`` keys."""

    def __init__(self, idim: int, n_layers_enc: int, n_head: int, d_model: int, kernel_size: int = 33, max_len: int = 5000):
        super().__init__()
        self.input_preprocessor = Conv2dSubsampling(idim, d_model)
        self.positional_encoding = RelPositionalEncoding(d_model, max_len)
        self.layer_stack = nn.ModuleList(ConformerBlock(d_model, n_head, kernel_size) for _ in range(n_layers_enc))


class ConformerAudioEncoder(AudioEncoder):
    """FireRedASR-AED's encoder: Kaldi fbank + CMVN front end, 4x subsampling (40 ms frames), L blocks."""

    kind = "conformer"
    default_stride = 2  # 25 Hz -> 12.5 Hz
    time_axis = 1  # features are (B, F, idim)

    def __init__(self, model: ConformerEncoder, args: dict, mean: torch.Tensor, istd: torch.Tensor):
        super().__init__()
        self.model = model.requires_grad_(False).eval()
        self.args = {k: int(args[k]) for k in ARGS}
        self.num_layers, self.dim, self.idim = self.args["n_layers_enc"], self.args["d_model"], self.args["idim"]
        if mean.numel() != self.idim:
            raise BackboneError(f"cmvn.ark has {mean.numel()} dimensions but the encoder takes idim={self.idim}")
        self.register_buffer("cmvn_mean", mean.float(), persistent=False)
        self.register_buffer("cmvn_istd", istd.float(), persistent=False)
        # The longest clip the positional table covers (200 s for FireRedASR's 5000 positions):
        # encoder frames = (fbank frames - 3) // 4, so at most 4 * positions + 6 fbank frames.
        self.max_samples = FRAME_LENGTH + (4 * model.positional_encoding.max_frames + 5) * FRAME_SHIFT

    def features(self, waves: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, F, idim) CMVN-normalised fbank, zero past each clip's end (FireRedASR pads with 0 after CMVN)."""
        feats, frames = kaldi_fbank(waves, lengths, self.idim)
        real = torch.arange(feats.shape[1], device=feats.device)[None, :] < to_device(frames, feats.device)[:, None]
        feats = (feats - self.cmvn_mean.float()) * self.cmvn_istd.float()
        feats = feats * real[..., None]
        # no further than the positional table: 4 * max_frames + 3 fbank frames subsample to max_frames
        width = padded_width(feats.shape[1], self.pad_multiple, 4 * self.model.positional_encoding.max_frames + 3)
        return F.pad(feats, (0, 0, 0, width - feats.shape[1])), frames

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        frames = torch.tensor([num_frames(int(n)) for n in torch.as_tensor(lengths).tolist()], dtype=torch.long)
        return subsampled_lengths(frames)

    def forward_layers(
        self, feats: torch.Tensor, feat_lengths: torch.Tensor, hook: LayerHook | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, F, idim) features with ``feat_lengths`` real frames -> (B, T, D) states and the (B, T) mask of real frames.

        As FireRedASR: 6 zero frames right-padded before the stem, lengths from the unpadded counts.
        Frames past the longest clip are then dropped (every clip's padding; masked keys and zeroed
        conv inputs in FireRedASR, so dropping them changes no real frame), and a batch of equal
        lengths runs with no mask at all.
        """
        enc = self.model
        dtype = enc.input_preprocessor.out.weight.dtype
        lengths = subsampled_lengths(feat_lengths.cpu())
        # the longest clip's frames, or more where features() padded the batch to a multiple (masked)
        t = int(subsampled_lengths(feats.shape[1])) if len(lengths) else 0
        if t > enc.positional_encoding.max_frames:
            raise ValueError(f"audio longer than {self.max_samples // SAMPLE_RATE} s reached the encoder; split it into windows first")
        x = enc.input_preprocessor(F.pad(feats.to(dtype), (0, 0, 0, STEM_CONTEXT - 1)))[:, :t]
        mask = torch.arange(t, device=x.device)[None, :] < to_device(lengths, x.device)[:, None]
        keep = pad = None
        if not bool((lengths == t).all()):  # host arithmetic: no device sync
            keep, pad = mask[:, None, None, :], ~mask[..., None]
        pos = enc.positional_encoding(t).to(x.dtype)
        for i, layer in enumerate(enc.layer_stack):
            x = layer(x, pos, keep, pad)
            if hook is not None:
                x = hook(i, x, mask)
        return x, mask

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        """Every block ends in its own LayerNorm; FireRedASR's encoder output is the last block's."""
        return x

    def identity(self) -> dict:
        return dict(self.args)

    def fingerprint_tensor(self) -> torch.Tensor:
        return self.model.input_preprocessor.out.weight


def _torch_load(path: Path) -> dict:
    """``weights_only=True`` with only ``argparse.Namespace`` allowed beyond tensors and containers.
    Memory-mapped where the file allows it, so AED-L's decoder half is never read into memory."""
    import pickle
    import re

    with torch.serialization.safe_globals([argparse.Namespace]):
        for mmap in (True, False):  # legacy (non-zip) files cannot be memory-mapped: read them whole
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            except pickle.UnpicklingError as e:
                found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
                if found:
                    raise BackboneError(f"{path}: refused, the checkpoint needs {found.group(1)} (only tensors and an argparse.Namespace are loaded)") from None
                raise BackboneError(f"{path}: not a readable PyTorch checkpoint") from None
            except RuntimeError as e:
                if not (mmap and "mmap" in str(e)):
                    raise BackboneError(f"{path}: not a readable PyTorch checkpoint ({_first_line(e)})") from None
    raise AssertionError("unreachable")


def _first_line(e: Exception) -> str:
    return next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)


def resolve_files(path: str) -> tuple[Path, Path]:
    """``path`` is FireRedASR's model folder (model.pth.tar + cmvn.ark), the .pth.tar file itself
    (cmvn.ark beside it), or a hub id (``FireRedTeam/FireRedASR-AED-L``: only those two files are fetched)."""
    from steermoe_core.backbones.weights import resolve_model_dir, resolve_path

    p = Path(resolve_path(path)).expanduser()
    ckpt = p if p.is_file() else resolve_model_dir(path, patterns=["model.pth.tar", "cmvn.ark"]) / "model.pth.tar"
    if not ckpt.is_file():
        raise BackboneError(f"{path}: no FireRedASR checkpoint here (expected a folder with model.pth.tar and cmvn.ark, or the .pth.tar file)")
    return ckpt, ckpt.parent / "cmvn.ark"


def read_checkpoint(ckpt: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """FireRedASR's ``{"args": Namespace, "model_state_dict": ...}`` -> (encoder args, ``encoder.*`` state without the prefix)."""
    package = _torch_load(ckpt)
    if not isinstance(package, dict) or "args" not in package or "model_state_dict" not in package:
        raise BackboneError(f"{ckpt}: not a FireRedASR checkpoint (expected a dict with 'args' and 'model_state_dict')")
    args = vars(package["args"]) if isinstance(package["args"], argparse.Namespace) else package["args"]
    if not isinstance(args, dict):
        raise BackboneError(f"{ckpt}: 'args' is a {type(args).__name__}, expected an argparse.Namespace")
    missing = [k for k in ARGS if k not in args]
    if missing:
        raise BackboneError(f"{ckpt}: 'args' lacks {', '.join(missing)} (not a FireRedASR-AED checkpoint?)")
    state = {k[len("encoder."):]: v for k, v in package["model_state_dict"].items() if k.startswith("encoder.")}
    if not state:
        raise BackboneError(f"{ckpt}: no encoder.* weights in model_state_dict")
    return args, state


def build_encoder(args: dict) -> ConformerEncoder:
    return ConformerEncoder(int(args["idim"]), int(args["n_layers_enc"]), int(args["n_head"]), int(args["d_model"]), int(args["kernel_size"]))


def load(path: str, dtype: torch.dtype = torch.float32, **_ignored) -> ConformerAudioEncoder:
    """The registry's loader for ``kind = "conformer"`` (Whisper-only options such as trim_padding are ignored:
    the Conformer always encodes only the real frames)."""
    ckpt, cmvn = resolve_files(path)
    args, state = read_checkpoint(ckpt)
    pe = state.get("positional_encoding.pe")
    with torch.device("meta"):
        model = build_encoder(args)
    if pe is not None:
        model.positional_encoding.pe = torch.empty_like(pe, device="meta")  # the table length as saved
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:  # missing/unexpected keys or wrong shapes: name the first
        detail = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else _first_line(e)
        raise BackboneError(f"{ckpt}: encoder weights do not match its args ({detail[:300]})") from None
    mean, istd = load_cmvn(cmvn)
    return ConformerAudioEncoder(model.to(dtype), args, mean, istd)
