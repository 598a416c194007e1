"""`deepseek routing`: training-free entropy-adaptive routing for any checkpoint, and per-layer routing stats.

    deepseek routing calibrate --model runs/x --data val.txt --target-k 2.5 --out runs/x-entropy
    deepseek routing stats --model runs/x-entropy --data val.txt

`calibrate` switches the checkpoint to adaptive routing (entropy by default, or the top-p peer), sets each
layer's threshold so its average experts per token on the data is the target, prints the stats and saves a
copy whose config carries the thresholds. `stats` prints average k, the k histogram, MaxVio and the routing
entropy per MoE layer. See docs/routing.md.
"""

from __future__ import annotations

import shutil
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def add_parser(sub) -> None:
    p = sub.add_parser("routing", help="adaptive expert routing: calibrate a checkpoint, print routing stats")
    rsub = p.add_subparsers(dest="routing_command", required=True)
    c = rsub.add_parser("calibrate", help="training-free entropy routing at a target average k")
    c.add_argument("--model", required=True, help="model folder or bundled name (with a tokenizer)")
    c.add_argument("--data", required=True, help="text file whose tokens set the thresholds")
    c.add_argument("--target-k", type=float, required=True, help="average routed experts per token")
    c.add_argument("--mode", choices=("entropy", "top_p"), default="entropy",
                   help="entropy: k from the router's entropy; top_p: the fewest experts covering the mass")  # fmt: skip
    c.add_argument("--k-min", type=int, default=1, help="fewest routed experts per token")
    c.add_argument("--k-max", type=int, default=None, help="default: the checkpoint's num_experts_per_tok")
    c.add_argument("--tokens", type=int, default=4096, help="calibration tokens read from --data")
    c.add_argument("--out", required=True, help="folder for the calibrated copy")
    c.set_defaults(func=run_calibrate)
    s = rsub.add_parser("stats", help="per-layer average k, k histogram, MaxVio, routing entropy")
    s.add_argument("--model", required=True, help="model folder or bundled name (with a tokenizer)")
    s.add_argument("--data", required=True, help="text file to route")
    s.add_argument("--tokens", type=int, default=4096, help="tokens read from --data")
    s.set_defaults(func=run_stats)


def load_tokens(model_name: str, data: str, n_tokens: int, seq_len: int = 512):
    """(rows, seq_len) token ids from the first n_tokens of a text file, with the model's tokenizer."""
    import torch
    from transformers import AutoTokenizer

    from deepseek.compat.checkpoint import resolve

    if n_tokens <= 0:
        raise ValueError(f"--tokens must be positive, got {n_tokens}")
    if not Path(data).is_file():
        raise FileNotFoundError(f"--data {data}: no such file")
    path = resolve(model_name)
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{path} has no tokenizer.json; routing calibration needs the model's tokenizer")
    tok = AutoTokenizer.from_pretrained(str(path))
    ids = tok.encode(Path(data).read_text(encoding="utf-8"), add_special_tokens=False)[:n_tokens]
    if len(ids) < 16:
        raise ValueError(f"--data {data} holds only {len(ids)} tokens; calibration needs at least 16")
    T = min(seq_len, len(ids))
    rows = len(ids) // T
    return path, torch.tensor(ids[: rows * T]).view(rows, T)


def print_stats(model, ids) -> dict:
    import torch

    from deepseek.model import routing

    stats = routing.track_routing(model)
    with torch.inference_mode():
        for i in range(0, ids.shape[0], 4):
            model.model(input_ids=ids[i : i + 4])
    routing.stop_tracking(model)
    summary = routing.summarize(stats)
    print(f"{'layer':<28}{'avg k':>8}{'MaxVio':>9}{'entropy':>9}  k histogram")
    for name, row in summary["layers"].items():
        ent = f"{row['entropy']:.3f}" if row["entropy"] is not None else "-"
        print(f"{name:<28}{row['avg_k']:>8.3f}{row['max_vio']:>9.3f}{ent:>9}  {row['k_hist']}")
    print(f"{'mean':<28}{summary['avg_k']:>8.3f}{summary['max_vio']:>9.3f}")
    return summary


def run_calibrate(args) -> int:
    from deepseek.model import routing
    from deepseek.model.transformer import R1ForCausalLM

    path, ids = load_tokens(args.model, args.data, args.tokens)
    model = R1ForCausalLM.from_pretrained(path)
    k_max = args.k_max if args.k_max is not None else model.config.num_experts_per_tok
    routing.set_routing(model, args.mode, k_min=args.k_min, k_max=k_max, target_k=None, layer_thresholds=None)
    values = routing.calibrate(model, ids, args.target_k)
    print(f"{args.mode} routing, k {args.k_min}..{k_max}, target {args.target_k}: thresholds "
          + ", ".join(f"{v:.4g}" for v in values))  # fmt: skip
    print_stats(model, ids)
    out = Path(args.out)
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (path / name).is_file():
            shutil.copy2(path / name, out / name)
    print(f"saved {out}")
    return 0


def run_stats(args) -> int:
    from deepseek.model import routing
    from deepseek.model.transformer import R1ForCausalLM

    path, ids = load_tokens(args.model, args.data, args.tokens)
    model = R1ForCausalLM.from_pretrained(path)
    routing.apply_thresholds(model)
    print(f"routing_mode={model.config.routing.mode}")
    print_stats(model, ids)
    return 0
