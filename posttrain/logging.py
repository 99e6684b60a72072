"""Run directories: ``OUTPUT_DIR/<recipe>/<run_name>/`` with the resolved config,
``metrics.jsonl``, PNG plots, checkpoints, the final model and ``summary.json``.

``summary.json``: ``{"recipe", "seconds", "run_dir", "metrics": {NAME: {"before", "after",
"better"}}}`` so users and their CI can check a run without parsing logs.
"""

from __future__ import annotations

import json
import logging as _logging
import math
import os
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import yaml

from posttrain.checkpoint import clean_partial, latest_checkpoint, load_checkpoint
from posttrain.config import to_dict
from posttrain.errors import UserError


def quiet_libraries() -> None:
    """Silence library chatter (load bars, config notes) so a run's own output is readable."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass
    for name in ("transformers", "datasets", "accelerate", "torch"):
        _logging.getLogger(name).setLevel(_logging.ERROR)


def write_json_atomic(path: str, obj: Any) -> None:
    """Write JSON to ``path`` via a temp file and a rename."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2, default=float)
        fh.write("\n")
    os.replace(tmp, path)


def write_text_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


@dataclass
class RunResult:
    """What a recipe's ``run`` returns: where the run lives and its summary."""

    run_dir: str
    summary: dict

    def metric(self, name: str) -> dict:
        return self.summary["metrics"][name]


class Run:
    """One run directory of one recipe; new, or the latest unfinished one when resuming."""

    def __init__(self, recipe: str, cfg):
        self.recipe = recipe
        self.cfg = cfg
        self.start = time.time()
        base = os.path.join(cfg.output_dir, recipe)
        self.resuming = False
        path = None
        if cfg.resume:
            path = self._find_resumable(base, cfg.run_name)
            if path is None:
                print(f"resume=true: no unfinished {recipe} run under {base}; starting a new run", flush=True)
            else:
                self.resuming = True
        if path is None:
            name = cfg.run_name or time.strftime("%Y%m%d-%H%M%S")
            path = os.path.join(base, name)
            suffix = 1
            while os.path.exists(path) and not cfg.run_name:
                suffix += 1
                path = os.path.join(base, f"{name}-{suffix}")
            if os.path.exists(os.path.join(path, "summary.json")):
                raise UserError(f"run directory {path} already holds a finished run; choose another run_name")
        try:
            os.makedirs(path, exist_ok=True)
            probe = os.path.join(path, f".write-test-{os.getpid()}")
            with open(probe, "w") as fh:
                fh.write("ok")
            os.remove(probe)
        except OSError as e:
            raise UserError(f"cannot write the run directory {path}: {e.strerror or e}; set output_dir to a writable folder") from None
        self.path = path
        self.checkpoints = os.path.join(path, "checkpoints")
        self.metrics_path = os.path.join(path, "metrics.jsonl")
        clean_partial(self.checkpoints)
        if self.resuming:
            self._note_config_changes()
            if latest_checkpoint(self.checkpoints) is None:
                # Killed before its first checkpoint: it starts again from step 0, so the
                # training lines it logged go (the step-0 "before" line stays).
                print(f"resume=true: {path} has no checkpoint yet; it restarts from step 0", flush=True)
                self.rewind(0)
        write_text_atomic(os.path.join(path, "config.yaml"), yaml.safe_dump(to_dict(cfg), sort_keys=False))

    @staticmethod
    def _find_resumable(base: str, run_name: str) -> str | None:
        if run_name:
            path = os.path.join(base, run_name)
            return path if os.path.isdir(path) and not os.path.exists(os.path.join(path, "summary.json")) else None
        if not os.path.isdir(base):
            return None
        candidates = [
            os.path.join(base, d)
            for d in os.listdir(base)
            if os.path.isdir(os.path.join(base, d)) and not os.path.exists(os.path.join(base, d, "summary.json"))
        ]
        candidates = [c for c in candidates if os.path.exists(os.path.join(c, "config.yaml"))]
        return max(candidates, key=os.path.getmtime) if candidates else None

    def _note_config_changes(self) -> None:
        old_path = os.path.join(self.path, "config.yaml")
        if not os.path.exists(old_path):
            return
        with open(old_path, encoding="utf-8") as fh:
            old = yaml.safe_load(fh) or {}
        new = to_dict(self.cfg)
        changed = [k for k in new if k not in ("resume", "max_steps", "run_name") and old.get(k) != new.get(k)]
        if changed:
            print(f"note: resuming {self.path} with changed config keys: {', '.join(changed)}", flush=True)

    # -- checkpoints --------------------------------------------------------------------

    def latest_checkpoint(self) -> str | None:
        """The checkpoint to resume from (None for a new run)."""
        return latest_checkpoint(self.checkpoints) if self.resuming else None

    def resume(self, modules: dict, optimizer=None, scheduler=None) -> int:
        """Load the latest checkpoint into ``modules`` (and the optimiser / scheduler), drop the
        metrics logged after it, and return its step; 0 for a new run."""
        checkpoint = self.latest_checkpoint()
        if not checkpoint:
            return 0
        step = load_checkpoint(checkpoint, modules, optimizer, scheduler)["step"]
        self.rewind(step)
        print(f"resumed from {checkpoint} (step {step})", flush=True)
        return step

    def rewind(self, step: int) -> None:
        """Drop metrics logged after ``step`` (they are re-done after a resume)."""
        if not os.path.exists(self.metrics_path):
            return
        with open(self.metrics_path, encoding="utf-8") as fh:
            lines = [line for line in fh if line.strip()]
        kept = []
        for line in lines:
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:  # a line cut short by the kill
                continue
        write_text_atomic(self.metrics_path, "".join(kept))

    # -- metrics ------------------------------------------------------------------------

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Append one line to metrics.jsonl."""
        row = {"step": step, "time": round(time.time() - self.start, 2)}
        row.update({k: (float(v) if v is not None else None) for k, v in metrics.items()})
        with open(self.metrics_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
            fh.flush()

    def read_metrics(self) -> list[dict]:
        if not os.path.exists(self.metrics_path):
            return []
        rows = []
        with open(self.metrics_path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return rows

    def plot(self) -> list[str]:
        """One PNG per metric family (``kl/arithmetic`` and ``kl/strings`` share ``kl.png``)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = self.read_metrics()
        series: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
        for row in rows:
            for key, value in row.items():
                if key in ("step", "time") or value is None or (isinstance(value, float) and math.isnan(value)):
                    continue
                family = key.split("/")[0]
                series[family][key].append((row["step"], value))
        os.makedirs(os.path.join(self.path, "plots"), exist_ok=True)
        written = []
        for family, curves in sorted(series.items()):
            fig, ax = plt.subplots(figsize=(6, 3.6))
            for key, points in sorted(curves.items()):
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=key)
            ax.set_xlabel("step")
            ax.set_title(f"{self.recipe}: {family}")
            ax.grid(alpha=0.3)
            if len(curves) > 1 or family not in curves:
                ax.legend(fontsize=8)
            fig.tight_layout()
            out = os.path.join(self.path, "plots", f"{family.replace(' ', '_')}.png")
            fig.savefig(out, dpi=100)
            plt.close(fig)
            written.append(out)
        return written

    # -- files --------------------------------------------------------------------------

    def file(self, *parts: str) -> str:
        path = os.path.join(self.path, *parts)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return path

    def save_json(self, name: str, obj: Any) -> None:
        write_json_atomic(self.file(name), obj)

    def load_json(self, name: str) -> Any | None:
        path = os.path.join(self.path, name)
        if not os.path.exists(path):
            return None
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)

    # -- the end ------------------------------------------------------------------------

    def finish(self, targets: dict[str, tuple[float, float, str]], extra: dict | None = None) -> RunResult:
        """Write summary.json and the plots, print the before -> after table and one summary line.

        ``targets``: NAME -> (before, after, "lower" | "higher").
        """
        seconds = round(time.time() - self.start, 1)
        summary = {
            "recipe": self.recipe,
            "seconds": seconds,
            "run_dir": self.path,
            "metrics": {k: {"before": b, "after": a, "better": better} for k, (b, a, better) in targets.items()},
        }
        if extra:
            summary.update(extra)
        self.plot()
        write_json_atomic(os.path.join(self.path, "summary.json"), summary)
        print(format_table(targets), flush=True)
        parts = [f"{k} {_fmt(b)} → {_fmt(a)}" for k, (b, a, _) in targets.items()]
        print(f"{self.recipe} done in {seconds:.0f}s: {', '.join(parts)}  [{self.path}]", flush=True)
        return RunResult(self.path, summary)


def _fmt(x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"{x:.3f}" if abs(x) < 100 else f"{x:.1f}"


def format_metrics(metrics: dict[str, float | None]) -> str:
    """``name value, ...`` on one line (``n/a`` where a metric has no value)."""
    return ", ".join(f"{k} {_fmt(v)}" for k, v in metrics.items())


def format_table(targets: dict[str, tuple[float, float, str]]) -> str:
    """A before -> after table with the direction of improvement."""
    width = max((len(k) for k in targets), default=6)
    lines = [f"{'metric':<{width}}  {'before':>9}  {'after':>9}  {'change':>9}  better"]
    for key, (before, after, better) in targets.items():
        if before is None or after is None:
            change = "n/a"
        elif before and better == "lower":
            change = f"{(after - before) / abs(before) * 100:+.1f}%"
        else:
            change = f"{after - before:+.3f}"
        ok = ""
        if before is not None and after is not None:
            ok = "=" if after == before else "✓" if (after < before if better == "lower" else after > before) else "✗"
        lines.append(f"{key:<{width}}  {_fmt(before):>9}  {_fmt(after):>9}  {change:>9}  {better} {ok}")
    return "\n".join(lines)
