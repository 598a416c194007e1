"""`deepseek chat`: interactive terminal chat with a reasoning model (the bundled r1-tiny by default).

    deepseek chat                                   # multi-turn; /reset clears the history, /exit quits
    deepseek chat --prompt "What is 123 + 456?"     # one shot
    deepseek chat --model runs/r1-tiny/grpo/checkpoints/step_000060 --temperature 0.6
    deepseek chat --image seven.png --prompt "Which digit is this?"          # also --audio x.wav, --points x.npy
    (interactive: /image PATH, /audio PATH, /points PATH attach a file to the next message)

Tokens stream as they are generated; the reasoning (inside <think>) is shown dim and apart from the answer.
Ctrl-C stops the current generation (the partial answer is kept out of the history) and returns to the prompt;
Ctrl-C or Ctrl-D at an empty prompt quits. As in DeepSeek-R1, earlier turns' reasoning is not fed back.
"""

from __future__ import annotations

import sys

from deepseek.chat import ChatSession
from deepseek.loading import DEFAULT_MODEL

from .sampling import add_sampling_arguments, check_sampling_arguments, resolve_sampling, resolve_use_mtp

HELP = ("commands: /image PATH, /audio PATH, /points PATH (attach to the next message), /reset (clear the "
        "conversation), /exit (quit); Ctrl-C stops a reply, Ctrl-D quits")
MEDIA = ("image", "audio", "points")


def add_parser(sub) -> None:
    p = sub.add_parser("chat", help="chat with a reasoning model in the terminal (bundled r1-tiny by default)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="model folder, bundled name or HF-cache repo id")
    p.add_argument("--prompt", default=None, help="one-shot: answer this and exit")
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="attach an image (PNG/JPEG) to --prompt; repeatable (needs a multimodal model)")
    p.add_argument("--audio", action="append", default=[], metavar="PATH",
                   help="attach a WAV file (0.2-30 s, any rate) to --prompt; repeatable")
    p.add_argument("--points", action="append", default=[], metavar="PATH",
                   help="attach a point cloud (.npy (N,3)/(N,6), .ply, .xyz) to --prompt; repeatable")
    add_sampling_arguments(p)
    p.add_argument("--color", choices=["auto", "always", "never"], default="auto",
                   help="dim the reasoning (auto: when stdout is a terminal)")  # fmt: skip
    p.add_argument("--device", default="cpu", help="torch device")
    p.set_defaults(func=run)


def run(args) -> int:
    check_sampling_arguments(args)
    media = [(m, path) for m in MEDIA for path in getattr(args, m)]
    if media and args.prompt is None:
        raise SystemExit("error: --image/--audio/--points go with --prompt (interactively, use /image PATH)")
    try:
        media = [(m, decode_file(m, path)) for m, path in media]  # before the model loads
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    from deepseek.loading import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(args.model, device=args.device)
    if media and getattr(model, "multimodal", None) is None:
        raise SystemExit(f"error: {args.model} is a text model: it takes no images, audio or points")
    d = resolve_sampling(args, model)
    color = {"auto": None, "always": True, "never": False}[args.color]
    session = ChatSession(model, tok, color=color, max_new_tokens=d.max_new_tokens, temperature=d.temperature,
                          top_p=d.top_p, seed=args.seed, system=args.system,
                          use_mtp=resolve_use_mtp(args, model), compile=args.compile)  # fmt: skip
    if args.prompt is not None:
        session.send(args.prompt, media)
        return 0
    pending: list = []
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
        command, _, rest = line.partition(" ")
        if command.lstrip("/") in MEDIA and command.startswith("/"):
            try:
                pending.append((command[1:], decode_file(command[1:], rest.strip())))
                print(f"[{command[1:]} attached: {rest.strip()}]")
            except ValueError as exc:
                print(f"error: {exc}", file=sys.stderr)
            continue
        try:
            media, pending = pending, []
            session.send(line, media or None)
        except ValueError as exc:  # e.g. the conversation outgrew the context
            print(f"error: {exc}", file=sys.stderr)


def decode_file(modality: str, path: str):
    """A media file, checked and decoded now (a one-line ValueError for a missing or bad file)."""
    from deepseek.multimodal.base import MultimodalConfig
    from deepseek.multimodal.media import decode

    if not path:
        raise ValueError(f"/{modality} needs a file path")
    return decode(modality, path, MultimodalConfig())
