"""Throughput and latency of `sentcode serve` at 1, 8 and 32 concurrent clients.

    python benchmarks/bench_serve.py --lm RUN_DIR --sentence RUN_DIR [--clients 1 8 32] [--max-batch 1 8 32]

Each server is a `sentcode serve` subprocess on a free loopback port (its own process, so the clients' Python
does not share its GIL); clients are threads sending plain HTTP. Every client sends its requests back to back.

- Flat LM: POST /v1/completions, `max_tokens` tokens from a short prompt, temperature 0.8, a seed per request.
  Weights do not change speed, but a model that rarely ends its text keeps every request at full length.
  Measured once per --max-batch value (1 = no batching) to show what batching buys.
- Sentence-step run: POST /generate with the sentence-step seed's body (`max_sentences` 1, rerank on);
  served one request at a time by design.

Reported per level: requests/s over the whole level, p50/p99 latency, tokens/s for the flat LM, any non-200
answers. After one warm-up request. Writes benchmarks/results/serve.json.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import save  # noqa: E402


class Server:
    def __init__(self, run_dir: str, args: list[str], threads: int):
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
        cmd = [sys.executable, "-m", "sentcode.cli", "serve", run_dir, "--port", "0", "--threads", str(threads), *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        seen = ""
        while True:  # notices (an ONNX export on first use) may come before the address line
            line = self.proc.stdout.readline()
            seen += line
            m = re.search(r"http://([\d.]+):(\d+)", line)
            if m or not line:
                break
        if not m:
            self.proc.kill()
            raise SystemExit(f"server did not start: {seen}{self.proc.stdout.read()}")
        self.host, self.port = m.group(1), int(m.group(2))
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()  # drain the access log
        self.wait_ready()

    def wait_ready(self, timeout: float = 600) -> None:
        """The server listens at once and loads its run behind it (503 meanwhile): wait until /health says ok."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
                conn.request("GET", "/health")
                status = conn.getresponse().status
                conn.close()
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise SystemExit("the server did not become ready")

    def post(self, path: str, body: dict) -> tuple[int, dict]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=600)
        conn.request("POST", path, json.dumps(body), {"content-type": "application/json"})
        resp = conn.getresponse()
        data = json.loads(resp.read())
        conn.close()
        return resp.status, data

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def load_level(server: Server, path: str, make_body, clients: int, per_client: int) -> dict:
    lat, statuses, tokens = [], [], []
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)

    def client(c: int):
        start.wait()
        for r in range(per_client):
            t = time.perf_counter()
            status, data = server.post(path, make_body(c * 1000 + r))
            dt = time.perf_counter() - t
            with lock:
                statuses.append(status)
                if status == 200:
                    lat.append(dt)
                    tokens.append(data["usage"]["completion_tokens"])

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"clients": clients, "requests": len(statuses), "ok": len(lat), "wall_s": round(wall, 2),
            "requests_per_s": round(len(lat) / wall, 2), "tokens_per_s": round(sum(tokens) / wall, 1),
            "p50_s": round(statistics.median(lat), 3), "p99_s": round(percentile(lat, 0.99), 3),
            "non_200": sorted(set(s for s in statuses if s != 200))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lm", required=True, metavar="RUN_DIR", help="a flat LM run directory")
    ap.add_argument("--sentence", default=None, metavar="RUN_DIR", help="a sentence pipeline run directory")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--max-batch", type=int, nargs="+", default=[1, 8, 32], help="flat LM servers to measure")
    ap.add_argument("--max-tokens", type=int, default=64, help="flat LM tokens per request (default 64)")
    ap.add_argument("--rounds", type=int, default=64, help="flat LM: requests per level = max(rounds, 2 x clients)")
    ap.add_argument("--sentence-rounds", type=int, default=8,
                    help="sentence run: requests per level, at least one per client")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the server (default 2)")
    ap.add_argument("--backends", nargs="+", choices=["torch", "onnx"], default=["torch"],
                    help="flat LM: backends to measure, side by side (onnx exports into RUN_DIR/onnx on first use)")
    ap.add_argument("--name", default="serve", help="result file name (default serve)")
    args = ap.parse_args()

    load_before = os.getloadavg()
    out = {"threads": args.threads, "max_tokens": args.max_tokens, "flat": [], "sentence": []}
    prompt = "The state of the Union"

    def flat_body(i):
        return {"prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0.8, "seed": i}

    for mb, backend in ((mb, b) for mb in args.max_batch for b in args.backends):
        server = Server(args.lm, ["--max-batch", str(mb), "--max-queue", "64", "--backend", backend], args.threads)
        try:
            server.post("/v1/completions", flat_body(0))
            for c in args.clients:
                per = max(1, -(-max(args.rounds, 2 * c) // c))
                row = {"max_batch": mb, "backend": backend, **load_level(server, "/v1/completions", flat_body, c, per)}
                print(json.dumps(row), flush=True)
                out["flat"].append(row)
        finally:
            server.stop()

    if args.sentence:
        def sent_body(i):
            return {"prompt": "The state of the Union is strong.", "max_sentences": 1,
                    "params": {"rerank": True, "do_sample": True, "seed": i}}

        server = Server(args.sentence, ["--max-queue", "64"], args.threads)
        try:
            server.post("/generate", sent_body(0))
            for c in args.clients:
                per = max(1, -(-args.sentence_rounds // c))
                row = load_level(server, "/generate", sent_body, c, per)
                print(json.dumps(row), flush=True)
                out["sentence"].append(row)
        finally:
            server.stop()

    out["load_average_before_after"] = [round(load_before[0], 2), round(os.getloadavg()[0], 2)]
    out["command"] = "python benchmarks/bench_serve.py " + " ".join(
        a if not os.path.isabs(a) else "RUN_DIR" for a in sys.argv[1:])
    print(f"wrote {save(args.name, out)}")


if __name__ == "__main__":
    main()
