"""Start-up of the `deepseek` command: wall time of `--help` (the top level and every command) and the time
from launching `deepseek chat --prompt ...` to the first byte it prints (the model's first token) and to exit.

    python benchmarks/startup.py                 # 3 runs each, median; prints a table, then one JSON line
    python benchmarks/startup.py --runs 5 --prompt "What is 48 + 27?"

Each run is a fresh process, as a user starts it; the machine's load average is printed with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = ["generate", "train", "eval", "tokenizer", "serve", "keys", "usage", "recipe", "chat", "routing"]


def deepseek_command() -> list[str]:
    script = Path(sys.executable).with_name("deepseek")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "deepseek.cli"]


def wall(argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


def first_byte(argv: list[str]) -> tuple[float, float]:
    """(seconds to the first stdout byte, seconds to exit) of a fresh process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    proc.stdout.read(1)
    first = time.perf_counter() - t0
    proc.stdout.read()
    if proc.wait() != 0:
        raise SystemExit(f"{' '.join(argv)} exited with {proc.returncode}")
    return first, time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--prompt", default="What is 48 + 27?")
    args = parser.parse_args()
    if args.runs < 1:
        raise SystemExit(f"--runs must be >= 1, got {args.runs}")
    cmd = deepseek_command()
    load_before = os.getloadavg()
    rows = {"--help": statistics.median(wall(cmd + ["--help"]) for _ in range(args.runs))}
    for c in COMMANDS:
        rows[f"{c} --help"] = statistics.median(wall(cmd + [c, "--help"]) for _ in range(args.runs))
    chats = [first_byte(cmd + ["chat", "--prompt", args.prompt, "--color", "never"]) for _ in range(args.runs)]
    first, done = statistics.median(f for f, _ in chats), statistics.median(d for _, d in chats)
    load_after = os.getloadavg()
    print(f"{'command':<28}{'wall s (median of ' + str(args.runs) + ')':>26}")
    for name, seconds in rows.items():
        print(f"{'deepseek ' + name:<28}{seconds:>26.3f}")
    print(f"{'chat: first token':<28}{first:>26.3f}")
    print(f"{'chat: whole reply':<28}{done:>26.3f}")
    print(f"load average (1 min) {load_before[0]:.2f} before, {load_after[0]:.2f} after, {os.cpu_count()} CPUs")
    print(json.dumps({"help_s": {k: round(v, 3) for k, v in rows.items()}, "max_help_s": round(max(rows.values()), 3),
                      "chat_first_token_s": round(first, 3), "chat_total_s": round(done, 3),
                      "loadavg_1m": [round(load_before[0], 2), round(load_after[0], 2)], "cpus": os.cpu_count()}))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
