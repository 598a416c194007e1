"""Chat with a reasoning model from Python: the conversation format, the <think> split, a streaming session.

    from deepseek.chat import ChatSession
    from deepseek.loading import load_model_and_tokenizer
    session = ChatSession(*load_model_and_tokenizer("deepseek/r1-tiny"))
    reply = session.send("What is 48 + 27?")        # streams to stdout; reply.reasoning, reply.answer

`deepseek chat` (deepseek/cli/chat.py) is this session in a terminal. As in DeepSeek-R1, earlier turns'
reasoning is not fed back.
"""

from __future__ import annotations

import signal
import sys
import threading
from dataclasses import dataclass

# DeepSeek-R1's own chat format, used when the tokenizer carries no chat template.
BOS, USER, ASSISTANT, EOS = "<｜begin▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<｜end▁of▁sentence｜>"
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
    finish_reason: str = "stop"  # "stop" (end of turn), "length" (cut at max_new_tokens) or "cancelled"


class ChatSession:
    """History + streaming generation with a stop flag. `send` writes to `out` as tokens arrive."""

    def __init__(self, model, tokenizer, out=None, color: bool | None = None, max_new_tokens: int | None = None,
                 temperature: float | None = None, top_p: float | None = None, seed: int | None = None,
                 system: str | None = None, use_mtp: bool | None = None, compile: bool = False):  # fmt: skip
        """Sampling settings left None take the model's defaults (its generation_config.json); use_mtp: MTP
        speculative decoding (greedy); compile: the compiled decode step (generation/compiled.py)."""
        from .generation.defaults import sampling_defaults, use_mtp_default

        d = sampling_defaults(model)
        self.model, self.tok = model, tokenizer
        self.out = out or sys.stdout
        self.color = self.out.isatty() if color is None else color
        self.max_new_tokens = d.max_new_tokens if max_new_tokens is None else max_new_tokens
        self.temperature = d.temperature if temperature is None else temperature
        self.top_p = d.top_p if top_p is None else top_p
        self.seed = seed
        self.use_mtp = use_mtp_default(model) if use_mtp is None else use_mtp
        self.compile = compile
        self.system = system
        self.history: list[dict] = []
        self.stop_event = threading.Event()
        self.on_step = None  # test hook: called with the step index after each token

    def reset(self) -> None:
        self.history = []

    def interrupt(self) -> None:
        self.stop_event.set()

    def _messages(self, user) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history + [{"role": "user", "content": user}]

    def send(self, user: str, media: list[tuple[str, object]] | None = None) -> Reply:
        """One turn. media: [(modality, item)] ("image" | "audio" | "points", a path / bytes / array), put
        before the text; they stay in the history (the model sees them again on later turns)."""
        import time

        import torch

        from .generation.loop import generate

        content = [{"type": m, m: item} for m, item in media] + [{"type": "text", "text": user}] if media else user
        messages = self._messages(content)
        embeds = None
        if any(isinstance(m["content"], list) for m in messages):  # media in this turn or an earlier one
            if getattr(self.model, "multimodal", None) is None:
                raise ValueError("this model is a text model: it takes no images, audio or points")
            inputs = self.model.processor(self.tok)(messages=messages)
            ids = inputs["input_ids"][0].tolist()
            embeds = self.model.media_embeds(inputs["input_ids"], inputs["media"])
        else:
            ids = chat_prompt_ids(self.tok, messages)
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
            res = generate(self.model, torch.tensor([ids]), max_new_tokens=self.max_new_tokens,
                     temperature=self.temperature, top_p=self.top_p, eos_token_id=self.tok.eos_token_id,
                     seed=self.seed, on_token=on_token, inputs_embeds=embeds, use_mtp=self.use_mtp,
                           compile=self.compile)  # fmt: skip
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
        seconds = time.perf_counter() - t0
        render(final=True)
        stopped = self.stop_event.is_set()
        finish = "cancelled" if stopped else res.finish_reasons[0]
        cut = f"[cut at the {self.max_new_tokens}-token limit (finish_reason length): raise --max-new-tokens]\n"
        write("\n" + ("[stopped]\n" if stopped else cut if finish == "length" else ""))
        reasoning, answer = split_reasoning(self.tok.decode(tokens, skip_special_tokens=True))
        if not stopped:  # R1 practice: the next turn sees the answer, not the reasoning
            self.history += [{"role": "user", "content": content},
                             {"role": "assistant", "content": (answer or "").strip()}]  # fmt: skip
        return Reply(reasoning, (answer or "").strip(), len(tokens), stopped, len(tokens) / max(seconds, 1e-9),
                     finish)  # fmt: skip


def chat_prompt_ids(tokenizer, conversation: str | list[dict] | dict) -> list[int]:
    """Token ids of a conversation followed by the assistant turn (R1 opens it with <think>): the one way
    prompts are built for chat, evaluation, GRPO rollouts and serving.

    conversation: a list of {"role", "content"} messages; a string (one user turn); or a task example
    (deepseek.tasks), whose "messages" (or "prompt") without the assistant answer become the prompt.
    With no chat template on the tokenizer, DeepSeek-R1's own format is written out."""
    if isinstance(conversation, str):
        messages = [{"role": "user", "content": conversation}]
    elif isinstance(conversation, dict):
        turns = conversation.get("messages") or [{"role": "user", "content": conversation["prompt"]}]
        messages = [m for m in turns if m["role"] != "assistant"]
    else:
        messages = list(conversation)
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    system = "".join(m["content"] for m in messages if m["role"] in ("system", "developer"))
    text = BOS + system
    for m in messages:
        if m["role"] == "user":
            text += USER + m["content"]
        elif m["role"] == "assistant":
            text += ASSISTANT + m["content"] + EOS
    text += ASSISTANT + THINK_OPEN + "\n"
    return tokenizer.encode(text, add_special_tokens=False)
