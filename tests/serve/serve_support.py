"""Shared pieces for the serving tests (no tests here): a tiny served-model folder with a real byte-level BPE
tokenizer, a PostgreSQL server started for the test session, and a live uvicorn server on a free port."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from helpers import random_model, tiny_config

SPECIALS = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜pad｜>", "<｜User｜>", "<｜Assistant｜>",
            "<think>", "</think>"]  # fmt: skip
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] in ('system', 'developer') %}{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}<｜User｜>{{ m['content'] }}{% else %}<｜Assistant｜>{{ m['content'] }}"
    "<｜end▁of▁sentence｜>{% endif %}{% endfor %}{% if add_generation_prompt %}<｜Assistant｜><think>\n{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog. Reasoning models think before they answer.",
    "DeepSeek-R1 writes its reasoning inside think tags, then the final answer. 1 + 1 = 2.",
    "Hello world! How are you today? Continuous batching serves many requests at once.",
] * 20


def build_tokenizer(vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIALS[0], eos_token=SPECIALS[1],
                                   pad_token=SPECIALS[2])  # fmt: skip
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_model_dir(path: Path, seed: int = 0, **config) -> Path:
    """A folder the server loads: a random tiny R1 model whose vocab matches a real trained BPE tokenizer."""
    tokenizer = build_tokenizer()
    ids = tokenizer.convert_tokens_to_ids(SPECIALS[:3])
    cfg = tiny_config(vocab_size=len(tokenizer), bos_token_id=ids[0], eos_token_id=ids[1], pad_token_id=ids[2],
                      max_position_embeddings=256, **config)  # fmt: skip
    model = random_model(cfg, seed=seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn serving `app` on 127.0.0.1:<free port> in a thread."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline:
                raise RuntimeError("uvicorn did not start in 30 s")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)


def postgres_bin() -> Path | None:
    """The folder holding initdb and pg_ctl (Debian puts them under /usr/lib/postgresql/<v>/bin)."""
    for name in ("initdb", "pg_ctl"):
        if shutil.which(name) is None and not list(Path("/usr/lib/postgresql").glob(f"*/bin/{name}")):
            return None
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return found[-1].parent if found else Path(shutil.which("initdb")).parent


class Postgres:
    """A throwaway PostgreSQL cluster in a temp dir on a free port. As root, it runs as the `postgres` user
    (the server refuses to run as root), so the data dir is handed to that user."""

    def __init__(self):
        self.bin = postgres_bin()
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="pgtest-"))
        self.data = self.dir / "data"
        self.as_root = os.geteuid() == 0

    def _run(self, *args):
        cmd = [str(self.bin / args[0]), *map(str, args[1:])]
        if self.as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def __enter__(self):
        if self.as_root:
            shutil.chown(self.dir, "postgres")
        self._run("initdb", "-D", self.data, "-A", "trust", "-U", "postgres", "--no-sync")
        self._run("pg_ctl", "-D", self.data, "-l", self.dir / "log", "-w", "-o",
                  f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off", "start")  # fmt: skip
        return self

    def __exit__(self, *exc):
        try:
            self._run("pg_ctl", "-D", self.data, "-m", "immediate", "stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
