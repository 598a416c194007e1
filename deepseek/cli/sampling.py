"""Sampling flags shared by `deepseek chat` and `deepseek generate`: unset flags take the model's own defaults
(its generation_config.json, deepseek/generation/defaults.py), as the SDK, the API and the playground do."""

from __future__ import annotations

import argparse


def add_sampling_arguments(p) -> None:
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the model's generation config")
    p.add_argument("--temperature", type=float, default=None,
                   help="0 = greedy; default: the model's generation config (greedy for the bundled models)")  # fmt: skip
    p.add_argument("--top-p", type=float, default=None, help="default: the model's generation config")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: unseeded)")
    p.add_argument("--mtp", action=argparse.BooleanOptionalAction, default=None,
                   help="speculative decoding with the model's MTP layer drafting (greedy only; same tokens, "
                        "faster); default: the model's generation config (use_mtp)")  # fmt: skip
    p.add_argument("--compile", action="store_true",
                   help="decode through the compiled one-token step (torch.compile: 1-2 min once per process and "
                        "cache size; ~2x faster per token on CPU at batch 1-8; same tokens)")  # fmt: skip


def check_sampling_arguments(args) -> None:
    """Bad values: one line, before the model loads."""
    if args.max_new_tokens is not None and args.max_new_tokens <= 0:
        raise ValueError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    if args.temperature is not None and not args.temperature >= 0:
        raise ValueError(f"--temperature must be >= 0, got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")


def resolve_sampling(args, model):
    """SamplingDefaults with the flags given on the command line in place of the model's defaults."""
    from dataclasses import replace

    from deepseek.generation.defaults import sampling_defaults

    given = {k: v for k, v in (("temperature", args.temperature), ("top_p", args.top_p),
                               ("max_new_tokens", args.max_new_tokens)) if v is not None}  # fmt: skip
    return replace(sampling_defaults(model), **given)


def resolve_use_mtp(args, model) -> bool:
    """--mtp / --no-mtp, else the model's generation_config.use_mtp (the SDK's default too)."""
    from deepseek.generation.defaults import use_mtp_default

    return use_mtp_default(model) if args.mtp is None else args.mtp
