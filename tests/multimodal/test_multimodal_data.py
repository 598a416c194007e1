"""Data: held-out splits disjoint from training by construction; glyph clouds; TTS (skips if a binary is missing)."""

import numpy as np
import pytest

from deepseek.multimodal import MultimodalConfig, data, load_audio


def test_held_out_splits_are_disjoint():
    assert data.disjointness() == {"image": True, "audio": True, "points": True, "text": True}
    train_fonts, test_fonts = data.font_files("train"), data.font_files("test")
    assert len(train_fonts) >= 12 and len(test_fonts) == 5 and all(p.exists() for p in train_fonts + test_fonts)
    assert not {p.name for p in train_fonts} & {p.name for p in test_fonts}
    assert not {t for t, _ in data.texts("train")} & {t for t, _ in data.texts("test")}
    assert {s[1][0] for s in data.speech_specs("train")} == {"espeak-ng"}
    assert {s[1][0] for s in data.speech_specs("test")} == {"flite"}
    assert len(data.speech_specs("train")) == 4800 and len(data.speech_specs("test")) == 300
    assert all(len([1 for _, d in data.texts(s) if d == k]) >= 6 for s in ("train", "test") for k in range(10))


def test_glyph_points_lie_on_the_extruded_glyph():
    rng = np.random.default_rng(0)
    p = data.glyph_points(data.font_files("test")[0], 0, 2000, rng)
    assert p.shape == (2000, 6) and np.isfinite(p).all()
    assert np.allclose(np.linalg.norm(p[:, 3:], axis=1), 1.0, atol=1e-5)  # unit normals
    assert np.abs(p[:, 2]).max() <= 0.125 + 1e-6  # depth 0.25, centred
    # a zero has a hole: no face point near the glyph's centre
    face = p[np.abs(p[:, 5]) == 1.0]
    assert np.linalg.norm(face[:, :2], axis=1).min() > 0.05


@pytest.mark.parametrize("split", ["train", "test"])
def test_tts_clip_is_a_loadable_spoken_word(split, tmp_path):
    missing = data.tts_missing(split)
    if missing:
        pytest.skip(f"{missing} is not installed (scripts/ci_services.sh installs it)")
    stem, cmd, d = data.speech_specs(split)[7]
    import subprocess

    out = tmp_path / "a.wav"
    subprocess.run([c.replace("{out}", str(out)) for c in cmd], check=True, capture_output=True)
    x = load_audio(out, MultimodalConfig())
    assert 0.2 * 16000 < len(x) < 2.5 * 16000 and x.abs().max() > 0.05  # a word, audible, at 16 kHz
