"""`deepseek chat` with media: --image/--audio/--points on a one-shot prompt, /image PATH interactively, and
one-line errors (missing file, bad file, text model) before the model loads."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from mm_support import make_mm_model_dir, multimodal_model, png_bytes, wav_bytes

from deepseek.chat import ChatSession


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    (root / "seven.png").write_bytes(png_bytes())
    (root / "clip.wav").write_bytes(wav_bytes())
    np.save(root / "cloud.npy", np.random.default_rng(0).normal(size=(100, 3)).astype(np.float32))
    (root / "bad.png").write_bytes(b"not a png")
    make_mm_model_dir(root / "model")
    return root


def _cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "deepseek.cli", "chat", *args], input=stdin, capture_output=True,
                          text=True, timeout=300)  # fmt: skip


def test_one_shot_with_every_modality_and_interactive_attach(files):
    r = _cli("--model", str(files / "model"), "--image", str(files / "seven.png"), "--audio", str(files / "clip.wav"),
             "--points", str(files / "cloud.npy"), "--prompt", "Which digit?", "--max-new-tokens", "4", "--color", "never")  # fmt: skip
    assert r.returncode == 0, r.stderr
    r = _cli("--model", str(files / "model"), "--max-new-tokens", "3", "--color", "never",
             stdin=f"/image {files / 'seven.png'}\nWhich digit?\n/points {files / 'missing.npy'}\n")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "[image attached:" in r.stdout and "file not found" in r.stderr


@pytest.mark.parametrize("args, message", [
    (["--image", "{root}/nope.png"], "image file not found"),
    (["--image", "{root}/bad.png"], "undecodable image"),
    (["--audio", "{root}/seven.png"], "RIFF|WAV|wav"),
    (["--model", "deepseek/r1-tiny", "--image", "{root}/seven.png"], "text model"),
])  # fmt: skip
def test_bad_media_is_one_line(files, args, message):
    import re

    args = [a.format(root=files) for a in args]
    model = [] if "--model" in args else ["--model", str(files / "model")]
    r = _cli(*model, *args, "--prompt", "hi")
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and re.search(message, lines[0]), r.stderr


def test_session_keeps_media_in_the_history():
    model, tok = multimodal_model()
    session = ChatSession(model, tok, out=open("/dev/null", "w"), max_new_tokens=3)
    session.send("Which digit?", [("image", png_bytes())])
    assert isinstance(session.history[0]["content"], list) and session.history[0]["content"][0]["type"] == "image"
    session.send("And now?")  # the earlier image is spliced again
    ids = model.processor(tok)(messages=session.history + [{"role": "user", "content": "x"}])["input_ids"]
    assert int((ids == 8).sum()) == model.multimodal.config.tokens_per_item
    assert torch.is_tensor(ids)
