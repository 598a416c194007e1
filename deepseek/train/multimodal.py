"""The multimodal stage of the recipe: bound encoders + projectors + SFT of the bundled r1-tiny on media chats.

    deepseek recipe multimodal --out runs/r1-tiny-mm [--bundle]     # ~20 min on 2 CPU cores
    from deepseek.train.multimodal import MultimodalRecipe, train_multimodal
    record = train_multimodal(MultimodalRecipe(steps=400, lm="full"))    # or lm="lora" / "frozen"

Stages: (1) the binding (deepseek/multimodal/, `benchmarks/multimodal.py` trains it; this stage starts from its
bundled weights, frozen); (2) projector + LM SFT on one-turn media chats,
"<image>\\nWhich digit is this?" -> "<think>\\nThe image shows the digit 7.\\n</think>\\n\\n7", mixed with
replayed arithmetic SFT traces (the r1-tiny recipe's own sft3 examples, so no new prompts) so that r1-tiny keeps
its arithmetic. The LM trains fully by default; lm="lora" trains LoRA adapters (merged at the end) and
lm="frozen" only the projectors. The result is a plain checkpoint: LM + multimodal.safetensors.

Shapes: n items, N encoder tokens, C shared width, K LM tokens per item, B rows, T tokens, D LM hidden.
The encoders are frozen, so their outputs for the training media are computed once (features) and the
projector trains on them; span tokens are dropped (zeroed) at random so the answer leans on the pooled
shared-space vector, which is what transfers across writers, voices and fonts.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..model.transformer import IGNORE
from ..multimodal.lm import PLACEHOLDERS

# Training questions are composed (frame x noun x politeness) so that the LM learns "a question about the
# item" rather than five strings; the held-out ("test") questions are phrasings none of them uses (tested by
# word overlap, not only exact strings).
_FRAMES = {
    "image": ("Which {n} is this?", "What {n} is written here?", "Read the handwritten {n}.", "What {n} does the"
              " picture show?", "Which {n} is in the image?", "Identify the {n} in the picture.", "What {n} do you"
              " see?", "Look at the picture: which {n} is it?", "Name the {n} drawn here.", "Can you read this {n}?",
              "Which {n} was written?", "What {n} is drawn on the page?"),
    "audio": ("Which {n} is spoken?", "What {n} does the speaker say?", "Listen: which {n} is it?", "What {n} is in"
              " this recording?", "Which {n} do you hear?", "Identify the spoken {n}.", "What {n} is said in the"
              " audio?", "Name the {n} you hear.", "Which {n} does the voice say?", "Can you hear which {n} it is?",
              "What {n} was pronounced?", "Transcribe the spoken {n}."),
    "points": ("Which {n} is this 3D shape?", "What {n} does this point cloud show?", "Name the {n} of this 3D"
               " model.", "What {n} is this object?", "Which {n} is this shape?", "Identify the {n} in the point"
               " cloud.", "Which {n} does the 3D model form?", "What {n} is shaped by these points?", "Look at the"
               " cloud: which {n} is it?", "Can you recognise this 3D {n}?", "What {n} is modelled here?",
               "Which {n} has this geometry?"),
}  # fmt: skip
_NOUNS = ("digit", "number", "numeral")
_POLITE = ("{q}", "Please answer: {q}", "{q} Answer with one digit.")


def _compose(modality: str) -> tuple[str, ...]:
    return tuple(p.format(q=f.format(n=n)) for f in _FRAMES[modality] for n in _NOUNS for p in _POLITE)


QUESTIONS = {
    "train": {m: _compose(m) for m in _FRAMES},
    "test": {
        "image": ("What is the digit in this image?", "Tell me which number this handwriting shows."),
        "audio": ("Which digit does this clip say?", "Tell me the number spoken here."),
        "points": ("Which digit do these 3D points form?", "Tell me the number this 3D scan shows."),
    },
}
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
REASONING = {"image": "The image shows the digit {d}.", "audio": "The clip says the digit {d}.",
             "points": "The shape is the digit {d}."}  # fmt: skip


@dataclass
class MultimodalRecipe:
    base: str = "deepseek/r1-tiny"  # the text model to extend
    binding: str = "deepseek/bundled/multimodal-bind"  # trained encoders (benchmarks/multimodal.py)
    out_dir: str = "runs/r1-tiny-mm"
    tokens_per_item: int = 8
    steps: int = 800
    media_batch: int = 24  # multimodal rows per step
    replay_batch: int = 6  # arithmetic SFT rows per step (keeps r1-tiny's arithmetic)
    replay_weight: float = 1.0  # loss = media rows' mean + replay_weight x replay rows' mean (stage_loss)
    lm: str = "full"  # what of the LM trains: "full" | "lora" | "frozen" (projector-only)
    lr: float = 2e-3  # projectors (and LoRA)
    lm_lr: float = 2e-4  # the LM's weights when lm="full"
    warmup: int = 30
    lora_rank: int = 8
    lora_alpha: int = 16
    image_views: int = 2  # augmented copies of each training image's features (augmented_views)
    audio_views: int = 0  # augmented copies of each training clip's features (augmented_audio_views)
    span_dropout: float = 0.5  # chance that an item's span tokens are zeroed (the pooled slot is kept)
    points_per_glyph: int = 20
    points_per_cloud: int = 1024
    seed: int = 0
    eval_items: int = 300  # held-out items per modality for the LM-answer evaluation
    train_items: int | None = None  # cap on training items per modality (None: all; small for tests)
    threads: int | None = None
    modalities: tuple = ("image", "audio", "points")
    weights: tuple = (0.4, 0.3, 0.3)  # share of media rows per modality (images are the hardest to read)
    replay_mix: dict = field(default_factory=dict)  # {} = the r1-tiny recipe's sft3 mix

    def __post_init__(self):
        for name in ("tokens_per_item", "steps", "media_batch", "eval_items"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"MultimodalRecipe.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.lm not in ("full", "lora", "frozen"):
            raise ValueError(f"MultimodalRecipe.lm must be full, lora or frozen, got {self.lm!r}")
        if not 0 <= self.span_dropout < 1:
            raise ValueError(f"MultimodalRecipe.span_dropout must be in [0, 1), got {self.span_dropout}")
        self.modalities = tuple(self.modalities)


# ---------------------------------------------------------------------------- data
def media_items(split: str, recipe: MultimodalRecipe, modality: str) -> tuple[list, list[int]]:
    """(items, digits) of a split: images / wav paths / point clouds (deepseek/multimodal/data.py)."""
    from ..multimodal import data

    if modality == "image":
        X, y = data.images(split)
        return list(X), y.tolist()
    if modality == "audio":
        clips = data.speech(split)
        return [str(p) for p, _ in clips], [d for _, d in clips]
    per_glyph = recipe.points_per_glyph if split == "train" else max(1, recipe.points_per_glyph // 2)
    P, y, _ = data.clouds(split, per_glyph, recipe.points_per_cloud, seed=recipe.seed + (0 if split == "train" else 1))
    return list(P), y.tolist()


@dataclass
class Features:
    tokens: torch.Tensor  # (n, N, C)
    mask: torch.Tensor  # (n, N)
    pooled: torch.Tensor  # (n, C)
    digits: list[int]

    @staticmethod
    def of(outs: list, digits: list[int]) -> Features:
        """Encoder outputs (or Features) of successive chunks, token axes zero-padded to the longest."""
        N = max(o.tokens.shape[1] for o in outs)
        return Features(torch.cat([F.pad(o.tokens, (0, 0, 0, N - o.tokens.shape[1])) for o in outs]),
                        torch.cat([F.pad(o.mask, (0, N - o.mask.shape[1])) for o in outs]),
                        torch.cat([o.pooled for o in outs]), list(digits))  # fmt: skip

    @staticmethod
    def cat(parts: list[Features]) -> Features:
        return Features.of(parts, [d for p in parts for d in p.digits])


@torch.inference_mode()
def encode_all(binding, modality: str, items: list, digits: list[int], batch: int = 128) -> Features:
    from ..multimodal.media import decode

    outs = []
    for i in range(0, len(items), batch):
        chunk = [decode(modality, x, binding.cfg) for x in items[i : i + batch]]
        outs.append(binding.encode(modality, chunk))
    return Features.of(outs, digits)


def augmented_views(binding, images: list, digits: list[int], recipe: MultimodalRecipe) -> list[Features]:
    """recipe.image_views augmented copies of the training images (the binding's own augmentation: affine,
    stroke, 7-10 px resolution, contrast) encoded once each, so the projector and LM see varied features too."""
    from ..multimodal.augment import aug_images

    g = torch.Generator().manual_seed(recipe.seed + 17)
    x_NHW = torch.from_numpy(np.stack(images)).float()
    views = []
    for _ in range(recipe.image_views):
        aug_NCGG = torch.cat([aug_images(x_NHW[i : i + 512], g, binding.cfg.image_grid)
                              for i in range(0, len(x_NHW), 512)])  # fmt: skip
        views.append(encode_all(binding, "image", list(aug_NCGG.permute(0, 2, 3, 1).numpy()), digits))
    return views


@torch.inference_mode()
def augmented_audio_views(binding, clips: list, digits: list[int], recipe: MultimodalRecipe) -> list[Features]:
    """recipe.audio_views augmented copies of the training clips' features: the binding's log-mel augmentation
    (time stretch, vocal-tract warp, spectral tilt, band limit, noise floor) on each clip's raw log-mel, then the
    encoder's own front end and trunk."""
    from ..multimodal.audio import load_audio, log_mel
    from ..multimodal.augment import aug_mels

    enc = binding.encoders["audio"]
    g = torch.Generator().manual_seed(recipe.seed + 29)
    raw = [log_mel(load_audio(c, enc.cfg)[None], enc.fbank_MK, enc.cfg.n_fft, enc.cfg.hop)[0] for c in clips]
    views = []
    for _ in range(recipe.audio_views):
        outs = [enc.forward_features(*aug_mels(raw[i : i + 128], g, enc.cfg)) for i in range(0, len(raw), 128)]
        views.append(Features.of(outs, digits))
    return views


def media_messages(modality: str, question: str, digit: int | None, media_first: bool = True) -> list[dict]:
    """A one-turn chat about one media item; with `digit`, the assistant's gold reply too."""
    ph = PLACEHOLDERS[modality]
    user = f"{ph}\n{question}" if media_first else f"{question}\n{ph}"
    messages = [{"role": "user", "content": user}]
    if digit is not None:
        messages.append({"role": "assistant", "content": str(digit),
                         "reasoning_content": REASONING[modality].format(d=digit)})  # fmt: skip
    return messages


def expand_row(ids: list[int], labels: list[int], placeholder_ids: set[int], K: int) -> tuple[list[int], list[int]]:
    out_ids, out_labels = [], []
    for i, lab in zip(ids, labels):
        if i in placeholder_ids:
            out_ids += [i] * K
            out_labels += [IGNORE] * K
        else:
            out_ids.append(i)
            out_labels.append(lab)
    return out_ids, out_labels


def replay_rows(recipe: MultimodalRecipe, tokenizer, n: int) -> list[tuple[list[int], list[int]]]:
    """Arithmetic SFT rows the r1-tiny recipe already trained on (its sft3 set): no new prompts."""
    from .data import chat_ids_labels
    from .recipe import recipe as named_recipe
    from .recipe import task_examples

    cfg = named_recipe("r1-tiny")
    mix = recipe.replay_mix or cfg.sft3_mix
    examples = task_examples(cfg, cfg.sft3_examples, cfg.sft3_seed + 2, mix)
    random.Random(recipe.seed).shuffle(examples)
    return [chat_ids_labels(ex["messages"], tokenizer) for ex in examples[:n]]


def pad_right(rows, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, T), labels (B, T)): right padding needs no attention mask in a causal model (pads come last)."""
    T = max(len(r[0]) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    for b, (i, lab) in enumerate(rows):
        ids[b, : len(i)] = torch.tensor(i)
        labels[b, : len(lab)] = torch.tensor(lab)
    return ids, labels


# ---------------------------------------------------------------------------- training
def lora_model(model, rank: int, alpha: int):
    """PEFT LoRA on the LM's attention and dense/shared-expert projections only (not the encoders/projectors)."""
    from peft import LoraConfig, get_peft_model

    target = (r"model\.layers\.\d+\.(self_attn\.(q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
              r"|mlp\.(shared_experts\.)?(gate_proj|up_proj|down_proj))")  # fmt: skip
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=target))


def splice_features(model, ids_BT: torch.Tensor, feats: dict[str, tuple], span_dropout: float, g) -> torch.Tensor:
    """Input embeddings with projected precomputed features at the placeholders. feats: modality ->
    (tokens (n, N, C), mask (n, N), pooled (n, C)) in row order."""
    adapter = model.multimodal
    x_BTD = model.model.embed_tokens(ids_BT)
    for modality, (tok, mask, pooled) in feats.items():
        if span_dropout:
            keep_n = (torch.rand(tok.shape[0], generator=g) >= span_dropout).to(tok.dtype)
            tok = tok * keep_n[:, None, None]
        proj = adapter.projectors[modality](tok, mask, pooled).to(x_BTD.dtype)
        at_BT = ids_BT == adapter.config.placeholder_ids[modality]
        x_BTD = x_BTD.masked_scatter(at_BT[..., None], proj.reshape(-1, x_BTD.shape[-1]))
    return x_BTD


def stage_loss(logits_BTV: torch.Tensor, labels_BT: torch.Tensor, n_media: int, replay_weight: float) -> torch.Tensor:
    """Mean next-token loss of the media rows (the first n_media) + replay_weight x that of the replay rows.

    Each part is averaged over its own tokens: one mean over the whole batch would let the long arithmetic traces
    (hundreds of tokens a row) drown the two digit tokens a media reply turns on."""
    ce_BT = F.cross_entropy(logits_BTV[:, :-1].flatten(0, 1).float(), labels_BT[:, 1:].flatten(), ignore_index=IGNORE,
                            reduction="none").view(labels_BT.shape[0], -1)  # fmt: skip
    valid_BT = (labels_BT[:, 1:] != IGNORE).float()

    def part(rows: slice) -> torch.Tensor:
        return (ce_BT[rows] * valid_BT[rows]).sum() / valid_BT[rows].sum().clamp(min=1)

    loss = part(slice(0, n_media))
    if n_media < labels_BT.shape[0]:
        loss = loss + replay_weight * part(slice(n_media, None))
    return loss


def train_multimodal(recipe: MultimodalRecipe, progress: bool = True) -> dict:
    from transformers import AutoTokenizer

    from ..chat import chat_prompt_ids  # noqa: F401  (the prompts the evaluation uses)
    from ..compat.checkpoint import resolve
    from ..multimodal.binding import BindingModel
    from ..multimodal.lm import attach
    from ..sdk import R1Model
    from .data import chat_ids_labels

    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    t_start = time.perf_counter()
    out_dir = Path(recipe.out_dir)
    base = resolve(recipe.base)
    tok = AutoTokenizer.from_pretrained(str(base))
    model = R1Model.from_pretrained(base)
    binding = BindingModel.load(resolve_binding(recipe.binding))
    attach(model, tok, binding, recipe.tokens_per_item, recipe.modalities)
    adapter = model.multimodal
    K = recipe.tokens_per_item
    ph_ids = set(adapter.config.placeholder_ids.values())

    t0 = time.perf_counter()
    feats = {}
    for m in recipe.modalities:
        items, digits = media_items("train", recipe, m)
        if recipe.train_items:
            keep = sorted(random.Random(recipe.seed).sample(range(len(items)), min(recipe.train_items, len(items))))
            items, digits = [items[i] for i in keep], [digits[i] for i in keep]
        feats[m] = encode_all(adapter.binding, m, items, digits)
        if m == "image" and recipe.image_views:
            feats[m] = Features.cat([feats[m]] + augmented_views(adapter.binding, items, digits, recipe))
        if m == "audio" and recipe.audio_views:
            feats[m] = Features.cat([feats[m]] + augmented_audio_views(adapter.binding, items, digits, recipe))
        if progress:
            print(f"[mm] encoded {len(items)} training {m} items in {time.perf_counter() - t0:.0f} s", flush=True)
    seconds_features = time.perf_counter() - t0
    replay = replay_rows(recipe, tok, recipe.steps * recipe.replay_batch) if recipe.replay_batch else []

    for p in model.parameters():
        p.requires_grad_(recipe.lm == "full")
    for p in adapter.parameters():  # the encoders stay frozen
        p.requires_grad_(False)
    peft = lora_model(model, recipe.lora_rank, recipe.lora_alpha) if recipe.lm == "lora" else None
    for p in adapter.projectors.parameters():
        p.requires_grad_(True)
    projector_params = list(adapter.projectors.parameters())
    ids_proj = {id(p) for p in projector_params}
    lm_params = [p for p in model.parameters() if p.requires_grad and id(p) not in ids_proj]
    trainable = projector_params + lm_params
    groups = [{"params": projector_params, "base_lr": recipe.lr}]
    if lm_params:
        groups.append({"params": lm_params, "base_lr": recipe.lm_lr if recipe.lm == "full" else recipe.lr})
    opt = torch.optim.AdamW(groups, lr=recipe.lr, weight_decay=0.0)
    rng = random.Random(recipe.seed)
    g = torch.Generator().manual_seed(recipe.seed)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    model.train()
    adapter.binding.eval()
    log, t0 = [], time.perf_counter()
    for step in range(recipe.steps):
        scale = min(1.0, (step + 1) / recipe.warmup) * 0.5 * (1 + math.cos(math.pi * step / recipe.steps))
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * scale
        lr = recipe.lr * scale
        rows, picks = [], {m: [] for m in recipe.modalities}
        for m in rng.choices(recipe.modalities, recipe.weights[: len(recipe.modalities)], k=recipe.media_batch):
            j = rng.randrange(len(feats[m].digits))
            d = feats[m].digits[j]
            msgs = media_messages(m, rng.choice(QUESTIONS["train"][m]), d, media_first=rng.random() < 0.7)
            rows.append((m, j, *expand_row(*chat_ids_labels(msgs, tok), ph_ids, K)))
        # masked_scatter fills placeholders in row order: sort the picks the same way
        for m, j, _, _ in rows:
            picks[m].append(j)
        batch_rows = [(i, lab) for _, _, i, lab in rows]
        batch_rows += replay[step * recipe.replay_batch : (step + 1) * recipe.replay_batch]
        ids, labels = pad_right(batch_rows, pad)
        f = {m: (feats[m].tokens[js], feats[m].mask[js], feats[m].pooled[js]) for m, js in picks.items() if js}
        embeds = splice_features(model, ids, f, recipe.span_dropout, g)
        loss = stage_loss(model(inputs_embeds=embeds).logits, labels, len(rows), recipe.replay_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        log.append(loss.item())
        if progress and (step % 25 == 0 or step == recipe.steps - 1):
            rate = (step + 1) / (time.perf_counter() - t0)
            eta = (recipe.steps - step - 1) / rate
            print(f"[mm] step {step + 1}/{recipe.steps} loss {sum(log[-25:]) / len(log[-25:]):.3f} "
                  f"lr {lr:.2e} {rate:.2f} steps/s eta {eta:.0f} s", flush=True)  # fmt: skip
    seconds_train = time.perf_counter() - t0
    if peft is not None:
        peft.merge_and_unload()
    model.eval()
    final = out_dir / "final"
    model.save_pretrained(final)
    tok.save_pretrained(str(final))
    model.processor(tok).save_pretrained(final)
    record = {"recipe": asdict(recipe), "loss_first": log[0], "loss_last25": sum(log[-25:]) / len(log[-25:]),
              "seconds": {"features": round(seconds_features, 1), "train": round(seconds_train, 1),
                          "total": round(time.perf_counter() - t_start, 1)},
              "trainable_parameters": sum(p.numel() for p in trainable), "out": str(final),
              "training_features": {m: len(f.digits) for m, f in feats.items()}}  # fmt: skip
    if progress:
        print("[mm] evaluating the LM's answers on held-out media", flush=True)
    record["eval"] = evaluate_answers(model, tok, recipe)
    (out_dir / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    (final / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def eval_subset(recipe: MultimodalRecipe, modality: str) -> tuple[list, list[int]]:
    """The held-out items the stage reports on: a fixed random subset (seeded) of each test split."""
    items, digits = media_items("test", recipe, modality)
    idx = sorted(random.Random(1234).sample(range(len(items)), min(recipe.eval_items, len(items))))
    return [items[i] for i in idx], [digits[i] for i in idx]


def evaluate_answers(model, tokenizer, recipe: MultimodalRecipe) -> dict:
    """Held-out LM answer accuracy per modality, next to the binding's zero-shot accuracy on the same items."""
    from ..eval.multimodal import lm_answer_accuracy, zero_shot_accuracy

    out = {}
    for m in recipe.modalities:
        items, digits = eval_subset(recipe, m)
        lm = lm_answer_accuracy(model, tokenizer, m, items, digits)
        zs = zero_shot_accuracy(model.multimodal.binding, m, items, digits)
        out[m] = {"n": len(items), "lm_answer": lm["accuracy"], "zero_shot": zs, "examples": lm["examples"]}
    out["mean_lm_answer"] = sum(out[m]["lm_answer"] for m in recipe.modalities) / len(recipe.modalities)
    return out


def bundle(record: dict, name: str = "r1-tiny-mm") -> Path:
    """Copy the stage's result into deepseek/bundled/<name> (LM + multimodal.safetensors + tokenizer)."""
    import shutil

    from ..compat.checkpoint import BUNDLED_DIR

    src, dst = Path(record["out"]), BUNDLED_DIR / name
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst


def resolve_binding(name: str) -> Path:
    from ..compat.checkpoint import BUNDLED_DIR

    path = Path(name)
    if path.is_dir():
        return path
    short = name.removeprefix("deepseek/bundled/").removeprefix("deepseek/")
    if (BUNDLED_DIR / short / "config.json").is_file():
        return BUNDLED_DIR / short
    raise FileNotFoundError(f"binding weights {name!r} not found (a folder or a bundled name)")
