"""`deepseek chat`: interactive terminal chat with a reasoning model (the bundled r1-tiny by default).

    deepseek chat                                   # multi-turn; /reset clears the history, /exit quits
    deepseek chat --prompt "What is 123 + 456?"     # one shot
    deepseek chat --model runs/r1-tiny/grpo/checkpoints/step_000060 --temperature 0.6

Tokens stream as they are generated; the reasoning (inside <think>) is shown dim and apart from the answer.
Ctrl-C stops the current generation (the partial answer is kept out of the history) and returns to the prompt;
Ctrl-C or Ctrl-D at an empty prompt quits. As in DeepSeek-R1, earlier turns' reasoning is not fed back.
"""

from __future__ import annotations

import signal
import sys
import threading
from dataclasses import dataclass

DIM, RESET = "\033[2m", "\033[0m"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def split_reasoning(text: str) -> tuple[str, str | None]:
    """(reasoning, answer) of a completion; answer None while the reasoning is still open."""
    if THINK_CLOSE in text:
        reasoning, answer = text.split(THINK_CLOSE, 1)
        return reasoning.replace(THINK_OPEN, "").strip("\n"), answer.lstrip("\n")
    if text.lstrip().startswith(THINK_OPEN) or not text.strip() or THINK_OPEN.startswith(text.lstrip()):
        return text.replace(THINK_OPEN, "").lstrip("\n"), None
    return "", text  # a completion without reasoning


@dataclass
class Reply:
    reasoning: str
    answer: str
    tokens: int
    stopped: bool  # interrupted (Ctrl-C) before the model finished
    tokens_per_second: float


class ChatSession:
    """History + streaming generation with a stop flag. `send` writes to `out` as tokens arrive."""

    def __init__(self, model, tokenizer, out=None, color: bool | None = None, max_new_tokens: int = 512,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None, system: str | None = None):  # fmt: skip
        self.model, self.tok = model, tokenizer
        self.out = out or sys.stdout
        self.color = self.out.isatty() if color is None else color
        self.max_new_tokens, self.temperature, self.top_p, self.seed = max_new_tokens, temperature, top_p, seed
        self.system = system
        self.history: list[dict] = []
        self.stop_event = threading.Event()
        self.on_step = None  # test hook: called with the step index after each token

    def reset(self) -> None:
        self.history = []

    def interrupt(self) -> None:
        self.stop_event.set()

    def _messages(self, user: str) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history + [{"role": "user", "content": user}]

    def send(self, user: str) -> Reply:
        import time

        import torch

        from .model.generate import generate

        ids = self.tok.apply_chat_template(self._messages(user), add_generation_prompt=True, tokenize=True,
                                           return_dict=False)  # fmt: skip
        limit = self.model.config.max_position_embeddings
        if len(ids) + self.max_new_tokens > limit:
            raise ValueError(f"the conversation ({len(ids)} tokens) + max_new_tokens ({self.max_new_tokens}) exceeds "
                             f"the model's context ({limit}); use /reset")  # fmt: skip
        tokens: list[int] = []
        shown = {"reasoning": 0, "answer": 0, "header": False, "answer_header": False}
        self.stop_event.clear()

        def write(s: str, dim: bool = False) -> None:
            if s:
                self.out.write(f"{DIM}{s}{RESET}" if dim and self.color else s)
                self.out.flush()

        def render(final: bool = False) -> None:
            text = self.tok.decode(tokens, skip_special_tokens=True)
            if text.endswith("\ufffd") and not final:  # half a UTF-8 character: wait for the rest
                return
            reasoning, answer = split_reasoning(text)
            if reasoning and not shown["header"]:
                write("[thinking]\n", dim=True)
                shown["header"] = True
            write(reasoning[shown["reasoning"]:], dim=True)
            shown["reasoning"] = max(shown["reasoning"], len(reasoning))
            if answer is not None:
                if shown["header"] and not shown["answer_header"] and answer:
                    write("\n[answer]\n" if not self.color else "\n\n")
                    shown["answer_header"] = True
                write(answer[shown["answer"]:])
                shown["answer"] = max(shown["answer"], len(answer))

        def on_token(step, token_B) -> bool:
            tok = int(token_B[0])
            if tok != self.tok.eos_token_id:
                tokens.append(tok)
                render()
            if self.on_step is not None:
                self.on_step(step)
            return self.stop_event.is_set()

        previous = None
        if threading.current_thread() is threading.main_thread():  # Ctrl-C -> stop this generation only
            previous = signal.signal(signal.SIGINT, lambda *_: self.interrupt())
        t0 = time.perf_counter()
        try:
            generate(self.model, torch.tensor([ids]), max_new_tokens=self.max_new_tokens,
                     temperature=self.temperature, top_p=self.top_p, eos_token_id=self.tok.eos_token_id,
                     seed=self.seed, on_token=on_token)  # fmt: skip
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
        seconds = time.perf_counter() - t0
        render(final=True)
        stopped = self.stop_event.is_set()
        write("\n" + ("[stopped]\n" if stopped else ""))
        reasoning, answer = split_reasoning(self.tok.decode(tokens, skip_special_tokens=True))
        if not stopped:  # R1 practice: the next turn sees the answer, not the reasoning
            self.history += [{"role": "user", "content": user}, {"role": "assistant", "content": (answer or "").strip()}]
        return Reply(reasoning, (answer or "").strip(), len(tokens), stopped, len(tokens) / max(seconds, 1e-9))


HELP = "commands: /reset (clear the conversation), /exit (quit); Ctrl-C stops a reply, Ctrl-D quits"


def add_parser(sub) -> None:
    p = sub.add_parser("chat", help="chat with a reasoning model in the terminal (bundled r1-tiny by default)")
    p.add_argument("--model", default="deepseek/r1-tiny", help="model folder, bundled name or HF-cache repo id")
    p.add_argument("--prompt", default=None, help="one-shot: answer this and exit")
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (best for the tiny models)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--color", choices=["auto", "always", "never"], default="auto")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.max_new_tokens <= 0:
        raise ValueError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise ValueError(f"--temperature must be >= 0 and --top-p in (0, 1], got {args.temperature}, {args.top_p}")
    from .cli_generate import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(args.model, args.device)
    color = {"auto": None, "always": True, "never": False}[args.color]
    session = ChatSession(model, tok, color=color, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                          top_p=args.top_p, seed=args.seed, system=args.system)  # fmt: skip
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
