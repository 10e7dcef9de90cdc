"""Live progress: a Rich bar on a terminal, plain log lines otherwise (CI logs, pipes, files)."""

from __future__ import annotations

import sys
import time


def _fmt_time(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Progress:
    def __init__(self, total: int, start: int = 0, enabled: bool = True, live: bool | None = None, log_every: int = 10):
        self.total, self.enabled, self.log_every = total, enabled, log_every
        self.live = enabled and (sys.stdout.isatty() if live is None else live)
        self._bar = None
        self._t0 = time.time()
        if self.live:
            from rich.progress import BarColumn, Progress as RichProgress, TaskProgressColumn, TextColumn, TimeElapsedColumn

            # The bar tracks the fraction done (steps or time budget, whichever is further), not raw steps.
            self._bar = RichProgress(
                TextColumn("[bold]train"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn(),
                TextColumn("step {task.fields[step]}  {task.fields[info]}"), refresh_per_second=4,
            )
            self._task = self._bar.add_task("train", total=1.0, completed=0.0, step=start, info="")
            self._bar.start()

    def update(self, step: int, info: dict, frac: float) -> None:
        if not self.enabled:
            return
        elapsed = time.time() - self._t0
        eta = elapsed / max(frac, 1e-9) * (1 - frac) if frac > 0 else float("nan")
        text = (
            f"loss {info['loss']:.4f}  lr {info['lr']:.2e}  tok/s {info['tok_s']:,.0f}  "
            f"mfu {'?' if info['mfu'] is None else format(info['mfu'] * 100, '.1f') + '%'}  "
            f"eta {_fmt_time(eta) if eta == eta else '?'}"
        )
        if self.live:
            self._bar.update(self._task, completed=frac, step=step, info=text)
        elif step % self.log_every == 0 or frac >= 1.0:
            print(f"step {step} ({frac * 100:.0f}%)  {text}", flush=True)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.live:
            self._bar.console.print(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
