"""Running the HTTP app with uvicorn: ``sentcode serve RUN_DIR`` and a background server for tests and scripts.

FastAPI and uvicorn are an optional extra; this module imports them only when a server is started, so that
``sentcode serve`` without them ends in one line that names the extra.
"""

from __future__ import annotations

import socket
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
            state = getattr(self.config.app.state, "sentcode", None)
            if state is not None:
                state.closing = True
                state.worker.stop()
            super().handle_exit(sig, frame)

    return Server


def _prepare(gen_or_run_dir, cfg: ServeConfig):
    _require_extra()
    cfg.check()
    if cfg.threads is not None:
        import torch

        torch.set_num_threads(cfg.threads)
    if isinstance(gen_or_run_dir, (str, Path)):
        import sentcode

        gen = sentcode.load(gen_or_run_dir, backend=cfg.backend)
    else:
        gen = gen_or_run_dir
    from sentcode.serve.app import build_app

    return build_app(gen, cfg)


def run_server(run_dir: str | Path, cfg: ServeConfig | None = None, log_level: str = "info") -> None:
    """Load ``run_dir`` and serve it until Ctrl+C or SIGTERM."""
    cfg = cfg or ServeConfig()
    _require_extra()
    cfg.check()
    sock = _listen(cfg.host, cfg.port)  # before loading: a busy port is reported at once
    import uvicorn

    app = _prepare(run_dir, cfg)
    st = app.state.sentcode
    host, port = sock.getsockname()[:2]
    print(f"serving {st.name} ({st.label}) on http://{host}:{port} "
          f"(docs at /docs); Ctrl+C stops", flush=True)
    server = _server_class()(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=30))
    server.run(sockets=[sock])


class BackgroundServer:
    """A server on a background thread (tests, benchmarks, notebooks): ``url``, ``app``, ``stop()``."""

    def __init__(self, gen_or_run_dir, cfg: ServeConfig | None = None, log_level: str = "warning"):
        cfg = cfg or ServeConfig(port=0)
        self.app = _prepare(gen_or_run_dir, cfg)
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
    def state(self):
        return self.app.state.sentcode

    def stop(self) -> None:
        self.state.closing = True
        self.state.worker.stop()
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()

    def __enter__(self) -> "BackgroundServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
