"""`deepseek recipe`: run the r1-tiny recipe (tokenizer -> pretraining -> cold-start SFT -> GRPO)."""

from __future__ import annotations


def add_parser(sub) -> None:
    from .train.recipe import STAGES

    p = sub.add_parser("recipe", help="run a training recipe end to end (r1-tiny: tokenizer, pretrain, SFT, GRPO)")
    p.add_argument("name", nargs="?", default="r1-tiny", choices=["r1-tiny", "debug"])
    p.add_argument("--out", default=None, help="run folder (default runs/r1-tiny)")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default; 1 on a busy CPU)")
    p.add_argument("--bundle", action="store_true",
                   help="copy the SFT model to deepseek/r1-base and the GRPO model to deepseek/r1-tiny")  # fmt: skip
    p.set_defaults(func=run)


def run(args) -> int:
    from .train.recipe import run_cli

    return run_cli(args)
