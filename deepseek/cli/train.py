"""`deepseek train`: pretraining or SFT from a preset, a saved config and `key=value` overrides.

    deepseek train --preset debug --data corpus.txt --tokenizer runs/tok --out runs/debug
    deepseek train --preset sft --init-from runs/pretrain/checkpoints/step_002000 --data task:addition@2000
    deepseek train --config runs/x/train_config.json --set max_steps=500 lr=1e-3 model.num_hidden_layers=4
    torchrun --nproc_per_node 2 -m deepseek.cli train --preset debug --data corpus.txt --set parallel=fsdp

Private (DP-SGD) LoRA fine-tuning through the SDK (deepseek/train/privacy.py); --out receives the merged model:
    deepseek train --init-from deepseek/r1-tiny --data records.jsonl --epochs 3 --dp-epsilon 8 --dp-delta 1e-5 \
        --out runs/dp-model
    deepseek train --init-from deepseek/r1-tiny --data records.jsonl --private      # defaults: eps 8, delta 1e-5
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
    p.add_argument("--max-steps", type=int, help="optimizer steps (default: the preset's / config's)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="overrides, e.g. lr=1e-3 batch_size=16 model.hidden_size=128 parallel=fsdp")  # fmt: skip
    dp = p.add_argument_group("differential privacy (LoRA fine-tuning of --init-from on --data)")
    dp.add_argument("--private", action="store_true", help="DP-SGD with the defaults (epsilon 8, delta 1e-5)")
    dp.add_argument("--dp-epsilon", type=float, help="target epsilon for the whole run (implies --private)")
    dp.add_argument("--dp-delta", type=float, help="delta, < 1/records (default 1e-5)")
    dp.add_argument("--dp-max-grad-norm", type=float, help="per-record clipping norm C (default 1.0)")
    dp.add_argument("--dp-accountant", choices=["prv", "rdp"], help="privacy accountant (default prv)")
    dp.add_argument("--epochs", type=int, default=1, help="passes over the data (private fine-tuning)")
    dp.add_argument("--batch-size", type=int, default=8, help="expected records per step (Poisson sampling)")
    p.set_defaults(func=run)


def privacy_from_args(args) -> dict | None:
    given = {"epsilon": args.dp_epsilon, "delta": args.dp_delta, "max_grad_norm": args.dp_max_grad_norm,
             "accountant": args.dp_accountant}  # fmt: skip
    given = {k: v for k, v in given.items() if v is not None}
    return given if (given or args.private) else None


def run_private(args, privacy: dict) -> int:
    from deepseek.train.privacy import resolve_privacy

    resolve_privacy(privacy)  # bad values fail here, before any loading
    if not args.init_from or not args.data:
        raise SystemExit("private fine-tuning needs --init-from <model> and --data <records>")
    from deepseek import R1Model

    model = R1Model.from_pretrained(args.init_from)
    metrics = model.finetune(dataset=args.data, epochs=args.epochs, batch_size=args.batch_size, privacy=privacy,
                             max_steps=args.max_steps, tokenizer=args.tokenizer)  # fmt: skip
    if args.out:
        model.save_pretrained(args.out)
    keys = ("steps", "final_loss", "val_loss", "epsilon", "delta", "noise_multiplier", "sample_rate",
            "max_grad_norm", "accountant", "privacy_unit")  # fmt: skip
    summary = {k: metrics[k] for k in keys} | {"epsilon_per_epoch": metrics["epsilon_per_epoch"], "out": args.out}
    for k in keys:
        print(f"{k:<20}{summary[k]}")
    print(json.dumps(summary))
    return 0


def run(args) -> int:
    privacy = privacy_from_args(args)
    if privacy is not None:
        return run_private(args, privacy)
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
