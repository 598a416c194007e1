"""`deepseek recipe`: run the r1-tiny recipe (tokenizer -> pretraining -> cold-start SFT -> GRPO), the one way
to start it. The stages, their outputs and the bundling live in deepseek/train/recipe.py.

    deepseek recipe r1-tiny --out runs/r1-tiny --threads 2 --bundle
    deepseek recipe r1-tiny --out runs/r1-tiny --stages grpo          # one stage; finished ones are skipped
    deepseek recipe r1-tiny --out runs/r1-tiny --stages "" --bundle   # bundle a finished run, train nothing
    deepseek recipe multimodal --out runs/r1-tiny-mm --bundle         # encoders + projectors + LoRA on r1-tiny
"""

from __future__ import annotations

import argparse
import json

# deepseek.train.recipe imports no torch at module level (tests/test_cli.py checks that `--help` stays light)
from deepseek.train.recipe import STAGES


def add_parser(sub) -> None:
    p = sub.add_parser("recipe", help="run a training recipe end to end (r1-tiny: tokenizer, pretrain, SFT, GRPO)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("name", nargs="?", default="r1-tiny", choices=["r1-tiny", "debug", "multimodal"],
                   help="r1-tiny: the text model; multimodal: its image/audio/points stage (deepseek/train/multimodal.py)")
    p.add_argument("--out", default=None, help="run folder (default runs/r1-tiny)")
    p.add_argument("--stages", default=",".join(STAGES),
                   help=f"comma-separated subset of {','.join(STAGES)} (empty: none)")  # fmt: skip
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default; 1 on a busy CPU)")
    p.add_argument("--bundle", action="store_true",
                   help="copy the last SFT model to deepseek/r1-base and the GRPO model to deepseek/r1-tiny "
                        "(multimodal: the result to deepseek/r1-tiny-mm)")  # fmt: skip
    p.add_argument("--steps", type=int, default=None, help="multimodal: SFT steps (default 400)")
    p.set_defaults(func=run)


def run(args) -> int:
    from deepseek.train.recipe import bundle_outputs, recipe, run_recipe

    if args.name == "multimodal":
        return run_multimodal(args)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    if args.threads < 0:
        raise ValueError(f"--threads must be >= 0, got {args.threads}")
    cfg = recipe(args.name, **({"out_dir": args.out} if args.out else {}))  # validates before any work
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    record = run_recipe(cfg, stages)
    if args.bundle:
        for name, folder in bundle_outputs(record, args.name).items():
            print(f"[recipe] bundled {name}: {folder}", flush=True)
    print(json.dumps(record))
    return 0


def run_multimodal(args) -> int:
    from deepseek.train.multimodal import MultimodalRecipe, bundle, train_multimodal

    kw = {"out_dir": args.out} if args.out else {}
    if args.steps is not None:
        kw["steps"] = args.steps
    if args.threads < 0:
        raise ValueError(f"--threads must be >= 0, got {args.threads}")
    cfg = MultimodalRecipe(threads=args.threads or None, **kw)  # validates before any work
    record = train_multimodal(cfg)
    if args.bundle:
        print(f"[recipe] bundled deepseek/r1-tiny-mm: {bundle(record)}", flush=True)
    print(json.dumps(record))
    return 0
