"""The ``sentcode`` command. Thin: parse arguments, call one library function, print."""

from __future__ import annotations

import argparse
import sys
import warnings

from sentcode.errors import SentcodeError


def _warn_one_line(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=sys.stderr)


def _add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 is greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the K most likely tokens (0 or unset: no limit)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: smallest set with probability >= P")
    p.add_argument("--seed", type=int, default=None, help="random seed for reproducible samples")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sentcode",
        description="Train, evaluate and sample small language models over bytes, BPE tokens or sentences.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = sub.add_parser("data", help="prepare corpora into packed token shards")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    prep = data_sub.add_parser("prepare", help="clean, split, tokenize and pack a corpus into DATA_DIR",
                               description="Load a corpus (sotu, sample, files, folders, .jsonl, a corpus YAML or hf:NAME), "
                               "split it by document into train/val/test, train the tokenizer on train, and write packed shards.")
    prep.add_argument("--corpus", nargs="+", default=["sotu"], metavar="SPEC",
                      help="sotu (default), sample, a file, a folder, a .jsonl, a corpus .yaml, or hf:NAME[:CONFIG][:SPLIT]")
    prep.add_argument("--tokenizer", choices=["bytes", "bpe"], default="bytes", help="bytes (default) or bpe")
    prep.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size (default 4096)")
    prep.add_argument("--val-frac", type=float, default=0.05, help="share of documents held out for validation")
    prep.add_argument("--test-frac", type=float, default=0.05, help="share of documents held out for testing")
    prep.add_argument("--out", required=True, metavar="DATA_DIR", help="output data directory")

    train = sub.add_parser("train", help="train a model")
    train_sub = train.add_subparsers(dest="train_command", required=True, metavar="FAMILY")
    lm = train_sub.add_parser("lm", help="train a flat byte/BPE language model",
                              description="Train a flat decoder LM on a prepared data directory. Ctrl+C or SIGTERM "
                              "finishes the step, saves a checkpoint and exits; a second Ctrl+C quits at once.")
    lm.add_argument("--preset", default="tiny", help="tiny, small, base, or a CONFIG.yaml (default tiny)")
    lm.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value, e.g. --set model.n_layer=6 --set train.lr=1e-3")
    lm.add_argument("--data", required=True, metavar="DATA_DIR", help="data directory from `sentcode data prepare`")
    lm.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory (config, checkpoints, metrics)")
    lm.add_argument("--max-steps", type=int, default=None, help="override train.max_steps")
    lm.add_argument("--resume", default=None, metavar="auto|CKPT", help="continue from the newest checkpoint (auto) or a file")
    lm.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    lm.add_argument("--no-progress", action="store_true", help="plain log lines instead of the live progress bar")

    ev = sub.add_parser("eval", help="bits per byte of a trained run",
                        description="A full deterministic pass over the held-out test split (or a text file); "
                        "prints bits per UTF-8 byte.")
    ev.add_argument("run_dir", metavar="RUN_DIR")
    ev.add_argument("--text-file", default=None, metavar="FILE", help="score this file instead of the held-out split")
    ev.add_argument("--split", choices=["val", "test"], default="test", help="held-out split to score (default test)")
    ev.add_argument("--json", action="store_true", help="print one JSON object (bpb, bytes, tokens, ...)")

    gen = sub.add_parser("generate", help="continue a prompt with a trained run",
                         description="Sample a continuation of --prompt. Temperature 0 is greedy.")
    gen.add_argument("run_dir", metavar="RUN_DIR")
    gen.add_argument("--prompt", required=True, help="text to continue")
    gen.add_argument("--max-bytes", type=int, default=200, help="most bytes to generate (default 200)")
    _add_sampling(gen)
    gen.add_argument("--stop", default=None, metavar="STR", help="stop before this string")
    gen.add_argument("--no-cache", action="store_true", help="recompute attention over the whole window at every step")

    demo = sub.add_parser("demo", help="the main job: prepare the default corpus, train, evaluate, sample",
                          description="Prepare the default corpus, train the tiny flat byte LM for a few minutes, "
                          "evaluate held-out bits per byte and print generated continuations.")
    demo.add_argument("--out", default="runs/demo", metavar="DIR", help="where data and runs go (default runs/demo)")
    demo.add_argument("--corpus", default="sotu", help="corpus spec (default sotu)")
    demo.add_argument("--minutes", type=float, default=3.0, help="training time budget in minutes (default 3)")
    return parser


def main(argv: list[str] | None = None) -> int:
    warnings.showwarning = _warn_one_line
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except SentcodeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _dispatch(args) -> int:
    if args.command == "data":
        from sentcode.data import prepare_data

        meta = prepare_data(args.corpus if len(args.corpus) > 1 else args.corpus[0], args.out, tokenizer=args.tokenizer,
                            vocab_size=args.vocab_size, val_frac=args.val_frac, test_frac=args.test_frac)
        for name, s in meta["splits"].items():
            print(f"{name}: {s['documents']} documents, {s['bytes']:,} bytes, {s['tokens']:,} tokens")
        print(f"wrote {args.out}")
        return 0
    if args.command == "train":
        from sentcode.train.lm import train_lm

        summary = train_lm(args.data, args.out, preset=args.preset, overrides=args.overrides, max_steps=args.max_steps,
                           resume=args.resume, device=args.device, progress="plain" if args.no_progress else True)
        if summary["status"] != "completed":
            return 130
        if summary["final_eval"] is not None:  # None on the other ranks of a torchrun job: rank 0 evaluates
            print(f"trained {summary['step']} steps in {summary['train_elapsed']:.0f}s; "
                  f"held-out bpb {summary['final_eval']['bpb']:.4f}; run directory {args.out}")
        else:
            print(f"trained {summary['step']} steps in {summary['train_elapsed']:.0f}s; run directory {args.out}")
        return 0
    if args.command == "eval":
        import sentcode
        from sentcode.eval.run import dumps, evaluate_run, format_result

        result = evaluate_run(sentcode.load(args.run_dir), text_file=args.text_file, split=args.split)
        print(dumps(result) if args.json else format_result(result))
        return 0
    if args.command == "generate":
        import sentcode

        g = sentcode.load(args.run_dir)
        pieces = g.stream(args.prompt, max_bytes=args.max_bytes, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, seed=args.seed, stop=args.stop, use_cache=not args.no_cache)
        sys.stdout.write(args.prompt)  # only once the request is known to be valid
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0
    if args.command == "demo":
        from sentcode.demo import run_demo

        run_demo(args.out, corpus=args.corpus, minutes=args.minutes)
        return 0
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
