"""The ``sentcode`` commands of the hierarchical byte autoencoder: ``pipeline hier`` (train and evaluate) and
``hier encode`` / ``hier decode`` (text to codes and back). Thin, like ``cli``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from sentcode.errors import SentcodeError


def add_pipeline(pipe_sub) -> None:
    ph = pipe_sub.add_parser(
        "hier", help="the hierarchical byte autoencoder: causal segments, compressor, codes, code LM, expander",
        description="Train a hierarchical byte autoencoder in RUN_DIR in one run of the training loop (budgets, "
        "--resume, Ctrl+C, progress), then score its test split: bits per byte and the autoencoder's figures.")
    ph.add_argument("--corpus", nargs="+", default=["sotu"], metavar="SPEC",
                    help="sotu (default), sample, a file, a folder, a .jsonl, a corpus .yaml, or hf:NAME[:CONFIG][:SPLIT]")
    ph.add_argument("--preset", default="hier-tiny", help="hier-tiny (default) or a CONFIG.yaml")
    ph.add_argument("--resume", default=None, metavar="auto|PATH", help="continue an interrupted training run")
    ph.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory")
    ph.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value, e.g. --set data.segmenter=entropy --set data.segment_bytes=6")
    ph.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    ph.add_argument("--no-progress", action="store_true", help="plain log lines instead of the live progress bar")
    ph.set_defaults(from_stage=None, until=None)


def add_commands(sub) -> None:
    h = sub.add_parser("hier", help="a hierarchical autoencoder run's codes: encode text, decode codes")
    h_sub = h.add_subparsers(dest="hier_command", required=True, metavar="ACTION")
    enc = h_sub.add_parser("encode", help="the codes of a text file, segment by segment, and the compression",
                           description="Cut the text with the run's segmenter and give each segment's codes. "
                           "Prints the compression; --out writes the codes (JSON) for `sentcode hier decode`; "
                           "--check decodes them again and reports how much of the text comes back exactly.")
    enc.add_argument("run_dir", metavar="RUN_DIR", help="a hierarchical autoencoder run (`sentcode pipeline hier`)")
    enc.add_argument("--text-file", required=True, metavar="FILE", help="UTF-8 text to encode")
    enc.add_argument("--out", default=None, metavar="CODES.json", help="write the codes here (default: print them)")
    enc.add_argument("--check", action="store_true", help="decode the codes and report the round trip")
    dec = h_sub.add_parser("decode", help="the text of codes written by `sentcode hier encode`",
                           description="Write each segment greedily from its codes and the code LM's state.")
    dec.add_argument("run_dir", metavar="RUN_DIR", help="the run that wrote the codes")
    dec.add_argument("--codes", required=True, metavar="CODES.json", help="codes from `sentcode hier encode --out`")
    dec.add_argument("--out", default=None, metavar="FILE", help="write the text here (default: print it)")
    dec.add_argument("--level", type=int, choices=[1, 2], default=None,
                     help="which codes of the file to decode (default: the top level it holds)")


def _load(run_dir: str):
    import sentcode
    from sentcode.registry import family_of

    g = sentcode.load(run_dir)
    if family_of(g).name != "hier":
        raise SentcodeError(f"{run_dir} holds a {family_of(g).label}; `sentcode hier` works on hierarchical "
                            "autoencoder runs (`sentcode pipeline hier`)")
    return g


def round_trip(text: str | bytes, decoded: str) -> dict:
    a = text.encode("utf-8", "surrogateescape") if isinstance(text, str) else text
    b = decoded.encode("utf-8", "surrogateescape")
    same = sum(x == y for x, y in zip(a, b))
    return {"exact": a == b, "bytes_matching": same / max(len(a), 1), "bytes": len(a), "decoded_bytes": len(b)}


def dispatch(args) -> int:
    from sentcode.eval.run import read_text_file
    from sentcode.io import write_json

    g = _load(args.run_dir)
    if args.hier_command == "encode":
        text = read_text_file(args.text_file)
        r = g.encode(text)
        print(f"{r['bytes']:,} bytes -> {len(r['codes']):,} segments x {r['levels']} codes: "
              f"{r['bytes_per_code']:.2f} bytes per code", file=sys.stderr)
        if "level2" in r:
            top = r["level2"]
            print(f"level 2: -> {len(top['codes']):,} segments x {top['levels']} codes: {top['bytes_per_code']:.2f} "
                  "bytes per code", file=sys.stderr)
        if args.check:
            for level, codes in ((1, r["codes"]), (2, r.get("level2", {}).get("codes"))):
                if codes is None:
                    continue
                rt = round_trip(text, g.decode(codes, level=level))
                print(f"round trip from level-{level} codes: {'exact' if rt['exact'] else 'not exact'}; "
                      f"{rt['bytes_matching']:.2%} of bytes match in place ({rt['decoded_bytes']:,} bytes decoded)",
                      file=sys.stderr)
        if args.out:
            write_json(Path(args.out), r)
            print(f"wrote {args.out}", file=sys.stderr)
        else:
            print(json.dumps(r))
        return 0
    path = Path(args.codes)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SentcodeError(f"cannot read codes from {path}: {e}") from None
    if not isinstance(data, dict) or "codes" not in data:
        raise SentcodeError(f"{path} holds no codes: write them with `sentcode hier encode RUN --out {path}`")
    level = args.level or (2 if isinstance(data.get("level2"), dict) else 1)
    part = data if level == 1 else data.get("level2")
    if not isinstance(part, dict) or "codes" not in part:
        raise SentcodeError(f"{path} holds no level-2 codes")
    model = g.model if level == 1 else (g.upper_model or g.model)
    if part.get("levels", model.cfg.levels) != model.cfg.levels:
        raise SentcodeError(f"{path} holds codes of {part['levels']} levels; this run has {model.cfg.levels}")
    text = g.decode(part["codes"], level=level)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8", errors="surrogateescape")
        print(f"wrote {len(text.encode('utf-8', 'surrogateescape')):,} bytes to {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text + "\n")
    return 0
