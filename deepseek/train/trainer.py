"""The training loop: pretraining and SFT, one process or many (torchrun, DDP or FSDP2), exact resume.

    from deepseek.train.trainer import train
    from deepseek.train.config import preset
    metrics = train(preset("debug", data="corpus.txt", tokenizer="runs/tok", out_dir="runs/x"))

    # or with your own model, batches and loss (GRPO, routing experiments, ...):
    metrics = train(cfg, model=model, train_batches=it, val_batches=val_it, loss_fn=my_loss)

Launch:
    deepseek train --preset debug --set data=corpus.txt tokenizer=runs/tok       # one process
    torchrun --nproc_per_node 2 -m deepseek.cli train --preset debug ...           # DDP (gloo on CPU)
    torchrun --nproc_per_node 2 -m deepseek.cli train ... --set parallel=fsdp      # FSDP2 fully_shard
    torchrun --nnodes 2 --node_rank $R --master_addr $HOST --master_port 29500 --nproc_per_node 8 \\
        -m deepseek.cli train ...                                                   # multi-node (NCCL)

A step: one global batch of `batch_size` sequences (same for every world size; each rank takes its slice and
walks it in micro-batches of `micro_batch_size`), loss = sum of token losses / label tokens in the global batch,
clip, AdamW, LR schedule, then the DeepSeek-V3 router bias update from the step's global expert loads.

The loss is a hook: `loss_fn(model, batch, config) -> LossOutput(loss, tokens, stats)` where `loss` is the mean
over `tokens` label tokens. The default, `causal_lm_loss`, is next-token cross-entropy + MTP + sequence aux loss.
Shapes: B sequences, T tokens.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ..model.config import R1Config
from ..model.transformer import R1ForCausalLM
from . import checkpoint as ckpt
from .balance import LoadTracker, record_routing, sequence_aux_loss, update_router_bias
from .config import TrainConfig
from .data import IGNORE


# ---------------------------------------------------------------------------- loss hook
@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, mean over `tokens`
    tokens: int  # label tokens the mean is over (weights micro-batches and ranks)
    stats: dict = field(default_factory=dict)  # extra scalars to log (floats)


def count_label_tokens(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def causal_lm_loss(model, batch: dict, config: TrainConfig) -> LossOutput:
    """Next-token cross-entropy on labelled tokens (+ mtp_loss_weight * MTP loss inside the model)
    (+ seq_aux_alpha * the sequence-wise balance loss)."""
    recording = record_routing(unwrap(model)) if config.seq_aux_alpha > 0 else nullcontext([])
    with recording as routings:
        out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=batch["labels"],
                    mtp_loss_weight=config.mtp_loss_weight)  # fmt: skip
    loss, stats, tokens = out.loss, {}, count_label_tokens(batch)
    if tokens == 0:  # nothing labelled here (e.g. an all-prompt SFT block): a zero loss that still reaches
        loss = out.logits.sum() * 0.0  # every logit, so DDP/FSDP see the same graph on every rank
    if config.seq_aux_alpha > 0:
        mask = batch.get("attention_mask")
        aux = sequence_aux_loss(routings, batch["input_ids"].shape[0], mask)
        loss = loss + config.seq_aux_alpha * aux
        stats["seq_aux"] = float(aux.detach())
    return LossOutput(loss, tokens, stats)


# ---------------------------------------------------------------------------- batches from tensors
class TokenBatches:
    """Random windows of seq_len tokens from one long token stream (pretraining on a tokenised corpus).
    Step n's batch depends only on (seed, n), so the data position is just n."""

    def __init__(self, tokens: torch.Tensor, seq_len: int, batch_size: int, seed: int = 0):
        if tokens.dim() != 1 or tokens.numel() <= seq_len:
            raise ValueError(f"need a 1-D token stream longer than seq_len={seq_len}, got {tuple(tokens.shape)}")
        self.tokens, self.seq_len, self.batch_size, self.seed, self.step = tokens.long(), seq_len, batch_size, seed, 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.step)
        starts = torch.randint(0, self.tokens.numel() - self.seq_len + 1, (self.batch_size,), generator=g)
        ids_BT = torch.stack([self.tokens[s : s + self.seq_len] for s in starts.tolist()])
        self.step += 1
        return {"input_ids": ids_BT, "labels": ids_BT.clone()}

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


def data_state(batches) -> dict:
    return batches.state_dict() if hasattr(batches, "state_dict") else {}


def restore_data(batches, state: dict, consumed: int) -> None:
    """Put the batch source where the checkpoint left it: its own state when it has one, else replay."""
    if hasattr(batches, "load_state_dict") and state:
        batches.load_state_dict(state)
    else:
        for _ in range(consumed):
            next(batches)


# ---------------------------------------------------------------------------- distributed
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False  # we initialised the process group (and tear it down)

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_type: str) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group(backend)
        owns = True
    return Dist(rank, world, local, owns)


def all_sum(values: list[float], device) -> list[float]:
    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def parallelize(model: nn.Module, mode: str, device: torch.device) -> nn.Module:
    """DDP: replicate and all-reduce grads. FSDP2: shard every decoder layer, then the root (parameters
    become DTensors sharded on dim 0; each layer is gathered just in time for its forward/backward)."""
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        unused = any(True for _ in getattr(model, "mtp", []))  # MTP idle when its loss weight is 0
        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                   find_unused_parameters=unused)  # fmt: skip
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        base = getattr(model, "model", model)
        for layer in list(getattr(base, "layers", [])) + [m.block for m in getattr(model, "mtp", [])]:
            fully_shard(layer)
        fully_shard(model)
        return model
    return model


def compile_blocks(model: nn.Module) -> int:
    """torch.compile the static-shape parts of every decoder layer (attention, norms, dense MLP, shared experts);
    the routed experts keep their data-dependent shapes in eager mode. The eager model is the reference path.
    Returns how many modules were compiled."""
    from ..model.moe import MoE

    compiled = 0
    base = getattr(model, "model", model)
    for layer in getattr(base, "layers", []):
        parts = [layer.self_attn, layer.input_layernorm, layer.post_attention_layernorm]
        parts.append(layer.mlp.shared_experts if isinstance(layer.mlp, MoE) else layer.mlp)
        for part in parts:
            if part is not None:
                part.compile()
                compiled += 1
    return compiled


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model, nn.parallel.DistributedDataParallel) \
        else model  # fmt: skip


def set_grad_sync(model: nn.Module, enabled: bool) -> None:
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
    elif isinstance(model, nn.parallel.DistributedDataParallel):
        model.require_backward_grad_sync = enabled


# ---------------------------------------------------------------------------- optimizer and schedule
def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (and stacked expert matrices); never norms, biases or other 1-D tensors."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(step: int, config: TrainConfig) -> float:
    """Linear warmup to 1, then cosine to min_lr_ratio at max_steps."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    span = max(1, config.max_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def full_state(model: nn.Module, optimizer) -> tuple[dict, dict]:
    """Full (unsharded) CPU state dicts of model and optimizer, keyed by parameter name. Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer(model: nn.Module, optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    # strict=False: AdamW keeps no state for a parameter that never got a gradient (e.g. the MTP module during
    # GRPO, whose loss does not use it); such a parameter legitimately has nothing to restore.
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True, strict=False))


# ---------------------------------------------------------------------------- setup helpers
def resolve_device(config: TrainConfig) -> torch.device:
    if config.device != "auto":
        return torch.device(config.device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def autocast_dtype(config: TrainConfig, device: torch.device):
    if config.dtype == "bfloat16" or (config.dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def build_model(config: TrainConfig) -> R1ForCausalLM:
    if config.init_from:
        return R1ForCausalLM.from_pretrained(config.init_from, dtype=torch.float32)
    torch.manual_seed(config.seed)
    model_cfg = R1Config(**config.model)
    model_cfg.build_mtp = config.mtp_loss_weight > 0 and model_cfg.num_nextn_predict_layers > 0
    model_cfg.mtp_loss_weight = config.mtp_loss_weight
    return R1ForCausalLM(model_cfg)


def build_batches(config: TrainConfig, tokenizer_dir, show_progress: bool):
    """(train, val) batch sources from config.data: a file/folder/dataset name, or `task:NAME[,NAME]@N`
    (N generated examples per task, as chat SFT records)."""
    from transformers import AutoTokenizer

    from .data import BatchIterator, prepare_data

    if tokenizer_dir is None:
        raise ValueError("config.data needs a tokenizer: set tokenizer=<folder> or init_from=<model folder>")
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    source = config.data
    if source.startswith("task:"):
        from ..tasks import get_task

        names, _, n = source[len("task:"):].partition("@")
        source = [{"messages": ex["messages"]} for name in names.split(",")
                  for ex in get_task(name).generate(int(n or 1000), seed=config.seed)]  # fmt: skip
    data = prepare_data(source, tokenizer, block_size=config.seq_len, show_progress=show_progress)
    train_it = BatchIterator(data.train, batch_size=config.batch_size, seed=config.seed)
    val = data.val
    if config.val_data:
        val = prepare_data(config.val_data, tokenizer, block_size=config.seq_len, val_fraction=0.0,
                           show_progress=show_progress).train  # fmt: skip
    val_it = None
    if val is not None and len(val) >= config.micro_batch_size:
        val_it = BatchIterator(val, batch_size=min(config.batch_size, len(val)), seed=0, shuffle=False)
    return train_it, val_it


def check_inputs(config: TrainConfig) -> None:
    """The run's inputs (data, val_data, init_from, tokenizer), each checked with one clear line before anything
    is written (before, `--data missing.jsonl` wrote train_config.json and then asked for a tokenizer)."""
    from .data import FILE_SUFFIXES, _cached_hub_dataset

    if config.data is None:
        raise ValueError("no training data: set data=<file | folder | dataset name | task:NAME> or pass train_batches")
    for key in ("data", "val_data"):
        source = getattr(config, key)
        if not source or not isinstance(source, str):
            continue
        if source.startswith("task:"):
            from ..tasks import get_task

            names, _, n = source[len("task:"):].partition("@")
            for name in names.split(","):
                get_task(name)  # an unknown name: ValueError listing the tasks
            if n and not (n.isdigit() and int(n) > 0):
                raise ValueError(f"{key}={source}: the count after @ must be a positive integer")
            continue
        path = Path(source).expanduser()
        if not path.exists() and (path.suffix.lower() in FILE_SUFFIXES or _cached_hub_dataset(source, "train") is None):
            raise FileNotFoundError(f"{key}={source}: no such file or folder, and no dataset of that name in the "
                                    "local Hugging Face cache")  # fmt: skip
    if config.init_from:
        from ..compat.checkpoint import resolve

        resolve(config.init_from)  # FileNotFoundError naming the bundled models
    if tokenizer_source(config) is None:
        raise ValueError("config.data needs a tokenizer: set tokenizer=<folder> or init_from=<model folder>")


def tokenizer_source(config: TrainConfig):
    for candidate in (config.tokenizer, config.init_from):
        if candidate and (Path(candidate) / "tokenizer.json").is_file():
            return Path(candidate)
    if config.init_from:
        from ..compat.checkpoint import resolve

        path = resolve(config.init_from)
        if (path / "tokenizer.json").is_file():
            return path
    return Path(config.tokenizer) if config.tokenizer else None


# ---------------------------------------------------------------------------- the loop
def train(config: TrainConfig, model: nn.Module | None = None, train_batches: Iterator[dict] | None = None,
          val_batches=None, loss_fn: Callable[..., LossOutput] | None = None) -> dict:  # fmt: skip
    """Train per `config`; returns the run's metrics (losses per step, final/val loss, tokens/s, checkpoint).

    train_batches yields *global* batches ({"input_ids": (batch_size, T), "labels": (batch_size, T), optional
    "attention_mask"}); with `state_dict`/`load_state_dict` its position is checkpointed, otherwise it is
    replayed on resume. val_batches: a list of batches or such an iterator (the same batches every eval)."""
    device = resolve_device(config)
    env = setup_distributed(device.type)
    try:
        return Run(config, env, device, model, train_batches, val_batches, loss_fn or causal_lm_loss).loop()
    finally:
        if env.owns_group:
            dist.destroy_process_group()


class Run:
    def __init__(self, config, env: Dist, device, model, train_batches, val_batches, loss_fn):
        self.config, self.env, self.device, self.loss_fn = config, env, device, loss_fn
        mode = config.parallel if config.parallel != "auto" else "ddp"
        self.mode = mode if env.world > 1 else "none"
        self.out = Path(config.out_dir)
        if train_batches is None:
            check_inputs(config)  # before anything is written
        if env.main:
            self.out.mkdir(parents=True, exist_ok=True)
            config.save(self.out / "train_config.json")
        self.tokenizer_dir = tokenizer_source(config)
        if train_batches is None:
            if config.data is None:
                raise ValueError("no training data: set data=<file | folder | dataset name | task:NAME> "
                                 "or pass train_batches")  # fmt: skip
            train_batches, built_val = build_batches(config, self.tokenizer_dir, env.main and config.progress)
            val_batches = val_batches if val_batches is not None else built_val
        self.train_batches, self.val_batches = train_batches, val_batches
        self.val_state = data_state(val_batches) if not isinstance(val_batches, list | tuple) else None
        self.accum = config.grad_accum(env.world)
        self.per_rank = config.batch_size // env.world

        self.model = model if model is not None else build_model(config)
        self.resume_from = ckpt.latest_checkpoint(self.out) if config.resume else None
        if self.resume_from is not None:
            ckpt.load_model_state(self.model, self.resume_from)
        self.model.to(device).train()
        if config.compile:
            compile_blocks(self.model)
        self.tracker = LoadTracker(self.model)
        self.wrapped = parallelize(self.model, self.mode, device)
        self.optimizer = torch.optim.AdamW(param_groups(self.wrapped, config.weight_decay), lr=config.lr,
                                           betas=(config.beta1, config.beta2), eps=config.eps)  # fmt: skip
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, config))
        self.amp = autocast_dtype(config, device)
        self.step, self.tokens = 0, 0
        if self.resume_from is not None:
            state = ckpt.load_training_state(self.resume_from)
            load_optimizer(self.wrapped, self.optimizer, state["optimizer"])
            t = state["trainer"]
            self.step, self.tokens = int(t["step"]), int(t["tokens"])
            self.scheduler.load_state_dict(t["scheduler"])
            restore_data(self.train_batches, t["data"], self.step)
            ckpt.set_rng_state(state["rng"])
        self.metrics_path = self.out / "metrics.jsonl"
        if env.main:
            self._truncate_metrics()

    # ------------------------------------------------------------------ pieces
    def _truncate_metrics(self) -> None:
        """Drop records past the resumed step (left by the interrupted run) so the log reads as one run."""
        if not self.metrics_path.exists():
            return
        keep = [line for line in self.metrics_path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= self.step]  # fmt: skip
        self.metrics_path.write_text("".join(line + "\n" for line in keep))

    def log(self, record: dict) -> None:
        if self.env.main:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def local_micro_batches(self, batch: dict) -> list[dict]:
        if "labels" not in batch:
            if self.config.mode == "sft":
                raise ValueError("mode=sft needs batches with masked `labels` (assistant tokens only)")
            batch = {**batch, "labels": batch["input_ids"]}
        B = batch["input_ids"].shape[0]
        if B != self.config.batch_size:
            raise ValueError(f"a batch has {B} sequences but TrainConfig.batch_size={self.config.batch_size}")
        lo = self.env.rank * self.per_rank
        mb = self.config.micro_batch_size
        return [{k: v[lo + i * mb : lo + (i + 1) * mb].to(self.device) for k, v in batch.items()
                 if isinstance(v, torch.Tensor)} for i in range(self.accum)]  # fmt: skip

    def train_step(self, batch: dict) -> dict:
        micro = self.local_micro_batches(batch)
        n_local = sum(count_label_tokens(m) for m in micro)
        (n_global,) = all_sum([float(n_local)], self.device)
        self.tracker.reset()
        loss_sum, stats_sum = 0.0, {}
        for i, mb in enumerate(micro):
            set_grad_sync(self.wrapped, i == len(micro) - 1)
            with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
                out = self.loss_fn(self.wrapped, mb, self.config)
            (out.loss * (out.tokens / max(n_global, 1.0) * self.env.world)).backward()
            loss_sum += float(out.loss.detach()) * out.tokens
            for k, v in out.stats.items():
                stats_sum[k] = stats_sum.get(k, 0.0) + float(v) * out.tokens
        grad_norm = 0.0
        if self.config.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.wrapped.parameters(), self.config.grad_clip)
            grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        balance = update_router_bias(self.tracker.layers, self.tracker.global_counts(), self.config.bias_update_speed)
        keys = sorted(stats_sum)
        summed = all_sum([loss_sum] + [stats_sum[k] for k in keys], self.device)
        denom = max(n_global, 1.0)
        record = {"loss": summed[0] / denom, "lr": lr, "grad_norm": grad_norm, **balance}
        record.update({k: v / denom for k, v in zip(keys, summed[1:])})
        return record

    @torch.no_grad()
    def evaluate(self) -> float | None:
        if self.val_batches is None:
            return None
        if self.val_state is not None:
            restore_data(self.val_batches, self.val_state, 0)
        source = iter(self.val_batches) if isinstance(self.val_batches, list | tuple) else self.val_batches
        self.wrapped.eval()
        loss_sum, n_sum = 0.0, 0.0
        for _ in range(self.config.eval_batches):
            batch = next(source, None)
            if batch is None:
                break
            batch = {**batch, "labels": batch.get("labels", batch["input_ids"])}
            per_rank = batch["input_ids"].shape[0] // self.env.world
            lo = self.env.rank * per_rank
            for i in range(0, per_rank, self.config.micro_batch_size):
                mb = {k: v[lo + i : lo + min(i + self.config.micro_batch_size, per_rank)].to(self.device)
                      for k, v in batch.items() if isinstance(v, torch.Tensor)}  # fmt: skip
                n = count_label_tokens(mb)
                with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
                    out = self.wrapped(input_ids=mb["input_ids"], attention_mask=mb.get("attention_mask"),
                                       labels=mb["labels"], mtp_loss_weight=0.0)  # fmt: skip
                if n:
                    loss_sum, n_sum = loss_sum + float(out.loss) * n, n_sum + n
        self.wrapped.train()
        loss_sum, n_sum = all_sum([loss_sum, n_sum], self.device)
        return loss_sum / n_sum if n_sum else None

    def save(self) -> Path | None:
        model_state, optim_state = full_state(self.wrapped, self.optimizer)
        path = None
        if self.env.main:
            trainer_state = {"step": self.step, "tokens": self.tokens, "scheduler": self.scheduler.state_dict(),
                             "data": data_state(self.train_batches), "world_size": self.env.world}  # fmt: skip
            path = ckpt.save_checkpoint(self.out, self.step, self.model, model_state, optim_state, trainer_state,
                                        self.tokenizer_dir, self.config.keep_checkpoints)  # fmt: skip
        if self.env.world > 1:
            dist.barrier()
        return path

    # ------------------------------------------------------------------ loop
    def loop(self) -> dict:
        from tqdm.auto import tqdm

        config, env = self.config, self.env
        bar = tqdm(total=config.max_steps, initial=self.step, unit="step", dynamic_ncols=True,
                   disable=not (env.main and config.progress), desc="train")  # fmt: skip
        losses, rates, val_loss, path = {}, [], None, None
        start = time.perf_counter()
        while self.step < config.max_steps:
            t0 = time.perf_counter()
            batch = next(self.train_batches)
            record = self.train_step(batch)
            self.step += 1
            step_tokens = int(batch["input_ids"].numel())
            self.tokens += step_tokens
            dt = time.perf_counter() - t0
            rates.append(step_tokens / dt)
            losses[self.step] = record["loss"]
            record = {"step": self.step, **record, "tokens": self.tokens, "tokens_per_second": step_tokens / dt,
                      "elapsed": time.perf_counter() - start}  # fmt: skip
            last = self.step == config.max_steps
            if self.step % config.log_every == 0 or last:
                self.log(record)
            bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{step_tokens / dt:,.0f}")
            bar.update(1)
            if (config.eval_every and self.step % config.eval_every == 0) or last:
                val_loss = self.evaluate()
                if val_loss is not None:
                    self.log({"step": self.step, "val_loss": val_loss})
                    bar.write(f"step {self.step}: val_loss {val_loss:.4f}") if env.main and config.progress else None
            if (config.save_every and self.step % config.save_every == 0) or last:
                path = self.save()
        bar.close()
        self.tracker.close()
        if env.main and self.metrics_path.exists():
            from .plot import plot_metrics

            plot_metrics(self.metrics_path, self.out / "curves.png")
        steady = rates[1:] or rates  # the first step pays one-time warm-up costs
        return {
            "steps": self.step,
            "losses": losses,
            "final_loss": losses[max(losses)] if losses else None,
            "val_loss": val_loss,
            "tokens": self.tokens,
            "tokens_per_second": sum(steady) / len(steady) if steady else 0.0,
            "seconds": time.perf_counter() - start,
            "checkpoint": str(path or ckpt.latest_checkpoint(self.out) or ""),
            "out_dir": str(self.out),
            "world_size": env.world,
            "parallel": self.mode,
        }
