"""`deepseek chat`: interactive terminal chat with a reasoning model (the bundled r1-tiny by default).

    deepseek chat                                   # multi-turn; /reset clears the history, /exit quits
    deepseek chat --prompt "What is 123 + 456?"     # one shot
    deepseek chat --model runs/r1-tiny/grpo/checkpoints/step_000060 --temperature 0.6

Tokens stream as they are generated; the reasoning (inside <think>) is shown dim and apart from the answer.
Ctrl-C stops the current generation (the partial answer is kept out of the history) and returns to the prompt;
Ctrl-C or Ctrl-D at an empty prompt quits. As in DeepSeek-R1, earlier turns' reasoning is not fed back.
"""

from __future__ import annotations

import sys

from deepseek.chat import ChatSession

from .sampling import add_sampling_arguments, check_sampling_arguments, resolve_sampling

HELP = "commands: /reset (clear the conversation), /exit (quit); Ctrl-C stops a reply, Ctrl-D quits"


def add_parser(sub) -> None:
    p = sub.add_parser("chat", help="chat with a reasoning model in the terminal (bundled r1-tiny by default)")
    p.add_argument("--model", default="deepseek/r1-tiny", help="model folder, bundled name or HF-cache repo id")
    p.add_argument("--prompt", default=None, help="one-shot: answer this and exit")
    p.add_argument("--system", default=None, help="system message")
    add_sampling_arguments(p)
    p.add_argument("--color", choices=["auto", "always", "never"], default="auto")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=run)


def run(args) -> int:
    check_sampling_arguments(args)
    from deepseek.loading import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(args.model, device=args.device)
    d = resolve_sampling(args, model)
    color = {"auto": None, "always": True, "never": False}[args.color]
    session = ChatSession(model, tok, color=color, max_new_tokens=d.max_new_tokens, temperature=d.temperature,
                          top_p=d.top_p, seed=args.seed, system=args.system)  # fmt: skip
    if args.prompt is not None:
        session.send(args.prompt)
        return 0
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"deepseek chat: {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters). {HELP}")
    while True:
        try:
            line = input("\n>>> " if interactive else "")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            session.reset()
            print("[conversation reset]")
            continue
        if line in ("/help", "/?"):
            print(HELP)
            continue
        try:
            session.send(line)
        except ValueError as exc:  # e.g. the conversation outgrew the context
            print(f"error: {exc}", file=sys.stderr)
