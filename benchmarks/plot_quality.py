"""Overlay every quality run's held-out bpb-vs-time curve in one PNG.

    python benchmarks/plot_quality.py   # reads results/quality_*.json, writes results/quality_curves.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS  # noqa: E402
from quality import plot  # noqa: E402


def main() -> None:
    curves = {}
    for path in sorted(RESULTS.glob("quality_*.json")):
        r = json.loads(path.read_text())
        if r.get("curve_val_bpb"):
            curves[f"{r['name']} (test {r['test_bpb']:.3f})"] = tuple(zip(*r["curve_val_bpb"]))
    out = RESULTS / "quality_curves.png"
    plot(curves, {"bz2 -9, whole corpus": 1.811, "gzip -9, whole corpus": 2.660}, out,
         "flat LMs on sotu: validation bpb vs training wall-clock")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
