"""Differentially private fine-tuning (DP-SGD with Poisson sampling, per-sequence clipping, Gaussian noise).

    from deepseek import R1Model
    model = R1Model.from_pretrained("deepseek/r1-tiny")
    metrics = model.finetune(dataset="records.jsonl", epochs=3, privacy={"epsilon": 8.0, "delta": 1e-5})
    metrics["epsilon"], metrics["noise_multiplier"]      # what the run spent, as the accountant computed it

    deepseek train --finetune --init-from deepseek/r1-tiny --data records.jsonl --epochs 3 --dp-epsilon 8

Privacy unit: one *record* (a training sequence; records are never packed together under DP). A step:
every record joins the batch independently with probability q = batch_size / N (Poisson sampling), each
sampled record's gradient of its own mean token loss is clipped to L2 norm <= max_grad_norm (C), the clipped
gradients are summed, N(0, (sigma C)^2) noise is added to every coordinate, and the sum is divided by the
expected batch size q N. sigma is the smallest noise multiplier for which Opacus' accountant (PRV by default,
or RDP) gives epsilon <= the target at `delta` after the planned steps (the sampled Gaussian mechanism,
composed over steps; the accountant's sampling model is exactly the Poisson sampling done here).

Per-sample gradients, two paths giving the same numbers (tests/train/test_grad_sample.py):
- fast (grad_sample.py, used whenever it applies): when every trainable parameter is an nn.Linear weight or
  bias - LoRA on attention, the dense MLP and the shared experts - one padded batched forward + backward per
  chunk of sampled records, with hooks that keep each linear layer's input and output gradient and sum their
  outer products per sequence (the MoE's flattened (B*T) tokens are viewed back as (B, T)). It is proved on a
  probe batch before training and every call checks that the per-sequence gradients add up to the batch's.
- reference (`per_sample_grads`): one forward + backward per sampled record, alone, at its own length. It is
  exact for every trainable parameter by construction - including LoRA on the stacked routed experts (PEFT
  `target_parameters`, whose data-dependent grouped matmuls hooks cannot split) and full fine-tuning - and is
  what DP-SGD falls back to for those.

What is not protected: the pretraining data; a person with several records (group their records into one, or
divide epsilon by the group size); the choice of hyper-parameters if they are tuned on the private data.
The router bias update (a data-dependent, un-noised statistic) is off under DP.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import nn
from torch.nn import functional as F

from .data import IGNORE
from .grad_sample import LinearGrads

ACCOUNTANTS = ("prv", "rdp")
PRIVACY_KEYS = ("epsilon", "delta", "max_grad_norm", "accountant")


# ---------------------------------------------------------------------------- configuration
@dataclass
class PrivacyConfig:
    epsilon: float = 8.0  # target (epsilon, delta)-DP for the whole run, per record
    delta: float = 1e-5  # must be < 1 / number of training records
    max_grad_norm: float = 1.0  # C: every record's gradient is clipped to this L2 norm
    accountant: str = "prv"  # "prv" (tight numerical composition) or "rdp" (Renyi DP, slightly looser)

    def __post_init__(self):
        if not isinstance(self.epsilon, int | float) or isinstance(self.epsilon, bool) or not self.epsilon > 0:
            raise ValueError(f"privacy epsilon must be a number > 0, got {self.epsilon!r}")
        if not isinstance(self.delta, int | float) or not 0 < self.delta < 1:
            raise ValueError(f"privacy delta must be in (0, 1), got {self.delta!r}; use e.g. 1e-5 (< 1/records)")
        if not isinstance(self.max_grad_norm, int | float) or not self.max_grad_norm > 0:
            raise ValueError(f"privacy max_grad_norm must be > 0, got {self.max_grad_norm!r}")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"unknown privacy accountant {self.accountant!r}; use one of {', '.join(ACCOUNTANTS)}")

    def check_records(self, n: int) -> None:
        if self.delta >= 1.0 / n:
            raise ValueError(f"privacy delta={self.delta:g} is >= 1/N = {1.0 / n:.3g} for N={n} training records; "
                             f"choose delta < {1.0 / n:.3g} (e.g. {10 ** math.floor(math.log10(0.1 / n)):g})")  # fmt: skip


def resolve_privacy(privacy) -> PrivacyConfig | None:
    """None / False: no DP; True: the defaults; a dict (keys epsilon, delta, max_grad_norm, accountant) or a
    PrivacyConfig: that."""
    if privacy is None or privacy is False:
        return None
    try:
        import opacus  # noqa: F401  (the accountants)
    except ImportError:
        raise ValueError("private fine-tuning needs Opacus' accountants: pip install 'deepseek-r1-open[privacy]'") from None
    if privacy is True:
        return PrivacyConfig()
    if isinstance(privacy, PrivacyConfig):
        return privacy
    if isinstance(privacy, dict):
        unknown = sorted(set(privacy) - set(PRIVACY_KEYS))
        if unknown:
            raise ValueError(f"unknown privacy option(s) {', '.join(unknown)}; known: {', '.join(PRIVACY_KEYS)}")
        return PrivacyConfig(**privacy)
    raise ValueError(f"privacy must be True, a dict or a PrivacyConfig, got {type(privacy).__name__}")


# ---------------------------------------------------------------------------- accounting (Opacus)
def noise_multiplier(cfg: PrivacyConfig, sample_rate: float, steps: int) -> float:
    """The smallest sigma reaching cfg.epsilon at cfg.delta after `steps` Poisson-sampled steps."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=cfg.epsilon, target_delta=cfg.delta, sample_rate=sample_rate,
                                      steps=steps, accountant=cfg.accountant, epsilon_tolerance=0.01))  # fmt: skip


def epsilon_spent(sigma: float, sample_rate: float, steps: int, delta: float, accountant: str) -> float:
    """epsilon after `steps` steps of the sampled Gaussian mechanism, from Opacus' accountant."""
    from opacus.accountants import create_accountant

    if steps == 0:
        return 0.0
    acc = create_accountant(accountant)
    acc.history = [(sigma, sample_rate, steps)]
    return float(acc.get_epsilon(delta=delta))


# ---------------------------------------------------------------------------- data: one record per sequence
@dataclass
class Records:
    """Tokenised records, each its own sequence (never packed): ids[i], labels[i] are 1-D, same length."""

    ids: list[torch.Tensor]
    labels: list[torch.Tensor]

    def __len__(self) -> int:
        return len(self.ids)


def prepare_records(source, tokenizer, seq_len: int, val_fraction: float = 0.05, salt: str = "",
                    show_progress: bool = False) -> tuple[Records, Records | None, dict]:  # fmt: skip
    """(train, validation, stats): records split by content hash (as prepare_data), tokenised, truncated to
    seq_len, one record per sequence; records without a labelled token are dropped."""
    from .data import content_key, detect_kind, load_records, split_by_hash, tokenize_records

    ds = load_records(source)
    kind = detect_kind(ds.column_names, str(source) if isinstance(source, str) else "dataset")
    rows = list(ds)
    train_idx, val_idx = split_by_hash([content_key(r, kind) for r in rows], val_fraction, salt)
    seqs = tokenize_records(rows, tokenizer, kind, show_progress=show_progress)

    def build(idx):
        ids, labels = [], []
        for i in idx:
            s_ids, s_lab = seqs[i][0][:seq_len], seqs[i][1][:seq_len]
            if len(s_ids) >= 2 and any(t != IGNORE for t in s_lab[1:]):
                ids.append(torch.tensor(s_ids, dtype=torch.long))
                labels.append(torch.tensor(s_lab, dtype=torch.long))
        return Records(ids, labels)

    train, val = build(train_idx), build(val_idx) if val_idx else None
    if len(train) == 0:
        raise ValueError("no training records with labelled tokens after tokenisation")
    stats = {"records": len(rows), "train_records": len(train), "val_records": len(val) if val else 0,
             "train_tokens": int(sum(int((lab[1:] != IGNORE).sum()) for lab in train.labels)), "kind": kind,
             "block_size": seq_len, "packing": "one record per sequence"}  # fmt: skip
    return train, (val if val is not None and len(val) else None), stats


def pad_batch(records: Records, idx: list[int], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (ids_BT, labels_BT); causal attention never lets a real token see the padding after it."""
    T = max(records.ids[i].numel() for i in idx)
    ids = torch.full((len(idx), T), pad_id, dtype=torch.long)
    labels = torch.full((len(idx), T), IGNORE, dtype=torch.long)
    for b, i in enumerate(idx):
        n = records.ids[i].numel()
        ids[b, :n], labels[b, :n] = records.ids[i], records.labels[i]
    return ids, labels


# ---------------------------------------------------------------------------- per-sequence losses and grads
def sequence_losses(model: nn.Module, ids_BT: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
    """(B,) each sequence's mean next-token loss over its labelled tokens (the unit's own objective)."""
    logits_BTV = model(input_ids=ids_BT, mtp_loss_weight=0.0).logits
    target_BT = labels_BT[:, 1:]
    tok_BT = F.cross_entropy(logits_BTV[:, :-1].float().transpose(1, 2), target_BT, ignore_index=IGNORE,
                             reduction="none")  # fmt: skip
    n_B = (target_BT != IGNORE).sum(1).clamp(min=1)
    return tok_BT.sum(1) / n_B


def per_sample_grads(model: nn.Module, params: list[nn.Parameter], records: Records, idx: list[int]):
    """Yield (i, flat gradient (P,), loss) of each record i in idx alone: one forward + backward per record."""
    for i in idx:
        for p in params:
            p.grad = None
        loss = sequence_losses(model, records.ids[i][None], records.labels[i][None])[0]
        loss.backward()
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        yield i, flat, float(loss.detach())


def sample_grads(model: nn.Module, params: list[nn.Parameter], records: Records, idx: list[int], pad_id: int,
                 fast: LinearGrads | None, token_budget: int = 8192):  # fmt: skip
    """Yield (grads (b, P), losses (b,)) for the records idx, in chunks: from batched forwards of at most
    `token_budget` padded tokens when `fast` covers every parameter (grad_sample.py), else one record at a
    time (per_sample_grads, the reference path)."""
    if fast is None:
        for _, flat, loss in per_sample_grads(model, params, records, idx):
            yield flat[None], torch.tensor([loss])
        return
    order = sorted(idx, key=lambda i: records.ids[i].numel())  # similar lengths together: less padding
    start = 0
    while start < len(order):
        end = start + 1
        while end < len(order) and (end + 1 - start) * records.ids[order[end]].numel() <= token_budget:
            end += 1
        chunk = order[start:end]
        ids, labels = pad_batch(records, chunk, pad_id)
        grads_BP = fast.grads(lambda ids=ids, labels=labels: sequence_losses(model, ids, labels), *ids.shape)
        yield grads_BP, fast.losses
        start = end


def clip(flat: torch.Tensor, max_norm: float) -> torch.Tensor:
    """flat * min(1, C / ||flat||) per row of a (P,) or (b, P) tensor: the clipped per-sample gradients."""
    return flat * (max_norm / (flat.norm(dim=-1, keepdim=True) + 1e-6)).clamp(max=1.0)


def noisy_mean(clipped_sum_P: torch.Tensor, sigma: float, max_norm: float, expected_batch: float,
               generator: torch.Generator | None = None) -> torch.Tensor:  # fmt: skip
    """(sum of clipped grads + N(0, (sigma C)^2 I)) / expected batch size: the private gradient."""
    noise = torch.normal(0.0, sigma * max_norm, size=clipped_sum_P.shape, generator=generator)
    return (clipped_sum_P + noise.to(clipped_sum_P)) / expected_batch


def private_parameters(model: nn.Module, mtp_loss: bool = False) -> list[tuple[str, nn.Parameter]]:
    """The trainable parameters DP-SGD updates; refuses what cannot get per-record gradients.

    MTP parameters are frozen when their loss is off (they would receive only noise). Batch-statistics
    layers mix records inside a forward, so a model with a trainable one is refused."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm | nn.GroupNorm | nn.InstanceNorm1d) and any(
                p.requires_grad for p in module.parameters(recurse=False)):  # fmt: skip
            raise ValueError(f"{name} ({type(module).__name__}) mixes records within a batch, so it cannot get "
                             "per-sample gradients under privacy; freeze it or leave privacy off")  # fmt: skip
    named = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if not mtp_loss and ".mtp." in f".{name}.":
            p.requires_grad_(False)
            continue
        named.append((name, p))
    if not named:
        raise ValueError("no trainable parameters left for private fine-tuning")
    return named


# ---------------------------------------------------------------------------- the loop
@dataclass
class LoopConfig:
    steps: int
    batch_size: int  # DP: expected batch q*N (Poisson); non-private: the fixed batch
    lr: float = 2e-3
    warmup_steps: int = 1
    min_lr_ratio: float = 0.1
    betas: tuple = (0.9, 0.95)
    seed: int = 0
    progress: bool = True
    eval_every: int = 0
    batched_grads: bool = True  # DP: per-sequence grads from batched forwards when every target is nn.Linear


@torch.no_grad()
def heldout_loss(model: nn.Module, records: Records | None, pad_id: int, batch: int = 16) -> float | None:
    """Token-weighted next-token loss over every labelled token of the records."""
    if records is None or len(records) == 0:
        return None
    was = model.training
    model.eval()
    total, n = 0.0, 0
    for s in range(0, len(records), batch):
        idx = list(range(s, min(s + batch, len(records))))
        ids, labels = pad_batch(records, idx, pad_id)
        k = (labels[:, 1:] != IGNORE).sum(1)
        total += float((sequence_losses(model, ids, labels) * k).sum())
        n += int(k.sum())
    model.train(was)
    return total / max(n, 1)


def train_records(model: nn.Module, train: Records, val: Records | None, loop: LoopConfig,
                  privacy: PrivacyConfig | None, pad_id: int, mtp_loss: bool = False) -> dict:  # fmt: skip
    """Train `model` in place on `train` (one record per sequence); DP-SGD when `privacy` is set, otherwise the
    same loop without clipping or noise on fixed shuffled batches (the peer). Returns metrics."""
    from tqdm.auto import tqdm

    from .trainer import lr_factor

    N = len(train)
    named = private_parameters(model, mtp_loss) if privacy is not None else [
        (n, p) for n, p in model.named_parameters() if p.requires_grad]  # fmt: skip
    params = [p for _, p in named]
    fast = LinearGrads.of(model, params) if privacy is not None and loop.batched_grads else None
    if fast is not None:  # prove it on two real records before trusting it
        probe_ids, probe_labels = pad_batch(train, list(range(min(2, N))), pad_id)
        fast = fast if fast.works(lambda: sequence_losses(model, probe_ids, probe_labels), *probe_ids.shape) else None
    g = torch.Generator().manual_seed(loop.seed)
    noise_g = torch.Generator().manual_seed(loop.seed + 7919)
    B = min(loop.batch_size, N)
    q = B / N
    sigma = noise_multiplier(privacy, q, loop.steps) if privacy is not None else 0.0
    optimizer = torch.optim.AdamW(params, lr=loop.lr, betas=loop.betas, weight_decay=0.0)
    sched_cfg = SimpleNamespace(warmup_steps=loop.warmup_steps, max_steps=loop.steps, min_lr_ratio=loop.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, sched_cfg))
    model.train()
    losses, batch_sizes, clipped_frac, val_losses = {}, [], [], {}
    perm, pos = torch.randperm(N, generator=g), 0
    bar = tqdm(total=loop.steps, unit="step", desc="dp-train" if privacy else "train", disable=not loop.progress)
    start = time.perf_counter()
    for step in range(1, loop.steps + 1):
        if privacy is not None:
            idx = torch.nonzero(torch.rand(N, generator=g) < q).flatten().tolist()  # Poisson sampling
            total = torch.zeros(sum(p.numel() for p in params))
            loss_sum, n_clipped = 0.0, 0
            for grads_BP, losses_B in sample_grads(model, params, train, idx, pad_id, fast):
                n_clipped += int((grads_BP.norm(dim=1) > privacy.max_grad_norm).sum())
                total += clip(grads_BP, privacy.max_grad_norm).sum(0)
                loss_sum += float(losses_B.sum())
            grad = noisy_mean(total, sigma, privacy.max_grad_norm, q * N, noise_g)
            offset = 0
            for p in params:
                p.grad = grad[offset : offset + p.numel()].view_as(p).to(p.dtype)
                offset += p.numel()
            losses[step] = loss_sum / max(len(idx), 1)
            clipped_frac.append(n_clipped / max(len(idx), 1))
        else:
            if pos + B > N:
                perm, pos = torch.randperm(N, generator=g), 0
            idx = perm[pos : pos + B].tolist()
            pos += B
            ids, labels = pad_batch(train, idx, pad_id)
            loss = sequence_losses(model, ids, labels).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            losses[step] = float(loss.detach())
        batch_sizes.append(len(idx))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{losses[step]:.4f}", batch=len(idx))
        bar.update(1)
        if loop.eval_every and step % loop.eval_every == 0 and step < loop.steps:
            val_losses[step] = heldout_loss(model, val, pad_id)
    bar.close()
    seconds = time.perf_counter() - start
    val_loss = heldout_loss(model, val, pad_id)
    model.eval()
    out = {"steps": loop.steps, "losses": losses, "final_loss": losses[loop.steps] if losses else None,
           "val_loss": val_loss, "val_losses": {**val_losses, loop.steps: val_loss}, "seconds": seconds,
           "steps_per_second": loop.steps / seconds, "mean_batch": sum(batch_sizes) / len(batch_sizes),
           "batch_sizes": batch_sizes,
           "trainable_parameters": sum(p.numel() for p in params)}  # fmt: skip
    if privacy is not None:
        steps_per_epoch = max(1, round(1 / q))
        per_epoch = {e: epsilon_spent(sigma, q, min(e * steps_per_epoch, loop.steps), privacy.delta,
                                      privacy.accountant)
                     for e in range(1, math.ceil(loop.steps / steps_per_epoch) + 1)}  # fmt: skip
        out.update(epsilon=epsilon_spent(sigma, q, loop.steps, privacy.delta, privacy.accountant),
                   epsilon_per_epoch=per_epoch, target_epsilon=privacy.epsilon, delta=privacy.delta,
                   noise_multiplier=sigma, sample_rate=q, max_grad_norm=privacy.max_grad_norm,
                   accountant=privacy.accountant, privacy_unit="sequence", sampling="poisson",
                   clipped_fraction=sum(clipped_frac) / len(clipped_frac),
                   per_sample_gradients="batched (linear hooks)" if fast is not None else "per-record loop",
                   private_parameters=[n for n, _ in named])  # fmt: skip
    return out
