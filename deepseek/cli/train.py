"""`deepseek train`: pretraining or SFT from a preset, a saved config and `key=value` overrides.

    deepseek train --preset debug --data corpus.txt --tokenizer runs/tok --out runs/debug
    deepseek train --preset sft --init-from runs/pretrain/checkpoints/step_002000 --data task:addition@2000
    deepseek train --config runs/x/train_config.json --set max_steps=500 lr=1e-3 model.num_hidden_layers=4
    torchrun --nproc_per_node 2 -m deepseek.cli train --preset debug --data corpus.txt --set parallel=fsdp
"""

from __future__ import annotations

import argparse
import json
import os


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help="pretrain or fine-tune (SFT) a model; torchrun for several processes",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="debug", help="debug | tiny | sft (see deepseek/train/config.py)")
    p.add_argument("--config", help="a train_config.json to start from instead of a preset")
    p.add_argument("--data", help="file, folder, dataset name, or task:NAME[,NAME]@N")
    p.add_argument("--val-data", help="separate validation data (default: a held-out split of --data)")
    p.add_argument("--tokenizer", help="folder with tokenizer.json (default: the --init-from model's)")
    p.add_argument("--init-from", help="model folder or bundled name to start from (default: a fresh model)")
    p.add_argument("--out", help="run directory (checkpoints, metrics.jsonl, curves.png, train_config.json)")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="overrides, e.g. lr=1e-3 batch_size=16 model.hidden_size=128 parallel=fsdp")  # fmt: skip
    p.set_defaults(func=run)


def run(args) -> int:
    from deepseek.train.config import TrainConfig, apply_overrides, preset
    from deepseek.train.trainer import train

    config = TrainConfig.load(args.config) if args.config else preset(args.preset)
    items = list(args.set)
    for flag, key in (("data", "data"), ("val_data", "val_data"), ("tokenizer", "tokenizer"),
                      ("init_from", "init_from"), ("out", "out_dir"), ("max_steps", "max_steps")):  # fmt: skip
        value = getattr(args, flag)
        if value is not None:
            items.append(f"{key}={json.dumps(value) if isinstance(value, int) else value}")
    config = apply_overrides(config, items)
    metrics = train(config)
    if metrics["world_size"] > 1 and os.environ.get("RANK", "0") != "0":
        return 0
    summary = {k: v for k, v in metrics.items() if k != "losses"}
    print(f"{'steps':<20}{summary['steps']}")
    if summary["final_loss"] is not None:  # None when the run was already complete
        print(f"{'final train loss':<20}{summary['final_loss']:.4f}")
    if summary["val_loss"] is not None:
        print(f"{'validation loss':<20}{summary['val_loss']:.4f}")
    print(f"{'tokens/s':<20}{summary['tokens_per_second']:,.0f}")
    print(f"{'checkpoint':<20}{summary['checkpoint']}")
    print(json.dumps(summary))
    return 0
