"""`deepseek passkey`: train a small model for passkey retrieval, or measure it at any length.

    deepseek passkey train --out runs/passkey --steps 600                      # ~10 min on 2 cores
    deepseek passkey train --out runs/pk4 --layers 4 --view --steps 3000 --batch 16   # the bundled passkey-128k
    deepseek passkey eval --model deepseek/passkey-128k --lengths 4096,131072 --trials 10

Training: deepseek/train/passkey.py; prompts and evaluation: deepseek/eval/passkey.py.
"""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("passkey", help="train / evaluate passkey retrieval (long context)")
    sub = p.add_subparsers(dest="passkey_cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--out", required=True, help="folder for the trained model")
    t.add_argument("--steps", type=int, default=600, help="optimizer steps")
    t.add_argument("--batch", type=int, default=8, help="rows per step")
    t.add_argument("--length", type=int, default=384, help="longest training row in tokens")
    t.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    t.add_argument("--keys", type=int, default=1, help="passkeys hidden per row")
    t.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    t.add_argument("--answer-weight", type=float, default=1.0, help="loss weight of the answer tokens")
    t.add_argument("--pose", type=float, default=0.8, help="fraction of rows with a position gap")
    t.add_argument("--pose-after", type=float, default=0.25, help="gaps start after this fraction of the steps")
    t.add_argument("--eval-every", type=int, default=200, help="steps between retrieval checks")
    t.add_argument("--layers", type=int, default=2, help="decoder layers of a fresh model")
    t.add_argument("--init", default=None, help="continue from this saved model")
    t.add_argument("--min-length", type=int, default=None, help="shortest row (default: half of --length)")
    t.add_argument("--tokenizer", default="bytes", help='"bytes" or a tokenizer/model folder or bundled name')
    t.add_argument("--gap-start", type=int, default=None, help="PoSE gap curriculum: largest gap at the start")
    t.add_argument("--view", action="store_true", help="train for the compressed cache's compact views")
    t.add_argument("--view-frac", type=float, default=0.75, help="with --view: fraction of rows that are views")
    t.add_argument("--view-source", default="1024,8192", help="with --view: prompt lengths the views come from")
    t.add_argument("--blind-recent", action="store_true",
                   help="with --view: recent tokens before the last prefill chunk do not see the selected blocks")
    t.add_argument("--blind-first-layer", action="store_true",
                   help="with --blind-recent: in the first layer no recent token sees the selected blocks")
    t.add_argument("--lead-layer", type=int, default=None,
                   help="with --view: kv_lead_layer saved in the model's config (the layer whose selection all read; default: keep the --init model's)")
    t.add_argument("--view-topk", type=int, default=None,
                   help="with --view: blocks read per query (default VIEW_SETTINGS' 2; 4 = two runs of 2)")
    t.add_argument("--filler", default="repeat",
                   help='haystack: "repeat" (Landmark), "essay", "train" (real prose of the training families) or one family')
    t.add_argument("--longdoc", type=float, default=0.0,
                   help="fraction of rows that are variable-tracking or clause questions (deepseek.tasks.haystack)")
    t.add_argument("--select-weight", type=float, default=0.0,
                   help="with --view and a lead layer: weight of the loss that trains block selection (train/selection.py)")
    t.add_argument("--select-rows", type=int, default=4, help="with --select-weight: rows per step it is applied to")
    e = sub.add_parser("eval")
    e.add_argument("--model", required=True, help="model folder or bundled name")
    e.add_argument("--lengths", default="4096,16384", help="comma-separated prompt lengths in tokens")
    e.add_argument("--trials", type=int, default=10, help="prompts per length (passkey depths)")
    e.add_argument("--keys", type=int, default=1, help="passkeys hidden per prompt")
    e.add_argument("--modes", default="full,compressed", help="comma-separated cache modes: full, compressed")
    e.add_argument("--filler", default="repeat",
                   help='haystack: "repeat", "essay", "train" or a real-prose family (held out: package-readmes)')
    e.add_argument("--ppl-lengths", default="", help="also perplexity on repeating prose of these lengths")
    t.set_defaults(func=run_train)
    e.set_defaults(func=run_eval)


def run_train(args) -> int:
    import json
    import time

    from deepseek.train.passkey import train


    t0 = time.time()
    losses = train(args.out, args.steps, args.batch, args.length, args.lr, keys=args.keys, threads=args.threads,
                   answer_weight=args.answer_weight, pose=args.pose, pose_after=args.pose_after,
                   eval_every=args.eval_every, layers=args.layers, init=args.init,
                   min_length=args.min_length, tokenizer=args.tokenizer, gap_start=args.gap_start,
                   view=args.view, view_frac=args.view_frac, blind_recent=args.blind_recent,
                   blind_first_layer=args.blind_first_layer, lead_layer=args.lead_layer, view_topk=args.view_topk,
                   view_source=tuple(int(x) for x in args.view_source.split(",")),
                   filler=args.filler, longdoc=args.longdoc, select_weight=args.select_weight,
                   select_rows=args.select_rows)  # fmt: skip
    print(json.dumps({"final_loss": round(sum(losses[-20:]) / len(losses[-20:]), 4), "seconds": round(time.time() - t0)}))
    return 0


def run_eval(args) -> int:
    import json

    from deepseek.eval.passkey import essay_ids, long_perplexity, model_tokenizer, passkey_accuracy
    from deepseek.model.longctx.prefill import extend_context
    from deepseek.sdk import R1Model
    from deepseek.tasks.passkey import Passkey

    Passkey(filler=args.filler)  # a bad --filler fails here, before the model loads
    model = R1Model.from_pretrained(args.model).eval()
    lengths = [int(x) for x in args.lengths.split(",")]
    extend_context(model, max(lengths) + 64)
    result = {}
    for n in lengths:
        for mode in args.modes.split(","):
            acc = passkey_accuracy(model, n, args.trials, mode == "compressed", seed=n, keys=args.keys, progress=True,
                                   tok=model_tokenizer(args.model), filler=args.filler)  # fmt: skip
            result[f"{n // 1024}k_{mode}"] = acc
            print(f"{n:>7} {mode:<10} {acc:.2f}", flush=True)
    skip = model.config.compression.window + 2 * model.config.compression.block_size  # where the caches start to differ
    for n in [int(x) for x in args.ppl_lengths.split(",") if x]:
        ids = essay_ids(n, tok=model_tokenizer(args.model))
        for mode in args.modes.split(","):
            ppl = long_perplexity(model, ids, mode == "compressed", skip=skip)
            result[f"{n // 1024}k_ppl_{mode}"] = round(ppl, 4)
            print(f"{n:>7} {mode:<10} perplexity {ppl:.4f}", flush=True)
    print(json.dumps(result))
    return 0
