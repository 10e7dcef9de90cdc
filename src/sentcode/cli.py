"""The ``sentcode`` command. Thin: parse arguments, call one library function, print."""

from __future__ import annotations

import argparse
import sys
import warnings

from sentcode.errors import SentcodeError
from sentcode.registry import family, family_of


def _warn_one_line(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=sys.stderr)


def _add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 is greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the K most likely tokens (0 or unset: no limit)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: smallest set with probability >= P")
    p.add_argument("--seed", type=int, default=None, help="random seed for reproducible samples")


def _add_run_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="a sentence pipeline run directory (from `sentcode pipeline sentence`)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--no-progress", action="store_true", help="plain log lines instead of the live progress bar")


def _add_sentence_train(train_sub) -> None:
    pl = train_sub.add_parser("planner", help="train the planner stage of a sentence pipeline run",
                              description="Train the planner on the run's per-document RVQ codes (stage 'planner': "
                              "RUN_DIR/planner), then store its greedy predicted codes for every split. Needs the "
                              "rvq stage; later stages become stale and are redone by the next pipeline run.")
    _add_run_dir(pl)
    rd = train_sub.add_parser("renderer", help="train a renderer stage of a sentence pipeline run",
                              description="Train a renderer of a sentence pipeline run: --kind ar (codes + context -> "
                              "bytes, stage 'renderer'), nocode (the no-code ablation, stage 'renderer-nocode') or nar "
                              "(the non-autoregressive renderer, stage 'renderer-nar', when available).")
    _add_run_dir(rd)
    rd.add_argument("--kind", choices=["ar", "nar", "nocode"], default="ar", help="which renderer (default ar)")


def _add_sentence_commands(sub) -> None:
    from sentcode.runs.staged_config import STAGES

    pipe = sub.add_parser("pipeline", help="build a model end to end from a corpus (cached stages)")
    pipe_sub = pipe.add_subparsers(dest="pipeline_command", required=True, metavar="FAMILY")
    ps = pipe_sub.add_parser(
        "sentence", help="the sentence-step LM: sentences, encoder, embeddings, RVQ, planner, renderers, eval",
        description="Build a sentence-step LM in RUN_DIR, one sub-directory per stage (" + ", ".join(STAGES) + "). "
        "A stage whose inputs and config are unchanged is skipped, so re-running is cheap; --from STAGE redoes "
        "that stage and every later one. Ctrl+C stops; the interrupted stage is redone next time.")
    ps.add_argument("--corpus", nargs="+", default=["sotu"], metavar="SPEC",
                    help="sotu (default), sample, a file, a folder, a .jsonl, a corpus .yaml, or hf:NAME[:CONFIG][:SPLIT]")
    ps.add_argument("--preset", default="sentence-tiny",
                    help="sentence-tiny (default) or sentence-small: the end-to-end model, one training run; "
                         "staged-tiny or staged-small: the seeds' staged recipe; or a CONFIG.yaml")
    ps.add_argument("--resume", default=None, metavar="auto|PATH",
                    help="end-to-end presets: continue an interrupted training run (staged presets cache their stages)")
    ps.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory")
    ps.add_argument("--from", dest="from_stage", choices=STAGES, default=None, metavar="STAGE",
                    help="redo this stage and all later ones (" + ", ".join(STAGES) + ")")
    ps.add_argument("--until", choices=STAGES, default=None, metavar="STAGE", help="stop after this stage")
    ps.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value, e.g. --set encoder.model.d_model=64 --set budgets.renderer.max_steps=500")
    ps.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    ps.add_argument("--no-progress", action="store_true", help="plain log lines instead of the live progress bar")

    from sentcode import cli_hier

    cli_hier.add_pipeline(pipe_sub)
    cli_hier.add_commands(sub)

    sp = sub.add_parser("sentences", help="split the corpus stage of a sentence pipeline run into sentences",
                        description="Stage 'sentences': split each document of RUN_DIR/corpus into sentences "
                        "(nupunkt; over-long ones cut into pieces) and write RUN_DIR/sentences.")
    _add_run_dir(sp)
    enc = sub.add_parser("encoder", help="the byte sentence encoder stage of a sentence pipeline run")
    enc_sub = enc.add_subparsers(dest="encoder_command", required=True, metavar="ACTION")
    et = enc_sub.add_parser("train", help="train the byte sentence encoder (stage 'encoder')",
                            description="Train the byte sentence encoder on the run's training sentences "
                            "(contrastive, objective from the config: 'next' by default) into RUN_DIR/encoder.")
    _add_run_dir(et)
    em = sub.add_parser("embed", help="embed every sentence of a sentence pipeline run (stage 'embed')",
                        description="Embed every sentence of every split with the trained encoder; writes float32 "
                        "memmaps RUN_DIR/embed/SPLIT.npy with a JSON sidecar.")
    _add_run_dir(em)
    rvq = sub.add_parser("rvq", help="the residual VQ stage of a sentence pipeline run")
    rvq_sub = rvq.add_subparsers(dest="rvq_command", required=True, metavar="ACTION")
    rf = rvq_sub.add_parser("fit", help="fit the RVQ on train embeddings, report health, encode all splits",
                            description="Stage 'rvq': k-means++ and Lloyd iterations per level on the training "
                            "embeddings; writes rvq.safetensors, rvq.json, report.json (val health) and per-split "
                            "codes [N, K] and residuals.")
    _add_run_dir(rf)
    re_ = rvq_sub.add_parser("encode", help="re-encode every split with the fitted RVQ",
                             description="Re-encode every split's embeddings with the stored quantizer (after "
                             "re-embedding, say); stages that read the codes become stale if the codes change.")
    _add_run_dir(re_)
    rr = rvq_sub.add_parser("report", help="per-level health of the fitted RVQ on a split",
                            description="Per level: reconstruction cosine and MSE, residual energy, share of codes "
                            "used, code perplexity and dead codes, on the chosen split's embeddings.")
    _add_run_dir(rr)
    rr.add_argument("--split", choices=["train", "val", "test"], default="val", help="split to measure (default val)")
    rr.add_argument("--json", action="store_true", help="print JSON")


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
    prep.add_argument("--tokenizer", choices=["bytes", "bpe", "unigram"], default="bytes",
                      help="bytes (default), bpe, or unigram (both byte-level: every byte string round-trips)")
    prep.add_argument("--vocab-size", type=int, default=4096, help="BPE or Unigram vocabulary size (default 4096)")
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

    _add_sentence_train(train_sub)
    _add_sentence_commands(sub)

    ev = sub.add_parser("eval", help="bits per byte of a trained run",
                        description="A full deterministic pass over the held-out test split (or a text file); "
                        "prints bits per UTF-8 byte.")
    ev.add_argument("run_dir", metavar="RUN_DIR", help="a flat LM run or a sentence pipeline run (two-part bpb and its parts)")
    ev.add_argument("--text-file", default=None, metavar="FILE", help="score this file instead of the held-out split")
    ev.add_argument("--split", choices=["val", "test"], default="test", help="held-out split to score (default test)")
    ev.add_argument("--json", action="store_true", help="print one JSON object (bpb, bytes, tokens, ...)")

    gen = sub.add_parser("generate", help="continue a prompt with a trained run",
                         description="Sample a continuation of --prompt. Temperature 0 is greedy. A flat LM run "
                         "writes up to --max-bytes bytes; a sentence pipeline run writes up to --max-sentences "
                         "sentences, each chosen among --rerank candidates by agreement with the planned codes.")
    gen.add_argument("run_dir", metavar="RUN_DIR")
    gen.add_argument("--prompt", required=True, help="text to continue")
    gen.add_argument("--max-bytes", type=int, default=200, help="flat LM: most bytes to generate (default 200)")
    _add_sampling(gen)
    gen.add_argument("--stop", default=None, metavar="STR", help="flat LM: stop before this string")
    gen.add_argument("--no-cache", action="store_true", help="flat LM: recompute attention over the whole window at every step")
    gen.add_argument("--max-sentences", type=int, default=None,
                     help="sentence run: most sentences to generate, 1 to 64 (default 3); hierarchical "
                          "autoencoder run: most segments (words or so), 1 to 4096 (default 40)")
    rr = gen.add_mutually_exclusive_group()
    rr.add_argument("--rerank", type=int, default=None, metavar="N",
                    help="sentence run: candidates rendered per sentence and reranked (default 4; 0 or 1: none)")
    rr.add_argument("--no-rerank", action="store_true", help="sentence run: take the first candidate (same as --rerank 1)")
    gen.add_argument("--stream", action="store_true", help="sentence run: print each sentence as soon as it is chosen")
    gen.add_argument("--renderer", choices=["ar", "nar"], default=None,
                     help="sentence run: the renderer that writes (default ar; nar needs the renderer-nar stage)")
    _add_backend(gen)

    chat = sub.add_parser("chat", help="talk with a trained run in the terminal (streaming REPL)",
                          description="Each line you enter joins the conversation and the model continues it, "
                          "streaming. A flat LM reads the newest part of the conversation that fits its context "
                          "(turns joined by newlines); a sentence run reads its most recent sentences (turns joined "
                          "by spaces). Commands: /reset, /temperature T, /max N, /help, /quit. Ctrl+C stops a reply "
                          "or clears the line; Ctrl+D quits.")
    chat.add_argument("run_dir", metavar="RUN_DIR", help="a flat LM run or a sentence pipeline run")
    chat.add_argument("--max", type=int, default=None, metavar="N",
                      help="longest reply: bytes for a flat LM (default 200), sentences for a sentence run (default 3)")
    _add_sampling(chat)
    _add_backend(chat)

    exp = sub.add_parser("export", help="export a flat LM run to ONNX (optionally int8), checked first (extra 'onnx')",
                         description="Write RUN_DIR's model as an ONNX graph that ONNX Runtime runs, with its config "
                         "and tokenizer beside it. Before anything is written the graph is checked against the "
                         "PyTorch model on held-out text: logits within a tolerance and identical greedy "
                         "continuations (fp32), bits per byte within --max-bpb-cost of the PyTorch model's (int8). "
                         "`sentcode generate|chat|serve DIR` and `sentcode.load(DIR)` run the result. Needs pip "
                         "install 'sentcode[onnx]'.")
    exp.add_argument("run_dir", metavar="RUN_DIR", help="a trained flat LM run")
    exp.add_argument("--format", choices=["onnx"], default="onnx", help="export format (default onnx)")
    exp.add_argument("--quantize", choices=["int8"], default=None, help="weight-only int8 matrices for the CPU")
    exp.add_argument("--max-bpb-cost", type=float, default=0.01, metavar="F",
                     help="int8: largest relative bits-per-byte increase accepted (default 0.01)")
    exp.add_argument("--out", required=True, metavar="DIR", help="new (or empty) directory to write")

    # prefix_chars="+": every "-" option after `lm-eval` belongs to lm-eval, so argparse passes it through.
    lme = sub.add_parser("lm-eval", prefix_chars="+", add_help=False, formatter_class=argparse.RawDescriptionHelpFormatter,
                         help="run lm-evaluation-harness with the 'sentcode' model registered (extra 'lmeval')",
                         usage="sentcode lm-eval [LM_EVAL_ARGS ...]",
                         description="""Run lm-eval's own command line in a process where the model 'sentcode' is
registered (lm-eval 0.4.x finds third-party models only that way). Every argument goes to lm-eval
unchanged; --include_path defaults to the bundled offline tasks: sentcode_sotu_mc (multiple choice),
sentcode_sotu_ppl (rolling log-likelihood), sentcode_sotu_gen (generation), tag sentcode_sotu.

  sentcode lm-eval --model sentcode --model_args run=runs/tiny --tasks sentcode_sotu
  sentcode lm-eval run --help          lm-eval's own options

Model args: run=RUN_DIR (a flat LM or a sentence pipeline run), device=cpu|cuda, rerank=N (sentence
runs, when sampling). Needs pip install 'sentcode[lmeval]'.""")
    lme.add_argument("lm_eval_args", nargs=argparse.REMAINDER, metavar="LM_EVAL_ARGS",
                     help="arguments for lm-eval, e.g. --model sentcode --model_args run=RUN_DIR --tasks sentcode_sotu")
    lme.set_defaults(print_help=lme.print_help)

    demo = sub.add_parser("demo", help="the main job: prepare the default corpus, train, evaluate, sample",
                          description="Prepare the default corpus, train the tiny flat LM (BPE) and a tiny "
                          "end-to-end sentence-step LM for the same training wall-clock (2.5 minutes each; about 7 minutes on 2 CPU "
                          "cores in all), evaluate both on the held-out "
                          "test split and print them side by side: bits per byte, parameters, generated bytes/s "
                          "and a sample from each.")
    demo.add_argument("--out", default="runs/demo", metavar="DIR", help="where data and runs go (default runs/demo)")
    demo.add_argument("--corpus", default="sotu", help="corpus spec (default sotu)")
    demo.add_argument("--minutes", type=float, default=None,
                      help="training budget of each model in minutes (default 2.5)")
    demo.add_argument("--flat-only", action="store_true", help="only the flat LM (about 4 minutes), with samples")
    demo.add_argument("--sentence", action="store_true",
                      help="instead: train the tiny sentence-step LM with its whole preset, evaluate it and sample")

    srv = sub.add_parser("serve", help="serve trained runs over HTTP, with a playground page (extra 'serve')",
                         description="Serve one or more runs over HTTP, each under its model name: the playground "
                         "page at /, POST /generate (the seeds' bodies), /v1/completions, /v1/chat/completions "
                         "(streaming as server-sent events), /v1/plan, GET /v1/models, /health, /docs. A request "
                         "picks a model with its 'model' field. Flat LM requests are decoded together in batches; a "
                         "sentence run serves one request at a time. Needs pip install 'sentcode[serve]'.")
    srv.add_argument("run_dir", metavar="RUN_DIR", nargs="+", help="flat LM, sentence-step or autoencoder runs")
    srv.add_argument("--host", default="127.0.0.1",
                     help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 opens it to the network)")
    srv.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000; 0 picks a free one)")
    srv.add_argument("--model-name", nargs="+", default=None, metavar="NAME",
                     help="model ids in /v1/models and requests, one per run (default: each run directory's name)")
    srv.add_argument("--max-batch", type=int, default=8, metavar="N",
                     help="flat LM: requests decoded together (default 8); a sentence run serves 1 at a time")
    srv.add_argument("--max-queue", type=int, default=32, metavar="N",
                     help="requests waiting beyond those being served; more get 429 (default 32)")
    srv.add_argument("--max-tokens", type=int, default=1024, metavar="N",
                     help="largest max_tokens a request may ask for: tokens for a flat LM, sentences (at most 64) "
                     "for a sentence run (default 1024)")
    srv.add_argument("--max-prompt-bytes", type=int, default=65536, metavar="N",
                     help="largest prompt in UTF-8 bytes (chat: all messages together); larger get 400 (default 65536)")
    srv.add_argument("--max-body-bytes", type=int, default=1048576, metavar="N",
                     help="largest request body; larger get 413 (default 1048576)")
    srv.add_argument("--threads", type=int, default=None, metavar="N",
                     help="torch CPU threads for the model (default: torch's choice)")
    _add_backend(srv)
    return parser


def _add_backend(p) -> None:
    p.add_argument("--backend", choices=["torch", "onnx"], default="torch",
                   help="flat LM: onnx runs it with ONNX Runtime, exported and checked into RUN_DIR/onnx on first "
                        "use (extra 'onnx'; 2.6-3.5 x faster at batch 1, 2.7 x at batch 8 on a 2-core CPU, measured); default torch")


_SENTENCE_COMMANDS = ("pipeline", "sentences", "encoder", "embed", "rvq", "hier")


def _progress(args):
    return "plain" if args.no_progress else True


def _dispatch_sentence(args) -> int:
    from sentcode.pipeline import sentence as pipe

    if args.command == "hier":
        from sentcode.cli_hier import dispatch

        return dispatch(args)
    if args.command == "pipeline":
        corpus = args.corpus if len(args.corpus) > 1 else args.corpus[0]
        fam = family(_preset_family(args.preset), where=f"preset {args.preset!r}")
        # `pipeline hier` takes autoencoder presets only, `pipeline sentence` the sentence-step ones
        if (args.pipeline_command == "hier") != (fam.name == "hier") or not fam.steps_by_sentence:
            raise SentcodeError(f"preset {args.preset!r} is a {fam.label} config; train it with "
                                f"`{fam.command.format(preset=args.preset)}`")
        if not fam.staged:
            return _train_end_to_end(args, corpus, fam)
        if args.resume is not None:
            raise SentcodeError("--resume applies to the end-to-end presets; a staged pipeline skips finished stages itself")
        r = pipe.run_pipeline(corpus, args.out, preset=args.preset, overrides=args.overrides,
                              from_stage=args.from_stage, until=args.until, progress=_progress(args), device=args.device)
        times = ", ".join(f"{k} {v:.0f}s" for k, v in r["seconds"].items() if v is not None)
        print(f"ran {len(r['ran'])} stage(s), skipped {len(r['skipped'])} up to date; stage seconds: {times}")
        if "eval" in r:
            from sentcode.eval.sentence import format_sentence_result

            print(format_sentence_result(r["eval"]))
        print(f"run directory {args.out}")
        return 0
    if args.command == "rvq" and args.rvq_command == "encode":
        r = pipe.rvq_encode(args.run_dir)
        print(f"re-encoded {sum(r['sentences'].values()):,} sentences; codes {'changed' if r['changed'] else 'unchanged'}")
        return 0
    if args.command == "rvq" and args.rvq_command == "report":
        import json

        rows = pipe.rvq_report(args.run_dir, args.split)
        if args.json:
            print(json.dumps(rows))
        else:
            for r in rows:
                print(f"level {r['level']}: cosine {r['cosine']:.4f}  mse {r['mse']:.3g}  residual energy "
                      f"{r['residual_energy']:.4f}  used {r['used']:.3f}  perplexity {r['perplexity']:.1f}  dead {r['dead']}")
        return 0
    stage = {"sentences": "sentences", "encoder": "encoder", "embed": "embed", "rvq": "rvq"}.get(args.command)
    if args.command == "train":
        stage = "planner" if args.train_command == "planner" else \
            {"ar": "renderer", "nocode": "renderer-nocode", "nar": "renderer-nar"}[args.kind]
    rec = pipe.run_stage(args.run_dir, stage, progress=_progress(args), device=args.device)
    print(f"stage {stage} done in {rec['seconds']:.1f}s; later stages are redone by the next "
          f"`sentcode pipeline sentence --out {args.run_dir}`")
    return 0


def _preset_family(preset: str) -> str:
    from sentcode.config import _read_yaml

    return _read_yaml(preset).get("family", "lm")


def _train_end_to_end(args, corpus, fam) -> int:
    if args.from_stage is not None or args.until is not None:
        raise SentcodeError("--from and --until apply to the staged presets; an end-to-end preset is one training run")
    if not isinstance(corpus, str):
        raise SentcodeError("an end-to-end preset takes one --corpus SPEC (a corpus .yaml can combine several)")
    s = fam.resolve("train")(corpus, args.out, preset=args.preset, overrides=args.overrides, resume=args.resume,
                             device=args.device, progress=_progress(args))
    if s["status"] != "completed":
        return 130
    print(f"trained {s['step']} steps in {s['train_elapsed']:.0f}s"
          + (f", then {s['upper']['step']} steps of the second level" if s.get("upper") else ""))
    if s.get("eval"):
        print(fam.resolve("format")(s["eval"]))
    print(f"run directory {args.out}")
    return 0


def _generate_sentence(g, args) -> int:
    if args.stop is not None or args.no_cache:
        raise SentcodeError("--stop and --no-cache apply to flat LM runs, not sentence pipeline runs")
    rerank = 1 if args.no_rerank else args.rerank
    max_sentences = getattr(g, "default_steps", 3) if args.max_sentences is None else args.max_sentences
    kw = dict(max_sentences=max_sentences, rerank=rerank, temperature=args.temperature, seed=args.seed,
              top_k=args.top_k, top_p=args.top_p)
    pieces = g.stream(args.prompt, **kw)  # checked before anything is printed
    sep = g.separator
    sys.stdout.write(args.prompt)
    if args.stream:
        for piece in pieces:
            sys.stdout.write(sep + piece)
            sys.stdout.flush()
    else:
        text = sep.join(pieces)
        sys.stdout.write(sep + text if text else "")
    sys.stdout.write("\n")
    return 0


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
    if args.command in _SENTENCE_COMMANDS or (args.command == "train" and args.train_command != "lm"):
        return _dispatch_sentence(args)
    if args.command == "train":
        from sentcode.train.lm import train_lm

        summary = train_lm(args.data, args.out, preset=args.preset, overrides=args.overrides, max_steps=args.max_steps,
                           resume=args.resume, device=args.device, progress="plain" if args.no_progress else True)
        if summary["status"] != "completed":
            return 130
        if summary["final_eval"] is not None:  # None on the other ranks of a torchrun job: rank 0 evaluates
            print(f"trained {summary['step']} steps in {summary['train_elapsed']:.0f}s; "
                  f"validation-split bpb {summary['final_eval']['bpb']:.4f} (`sentcode eval {args.out}` scores the "
                  f"test split); run directory {args.out}")
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

        g = sentcode.load(args.run_dir, renderer=args.renderer, backend=args.backend)
        if family_of(g).steps_by_sentence:
            return _generate_sentence(g, args)
        if args.max_sentences is not None or args.rerank is not None or args.no_rerank or args.stream:
            raise SentcodeError("--max-sentences, --rerank, --no-rerank and --stream apply to sentence pipeline runs; "
                                "this is a flat LM run (use --max-bytes)")
        pieces = g.stream(args.prompt, max_bytes=args.max_bytes, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, seed=args.seed, stop=args.stop, use_cache=not args.no_cache)
        sys.stdout.write(args.prompt)  # only once the request is known to be valid
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0
    if args.command == "chat":
        from sentcode.serve.chat import run_chat

        return run_chat(args.run_dir, temperature=args.temperature, max_len=args.max, top_k=args.top_k,
                        top_p=args.top_p, seed=args.seed, backend=args.backend)
    if args.command == "export":
        from sentcode.infer.export import export_run

        info = export_run(args.run_dir, args.out, fmt=args.format, quantize=args.quantize,
                          max_bpb_cost=args.max_bpb_cost)
        speed = info["tokens_per_s_batch1"]
        print(f"wrote {args.out} ({args.format}{', int8 weights' if args.quantize else ''}); checked on "
              f"{info['check_tokens']:,} tokens of the {info['check_source']}: largest logit difference "
              f"{info['max_logit_diff']:.2e}, greedy continuations identical {info['greedy_identical']}, bits per byte "
              f"{info['bpb_onnx']:.4f} against {info['bpb_torch']:.4f} ({info['bpb_cost']:+.2%}); batch-1 decoding "
              f"{speed['onnx']:,.0f} tokens/s against {speed['torch']:,.0f} ({speed['onnx'] / speed['torch']:.1f} x)")
        return 0
    if args.command == "lm-eval":
        if not args.lm_eval_args or args.lm_eval_args[0] in ("-h", "--help"):
            args.print_help()
            return 0
        from sentcode.lmeval.cli import run_lm_eval

        return run_lm_eval(args.lm_eval_args)
    if args.command == "demo":
        from sentcode.demo import run_demo, run_flat, run_sentence_demo

        if args.sentence and args.flat_only:
            raise SentcodeError("--sentence and --flat-only exclude each other")
        if args.sentence:
            run_sentence_demo(args.out, corpus=args.corpus)
        elif args.flat_only:
            run_flat(args.out, corpus=args.corpus, minutes=args.minutes or 3.0)
        else:
            run_demo(args.out, corpus=args.corpus, minutes=args.minutes or 2.5)
        return 0
    if args.command == "serve":
        from sentcode.serve.config import ServeConfig
        from sentcode.serve.server import run_server

        run_server(args.run_dir, ServeConfig(host=args.host, port=args.port,
                                             max_body_bytes=args.max_body_bytes, max_prompt_bytes=args.max_prompt_bytes,
                                             max_tokens=args.max_tokens, max_batch=args.max_batch,
                                             max_queue=args.max_queue, threads=args.threads,
                                             backend=args.backend), names=args.model_name)
        return 0
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
