"""Audio: WAV reading, resampling and log-mels against independent computations, encoder shapes, bad input."""

import io
import math
import struct
import wave

import numpy as np
import pytest
import torch

from deepseek.multimodal import (
    AudioEncoder,
    MultimodalConfig,
    load_audio,
    log_mel,
    mel_filterbank,
    read_wav,
    resample,
)

CFG = MultimodalConfig()


def wav_bytes(x: np.ndarray, rate: int, width: int = 2, channels: int = 1) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        if width == 1:
            w.writeframes((np.clip(x, -1, 1) * 127 + 128).astype(np.uint8).tobytes())
        else:
            w.writeframes((np.clip(x, -1, 1) * 32767).astype("<i2").tobytes())
    return buf.getvalue()


def float_wav(x: np.ndarray, rate: int) -> bytes:
    body = x.astype("<f4").tobytes()
    fmt = struct.pack("<HHIIHH", 3, 1, rate, rate * 4, 4, 32)
    return b"RIFF" + struct.pack("<I", 4 + 8 + 16 + 8 + len(body)) + b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt \
        + b"data" + struct.pack("<I", len(body)) + body


def sine(freq, rate, seconds):
    return np.sin(2 * np.pi * freq * np.arange(int(rate * seconds)) / rate)


def test_read_wav_pcm16_pcm8_float_and_stereo():
    x = 0.5 * sine(440, 8000, 0.5)
    y, r = read_wav(wav_bytes(x, 8000))
    assert r == 8000 and len(y) == 4000 and np.abs(y - x).max() < 1e-4
    y8, _ = read_wav(wav_bytes(x, 8000, width=1))
    assert np.abs(y8 - x).max() < 1.5 / 128
    yf, _ = read_wav(float_wav(x, 8000))
    assert np.abs(yf - x).max() < 1e-7
    st = np.stack([x, -0.5 * x], 1).reshape(-1)  # interleaved L, R
    ys, _ = read_wav(wav_bytes(st, 8000, channels=2))
    assert len(ys) == 4000 and np.abs(ys - 0.25 * x).max() < 1e-4  # averaged to mono


@pytest.mark.parametrize("rate_in", [22050, 8000, 44100, 44101])
def test_resample_matches_the_analytic_sine(rate_in):
    x = torch.from_numpy(sine(440, rate_in, 0.5)).float()
    y = resample(x, rate_in, 16000)
    assert len(y) == math.ceil(len(x) * 16000 / rate_in)
    ref = sine(440, 16000, len(y) / 16000)[: len(y)]
    assert np.abs(y.numpy() - ref)[100:-100].max() < 1e-3  # away from the edges


def test_resample_removes_tones_above_the_new_nyquist():
    x = torch.from_numpy(sine(10000, 44100, 0.5)).float()  # 10 kHz > 8 kHz Nyquist at 16 kHz
    y = resample(x, 44100, 16000)
    assert y[100:-100].pow(2).mean().sqrt() < 0.01


def test_mel_filterbank_and_log_mel_match_numpy():
    n_fft, hop, rate, M = 400, 160, 16000, 40
    fb = mel_filterbank(M, n_fft, rate).numpy()
    # independent filterbank: loop over filters, piecewise-linear on the mel scale via np.interp
    mel = lambda f: 2595 * np.log10(1 + f / 700)  # noqa: E731
    edges = 700 * (10 ** (np.linspace(0, mel(rate / 2), M + 2) / 2595) - 1)
    freqs = np.arange(n_fft // 2 + 1) * rate / n_fft
    ref = np.stack([np.interp(freqs, edges[m:m + 3], [0, 1, 0]) for m in range(M)])
    assert np.abs(fb - ref).max() < 1e-5
    x = np.random.default_rng(0).standard_normal(4000).astype(np.float32)
    got = log_mel(torch.from_numpy(x)[None], torch.from_numpy(ref).float(), n_fft, hop)[0].numpy()
    xp = np.pad(x, n_fft // 2, mode="reflect")
    win = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)  # periodic Hann
    frames = np.stack([xp[i * hop:i * hop + n_fft] * win for i in range(1 + len(x) // hop)])
    want = np.log(np.maximum((np.abs(np.fft.rfft(frames, axis=1)) ** 2) @ ref.T, 1e-10)).T
    assert got.shape == want.shape == (M, 1 + 4000 // hop)
    assert np.abs(got - want).max() < 1e-3


def test_encoder_shapes_masks_and_batch_independence():
    torch.manual_seed(0)
    enc = AudioEncoder(CFG).eval()
    a = (0.3 * sine(300, 22050, 0.5), 22050)
    b = wav_bytes(0.3 * sine(500, 8000, 1.2), 8000)
    with torch.no_grad():
        out = enc([a, b])
        alone = enc([a])
    F1, F2 = 1 + 8000 // CFG.hop, 1 + 19200 // CFG.hop  # frames at 16 kHz
    assert out.tokens.shape == (2, math.ceil(F2 / 4), CFG.dim) and out.pooled.shape == (2, CFG.dim)
    assert out.mask.sum(1).tolist() == [math.ceil(math.ceil(F1 / 2) / 2), math.ceil(math.ceil(F2 / 2) / 2)]
    assert torch.allclose(out.pooled.norm(dim=1), torch.ones(2), atol=1e-5)
    assert torch.allclose(alone.pooled[0], out.pooled[0], atol=1e-5)  # padding in a batch changes nothing


def test_bad_audio_errors():
    with pytest.raises(ValueError, match="unsupported audio format"):
        load_audio(b"ID3\x03" + bytes(100), CFG)  # an MP3
    with pytest.raises(ValueError, match="unsupported audio format"):
        load_audio(b"fLaC" + bytes(100), CFG)
    with pytest.raises(ValueError, match="clips must last 0.2-30.0 s"):
        load_audio(wav_bytes(sine(440, 8000, 0.1), 8000), CFG)
    with pytest.raises(ValueError, match="clips must last"):
        load_audio(wav_bytes(np.zeros(8000 * 31), 8000), CFG)
    with pytest.raises(ValueError, match="clips must last"):
        load_audio((np.zeros(100), 16000), CFG)
    with pytest.raises(ValueError, match="NaN"):
        load_audio((np.full(8000, np.nan), 16000), CFG)


def test_frontend_floor_trim_lifter_and_mean_normalisation():
    from deepseek.multimodal.audio import dct_matrix, frontend

    D = dct_matrix(CFG.n_mels)
    assert torch.allclose(D @ D.T, torch.eye(CFG.n_mels), atol=1e-5)  # orthonormal DCT-II
    fb = mel_filterbank(CFG.n_mels, CFG.n_fft, CFG.sample_rate, fmax=CFG.fmax)
    rng = np.random.default_rng(0)
    tone = 0.5 * sine(440, 16000, 0.5) + 0.5 * sine(1250, 16000, 0.5) + 1e-3 * rng.standard_normal(8000)
    clip = np.concatenate([np.zeros(4000), tone, np.zeros(6400)])  # 0.25 s silence, 0.5 s tone, 0.4 s silence
    mel = log_mel(torch.from_numpy(clip).float()[None], fb, CFG.n_fft, CFG.hop)[0]
    out = frontend(mel, CFG)
    assert abs(out.shape[1] - 8000 // CFG.hop) <= 3  # the silence around the tone is trimmed (50 frames kept)
    assert out.shape[0] == CFG.n_mels
    assert torch.allclose(out.mean(1), torch.zeros(CFG.n_mels), atol=1e-4)  # per-bin mean removed
    assert abs(float(out.std(unbiased=False)) - 1.0) < 1e-4
    # only the first `cepstra` cepstral coefficients survive the lifter (CMN subtracts a per-bin constant,
    # which is itself liftered, so the rest stay ~0)
    assert float((D[CFG.cepstra:] @ out).abs().max()) < 1e-3
    # gain and a fixed channel colour (a per-bin constant in the log domain) change nothing
    colour = torch.linspace(-2, 2, CFG.n_mels)[:, None]
    for shifted in (mel + math.log(0.01), mel + colour):
        floored = torch.maximum(shifted, shifted.max() - CFG.floor_nats)
        if torch.equal(floored - shifted == 0, mel - torch.maximum(mel, mel.max() - CFG.floor_nats) == 0):
            assert torch.allclose(frontend(shifted, CFG), out, atol=1e-3)
    assert torch.allclose(frontend(mel + math.log(0.01), CFG), out, atol=1e-3)
    # values below peak - floor_nats are raised to the floor before anything else
    low = mel.clone()
    low[:, :10] = -50.0
    assert torch.allclose(frontend(low, CFG), frontend(torch.maximum(low, low.max() - CFG.floor_nats), CFG))


def test_encoder_tokens_follow_the_trimmed_speech():
    enc = AudioEncoder(CFG).eval()
    tone = 0.4 * sine(700, 16000, 0.6)
    padded = np.concatenate([np.zeros(8000), tone, np.zeros(8000)])
    with torch.no_grad():
        a, b = enc([(tone, 16000)]), enc([(padded, 16000)])
    assert a.mask.sum() == b.mask.sum() == math.ceil((0.6 * 16000 / CFG.hop + 1) / 4)  # 16 tokens, not 41
    # only the onset and offset frames differ (silence vs the STFT's reflection at the clip's ends)
    assert float((a.pooled * b.pooled).sum()) > 0.95
