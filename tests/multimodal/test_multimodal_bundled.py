"""The bundled binding weights load and keep what the benchmark measured (3D on a held-out font)."""

from pathlib import Path

import numpy as np
import torch

import deepseek
from deepseek.multimodal import BindingModel, data

BUNDLE = Path(deepseek.__file__).parent / "bundled" / "multimodal-bind"
MIN_FLITE_CORRECT = 16  # of 20; the benchmark measured 92.3% zero-shot over all 300 flite clips


def test_bundled_binding_classifies_held_out_font_glyphs():
    model = BindingModel.load(BUNDLE)
    assert model.anchor == "text" and (BUNDLE / "training.json").exists()
    assert (BUNDLE / "model.safetensors").stat().st_size < 5 * 2**20
    rng = np.random.default_rng(0)
    clouds = [data.glyph_points(data.font_files("test")[0], d, 1024, rng) for d in range(10)]
    texts = [t for t, _ in data.texts("test")]
    labels = torch.tensor([d for _, d in data.texts("test")])
    with torch.no_grad():
        e = model.embed(text=texts, points=clouds)
    protos = torch.stack([e["text"][labels == d].mean(0) for d in range(10)])
    pred = (e["points"] @ protos.T).argmax(1)
    assert (pred == torch.arange(10)).sum() >= 9  # measured 99.8% zero-shot on the held-out fonts


def test_bundled_binding_classifies_held_out_flite_speech(tmp_path):
    import shutil
    import subprocess

    import pytest

    if shutil.which("flite") is None:
        pytest.skip("flite is not installed (scripts/ci_services.sh installs it)")
    model = BindingModel.load(BUNDLE)
    clips, labels = [], []
    for stem, cmd, d in data.speech_specs("test"):
        if stem.startswith(("flite_awb_1.0_140_", "flite_kal16_1.0_95_")):  # 20 clips: two held-out voices
            out = tmp_path / f"{stem}.wav"
            subprocess.run([c.replace("{out}", str(out)) for c in cmd], check=True, capture_output=True)
            clips.append(out)
            labels.append(d)
    texts = [t for t, _ in data.texts("test")]
    tl = torch.tensor([d for _, d in data.texts("test")])
    with torch.no_grad():
        e = model.embed(text=texts, audio=clips)
    protos = torch.stack([e["text"][tl == d].mean(0) for d in range(10)])
    pred = (e["audio"] @ protos.T).argmax(1)
    assert len(clips) == 20 and (pred == torch.tensor(labels)).sum() >= MIN_FLITE_CORRECT
