"""Checkpoints, written atomically so a killed run never leaves a half-written one.

A checkpoint is a folder ``checkpoints/step-000120/`` holding each trained model's weights
(safetensors), the optimiser and scheduler state, RNG states and a ``state.json`` written
last. It is built as ``.step-000120.tmp-PID`` and renamed into place only when complete, so
the newest folder without the ``.tmp`` suffix is always loadable.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from posttrain.errors import UserError

STATE_FILE = "state.json"


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states in JSON-safe form (torch's as a list of bytes)."""
    np_state = np.random.get_state()
    return {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = state["numpy"]
    np.random.set_state((npst[0], np.array(npst[1], dtype=np.uint32), npst[2], npst[3], npst[4]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


def save_checkpoint(
    root: str,
    step: int,
    models: dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    extra: dict[str, Any] | None = None,
    keep: int = 2,
) -> str:
    """Write checkpoint ``step`` under ``root`` atomically; keep the ``keep`` newest."""
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"step-{step:06d}")
    tmp = os.path.join(root, f".step-{step:06d}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        for name, model in models.items():
            save_model(model, os.path.join(tmp, f"{name}.safetensors"))
        if optimizer is not None:
            torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
        if scheduler is not None:
            torch.save(scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
        state = {"step": step, "models": sorted(models), "rng": rng_state(), "extra": extra or {}}
        with open(os.path.join(tmp, STATE_FILE), "w", encoding="utf-8") as fh:
            json.dump(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if os.path.exists(final):  # a resumed run re-saving the same step
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"could not write checkpoint {final}: {e.strerror or e}; free disk space or change output_dir") from None
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: str) -> list[str]:
    """Complete checkpoints under ``root``, oldest first (unfinished temp folders skipped)."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if name.startswith("step-") and os.path.exists(os.path.join(path, STATE_FILE)):
            found.append(path)
    return sorted(found)


def latest_checkpoint(root: str) -> str | None:
    """The newest complete checkpoint under ``root``, or None."""
    found = list_checkpoints(root)
    return found[-1] if found else None


def clean_partial(root: str) -> None:
    """Remove temp folders left by a run killed while saving."""
    if os.path.isdir(root):
        for name in os.listdir(root):
            if name.startswith(".step-") and ".tmp-" in name:
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def load_checkpoint(
    path: str,
    models: dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
) -> dict[str, Any]:
    """Load a checkpoint into the given objects; returns its state (``step``, ``extra``)."""
    with open(os.path.join(path, STATE_FILE), encoding="utf-8") as fh:
        state = json.load(fh)
    for name, model in models.items():
        file = os.path.join(path, f"{name}.safetensors")
        if not os.path.exists(file):
            raise UserError(f"checkpoint {path} has no weights for {name!r}; it was written by a different recipe or config")
        missing, unexpected = load_model(model, file, strict=False)
        if unexpected or missing:
            raise UserError(
                f"checkpoint {path} does not fit the {name} model ({len(missing)} missing, {len(unexpected)} unexpected "
                "tensors); resume with the same model config it was written with"
            )
    if optimizer is not None and os.path.exists(os.path.join(path, "optimizer.pt")):
        optimizer.load_state_dict(torch.load(os.path.join(path, "optimizer.pt"), weights_only=True))
    if scheduler is not None and os.path.exists(os.path.join(path, "scheduler.pt")):
        scheduler.load_state_dict(torch.load(os.path.join(path, "scheduler.pt"), weights_only=True))
    set_rng_state(state["rng"])
    return state
