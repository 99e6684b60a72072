"""``make bench``: run every benchmark, print its ratios, write ``bench/results.json`` as
``{NAME: {"ratio": x, "goal": ">= 2.5", ...}}``. Ratios are measured side by side in one
run: absolute times on shared machines mean nothing.

Each benchmark runs in a process of its own with one math-library thread (``OMP_NUM_THREADS=1``
etc.; the Ray actors a benchmark starts inherit it), so one benchmark's Ray session, vLLM engine
or thread settings cannot change another's numbers. A benchmark that fails is recorded with its
error and the others still run.

    python -m bench                      # all of them
    python -m bench bench.bench_pool     # only some
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile

BENCHES = [
    "bench.bench_asr",  # asr_batched_vs_single
    "bench.bench_pool",  # pool_2_vs_1
    "bench.bench_pipeline",  # pipelined_vs_serial
    "bench.bench_trl_step",  # posttrain_vs_trl_step_time
    "bench.bench_sync",  # sync_over_step
    "bench.bench_vllm",  # vllm_vs_hf
]
THREAD_ENV = {name: "1" for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_one(name: str) -> dict:
    """``NAME.run()`` in a fresh process with one thread; its results, or an error entry."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
        out = fh.name
    code = f"import json, importlib; json.dump(importlib.import_module({name!r}).run(), open({out!r}, 'w'))"
    env = {**os.environ, **THREAD_ENV, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "TRL_EXPERIMENTAL_SILENCE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env)
    try:
        with open(out) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return {name: {"ratio": None, "goal": "", "error": f"exit code {proc.returncode} (see the output above)"}}
    finally:
        os.unlink(out)


def main(argv: list[str] | None = None) -> int:
    names = (argv if argv is not None else sys.argv[1:]) or BENCHES
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results.json")
    results = {}
    if argv is None and sys.argv[1:] and os.path.exists(path):  # a partial run keeps the others' numbers
        with open(path) as fh:
            results = json.load(fh)
    for name in names:
        print(f"== {name}", flush=True)
        results.update(run_one(name))
    with open(path, "w") as fh:
        json.dump(results, fh, indent=2)
    print("\nratio results (goal in brackets):")
    for key, value in results.items():
        ratio = value.get("ratio")
        shown = "  n/a" if ratio is None or (isinstance(ratio, float) and math.isnan(ratio)) else f"{ratio:.2f}x"
        why = value.get("skipped") or value.get("error") or value.get("note") or ""
        print(f"  {key:<28} {shown}  [{value.get('goal', '')}]" + (f"  {why}" if why else ""))
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
