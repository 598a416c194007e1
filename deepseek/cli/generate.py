"""`deepseek generate`: stream a completion from a model folder or bundled name.

Special tokens (<|eos|>, ...) are not printed; the reasoning tags show as [thinking] / [answer] lines (--raw prints
the decoded text as it is). A completion cut at --max-new-tokens says so on stderr (finish_reason length)."""

from __future__ import annotations

import sys
import time

from deepseek.chat import THINK_CLOSE, THINK_OPEN
from deepseek.loading import DEFAULT_MODEL

from .sampling import add_sampling_arguments, check_sampling_arguments, resolve_sampling, resolve_use_mtp


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="stream a completion for a prompt")
    p.add_argument("--model", default=DEFAULT_MODEL, help="model folder or bundled name (default: %(default)s)")
    p.add_argument("--prompt", required=True, help="the prompt text")
    add_sampling_arguments(p)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument("--int8", action="store_true", help="int8 weight-only quantisation")
    p.add_argument("--raw", action="store_true", help="print the decoded text with special tokens and <think> tags")
    p.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
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
    opened = args.chat and text.rstrip().endswith(THINK_OPEN)  # the chat template opened the reasoning
    head = "" if args.raw or not opened else "[thinking]"

    def show(final: bool = False) -> None:
        nonlocal shown
        text = head + (tok.decode(tokens, skip_special_tokens=False) if args.raw else display_text(tok, tokens))
        if final or not (text.endswith("\ufffd") or any(t.startswith(text[-k:]) for t in _TAGS
                                                          for k in range(1, len(t)) if len(text) >= k)):  # fmt: skip
            sys.stdout.write(text[len(shown) :])  # (held back: half a UTF-8 character or half a tag)
            sys.stdout.flush()
            shown = text

    def on_token(step, token):
        tokens.append(int(token[0]))
        show()

    t = time.perf_counter()
    out = generate(model, ids, max_new_tokens=d.max_new_tokens, temperature=d.temperature, top_p=d.top_p,
                   eos_token_id=tok.eos_token_id, seed=args.seed, on_token=on_token,
                   use_mtp=resolve_use_mtp(args, model), compile=args.compile)  # fmt: skip
    show(final=True)
    n = len(out.new_tokens[0])
    cut = f"cut at --max-new-tokens {d.max_new_tokens} (finish_reason length), " if out.finish_reasons[0] == "length" else ""
    compiled = f", compiling {out.stats['compile_seconds']:.0f} s" if out.stats.get("compile_seconds") else ""
    print(f"\n[{n} tokens, {cut}{n / (time.perf_counter() - t):.1f} tok/s, decode "
          f"{out.decode_tokens_per_second:.1f} tok/s{compiled}]", file=sys.stderr)  # fmt: skip
    return 0


_TAGS = (THINK_OPEN, THINK_CLOSE)


def display_text(tok, tokens: list[int]) -> str:
    """The completion as shown: special tokens dropped, `<think>` / `</think>` as [thinking] / [answer] lines."""
    text = tok.decode(tokens, skip_special_tokens=True)
    return text.replace(THINK_OPEN, "[thinking]").replace(THINK_CLOSE, "[answer]")
