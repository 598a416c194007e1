"""Train only the MTP layer (main model frozen) for speculative decoding with several drafts per step.

    python -m deepseek.train.mtp_distill --out runs/mtp-distill --threads 1   # ~4 minutes on a 2-core CPU
    python -m deepseek.train.mtp_distill --out runs/mtp-distill --write-bundled   # then into deepseek/bundled/r1-tiny

Self-distillation: r1-tiny's own greedy completions for prompts of the recipe's first SFT set (every one of
them in `training_prompts`, so disjoint from the held-out prompts benchmarks/speculative.py times). Two losses:
depth 1 as trained before (h_i, t_{i+1} -> t_{i+2}), and depth 2 the way speculative.py drafts a second token:
the same layer re-applied to its own hidden g_i with t_{i+2}, at position i + 1, attending to the depth-1
entries up to i and to itself (the mask below), predicting t_{i+3}. After --write-bundled, r1-tiny's
generation_config.json names how many drafts per step to use (`mtp_draft_tokens`, docs/decode.md).

Legend: B sequences, L tokens, n = L - 1 depth-1 entries, m = n - 1 depth-2 entries, D hidden.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..model.transformer import IGNORE


def distill_examples(n: int) -> list[dict]:
    """n examples drawn (seeded) from the recipe's first SFT set: prompts r1-tiny already trained on."""
    from .recipe import recipe, task_examples

    cfg = recipe("r1-tiny")
    exs = task_examples(cfg, cfg.sft_examples, seed=cfg.seed + 2)
    return [exs[i] for i in torch.randperm(len(exs), generator=torch.Generator().manual_seed(0))[:n].tolist()]


def completions(model, tok, n: int, max_new_tokens: int = 360, batch: int = 16):
    """(prompt + greedy completion token lists, prompt lengths) for the n distillation prompts."""
    from ..chat import chat_prompt_ids
    from ..generation.loop import generate
    from .data import left_pad

    prompts = [chat_prompt_ids(tok, ex) for ex in distill_examples(n)]
    out = []
    for i in range(0, n, batch):
        ids, mask = left_pad(prompts[i : i + batch], tok.pad_token_id)
        res = generate(model, ids, mask, max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id)
        out += [p + t for p, t in zip(prompts[i : i + batch], res.new_tokens)]
        print(f"generated {len(out)}/{n}", flush=True)
    return out, [len(p) for p in prompts]


def depth2_mask(n: int, m: int) -> torch.Tensor:
    """(n + m, n + m), True = attend: depth-1 rows causal over depth-1; depth-2 row j sees depth-1 cols <= j and
    its own column (what the second draft attends to in speculative.py)."""
    mask = torch.zeros(n + m, n + m, dtype=torch.bool)
    mask[:n, :n] = torch.ones(n, n, dtype=torch.bool).tril()
    mask[n:, :n] = torch.ones(m, n, dtype=torch.bool).tril()
    mask[n:, n:] = torch.eye(m, dtype=torch.bool)
    return mask


def mtp_losses(model, h_BLD, ids_BL, labels_BL) -> tuple[torch.Tensor, torch.Tensor]:
    """(depth-1 loss, depth-2 loss); labels_BL: the token at each position, IGNORE where it is not learned."""
    B, L, _ = h_BLD.shape
    n, m = L - 1, L - 2
    layer = model.mtp[0]
    pos1 = torch.arange(n)[None].expand(B, n)
    cos, sin = model.model.rotary_emb(pos1, h_BLD.dtype)
    causal = torch.ones(n, n, dtype=torch.bool).tril()[None].expand(B, n, n)
    logits1, g_BnD = layer(h_BLD[:, :n], ids_BL[:, 1 : n + 1], cos, sin, causal)
    loss1 = F.cross_entropy(
        logits1[:, : L - 2].flatten(0, 1), labels_BL[:, 2:].flatten(), ignore_index=IGNORE
    )
    pos = torch.cat((pos1, torch.arange(1, m + 1)[None].expand(B, m)), 1)
    cos, sin = model.model.rotary_emb(pos, h_BLD.dtype)
    h_cat = torch.cat((h_BLD[:, :n], g_BnD[:, :m]), 1)
    ids_cat = torch.cat((ids_BL[:, 1 : n + 1], ids_BL[:, 2 : m + 2]), 1)
    logits, _ = layer(h_cat, ids_cat, cos, sin, depth2_mask(n, m)[None].expand(B, n + m, n + m))
    logits2 = logits[:, n : n + m - 1]  # entry j predicts t_{j+3}
    loss2 = F.cross_entropy(logits2.flatten(0, 1), labels_BL[:, 3:].flatten(), ignore_index=IGNORE)
    return loss1, loss2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/mtp-distill")
    ap.add_argument("--sequences", type=int, default=256)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--write-bundled", action="store_true", help="write the MTP weights into deepseek/bundled/r1-tiny"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from ..loading import load_model_and_tokenizer

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, tok = load_model_and_tokenizer("deepseek/r1-tiny", for_decode=False)
    t0 = time.perf_counter()
    seqs, prompt_lens = completions(model, tok, args.sequences)
    t_gen = time.perf_counter() - t0
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), tok.pad_token_id)
    labels = torch.full((len(seqs), L), IGNORE)
    for i, (s, p) in enumerate(zip(seqs, prompt_lens)):
        ids[i, : len(s)] = torch.tensor(s)
        labels[i, p : len(s)] = torch.tensor(s[p:])  # learn the completion (the model's own greedy tokens)
    with torch.no_grad():  # the frozen main model's pre-norm hidden states, once
        h = torch.cat(
            [model.model(input_ids=ids[i : i + 16]).hidden_states[0] for i in range(0, len(seqs), 16)]
        )
    for p in model.parameters():
        p.requires_grad_(False)
    params = list(model.mtp[0].parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    log = []
    for step in range(args.steps):
        lr = (
            args.lr
            * min(1.0, (step + 1) / 20)
            * (0.5 * (1 + torch.cos(torch.tensor(step / args.steps * 3.14159))))
        )
        for group in opt.param_groups:
            group["lr"] = float(lr)
        idx = torch.randint(len(seqs), (args.batch,), generator=g)
        n = int((labels[idx] != IGNORE).nonzero()[:, 1].max()) + 1
        loss1, loss2 = mtp_losses(model, h[idx, :n], ids[idx, :n], labels[idx, :n])
        opt.zero_grad()
        (loss1 + loss2).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        log.append((step, loss1.item(), loss2.item()))
        if step % 20 == 0 or step == args.steps - 1:
            print(f"step {step} loss depth1 {float(loss1):.4f} depth2 {float(loss2):.4f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip
    torch.save({k: v.detach().clone() for k, v in model.mtp[0].state_dict().items()}, out_dir / "mtp.pt")
    summary = {"sequences": len(seqs), "steps": args.steps, "batch": args.batch, "lr": args.lr,
               "generate_seconds": round(t_gen, 1), "seconds": round(time.perf_counter() - t0, 1),
               "first": log[0], "last": log[-1]}  # fmt: skip
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))
    if args.write_bundled:
        write_bundled(model)


def write_bundled(model, folder: str = "deepseek/bundled/r1-tiny") -> None:
    """Replace the MTP tensors (model.layers.{L}.*) in the bundled model.safetensors; every other tensor is
    written back as loaded (byte-identical)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from ..compat.keys import module_to_checkpoint

    path = Path(folder) / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    L = model.config.num_hidden_layers
    for name, t in model.mtp.state_dict(prefix="mtp.").items():
        for key, value in module_to_checkpoint(name, t, L):
            if key not in tensors:
                raise KeyError(f"{key} is not in {path}")
            tensors[key] = value.detach().contiguous().to(tensors[key].dtype)
    save_file(tensors, str(path), metadata=meta)


if __name__ == "__main__":
    main()
