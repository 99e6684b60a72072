"""``make bench``: run every benchmark, print its ratios, write ``bench/results.json`` as
``{NAME: {"ratio": x, "goal": ">= 2.5", ...}}``. Ratios are measured side by side in one
run: absolute times on shared machines mean nothing."""

from __future__ import annotations

import importlib
import json
import os
import sys

BENCHES = ["bench.bench_asr"]


def main() -> int:
    results = {}
    for name in BENCHES:
        print(f"== {name}", flush=True)
        results.update(importlib.import_module(name).run())
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results.json")
    with open(path, "w") as fh:
        json.dump(results, fh, indent=2)
    print("\nratio results (goal in brackets):")
    for key, value in results.items():
        print(f"  {key:<28} {value['ratio']:.2f}x  [{value['goal']}]")
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
