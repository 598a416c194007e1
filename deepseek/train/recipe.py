"""The r1-tiny recipe: tokenizer -> pretraining -> cold-start SFT -> GRPO, on a CPU, in one command.

    deepseek recipe r1-tiny --out runs/r1-tiny            # all stages; a finished stage is skipped on rerun
    deepseek recipe r1-tiny --out runs/r1-tiny --stages tokenizer,pretrain,sft
    deepseek recipe r1-tiny --out runs/r1-tiny --bundle   # then copy the models into deepseek/bundled

From Python: `run_recipe(recipe("r1-tiny", out_dir=...), stages)`, then `bundle_outputs(record, "r1-tiny")`
(what `deepseek recipe` calls; deepseek/cli/recipe.py only parses the arguments).

Stages and what they leave under <out>:
    tokenizer/   byte-level BPE (1K vocab, one token per digit) trained on task text + prose
    pretrain/    next-token training on plain-text problems with worked solutions (+ passkey, countdown, prose)
    sft/         cold-start SFT on chat examples: reasoning inside <think>, then the answer (assistant-only loss)
    sft2/        a second SFT pass on fresh examples with a bigger batch (sft2_steps=0 skips it)
    sft3/        a third pass weighted towards the hardest in-distribution sets (2-digit multiplication,
                 3-digit subtraction), longer blocks for the long multiplication traces (sft3_steps=0 skips it)
    sft4/        off by default (sft4_steps=0): the same mixture again on fresh examples at half the learning
                 rate; `recipe("r1-tiny", sft4_steps=800)` is the SFT-only comparison for GRPO
    grpo/        GRPO with rule-based rewards (grader accuracy + <think> format) on prompts only, from the last
                 SFT stage (sft3), 256 rollouts per step weighted to 3-digit subtraction
    recipe.json  the resolved recipe and the wall-clock seconds of each stage

The model is DeepSeek-V3 in miniature: MLA, DeepSeekMoE (1 shared + 8 routed experts, top-2, sigmoid gates,
group-limited routing, auxiliary-loss-free bias balancing), one MTP module.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from .config import preset

STAGES = ("tokenizer", "pretrain", "sft", "sft2", "sft3", "sft4", "grpo")
SFT_STAGES = ("sft", "sft2", "sft3", "sft4")  # in order; each starts from the latest one finished before it


def latest_sft(outputs: dict, before: str | None = None) -> str:
    """The last finished SFT stage (before `before`, if given)."""
    stages = SFT_STAGES[: SFT_STAGES.index(before)] if before else SFT_STAGES
    found = next((s for s in reversed(stages) if s in outputs), None)
    if found is None:
        raise ValueError(f"no finished SFT stage ({', '.join(stages)}) in this run; run the sft stage first")
    return found


def stage_input(outputs: dict, needed: str, stage: str) -> Path:
    """The output folder of an earlier stage that `stage` starts from; a clear error when it never ran."""
    if needed not in outputs:
        raise ValueError(f"recipe stage {stage} starts from the {needed} stage, which has not run in this folder")
    return Path(outputs[needed])


def r1_tiny_model() -> dict:
    """R1Config fields of r1-tiny (about 2M parameters)."""
    return dict(
        vocab_size=1024, hidden_size=128, intermediate_size=384, moe_intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=4, kv_lora_rank=64, q_lora_rank=96, qk_rope_head_dim=16, qk_nope_head_dim=32,
        v_head_dim=32, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=2,
        first_k_dense_replace=1, routed_scaling_factor=2.5, max_position_embeddings=1024,
        num_nextn_predict_layers=1, bos_token_id=0, eos_token_id=1, pad_token_id=2, tie_word_embeddings=False,
    )  # fmt: skip


@dataclass
class RecipeConfig:
    out_dir: str = "runs/r1-tiny"
    model: dict = field(default_factory=r1_tiny_model)
    vocab_size: int = 1024
    seed: int = 0
    # which digits the supervised stages see (traces); GRPO also gets prompts with more digits
    sft_digits: tuple = (1, 2, 3)
    mul_digits: tuple = (1, 2)
    # pretraining
    pretrain_examples: int = 24000  # problems with worked solutions, as plain text
    pretrain_steps: int = 700
    pretrain_seq_len: int = 256
    pretrain_batch: int = 8
    pretrain_lr: float = 3e-3
    # cold-start SFT
    sft_examples: int = 6000
    sft_steps: int = 400
    sft_seq_len: int = 256
    sft_batch: int = 8
    sft_lr: float = 1e-3
    # a second SFT pass on fresh examples (bigger batch), from the first pass's checkpoint
    sft2_examples: int = 24000
    sft2_steps: int = 600
    sft2_batch: int = 16
    sft2_seed: int = 7
    # a third pass weighted towards what the second one left weakest ({"task:difficulty": share})
    sft3_examples: int = 16000
    sft3_steps: int = 500
    sft3_batch: int = 16
    sft3_seq_len: int = 384  # a 2-digit multiplication trace is ~320 tokens
    sft3_seed: int = 11
    sft3_mix: dict = field(default_factory=lambda: {
        "addition:1": 0.03, "addition:2": 0.07, "addition:3": 0.10, "subtraction:1": 0.03, "subtraction:2": 0.07,
        "subtraction:3": 0.15, "multiplication:1": 0.05, "multiplication:2": 0.35, "countdown:3": 0.075,
        "passkey:64": 0.0375, "passkey:96": 0.0375})  # fmt: skip
    # a fourth pass: sft3_mix on fresh examples (another seed), lower learning rate, from sft3's checkpoint.
    # 0 = skipped (the default): GRPO starts from sft3. 800 steps is the SFT-only comparison (docs/reasoning.md).
    sft4_examples: int = 16000
    sft4_steps: int = 0
    sft4_seed: int = 23
    sft4_lr: float = 5e-4
    # GRPO (fields of GRPOConfig, merged over its defaults): 256 rollouts per step (32 prompts x 8), weighted to
    # the set SFT leaves weakest (3-digit subtraction), std-scaled advantages, no KL term
    grpo: dict = field(default_factory=lambda: dict(
        steps=30, prompts_per_step=32, group_size=8, max_new_tokens=352, temperature=1.0, lr=2e-5, beta=0.0,
        scale_rewards=True, norm="token", eval_every=10, eval_examples=32,
        tasks=["addition:3", "subtraction:2", "subtraction:3", "subtraction:3", "subtraction:3", "multiplication:2"],
        eval_tasks=["addition:2", "subtraction:2", "addition:3", "subtraction:3", "multiplication:2"]))

    def __post_init__(self):
        for name in ("pretrain_examples", "pretrain_steps", "pretrain_seq_len", "pretrain_batch", "sft_examples",
                     "sft_steps", "sft_seq_len", "sft_batch", "vocab_size"):  # fmt: skip
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"RecipeConfig.{name} must be a positive integer, got {value!r}")
        self.sft_digits, self.mul_digits = tuple(self.sft_digits), tuple(self.mul_digits)
        if not self.sft_digits or min(self.sft_digits) < 1:
            raise ValueError(f"RecipeConfig.sft_digits must be digit counts >= 1, got {self.sft_digits}")

    def save(self, path) -> None:
        Path(path).write_text(json.dumps(dataclasses.asdict(self), indent=2))


def recipe(name: str, **overrides) -> RecipeConfig:
    """Named recipes: `r1-tiny` (the bundled model, ~1 h on 2 CPU cores) and `debug` (a minute, for tests)."""
    if name == "r1-tiny":
        return RecipeConfig(**overrides)
    if name == "debug":
        small = dict(r1_tiny_model(), vocab_size=384, hidden_size=48, intermediate_size=96, moe_intermediate_size=32,
                     num_hidden_layers=2, kv_lora_rank=16, q_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=8,
                     v_head_dim=8)  # fmt: skip
        kw = dict(model=small, vocab_size=384, pretrain_examples=300, pretrain_steps=4, pretrain_batch=4,
                  pretrain_seq_len=128, sft_examples=100, sft_steps=4, sft_batch=4, sft_seq_len=192,
                  sft2_examples=60, sft2_steps=2, sft2_batch=4, sft3_examples=60, sft3_steps=2, sft3_batch=4,
                  sft3_seq_len=192, sft4_examples=60, sft4_steps=2,
                  sft_digits=(1, 2), mul_digits=(1,),
                  grpo=dict(steps=2, prompts_per_step=2, group_size=4, max_new_tokens=48, tasks=["addition:1", "addition:2"],
                            eval_tasks=["addition:2"], eval_every=0, eval_examples=4, save_every=2))  # fmt: skip
        kw.update(overrides)
        return RecipeConfig(**kw)
    raise ValueError(f"unknown recipe {name!r}; choose one of: r1-tiny, debug")


# ---------------------------------------------------------------------------- data
def task_examples(cfg: RecipeConfig, n: int, seed: int, mix: dict | None = None) -> list[dict]:
    """A reasoning mixture: ~80% arithmetic (add/sub over sft_digits, mul over mul_digits), the rest countdown
    (3 numbers) and short passkey retrieval; or `mix` ({"task:difficulty": share}). Deterministic in (n, seed)."""
    from ..tasks import get_task

    if mix is not None:
        plan = [(spec.split(":")[0], int(spec.split(":")[1]), share) for spec, share in mix.items()]
    else:
        plan = [("addition", d, 0.30 / len(cfg.sft_digits)) for d in cfg.sft_digits]
        plan += [("subtraction", d, 0.30 / len(cfg.sft_digits)) for d in cfg.sft_digits]
        plan += [("multiplication", d, 0.20 / len(cfg.mul_digits)) for d in cfg.mul_digits]
        plan += [("countdown", 3, 0.10), ("passkey", 64, 0.05), ("passkey", 96, 0.05)]
    out = []
    for name, difficulty, share in plan:
        out += get_task(name).generate(max(1, round(n * share)), seed=seed, difficulty=difficulty)
    return out


def pretrain_records(cfg: RecipeConfig) -> list[dict]:
    from ..tasks.filler import PROSE

    texts = [{"text": f"{ex['prompt']}\n{ex['reasoning']}\nAnswer: {ex['answer']}"}
             for ex in task_examples(cfg, cfg.pretrain_examples, seed=cfg.seed + 1)]  # fmt: skip
    paragraphs = [p.strip() for p in PROSE.split("\n\n") if p.strip()]
    return texts + [{"text": p} for p in paragraphs] * 4


def sft_records(cfg: RecipeConfig, mix: dict | None = None) -> list[dict]:
    return [{"messages": ex["messages"]} for ex in task_examples(cfg, cfg.sft_examples, seed=cfg.seed + 2, mix=mix)]


def sft2_config(cfg: RecipeConfig) -> RecipeConfig:
    return dataclasses.replace(cfg, sft_examples=cfg.sft2_examples, seed=cfg.sft2_seed)


def training_prompts(cfg: RecipeConfig) -> set[str]:
    """Every prompt the supervised stages trained on (held-out evaluation excludes them)."""
    exs = task_examples(cfg, cfg.pretrain_examples, cfg.seed + 1) + task_examples(cfg, cfg.sft_examples, cfg.seed + 2)
    if cfg.sft2_steps:
        exs += task_examples(cfg, cfg.sft2_examples, cfg.sft2_seed + 2)
    if cfg.sft3_steps:
        exs += task_examples(cfg, cfg.sft3_examples, cfg.sft3_seed + 2, cfg.sft3_mix)
    if cfg.sft4_steps:
        exs += task_examples(cfg, cfg.sft4_examples, cfg.sft4_seed + 2, cfg.sft3_mix)
    return {ex["prompt"] for ex in exs}


# ---------------------------------------------------------------------------- stages
def stage_done(stage_dir: Path, steps: int) -> Path | None:
    from .checkpoint import latest_checkpoint

    last = latest_checkpoint(stage_dir)
    return last if last is not None and last.name == f"step_{steps:06d}" else None


def run_tokenizer(cfg: RecipeConfig, out: Path) -> Path:
    from ..tokenizer import default_corpus, train_tokenizer

    folder = out / "tokenizer"
    if (folder / "tokenizer.json").is_file():
        return folder
    corpus = default_corpus(n_per_task=200, seed=cfg.seed) + [r["text"] for r in pretrain_records(cfg)[:3000]]
    train_tokenizer(corpus, vocab_size=cfg.vocab_size, out_dir=folder)
    return folder


def _blocks(records, tokenizer, block_size: int, batch: int, seed: int, split_documents=None):
    from .data import BatchIterator, prepare_data

    data = prepare_data(records, tokenizer, block_size=block_size, val_fraction=0.02, split_documents=split_documents)
    train_it = BatchIterator(data.train, batch_size=batch, seed=seed)
    val_it = BatchIterator(data.val, batch_size=min(batch, len(data.val)), seed=0, shuffle=False) \
        if data.val is not None and len(data.val) >= 1 else None  # fmt: skip
    return train_it, val_it, data.stats


def run_pretrain(cfg: RecipeConfig, out: Path, tok_dir: Path) -> Path:
    from transformers import AutoTokenizer

    from .trainer import train

    stage = out / "pretrain"
    done = stage_done(stage, cfg.pretrain_steps)
    if done:
        return done
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    model = dict(cfg.model, vocab_size=len(tokenizer))
    train_it, val_it, stats = _blocks(pretrain_records(cfg), tokenizer, cfg.pretrain_seq_len, cfg.pretrain_batch,
                                      cfg.seed)  # fmt: skip
    print(f"pretrain data: {json.dumps(stats)}", flush=True)
    tc = preset("tiny", out_dir=str(stage), model=model, tokenizer=str(tok_dir), seq_len=cfg.pretrain_seq_len,
                batch_size=cfg.pretrain_batch, micro_batch_size=cfg.pretrain_batch, max_steps=cfg.pretrain_steps,
                lr=cfg.pretrain_lr, warmup_steps=min(50, cfg.pretrain_steps // 10), eval_every=100,
                save_every=100, seed=cfg.seed, mtp_loss_weight=0.3)  # fmt: skip
    tc.model = model  # the r1-tiny shape exactly, not merged over the `tiny` preset's
    metrics = train(tc, train_batches=train_it, val_batches=val_it)
    return Path(metrics["checkpoint"])


def _sft_pass(name: str, records: list[dict], out: Path, init: Path, steps: int, batch: int, seq_len: int, lr: float,
              seed: int, eval_every: int) -> Path:  # fmt: skip
    """One supervised pass (assistant-only loss) from `init`, in <out>/<name>; skipped when already finished."""
    from transformers import AutoTokenizer

    from .trainer import train

    stage = out / name
    done = stage_done(stage, steps)
    if done:
        return done
    tokenizer = AutoTokenizer.from_pretrained(str(init))
    train_it, val_it, stats = _blocks(records, tokenizer, seq_len, batch, seed, split_documents=False)
    print(f"{name} data: {json.dumps(stats)}", flush=True)
    tc = preset("sft", out_dir=str(stage), init_from=str(init), tokenizer=str(init), seq_len=seq_len,
                batch_size=batch, micro_batch_size=batch, max_steps=steps, lr=lr, warmup_steps=min(20, steps // 10),
                eval_every=eval_every, save_every=100, seed=seed, mtp_loss_weight=0.3)  # fmt: skip
    metrics = train(tc, train_batches=train_it, val_batches=val_it)
    return Path(metrics["checkpoint"])


def run_sft(cfg: RecipeConfig, out: Path, init: Path) -> Path:
    return _sft_pass("sft", sft_records(cfg), out, init, cfg.sft_steps, cfg.sft_batch, cfg.sft_seq_len, cfg.sft_lr,
                     cfg.seed, eval_every=100)  # fmt: skip


def run_sft2(cfg: RecipeConfig, out: Path, init: Path) -> Path:
    """Second SFT pass: fresh examples (another seed), a bigger batch, from the first pass's checkpoint."""
    return _sft_pass("sft2", sft_records(sft2_config(cfg)), out, init, cfg.sft2_steps, cfg.sft2_batch,
                     cfg.sft_seq_len, cfg.sft_lr, cfg.sft2_seed, eval_every=200)  # fmt: skip


def run_sft3(cfg: RecipeConfig, out: Path, init: Path) -> Path:
    """Third SFT pass: the sft3_mix mixture (hardest in-distribution sets upweighted), longer blocks."""
    records = sft_records(dataclasses.replace(cfg, sft_examples=cfg.sft3_examples, seed=cfg.sft3_seed), cfg.sft3_mix)
    return _sft_pass("sft3", records, out, init, cfg.sft3_steps, cfg.sft3_batch, cfg.sft3_seq_len, cfg.sft_lr,
                     cfg.sft3_seed, eval_every=250)  # fmt: skip


def run_sft4(cfg: RecipeConfig, out: Path, init: Path) -> Path:
    """Fourth SFT pass: sft3_mix again on fresh examples, at sft4_lr."""
    records = sft_records(dataclasses.replace(cfg, sft_examples=cfg.sft4_examples, seed=cfg.sft4_seed), cfg.sft3_mix)
    return _sft_pass("sft4", records, out, init, cfg.sft4_steps, cfg.sft3_batch, cfg.sft3_seq_len, cfg.sft4_lr,
                     cfg.sft4_seed, eval_every=200)  # fmt: skip


def run_grpo(cfg: RecipeConfig, out: Path, init: Path) -> Path:
    from .rl.grpo import GRPOConfig, train_grpo

    stage = out / "grpo"
    gc = GRPOConfig(**{"out_dir": str(stage), "init_from": str(init), "seed": cfg.seed, **cfg.grpo})
    gc.exclude_prompts = sorted(training_prompts(cfg)) if gc.eval_every or gc.eval_examples else []
    return Path(train_grpo(gc)["model_dir"])


def run_recipe(cfg: RecipeConfig, stages=STAGES) -> dict:
    """Run the stages in order (skipping finished ones); returns {stage: output folder} and seconds per stage."""
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown recipe stage(s) {unknown}; stages: {', '.join(STAGES)}")
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg.save(out / "recipe_config.json")
    times_path = out / "recipe.json"
    record = json.loads(times_path.read_text()) if times_path.is_file() else {"seconds": {}, "outputs": {}}
    outputs = record["outputs"]

    def timed(name, fn, *args):
        t0 = time.perf_counter()
        result = fn(*args)
        if name not in record["seconds"] or record["outputs"].get(name) != str(result):
            record["seconds"][name] = record["seconds"].get(name, 0.0) + time.perf_counter() - t0
        outputs[name] = str(result)
        times_path.write_text(json.dumps(record, indent=2))
        print(f"[recipe] {name}: {result} ({record['seconds'][name]:.0f} s)", flush=True)
        return result

    if "tokenizer" in stages:
        timed("tokenizer", run_tokenizer, cfg, out)
    if "pretrain" in stages:
        timed("pretrain", run_pretrain, cfg, out, stage_input(outputs, "tokenizer", "pretrain"))
    if "sft" in stages:
        timed("sft", run_sft, cfg, out, stage_input(outputs, "pretrain", "sft"))
    if "sft2" in stages and cfg.sft2_steps:
        timed("sft2", run_sft2, cfg, out, stage_input(outputs, "sft", "sft2"))
    if "sft3" in stages and cfg.sft3_steps:
        timed("sft3", run_sft3, cfg, out, Path(outputs[latest_sft(outputs, "sft3")]))
    if "sft4" in stages and cfg.sft4_steps:
        timed("sft4", run_sft4, cfg, out, Path(outputs[latest_sft(outputs, "sft4")]))
    if "grpo" in stages:
        timed("grpo", run_grpo, cfg, out, Path(outputs[latest_sft(outputs)]))
    record["total_seconds"] = sum(record["seconds"].values())
    times_path.write_text(json.dumps(record, indent=2))
    return record


# ---------------------------------------------------------------------------- bundling
BUNDLE_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                "special_tokens_map.json", "generation_config.json")  # fmt: skip


def bundle(model_dir, name: str, bundled_dir=None, note: dict | None = None) -> Path:
    """Copy a trained model folder (weights, config, tokenizer) into the package as `deepseek/<name>`,
    so `R1Model.from_pretrained("deepseek/<name>")` works offline. Optimizer/trainer state is left behind."""
    import shutil

    from ..compat.checkpoint import BUNDLED_DIR

    src = Path(model_dir)
    if not (src / "config.json").is_file() or not (src / "model.safetensors").is_file():
        raise FileNotFoundError(f"{src} is not a model folder (needs config.json and model.safetensors)")
    dst = Path(bundled_dir or BUNDLED_DIR) / name
    tmp = dst.with_name(f".tmp-{name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in BUNDLE_FILES:
        if (src / f).is_file():
            shutil.copy2(src / f, tmp / f)
    if note:
        (tmp / "training.json").write_text(json.dumps(note, indent=2))
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    return dst


def bundle_outputs(record: dict, recipe_name: str, bundled_dir=None) -> dict[str, Path]:
    """Bundle a run's models: its last SFT stage as `deepseek/r1-base`, its GRPO model as `deepseek/r1-tiny`.
    record: what run_recipe returned (or the run's recipe.json). Returns {bundled name: folder}."""
    outputs = record["outputs"]
    note = {"recipe": recipe_name, "seconds": record["seconds"], "total_seconds": record.get("total_seconds")}
    plan = [(latest_sft(outputs), "r1-base")] if any(s in outputs for s in SFT_STAGES) else []
    plan += [("grpo", "r1-tiny")] if "grpo" in outputs else []
    if not plan:
        raise ValueError("nothing to bundle: the run has no finished SFT or GRPO stage")
    return {name: bundle(outputs[stage], name, bundled_dir, note=dict(note, stage=stage)) for stage, name in plan}
