"""Four modalities in one shared space: train the binding, then measure it on held-out data.

    python benchmarks/multimodal.py --quick     # smoke run: 60 steps (a few minutes)
    python benchmarks/multimodal.py             # the reported run (400 steps, 20-30 min on 2 shared cores), saves the weights
    python benchmarks/multimodal.py --steps 3000 --no-save

Binds image, audio and 3D points to the text anchor (symmetric InfoNCE, learned temperature, ImageBind-style:
only (text, m) pairs are trained; image<->audio, image<->points, audio<->points are emergent). Data: see
deepseek/multimodal/data.py (MNIST -> scikit-learn digits, espeak-ng -> flite, DejaVu/STIX -> Computer
Modern fonts, train -> held-out templates). Reports on the held-out sets: R@1 for the 12 ordered modality
pairs, zero-shot accuracy against held-out-template text prototypes, peers in the same run (the same encoder
trained supervised on the modality alone, a logistic-regression probe on raw features) and chance. Prints a
table, then one JSON line; writes docs/multimodal_retrieval.png and docs/multimodal_space.png; saves the
weights (fp16 safetensors) to deepseek/bundled/multimodal-bind/.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from deepseek.multimodal import (
    BindingModel,
    MultimodalConfig,
    data,
    info_nce,
    load_audio,
    log_mel,
    mel_filterbank,
)
from deepseek.multimodal.audio import frontend, pad_mels
from deepseek.multimodal.augment import U, aug_images, aug_mels
from deepseek.multimodal.points import normalise_points

ROOT = Path(__file__).resolve().parents[1]
MODS = ("text", "image", "audio", "points")
FILLERS = ("look", "here", "is", "my", "of", "very", "nice", "big", "small", "an", "example", "photo", "clip",
           "sound", "object", "shown", "written", "printed", "please", "see")


# ---------------------------------------------------------------------------------------------- data + augmentation
class Data:
    def __init__(self, cfg: MultimodalConfig, seed: int, per_glyph: int):
        fb = mel_filterbank(cfg.n_mels, cfg.n_fft, cfg.sample_rate, fmax=cfg.fmax)
        self.cfg = cfg
        self.img = {s: tuple(map(torch.from_numpy, data.images(s))) for s in ("train", "test")}
        self.mel, self.audio_y = {}, {}
        for s in ("train", "test"):
            clips = data.speech(s)
            key = f"{s}_{len(clips)}_{cfg.sample_rate}_{cfg.n_mels}_{cfg.n_fft}_{cfg.hop}"
            key += f"_{cfg.fmax:g}" if cfg.fmax != cfg.sample_rate / 2 else ""
            cached = data.cache_dir().parent / f"mels_{key}.pt"  # log-mels of the cached clips (slow to redo)
            if cached.exists():
                self.mel[s] = torch.load(cached)
            else:
                self.mel[s] = [log_mel(load_audio(p, cfg)[None], fb, cfg.n_fft, cfg.hop)[0]
                               for p, _ in tqdm(clips, desc=f"log-mels {s}", unit="clip")]
                torch.save(self.mel[s], cached)
            self.audio_y[s] = torch.tensor([d for _, d in clips])
        pts_tr, y_tr, _ = data.clouds("train", per_glyph, cfg.sample_points, seed)
        pts_te, y_te, _ = data.clouds("test", 10, cfg.sample_points, seed + 1)
        self.pts = {"train": (torch.from_numpy(pts_tr), torch.from_numpy(y_tr)),
                    "test": (torch.from_numpy(pts_te), torch.from_numpy(y_te))}
        self.mel_test = [frontend(m, cfg) for m in self.mel["test"]]  # what the encoder's features() gives
        self.text = {s: data.texts(s) for s in ("train", "test")}
        self.by_class = {
            "image": [torch.nonzero(self.img["train"][1] == d)[:, 0] for d in range(10)],
            "audio": [torch.nonzero(self.audio_y["train"] == d)[:, 0] for d in range(10)],
            "points": [torch.nonzero(self.pts["train"][1] == d)[:, 0] for d in range(10)],
            "text": [[t for t, y in self.text["train"] if y == d] for d in range(10)],
        }

    def pick(self, mod, y_B, g):
        return [int(self.by_class[mod][d][torch.randint(len(self.by_class[mod][d]), (1,), generator=g)])
                if mod != "text" else int(torch.randint(len(self.by_class[mod][d]), (1,), generator=g))
                for d in y_B.tolist()]

    def batch(self, mod, y_B, g):
        idx = self.pick(mod, y_B, g)
        if mod == "image":
            return aug_images(self.img["train"][0][idx], g, self.cfg.image_grid)
        if mod == "audio":
            return aug_mels([self.mel["train"][i] for i in idx], g, self.cfg)
        if mod == "points":
            return aug_points(self.pts["train"][0][idx], g)
        return [aug_text(self.by_class["text"][d][i], g) for d, i in zip(y_B.tolist(), idx)]

    def test_inputs(self, mod):
        if mod == "image":
            return self.img["test"][0][:, None].expand(-1, 3, -1, -1), self.img["test"][1]
        if mod == "audio":
            return ("mel", self.mel_test), self.audio_y["test"]
        if mod == "points":
            return torch.stack([normalise_points(p) for p in self.pts["test"][0]]), self.pts["test"][1]
        return [t for t, _ in self.text["test"]], torch.tensor([y for _, y in self.text["test"]])


def aug_points(p_BS6, g):
    """Random rotation (<= 20 degrees about each axis), anisotropic scale, jitter, normals dropped half the time."""
    B = p_BS6.shape[0]
    R = torch.eye(3).repeat(B, 1, 1)
    for ax in range(3):
        a = U(g, B, -0.35, 0.35)
        c, s = torch.cos(a), torch.sin(a)
        Ra = torch.eye(3).repeat(B, 1, 1)
        i, j = [(1, 2), (0, 2), (0, 1)][ax]
        Ra[:, i, i], Ra[:, i, j], Ra[:, j, i], Ra[:, j, j] = c, -s, s, c
        R = R @ Ra
    xyz = torch.einsum("bij,bsj->bsi", R, p_BS6[..., :3] * torch.stack([U(g, B, 0.75, 1.25) for _ in range(3)], 1)[:, None])
    xyz = xyz + 0.01 * torch.randn(xyz.shape, generator=g)
    nrm = torch.einsum("bij,bsj->bsi", R, p_BS6[..., 3:]) * (torch.rand(B, 1, 1, generator=g) < 0.5)
    return torch.stack([normalise_points(p) for p in torch.cat([xyz, nrm], -1)])


def aug_text(t, g):
    words = t.split()
    for _ in range(int(torch.randint(0, 3, (1,), generator=g))):
        words.insert(int(torch.randint(len(words) + 1, (1,), generator=g)),
                     FILLERS[int(torch.randint(len(FILLERS), (1,), generator=g))])
    return " ".join(words)


def encode(model_enc, mod, x):
    if mod == "audio":
        return model_enc.forward_features(*x)
    return model_enc(x)


@torch.no_grad()
def embed_test(enc, mod, d: Data, bs=256):
    x, y = d.test_inputs(mod)
    outs = []
    n = len(x[1]) if mod == "audio" else len(x)
    for s in range(0, n, bs):
        xb = pad_mels(x[1][s:s + bs]) if mod == "audio" else x[s:s + bs]
        outs.append(encode(enc, mod, xb).pooled)
    return torch.cat(outs), y


# ---------------------------------------------------------------------------------------------- training
def lr_at(step, steps, base, warm=20):
    return base * min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, step / steps)))


def train_binding(d: Data, cfg, steps, per_class, lr, seed):
    torch.manual_seed(seed)
    model = BindingModel(cfg, anchor="text")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    g = torch.Generator().manual_seed(seed)
    bar = tqdm(range(steps), desc="binding", unit="step", mininterval=5)
    for step in bar:
        for pg in opt.param_groups:
            pg["lr"] = lr_at(step, steps, lr)
        y = torch.arange(10).repeat(per_class)[torch.randperm(10 * per_class, generator=g)]
        anchor = model.encode("text", d.batch("text", y, g)).pooled
        losses = {m: info_nce(anchor, encode(model.encoders[m], m, d.batch(m, y, g)).pooled, model.scale(), y)
                  for m in ("image", "audio", "points")}
        loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix({**{k: f"{v.item():.2f}" for k, v in losses.items()}, "scale": f"{model.scale().item():.1f}"})
    return model.eval()


def train_supervised(d: Data, cfg, mod, steps, per_class, lr, seed):
    """The peer: the same encoder trained alone with a linear classifier on the modality's training set."""
    torch.manual_seed(seed)
    enc = BindingModel(cfg).encoders[mod]
    head = nn.Linear(cfg.dim, 10)
    params = list(enc.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    g = torch.Generator().manual_seed(seed + 7)
    for step in tqdm(range(steps), desc=f"supervised {mod}", unit="step", mininterval=5):
        for pg in opt.param_groups:
            pg["lr"] = lr_at(step, steps, lr)
        y = torch.arange(10).repeat(per_class)
        loss = F.cross_entropy(head(encode(enc, mod, d.batch(mod, y, g)).pooled * 10), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    enc.eval()
    with torch.no_grad():
        e, y = embed_test(enc, mod, d)
        return float((head(e * 10).argmax(1) == y).float().mean())


def raw_probe(d: Data, mod) -> float:
    """Logistic regression on raw features (16x16 pixels; log-mel mean+std; a 12x12 xy occupancy histogram)."""
    from sklearn.linear_model import LogisticRegression

    def feats(split):
        if mod == "image":
            x = d.img[split][0][:, None]
            x = F.interpolate(x, size=(16, 16), mode="bilinear", antialias=True).flatten(1)
            return (x / x.amax(1, keepdim=True)).numpy(), d.img[split][1].numpy()
        if mod == "audio":
            f = [torch.cat([m.mean(1), m.std(1)]) for m in d.mel[split]]  # raw log-mels, mean + std over time
            return torch.stack(f).numpy(), d.audio_y[split].numpy()
        p, y = d.pts[split]
        h = [np.histogram2d(*normalise_points(c)[:, :2].T.numpy(), bins=12, range=[[-1, 1], [-1, 1]])[0].ravel()
             for c in p]
        return np.stack(h) / p.shape[1], y.numpy()

    (xtr, ytr), (xte, yte) = feats("train"), feats("test")
    clf = LogisticRegression(max_iter=2000, C=1.0).fit(xtr, ytr)
    return float((clf.predict(xte) == yte).mean())


# ---------------------------------------------------------------------------------------------- evaluation
def evaluate(model, d: Data):
    emb = {m: embed_test(model.encoders[m], m, d) for m in MODS}
    protos = torch.stack([F.normalize(emb["text"][0][emb["text"][1] == c].mean(0), dim=0) for c in range(10)])
    zero_shot = {m: float(((emb[m][0] @ protos.T).argmax(1) == emb[m][1]).float().mean()) for m in MODS[1:]}
    r1 = {}
    for q in MODS:
        for k in MODS:
            s = emb[q][0] @ emb[k][0].T
            if q == k:
                s.fill_diagonal_(-2.0)  # within a modality: leave the query itself out
            r1[(q, k)] = float((emb[k][1][s.argmax(1)] == emb[q][1]).float().mean())
    chance = {m: float(max((emb[m][1] == c).float().mean() for c in range(10))) for m in MODS}
    return emb, zero_shot, r1, chance


def plots(emb, r1, out_dir: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    M = np.array([[r1[(q, k)] for k in MODS] for q in MODS])
    fig, ax = plt.subplots(figsize=(5, 4.2))
    im = ax.imshow(M, vmin=0, vmax=1, cmap="viridis")
    for i in range(4):
        for j in range(4):
            ax.text(j, i, f"{100 * M[i, j]:.0f}", ha="center", va="center", color="w" if M[i, j] < 0.6 else "k")
    ax.set_xticks(range(4), MODS)
    ax.set_yticks(range(4), MODS)
    ax.set_xlabel("gallery (held-out)")
    ax.set_ylabel("query (held-out)")
    ax.set_title("R@1 (%), text-anchored binding")
    fig.colorbar(im)
    fig.tight_layout()
    fig.savefig(out_dir / "multimodal_retrieval.png", dpi=110)
    plt.close(fig)
    g = torch.Generator().manual_seed(0)
    xs, ys, ms = [], [], []
    for m in MODS:
        e, y = emb[m]
        sel = torch.randperm(len(y), generator=g)[:300]
        xs.append(e[sel])
        ys.append(y[sel])
        ms += [m] * len(sel)
    X = torch.cat(xs)
    X = X - X.mean(0)
    _, _, V = torch.pca_lowrank(X, q=2, center=False)
    P, Y = (X @ V[:, :2]).numpy(), torch.cat(ys).numpy()
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    ms = np.array(ms)
    for m, mk in zip(MODS, ("*", "o", "^", "s")):
        k = ms == m
        ax.scatter(P[k, 0], P[k, 1], c=Y[k], cmap="tab10", vmin=0, vmax=9, marker=mk, s=60 if m == "text" else 12,
                   alpha=0.8, label=m, edgecolors="k" if m == "text" else "none", linewidths=0.5)
    ax.legend(title="marker = modality, colour = digit")
    ax.set_title("Shared space, held-out data (PCA)")
    fig.tight_layout()
    fig.savefig(out_dir / "multimodal_space.png", dpi=110)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--sup-steps", type=int, default=30)
    ap.add_argument("--per-class", type=int, default=8, help="batch = 10 x per-class")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--per-glyph", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.sup_steps, args.per_glyph, args.no_save = 60, 20, 4, True
    torch.set_num_threads(args.threads)
    load0 = open("/proc/loadavg").read().split()[:3]
    cfg = MultimodalConfig()
    t0 = time.time()
    d = Data(cfg, args.seed, args.per_glyph)
    t_data = time.time() - t0
    t0 = time.time()
    model = train_binding(d, cfg, args.steps, args.per_class, args.lr, args.seed)
    t_train = time.time() - t0
    emb, zero_shot, r1, chance = evaluate(model, d)
    docs = ROOT / "docs"
    plots(emb, r1, docs)  # the binding's results are written before the (slower) peers run
    print(json.dumps({"binding_only": True, "zero_shot": zero_shot, "r1": {f"{q}->{k}": v for (q, k), v in r1.items()},
                      "train_minutes": round(t_train / 60, 2)}), flush=True)
    if not args.no_save:
        model.save(ROOT / "deepseek" / "bundled" / "multimodal-bind")
    probe = {m: raw_probe(d, m) for m in MODS[1:]}
    sup = {m: train_supervised(d, cfg, m, args.sup_steps, args.per_class, args.lr, args.seed) for m in MODS[1:]}
    load1 = open("/proc/loadavg").read().split()[:3]
    emergent = [(a, b) for a, b in model.emergent_pairs] + [(b, a) for a, b in model.emergent_pairs]
    targets = {"image": 0.90, "audio": 0.85, "points": 0.95}
    print("\nheld-out sizes: " + ", ".join(f"{m} {len(emb[m][1])}" for m in MODS))
    print(f"{'modality':<8} {'zero-shot':>9} {'target':>7} {'supervised':>10} {'raw probe':>9} {'chance':>7}")
    for m in MODS[1:]:
        print(f"{m:<8} {100 * zero_shot[m]:>8.1f}% {100 * targets[m]:>6.0f}% {100 * sup[m]:>9.1f}% "
              f"{100 * probe[m]:>8.1f}% {100 * chance[m]:>6.1f}%")
    print(f"\n{'R@1 query -> gallery':<22} {'R@1':>6} {'chance':>7}  kind")
    for q in MODS:
        for k in MODS:
            if q != k:
                kind = "emergent" if (q, k) in emergent else "trained"
                print(f"{q + ' -> ' + k:<22} {100 * r1[(q, k)]:>5.1f}% {100 * chance[k]:>6.1f}%  {kind}")
    a3 = 0.5 * (r1[("audio", "points")] + r1[("points", "audio")])
    print(f"emergent audio<->points R@1 (mean of both directions) {100 * a3:.1f}% (target 75%)")
    print(f"data {t_data:.0f} s, binding training {t_train / 60:.1f} min ({args.steps} steps, batch "
          f"{10 * args.per_class} per modality), load {load0} -> {load1}, {platform.processor() or platform.machine()}")
    result = {
        "bench": "multimodal", "anchor": model.anchor, "steps": args.steps, "batch": 10 * args.per_class,
        "train_minutes": round(t_train / 60, 2), "zero_shot": zero_shot, "supervised": sup, "raw_probe": probe,
        "chance": chance, "r1": {f"{q}->{k}": v for (q, k), v in r1.items()},
        "emergent": {f"{q}->{k}": r1[(q, k)] for q, k in emergent}, "emergent_audio_points": a3,
        "targets": {**{f"zero_shot_{k}": v for k, v in targets.items()}, "emergent_audio_points": 0.75},
        "loadavg_start": load0, "loadavg_end": load1, "threads": args.threads,
        "scale": round(model.scale().item(), 2),
    }
    if not args.no_save:
        out = ROOT / "deepseek" / "bundled" / "multimodal-bind"
        model.save(out)
        (out / "training.json").write_text(json.dumps({
            "command": "python benchmarks/multimodal.py " + " ".join(
                f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if not isinstance(v, bool)),
            "data": "deepseek/multimodal/data.py (train splits only)", "dtype": "float16", **result}, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
