"""Screenshots of the playground's views for the README: writing with a flat LM, the plan view of a sentence-step
run, the plan view of an autoencoder run, and the compare view.

    python benchmarks/playground_screenshots.py --flat RUN --steplm RUN --hier RUN

Serves the three runs in one server, drives the page in headless Chromium (Debian's ``chromium``) with Playwright,
and writes results/playground_{write,plan,hier,compare}.png.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS  # noqa: E402

from sentcode.serve.config import ServeConfig  # noqa: E402
from sentcode.serve.server import BackgroundServer  # noqa: E402

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
PROMPT = "The state of the Union is strong. We"


def main() -> None:
    from playwright.sync_api import sync_playwright

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flat", required=True)
    ap.add_argument("--steplm", required=True)
    ap.add_argument("--hier", required=True)
    args = ap.parse_args()
    RESULTS.mkdir(exist_ok=True)
    runs = {"flat": args.flat, "sentence-step": args.steplm, "autoencoder": args.hier}
    with BackgroundServer(runs, ServeConfig(port=0)) as server, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1200, "height": 860})
        page.goto(server.url + "/")
        page.wait_for_selector(".card .fact")

        def shot(name: str, model: str, length: int, compare: str | None = None, length2: int | None = None):
            if compare:
                page.click("#tab-compare")
                page.select_option("#model2", compare)
            page.select_option("#model", model)
            page.fill("#prompt", PROMPT)
            page.fill("#seed", "1")
            page.fill("#length", str(length))
            if length2:
                page.fill("#length2", str(length2))
            page.click("#go")
            page.wait_for_selector("#go:enabled", timeout=120_000)
            out = RESULTS / f"playground_{name}.png"
            page.screenshot(path=str(out), full_page=True)
            print(f"wrote {out}")

        shot("write", "flat", 300)
        shot("plan", "sentence-step", 3)
        shot("hier", "autoencoder", 12)
        shot("compare", "flat", 240, compare="sentence-step", length2=3)
        browser.close()


if __name__ == "__main__":
    main()
