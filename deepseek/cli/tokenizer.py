"""`deepseek tokenizer train` -- train the byte-level BPE tokenizer.

    deepseek tokenizer train --out runs/tok --vocab-size 4096                 # the built-in offline corpus
    deepseek tokenizer train --out runs/tok --vocab-size 8192 data/ notes.txt  # your files and folders
"""

from __future__ import annotations

import json
import time


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("tokenizer", help="train a byte-level BPE tokenizer")
    sub = p.add_subparsers(dest="tokenizer_command", required=True)
    t = sub.add_parser("train", help="train on files/folders (default: the built-in task + prose corpus)")
    t.add_argument("inputs", nargs="*", help="text/jsonl/csv/parquet files or folders (default: built-in corpus)")
    t.add_argument("--out", required=True, help="output folder (tokenizer.json, tokenizer_config.json)")
    t.add_argument("--vocab-size", type=int, default=4096, help="tokens in the vocabulary, special tokens included")
    t.add_argument("--min-frequency", type=int, default=2, help="fewest occurrences for a merge")
    t.add_argument("--with-default-corpus", action="store_true", help="add the built-in corpus to the inputs")
    t.add_argument("--seed", type=int, default=0, help="seed of the built-in corpus")
    t.set_defaults(func=run_train)


def run_train(args) -> int:
    from pathlib import Path

    from deepseek.tokenizer import default_corpus, train_tokenizer

    for item in args.inputs:  # check inputs before any work
        if not Path(item).exists():
            raise FileNotFoundError(f"no such file or folder: {item}")
    inputs = [Path(i) for i in args.inputs]
    if not inputs or args.with_default_corpus:
        inputs = inputs + default_corpus(seed=args.seed)
    start = time.perf_counter()
    tok = train_tokenizer(inputs, args.vocab_size, args.out, min_frequency=args.min_frequency)
    seconds = time.perf_counter() - start
    sample = "What is 4738 * 592? <think>Multiply digit by digit.</think> 2804896"
    n = len(tok(sample, add_special_tokens=False)["input_ids"])
    print(f"saved {args.out}: {len(tok)} tokens (asked {args.vocab_size}) in {seconds:.1f}s; "
          f"sample of {len(sample)} chars -> {n} tokens")  # fmt: skip
    print(json.dumps({"out": str(args.out), "vocab_size": len(tok), "seconds": round(seconds, 2)}))
    return 0
