"""GRPO training stage: rollouts from the fast decoder, rule-based rewards, the clipped GRPO loss, run by the
project's trainer (AdamW, schedule, router bias balancing, atomic checkpoints with resume, metrics).

    from deepseek.train.rl.grpo import GRPOConfig, train_grpo
    result = train_grpo(GRPOConfig(init_from="runs/r1-tiny/sft/checkpoints/step_000200", out_dir="runs/grpo"))

    deepseek recipe r1-tiny --stages grpo        # as the last stage of the r1-tiny recipe

One step: P prompts drawn from `tasks` ("name:difficulty"), G sampled completions each (B = P*G rows), rewards
= grader accuracy + format_weight * format, group-normalised advantages, then `updates_per_batch` optimizer
steps on that batch (ratio clipped against the sampling policy), with the k3 KL to the frozen starting model.
Logged per step (rollouts.jsonl + metrics.jsonl, plotted to grpo.png): reward mean/std, accuracy, format rate,
response length, KL, clip fraction, and held-out greedy accuracy every `eval_every` steps.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ...tasks import get_task
from ..config import TrainConfig
from ..trainer import LossOutput, count_label_tokens, train
from .loss import NORMS, group_advantages, grpo_loss, token_logprobs
from .rollout import evaluate, rollout, to_batch


@dataclass
class GRPOConfig:
    out_dir: str = "runs/grpo"
    init_from: str = "deepseek/r1-base"  # the SFT model (folder or bundled name); also the KL reference
    seed: int = 0
    # what to practise: "task:difficulty" (difficulty = digits for arithmetic); prompts only, no solutions
    tasks: list = field(default_factory=lambda: ["addition:3", "addition:4", "subtraction:3", "subtraction:4",
                                                 "multiplication:2"])  # fmt: skip
    steps: int = 60
    prompts_per_step: int = 8  # P
    group_size: int = 6  # G
    max_new_tokens: int = 256
    temperature: float = 1.0  # sampling temperature; the loss scores tokens with the same tempered policy
    top_p: float = 1.0
    # objective
    lr: float = 2e-4
    warmup_steps: int = 5
    beta: float = 0.02  # KL weight; 0 = no KL term (KL is still logged)
    clip_eps: float = 0.2
    clip_eps_high: float | None = None  # DAPO clip-higher; None = clip_eps
    norm: str = "token"  # "sequence" (GRPO) | "token" (DAPO) | "constant" (Dr. GRPO)
    scale_rewards: bool = True  # divide advantages by the group std (False = Dr. GRPO)
    format_weight: float = 0.1
    updates_per_batch: int = 1  # optimizer steps per rollout batch (>1 makes the ratio and clipping matter)
    grad_clip: float = 1.0
    bias_update_speed: float = 0.0  # router-bias balancing during RL (0 = routing frozen, the policy moves alone)
    # held-out evaluation during training (never-seen prompts; training prompts are excluded)
    eval_tasks: list = field(default_factory=lambda: ["addition:3", "subtraction:3", "addition:4", "subtraction:4"])
    eval_examples: int = 16  # per eval task
    eval_every: int = 10  # 0 = only before and after
    exclude_prompts: list = field(default_factory=list)  # prompts seen in training (kept out of eval)
    save_every: int = 20
    progress: bool = True

    def __post_init__(self):
        for name in ("steps", "prompts_per_step", "group_size", "max_new_tokens", "updates_per_batch"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"GRPOConfig.{name} must be a positive integer, got {value!r}")
        if self.group_size < 2:
            raise ValueError(f"GRPOConfig.group_size must be >= 2 (advantages compare completions), got {self.group_size}")
        if self.norm not in NORMS:
            raise ValueError(f"GRPOConfig.norm={self.norm!r}; allowed: {', '.join(NORMS)}")
        for name in ("beta", "clip_eps", "lr", "format_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"GRPOConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ValueError(f"GRPOConfig.temperature must be > 0 for sampling, got {self.temperature}")
        self.tasks_parsed = parse_tasks(self.tasks, "tasks")
        self.eval_parsed = parse_tasks(self.eval_tasks, "eval_tasks") if self.eval_tasks else []

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["exclude_prompts"] = len(self.exclude_prompts)
        return d


def parse_tasks(items, what: str) -> list[tuple[str, int]]:
    out = []
    for item in items:
        name, _, d = str(item).partition(":")
        task = get_task(name)
        out.append((name, task.check_difficulty(int(d) if d else None)))
    if not out:
        raise ValueError(f"GRPOConfig.{what} is empty; give 'task:difficulty' entries like 'addition:3'")
    return out


def eval_sets(cfg: GRPOConfig, exclude: set[str], seed: int = 10_000) -> dict[str, list[dict]]:
    """Held-out problems per "task:difficulty", none of them in `exclude` (training prompts)."""
    sets = {}
    for name, d in cfg.eval_parsed:
        pool = get_task(name).generate(cfg.eval_examples * 3, seed=seed, difficulty=d)
        sets[f"{name}:{d}"] = [ex for ex in pool if ex["prompt"] not in exclude][: cfg.eval_examples]
    return sets


def sequence_logprobs(model, batch: dict, temperature: float = 1.0) -> torch.Tensor:
    """Log-probs of the batch's tokens under the policy that sampled them: softmax(logits / temperature)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], mtp_loss_weight=0.0)
    logits = out.logits if temperature == 1.0 else out.logits / temperature
    return token_logprobs(logits, batch["input_ids"])  # (B, T)


class RolloutBatches:
    """The trainer's batch source: each new batch is a fresh set of graded rollouts from the current policy
    (served `updates_per_batch` times). Resumable: the prompts of step n depend only on (seed, n)."""

    def __init__(self, cfg: GRPOConfig, model, ref_model, tokenizer, held_out: dict, log_path: Path):
        self.cfg, self.model, self.ref, self.tok, self.held_out, self.log_path = (cfg, model, ref_model, tokenizer,
                                                                                  held_out, log_path)  # fmt: skip
        self.avoid = {ex["prompt"] for exs in held_out.values() for ex in exs}
        self.served, self.current = 0, None

    def __iter__(self):
        return self

    def prompts(self, step: int) -> list[dict]:
        rng = random.Random(f"grpo:{self.cfg.seed}:{step}")
        out = []
        while len(out) < self.cfg.prompts_per_step:
            name, d = rng.choice(self.cfg.tasks_parsed)
            ex = get_task(name).generate(1, seed=rng.randrange(1 << 30), difficulty=d)[0]
            if ex["prompt"] not in self.avoid:
                out.append(ex)
        return out

    def __next__(self) -> dict:
        cfg = self.cfg
        step, repeat = divmod(self.served, cfg.updates_per_batch)
        if repeat == 0 or self.current is None:
            if cfg.eval_every and step % cfg.eval_every == 0 and step > 0:
                log_eval(self.model, self.tok, self.held_out, cfg, step, self.log_path)
            self.current = self.make_batch(step)
        self.served += 1
        return self.current

    @torch.no_grad()
    def make_batch(self, step: int) -> dict:
        cfg = self.cfg
        t0 = time.perf_counter()
        rolls = rollout(self.model, self.tok, self.prompts(step), cfg.group_size, cfg.max_new_tokens,
                        cfg.temperature, cfg.top_p, seed=cfg.seed * 1_000_003 + step,
                        format_weight=cfg.format_weight)  # fmt: skip
        t_roll = time.perf_counter() - t0
        rewards_PG = torch.tensor([r.reward for r in rolls]).view(cfg.prompts_per_step, cfg.group_size)
        adv_B = group_advantages(rewards_PG, scale=cfg.scale_rewards).reshape(-1)
        batch = to_batch(rolls, self.tok.pad_token_id)
        batch["advantages"] = adv_B
        if cfg.updates_per_batch > 1:  # the sampling policy's log-probs, fixed across the repeated updates
            batch["old_logp"] = sequence_logprobs(self.model, batch, cfg.temperature)
        if self.ref is not None:
            batch["ref_logp"] = sequence_logprobs(self.ref, batch, cfg.temperature)
        acc_PG = torch.tensor([r.accuracy for r in rolls]).view(cfg.prompts_per_step, cfg.group_size)
        record = {"step": step + 1, "reward_mean": float(rewards_PG.mean()), "reward_std": float(rewards_PG.std()),
                  "accuracy": float(acc_PG.mean()), "format": sum(r.format for r in rolls) / len(rolls),
                  "response_length": sum(len(r.completion_ids) for r in rolls) / len(rolls),
                  "finished": sum(r.finished for r in rolls) / len(rolls),
                  "solved_groups": float((acc_PG.max(1).values > 0).float().mean()),
                  "zero_signal_groups": float((rewards_PG.std(1) == 0).float().mean()),
                  "rollout_seconds": t_roll, "sample": rolls[0].example["prompt"] + " -> " + rolls[0].text[-80:]}  # fmt: skip
        with open(self.log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        return batch

    def state_dict(self) -> dict:
        return {"served": self.served}

    def load_state_dict(self, state: dict) -> None:
        self.served, self.current = int(state["served"]), None
        if self.served % self.cfg.updates_per_batch:  # mid-batch: regenerate that batch's rollouts
            self.served -= self.served % self.cfg.updates_per_batch


def make_loss_fn(cfg: GRPOConfig):
    def loss_fn(model, batch: dict, config: TrainConfig) -> LossOutput:
        logp = sequence_logprobs(model, batch, cfg.temperature)
        out = grpo_loss(logp, batch["advantages"], batch["completion_mask"], old_logp_BT=batch.get("old_logp"),
                        ref_logp_BT=batch.get("ref_logp"), beta=cfg.beta, clip_eps=cfg.clip_eps,
                        clip_eps_high=cfg.clip_eps_high, norm=cfg.norm)  # fmt: skip
        return LossOutput(out.loss, count_label_tokens(batch),
                          {"kl": out.kl, "clip_fraction": out.clip_fraction, "ratio_mean": out.ratio_mean})

    return loss_fn


def log_eval(model, tokenizer, held_out: dict, cfg: GRPOConfig, step: int, log_path: Path) -> dict:
    record = {"step": step}
    for name, exs in held_out.items():
        res = evaluate(model, tokenizer, exs, max_new_tokens=cfg.max_new_tokens)
        record[f"eval/{name}"] = res["greedy"]
    if len(held_out):
        record["eval/mean"] = sum(v for k, v in record.items() if k.startswith("eval/")) / len(held_out)
    with open(log_path, "a") as f:
        f.write(json.dumps(record) + "\n")
    return record


def train_grpo(cfg: GRPOConfig) -> dict:
    """Run GRPO; returns {"model_dir": final checkpoint, "eval_before", "eval_after", "seconds", ...}."""
    from transformers import AutoTokenizer

    from ...compat.checkpoint import resolve
    from ...model.transformer import R1ForCausalLM

    source = resolve(cfg.init_from)
    if not (source / "tokenizer.json").is_file():
        raise ValueError(f"GRPO init_from={cfg.init_from!r} has no tokenizer.json; give a model folder with its tokenizer")
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "grpo_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    model = R1ForCausalLM.from_pretrained(source, dtype=torch.float32)
    ref = None
    if cfg.beta > 0:
        ref = R1ForCausalLM.from_pretrained(source, dtype=torch.float32).eval().requires_grad_(False)
    held_out = eval_sets(cfg, set(cfg.exclude_prompts))
    log_path = out / "rollouts.jsonl"
    t0 = time.perf_counter()
    resuming = (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir())
    if not resuming:
        log_path.write_text("")
        before = log_eval(model, tokenizer, held_out, cfg, 0, log_path)
    else:
        before = next((json.loads(x) for x in log_path.read_text().splitlines() if '"eval/' in x), {})
    B = cfg.prompts_per_step * cfg.group_size
    tc = TrainConfig(out_dir=str(out), init_from=str(source), tokenizer=str(source), mode="sft", batch_size=B,
                     micro_batch_size=B, max_steps=cfg.steps * cfg.updates_per_batch, lr=cfg.lr, min_lr_ratio=1.0,
                     warmup_steps=cfg.warmup_steps, weight_decay=0.0, grad_clip=cfg.grad_clip,
                     bias_update_speed=cfg.bias_update_speed,
                     seq_len=cfg.max_new_tokens, save_every=cfg.save_every * cfg.updates_per_batch,
                     seed=cfg.seed, progress=cfg.progress)  # fmt: skip
    batches = RolloutBatches(cfg, model, ref, tokenizer, held_out, log_path)
    metrics = train(tc, model=model, train_batches=batches, loss_fn=make_loss_fn(cfg))
    after = log_eval(model, tokenizer, held_out, cfg, cfg.steps, log_path)
    plot_grpo(out, out / "grpo.png")
    result = {"model_dir": metrics["checkpoint"], "eval_before": before, "eval_after": after,
              "seconds": time.perf_counter() - t0, "steps": cfg.steps}  # fmt: skip
    (out / "grpo_result.json").write_text(json.dumps(result, indent=2))
    return result


def plot_grpo(out_dir, png_path) -> Path:
    """Reward, accuracy (training rollouts and held-out greedy), response length, KL and clip fraction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    rows = [json.loads(x) for x in (out_dir / "rollouts.jsonl").read_text().splitlines() if x.strip()]
    metrics = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines() if x.strip()] \
        if (out_dir / "metrics.jsonl").is_file() else []  # fmt: skip
    roll = [r for r in rows if "reward_mean" in r]
    evals = [r for r in rows if "eval/mean" in r]
    fig, axes = plt.subplots(1, 5, figsize=(21, 3.6))
    steps = [r["step"] for r in roll]
    ax = axes[0]
    ax.plot(steps, [r["reward_mean"] for r in roll], label="mean")
    ax.fill_between(steps, [r["reward_mean"] - r["reward_std"] for r in roll],
                    [r["reward_mean"] + r["reward_std"] for r in roll], alpha=0.2, label="± std")  # fmt: skip
    ax.set_title("reward")
    ax.legend()
    ax = axes[1]
    ax.plot(steps, [r["accuracy"] for r in roll], label="rollouts (sampled)", alpha=0.7)
    for key in sorted({k for r in evals for k in r if k.startswith("eval/")}):
        ax.plot([r["step"] for r in evals], [r[key] for r in evals], "o-", ms=3, label=f"held-out {key[5:]} (greedy)")
    ax.set_title("accuracy")
    ax.legend(fontsize=7)
    axes[2].plot(steps, [r["response_length"] for r in roll])
    axes[2].set_title("response length (tokens)")
    axes[3].plot([m["step"] for m in metrics if "kl" in m], [m["kl"] for m in metrics if "kl" in m])
    axes[3].set_title("KL to reference (k3)")
    axes[4].plot([m["step"] for m in metrics if "clip_fraction" in m],
                 [m["clip_fraction"] for m in metrics if "clip_fraction" in m])  # fmt: skip
    axes[4].set_title("clip fraction")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(f"GRPO: {out_dir}")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return Path(png_path)
