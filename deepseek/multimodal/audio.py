"""Audio encoder: mono WAV at any sample rate -> 16 kHz -> log-mel (torch) -> time tokens + pooled vector.

Shapes: T samples, B batch, M mel bins (config.n_mels, 0..config.fmax Hz), F frames (10 ms) after silence
trimming, N = ceil(F / 4) tokens (40 ms each), D shared width. Stereo input is averaged to mono. Clips must
last config.min_seconds..max_seconds (checked from the header, before decoding the samples).

The front end (`frontend`, one clip at a time, so batching cannot change a clip) makes the features depend
on what is said more than on the voice or the synthesiser:
  1. floor: log-mel values more than config.floor_nats below the clip's peak are raised to that floor
     (digital silence, 8 kHz band edges and quiet noise all read as the same floor);
  2. trim: leading and trailing frames whose energy is more than config.trim_nats below the loudest frame
     are dropped (so the token count follows the speech, not the padding around it);
  3. lifter: the log-mel of each frame is smoothed to its first config.cepstra cepstral coefficients
     (DCT-II, truncated, inverted), which removes pitch harmonics and keeps the formant envelope;
  4. cepstral mean normalisation: each mel bin's mean over the clip is subtracted (a fixed channel or
     voice colour is a constant per bin in the log domain) and the clip is scaled to unit variance.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import EncoderOutput, MultimodalConfig, Trunk

_PCM, _FLOAT, _EXTENSIBLE = 1, 3, 0xFFFE


# ---------------------------------------------------------------------------------------------- WAV reading
def read_wav(data: bytes, min_seconds: float = 0.0, max_seconds: float = math.inf) -> tuple[np.ndarray, int]:
    """RIFF/WAVE bytes (PCM 8/16/24/32-bit or float 32/64) -> (mono float32 samples in [-1, 1], sample rate)."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        head = data[:4]
        raise ValueError(f"unsupported audio format (starts with {head!r}): expected a WAV (RIFF/WAVE) file")
    pos, fmt, body = 12, None, None
    while pos + 8 <= len(data):
        cid, size = data[pos:pos + 4], struct.unpack("<I", data[pos + 4:pos + 8])[0]
        chunk = data[pos + 8:pos + 8 + size]
        if cid == b"fmt ":
            fmt = chunk
        elif cid == b"data":
            body = chunk
            break
        pos += 8 + size + (size & 1)
    if fmt is None or body is None or len(fmt) < 16:
        raise ValueError("unsupported audio format: WAV file without a fmt and a data chunk")
    tag, channels, rate, _, _, bits = struct.unpack("<HHIIHH", fmt[:16])
    if tag == _EXTENSIBLE and len(fmt) >= 26:
        tag = struct.unpack("<H", fmt[24:26])[0]
    if channels < 1 or rate < 1000:
        raise ValueError(f"unsupported audio format: {channels} channels at {rate} Hz")
    width = bits // 8
    n = len(body) // (width * channels) if width else 0
    seconds = n / rate
    if not min_seconds <= seconds <= max_seconds:
        raise ValueError(f"audio lasts {seconds:.3f} s: clips must last {min_seconds}-{max_seconds} s")
    raw = body[: n * width * channels]
    if tag == _PCM and bits == 8:
        x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif tag == _PCM and bits == 16:
        x = np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
    elif tag == _PCM and bits == 24:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        x = (np.where(v >= 1 << 23, v - (1 << 24), v)).astype(np.float32) / float(1 << 23)
    elif tag == _PCM and bits == 32:
        x = np.frombuffer(raw, "<i4").astype(np.float32) / float(1 << 31)
    elif tag == _FLOAT and bits in (32, 64):
        x = np.frombuffer(raw, "<f4" if bits == 32 else "<f8").astype(np.float32)
    else:
        raise ValueError(f"unsupported audio format: WAV format tag {tag} with {bits} bits per sample")
    x = x.reshape(n, channels).mean(1)
    if not np.isfinite(x).all():
        raise ValueError("audio contains NaN or infinite samples")
    return x, rate


def load_audio(source, cfg: MultimodalConfig) -> torch.Tensor:
    """A path, WAV bytes, or (samples, sample_rate) -> float32 (T,) mono at cfg.sample_rate."""
    if isinstance(source, tuple):
        samples, rate = source
        x = np.asarray(samples, dtype=np.float32)
        if x.ndim == 2:
            x = x.mean(1) if x.shape[1] <= 8 else x.mean(0)
        if x.ndim != 1 or int(rate) < 1000:
            raise ValueError(f"audio must be (T,) or (T, channels) samples at >= 1000 Hz, got {x.shape} at {rate}")
        seconds = len(x) / int(rate)
        if not cfg.min_seconds <= seconds <= cfg.max_seconds:
            raise ValueError(f"audio lasts {seconds:.3f} s: clips must last {cfg.min_seconds}-{cfg.max_seconds} s")
        if not np.isfinite(x).all():
            raise ValueError("audio contains NaN or infinite samples")
        rate = int(rate)
    else:
        data = Path(source).read_bytes() if isinstance(source, (str, Path)) else bytes(source)
        x, rate = read_wav(data, cfg.min_seconds, cfg.max_seconds)
    return resample(torch.from_numpy(np.ascontiguousarray(x)), rate, cfg.sample_rate)


# ---------------------------------------------------------------------------------------------- DSP
def resample(x_T: torch.Tensor, rate_in: int, rate_out: int, half_taps: int = 16) -> torch.Tensor:
    """Band-limited resampling with a Hann-windowed sinc cut at 0.97 of the lower Nyquist frequency.

    For a rational ratio up/down (after dividing by the gcd) output sample n*up + p reads input samples
    n*down + off_p + k with weights that depend only on the phase p, so all phases run as one strided conv1d
    with `up` output channels; ratios with up > 512 (e.g. 44101 Hz) fall back to a per-sample gather."""
    if rate_in == rate_out:
        return x_T.float()
    g = math.gcd(rate_in, rate_out)
    up, down = rate_out // g, rate_in // g
    cutoff = 0.97 * min(1.0, up / down)  # as a fraction of the input Nyquist frequency
    T = x_T.shape[0]
    L = -(-T * up // down)  # ceil
    k_K = torch.arange(-half_taps + 1, half_taps + 1, dtype=torch.float64)

    def taps(frac):  # frac (...,) -> weights (..., K) for input samples floor(t) + k_K
        d = frac[..., None] - k_K
        return cutoff * torch.sinc(cutoff * d) * 0.5 * (1 + torch.cos(math.pi * d / half_taps))

    if up > 512:
        t_L = torch.arange(L, dtype=torch.float64) * down / up
        base_L = t_L.floor()
        idx_LK = (base_L[:, None] + k_K).long() + half_taps
        xp = F.pad(x_T.float(), (half_taps, half_taps + 1))
        return (xp[idx_LK.clamp(0, xp.shape[0] - 1)] * taps(t_L - base_L).float()).sum(1)
    p_P = torch.arange(up, dtype=torch.float64)
    off_P = torch.div(p_P * down, up, rounding_mode="floor")
    Kbig = down + 2 * half_taps - 1
    W_P1K = torch.zeros(up, 1, Kbig, dtype=torch.float64)
    cols_PK = (off_P[:, None] + k_K + half_taps - 1).long()
    W_P1K[:, 0].scatter_(1, cols_PK, taps(p_P * down / up - off_P))
    N = -(-L // up)
    need = (N - 1) * down + Kbig
    xp = F.pad(x_T.float(), (half_taps - 1, max(0, need - T - half_taps + 1)))
    y_PN = F.conv1d(xp[None, None], W_P1K.float(), stride=down)[0]
    return y_PN.T.reshape(-1)[:L]


def hz_to_mel(f):
    return 2595.0 * np.log10(1.0 + np.asarray(f, dtype=np.float64) / 700.0)


def mel_to_hz(m):
    return 700.0 * (10.0 ** (np.asarray(m, dtype=np.float64) / 2595.0) - 1.0)


def mel_filterbank(n_mels: int, n_fft: int, sample_rate: int, fmin: float = 0.0, fmax: float | None = None):
    """HTK-style triangular filters (M, n_fft // 2 + 1), peak 1, edges evenly spaced on the mel scale."""
    fmax = sample_rate / 2 if fmax is None else fmax
    edges_hz = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    bins_hz = np.arange(n_fft // 2 + 1) * sample_rate / n_fft
    lo, mid, hi = edges_hz[:-2, None], edges_hz[1:-1, None], edges_hz[2:, None]
    up = (bins_hz[None] - lo) / (mid - lo)
    down = (hi - bins_hz[None]) / (hi - mid)
    return torch.from_numpy(np.maximum(0.0, np.minimum(up, down))).float()


def log_mel(wave_BT: torch.Tensor, fbank_MK: torch.Tensor, n_fft: int, hop: int) -> torch.Tensor:
    """(B, T) waveforms -> (B, M, F) natural-log mel power, F = 1 + T // hop (centred, reflect-padded frames)."""
    window = torch.hann_window(n_fft, periodic=True, device=wave_BT.device)
    spec_BKF = torch.stft(wave_BT, n_fft, hop, window=window, center=True, pad_mode="reflect",
                          return_complex=True).abs().pow(2)
    return torch.log(torch.einsum("mk,bkf->bmf", fbank_MK, spec_BKF).clamp_min(1e-10))


def dct_matrix(n: int) -> torch.Tensor:
    """Orthonormal DCT-II (n, n): row k is the k-th cosine basis vector over n mel bins."""
    k = torch.arange(n, dtype=torch.float64)
    D = torch.cos(math.pi / n * (k[None] + 0.5) * k[:, None]) * math.sqrt(2.0 / n)
    D[0] /= math.sqrt(2.0)
    return D.float()


def frontend(mel_MF: torch.Tensor, cfg: MultimodalConfig) -> torch.Tensor:
    """One clip's log-mel (M, F) -> floored, silence-trimmed, liftered, mean-normalised (M, F') (see the top)."""
    m = torch.maximum(mel_MF, mel_MF.max() - cfg.floor_nats)
    energy_F = torch.logsumexp(m, 0)
    keep = torch.nonzero(energy_F > energy_F.max() - cfg.trim_nats)[:, 0]
    m = m[:, int(keep[0]):int(keep[-1]) + 1]
    if cfg.cepstra:
        D_CM = dct_matrix(m.shape[0]).to(m)[:cfg.cepstra]
        m = D_CM.T @ (D_CM @ m)
    m = m - m.mean(1, keepdim=True)
    return m / m.std(unbiased=False).clamp_min(1e-3)


def pad_mels(mels: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Front-ended clips [(M, F_b)] -> zero-padded (B, M, F) and frame counts (B,)."""
    F_ = max(m.shape[1] for m in mels)
    frames_B = torch.tensor([m.shape[1] for m in mels], device=mels[0].device)
    return torch.stack([F.pad(m, (0, F_ - m.shape[1])) for m in mels]), frames_B


def sinusoid(n: int, d: int) -> torch.Tensor:
    pos = torch.arange(n, dtype=torch.float32)[:, None]
    freq = torch.exp(-math.log(10000.0) * torch.arange(0, d, 2, dtype=torch.float32) / d)
    pe = torch.zeros(n, d)
    pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * freq), torch.cos(pos * freq)
    return pe


# ---------------------------------------------------------------------------------------------- encoder
class ChannelNorm(nn.Module):
    """LayerNorm over channels at each (mel, frame) position: no statistics cross frames, so padding a clip
    in a batch cannot change its features."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = nn.LayerNorm(c)

    def forward(self, x_BCmf):
        return self.norm(x_BCmf.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class AudioEncoder(nn.Module):
    def __init__(self, cfg: MultimodalConfig):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("fbank_MK", mel_filterbank(cfg.n_mels, cfg.n_fft, cfg.sample_rate, fmax=cfg.fmax),
                             persistent=False)
        c = cfg.dim // 4
        self.stem = nn.ModuleList([nn.Sequential(nn.Conv2d(1, c, 3, 2, 1), ChannelNorm(c), nn.GELU()),
                                   nn.Sequential(nn.Conv2d(c, 2 * c, 3, 2, 1), ChannelNorm(2 * c), nn.GELU())])
        self.proj = nn.Linear(2 * c * ((cfg.n_mels + 3) // 4), cfg.dim)
        max_tokens = int(cfg.max_seconds * cfg.sample_rate / cfg.hop) // 4 + 2
        self.register_buffer("pos_ND", sinusoid(max_tokens, cfg.dim), persistent=False)
        self.trunk = Trunk(cfg)

    def features(self, audio) -> tuple[torch.Tensor, torch.Tensor]:
        """A list of sources (paths, WAV bytes, (samples, rate), or 1-D tensors already at 16 kHz) ->
        (front-ended log-mel (B, M, F), frame counts (B,))."""
        if not isinstance(audio, (list, tuple)) or (len(audio) == 2 and isinstance(audio[1], int)):
            audio = [audio]
        waves = [a.float() if isinstance(a, torch.Tensor) else load_audio(a, self.cfg) for a in audio]
        dev = self.fbank_MK.device
        # one clip at a time: the STFT reflects at each clip's own end, so batching cannot change a clip
        mels = [log_mel(w[None].to(dev), self.fbank_MK, self.cfg.n_fft, self.cfg.hop)[0] for w in waves]
        return pad_mels([frontend(m, self.cfg) for m in mels])

    def forward_features(self, mel_BMF: torch.Tensor, frames_B: torch.Tensor) -> EncoderOutput:
        x = mel_BMF.unsqueeze(1)
        n_B = frames_B
        for block in self.stem:  # stride 2 in mel and time; padded frames re-zeroed after every block
            x = block(x)
            n_B = (n_B + 1) // 2
            x = x * (torch.arange(x.shape[-1], device=x.device)[None] < n_B[:, None])[:, None, None]
        B, C, m, N = x.shape
        x_BND = self.proj(x.permute(0, 3, 1, 2).reshape(B, N, C * m)) + self.pos_ND[:N]
        mask_BN = torch.arange(N, device=x_BND.device)[None] < n_B[:, None]
        return self.trunk(x_BND, mask_BN)

    def forward(self, audio) -> EncoderOutput:
        return self.forward_features(*self.features(audio))

