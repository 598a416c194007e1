"""`deepseek generate`: stream a completion from a model folder or bundled name."""

from __future__ import annotations

import sys
import time

from deepseek.loading import DEFAULT_MODEL

from .sampling import add_sampling_arguments, check_sampling_arguments, resolve_sampling


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="stream a completion for a prompt")
    p.add_argument("--model", default=DEFAULT_MODEL, help="model folder or bundled name")
    p.add_argument("--prompt", required=True)
    add_sampling_arguments(p)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument("--int8", action="store_true", help="int8 weight-only quantisation")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from deepseek.generation.loop import generate
    from deepseek.loading import load_model_and_tokenizer

    check_sampling_arguments(args)
    model, tok = load_model_and_tokenizer(args.model, device=args.device, int8=args.int8)
    d = resolve_sampling(args, model)
    if args.chat and tok.chat_template:
        text = tok.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=False,
                                       add_generation_prompt=True)  # fmt: skip
    else:
        text = args.prompt
    ids = torch.tensor([tok.encode(text, add_special_tokens=False)], device=args.device)
    tokens: list[int] = []
    shown = ""

    def on_token(step, token):
        nonlocal shown
        tokens.append(int(token[0]))
        text = tok.decode(tokens, skip_special_tokens=False)
        if not text.endswith("\ufffd"):  # wait for a complete UTF-8 character
            sys.stdout.write(text[len(shown) :])
            sys.stdout.flush()
            shown = text

    t = time.perf_counter()
    out = generate(model, ids, max_new_tokens=d.max_new_tokens, temperature=d.temperature, top_p=d.top_p,
                   eos_token_id=tok.eos_token_id, seed=args.seed, on_token=on_token)  # fmt: skip
    n = len(out.new_tokens[0])
    print(f"\n[{n} tokens, {n / (time.perf_counter() - t):.1f} tok/s, decode "
          f"{out.decode_tokens_per_second:.1f} tok/s]", file=sys.stderr)  # fmt: skip
    return 0
