"""Running the HTTP app with uvicorn: ``sentcode serve RUN_DIR`` and a background server for tests and scripts.

FastAPI and uvicorn are an optional extra; this module imports them only when a server is started, so that
``sentcode serve`` without them ends in one line that names the extra.
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from pathlib import Path

from sentcode.errors import SentcodeError
from sentcode.serve.config import ServeConfig

INSTALL_HINT = "serving needs FastAPI and uvicorn: pip install 'sentcode[serve]'"


def _require_extra() -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise SentcodeError(INSTALL_HINT) from None


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise SentcodeError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(2048)  # connections made before uvicorn starts accepting wait in the backlog
    sock.set_inheritable(True)
    return sock


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """Stops admitting on the first Ctrl+C/SIGTERM: new requests and queued ones get 503, requests being
        generated finish (up to the graceful-shutdown timeout)."""

        def handle_exit(self, sig, frame):
            served = getattr(self.config.app.state, "served", None)
            if served is not None:
                served.stop()
            super().handle_exit(sig, frame)

    return Server


def _threads(cfg: ServeConfig) -> None:
    if cfg.threads is not None:
        import torch

        torch.set_num_threads(cfg.threads)


def _named(runs, names) -> dict:
    """run (a generator or a directory) -> its model name: ``names`` in order, else the directory's name."""
    from sentcode.serve.app import default_name

    runs = list(runs)
    if names and len(names) != len(runs):
        raise SentcodeError(f"{len(names)} model names for {len(runs)} runs: give one --model-name per run, or none")
    out = {}
    for i, run in enumerate(runs):
        name = names[i] if names else (Path(run).resolve().name if isinstance(run, (str, Path)) else None)
        name = name or default_name(run, ServeConfig())
        if name in out:
            raise SentcodeError(f"two runs would both be served as '{name}': give each its own --model-name")
        out[name] = run
    return out


def _check_run(run_dir: Path) -> None:
    """What can be checked at once, before listening: a run directory of a known family."""
    from sentcode.infer.generator import read_run
    from sentcode.registry import family

    cfg, _ = read_run(run_dir)
    if not (run_dir / "export.json").is_file():
        family(cfg.get("family", "lm") if isinstance(cfg, dict) else "lm", where=run_dir)


def _prepare(runs, cfg: ServeConfig, names=None):
    """The app, every run loaded first (tests, scripts). ``runs``: one generator or run directory (named by
    ``cfg.model_name`` or the directory), a list of them (named by ``names`` or their directories) or a dict."""
    _require_extra()
    cfg.check()
    _threads(cfg)
    import sentcode
    from sentcode.serve.app import build_app

    def load(run):
        return sentcode.load(run, backend=cfg.backend) if isinstance(run, (str, Path)) else run

    if not isinstance(runs, (list, tuple, dict)):
        return build_app(load(runs), cfg)
    named = runs if isinstance(runs, dict) else _named(runs, names)
    return build_app({n: load(r) for n, r in named.items()}, cfg)


def _load_in_background(app, named: dict, cfg: ServeConfig) -> threading.Thread:
    """Load each run in turn while the server already answers (the page shows them as loading); a run that fails
    to load is marked failed, with its reason, and the others are served."""
    import sentcode

    def work():
        for name, run in named.items():
            st = app.state.served.states[name]
            try:
                st.ready(sentcode.load(run, backend=cfg.backend))
                print(f"  {name}: ready ({st.label})", flush=True)
            except Exception as e:  # a run that cannot be loaded must not take the others down
                st.failed = str(e) if isinstance(e, SentcodeError) else f"{type(e).__name__}: {e}"
                print(f"  {name}: could not be loaded: {st.failed}", file=sys.stderr, flush=True)

    thread = threading.Thread(target=work, name="sentcode-load", daemon=True)
    thread.start()
    return thread


def run_server(run_dirs, cfg: ServeConfig | None = None, log_level: str = "info", names=None) -> None:
    """Serve one run directory or several (each under its name) until Ctrl+C or SIGTERM. The server listens at
    once and loads the runs behind it."""
    cfg = cfg or ServeConfig()
    _require_extra()
    cfg.check()
    runs = [run_dirs] if isinstance(run_dirs, (str, Path)) else list(run_dirs)
    if cfg.model_name and not names and len(runs) == 1:
        names = [cfg.model_name]
    named = _named(runs, names)  # clashing names end here, before anything listens
    bad = {}  # runs that are not runs: served as failed, with the reason, beside the others
    for name, run in named.items():
        try:
            _check_run(Path(run))
        except SentcodeError as e:
            bad[name] = str(e)
    if len(bad) == len(named):
        raise SentcodeError(next(iter(bad.values())))
    sock = _listen(cfg.host, cfg.port)
    import uvicorn

    _threads(cfg)
    from sentcode.serve.app import build_app

    app = build_app({n: None for n in named}, cfg)
    host, port = sock.getsockname()[:2]
    print(f"serving {', '.join(named)} on http://{host}:{port} (playground at /, API docs at /docs); loading "
          f"{'it' if len(named) == 1 else 'them'} now; Ctrl+C stops", flush=True)
    for name, why in bad.items():
        app.state.served.states[name].failed = why
        print(f"  {name}: could not be loaded: {why}", file=sys.stderr, flush=True)
    _load_in_background(app, {n: r for n, r in named.items() if n not in bad}, cfg)
    server = _server_class()(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=30))
    server.run(sockets=[sock])


class BackgroundServer:
    """A server on a background thread (tests, benchmarks, notebooks): ``url``, ``app``, ``stop()``. ``runs``: a
    generator or run directory, a list of them, or a dict of model name -> either; all are loaded before it starts."""

    def __init__(self, runs, cfg: ServeConfig | None = None, log_level: str = "warning", names=None):
        cfg = cfg or ServeConfig(port=0)
        self.app = _prepare(runs, cfg, names)
        import uvicorn

        self.sock = _listen(cfg.host, cfg.port)
        host, port = self.sock.getsockname()[:2]
        self.url = f"http://{host}:{port}"
        self.server = _server_class()(uvicorn.Config(self.app, log_level=log_level, timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise SentcodeError("the background server did not start")
            time.sleep(0.01)

    @property
    def served(self):
        return self.app.state.served

    @property
    def state(self):
        """The first model's state (the only one, for a server of one run)."""
        return next(iter(self.served.states.values()))

    def stop(self) -> None:
        self.served.stop()
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()

    def __enter__(self) -> "BackgroundServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
