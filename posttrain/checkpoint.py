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
from posttrain.faults import fault_point

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
        fault_point("checkpoint")  # everything written, nothing renamed: the temp folder is dropped on resume
        publish(tmp, root, step, keep=None)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"could not write checkpoint {final}: {e.strerror or e}; free disk space or change output_dir") from None
    prune(root, keep)
    return final


def publish(src: str, root: str, step: int, keep: int | None = 2) -> str:
    """Rename the complete checkpoint folder ``src`` to ``root/step-NNNNNN`` (same file system),
    then keep the ``keep`` newest (None: prune nothing).

    A folder of that step already there (a resumed run re-saving the step it resumed from) is
    first renamed aside to ``.step-NNNNNN.old-PID`` and removed only after the new one is in
    place; a kill between the two renames leaves the old folder, which `clean_partial` puts
    back. So at every instant the step exists complete, or its previous version does."""
    final = os.path.join(root, f"step-{step:06d}")
    aside = None
    if os.path.exists(final):
        aside = os.path.join(root, f".step-{step:06d}.old-{os.getpid()}")
        shutil.rmtree(aside, ignore_errors=True)
        os.rename(final, aside)
        fault_point("checkpoint")  # the step's old folder aside, the new one not yet in place
    os.rename(src, final)
    _fsync_dir(root)
    if aside:
        shutil.rmtree(aside, ignore_errors=True)
    if keep is not None:
        prune(root, keep)
    return final


def prune(root: str, keep: int) -> None:
    """Remove all but the ``keep`` newest checkpoints. Each is renamed to a hidden
    ``.step-NNNNNN.del-PID`` first, so a kill during the removal never leaves a half-deleted
    folder that still looks complete."""
    for old in list_checkpoints(root)[: -max(1, keep)]:
        doomed = os.path.join(root, "." + os.path.basename(old) + f".del-{os.getpid()}")
        try:
            os.rename(old, doomed)
        except OSError:
            continue
        shutil.rmtree(doomed, ignore_errors=True)


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
    """Tidy up after a run killed while saving: drop unfinished temp folders and half-removed
    old checkpoints, and put back a step's previous folder that a kill left renamed aside
    (see `publish`)."""
    if not os.path.isdir(root):
        return
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if not name.startswith(".step-"):
            continue
        if ".old-" in name:
            final = os.path.join(root, name[1:].split(".old-")[0])
            if not os.path.exists(os.path.join(final, STATE_FILE)) and os.path.exists(os.path.join(path, STATE_FILE)):
                shutil.rmtree(final, ignore_errors=True)
                os.rename(path, final)
                continue
            shutil.rmtree(path, ignore_errors=True)
        elif ".tmp-" in name or ".del-" in name:
            shutil.rmtree(path, ignore_errors=True)


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


def load_pretrained_into(model: torch.nn.Module, folder: str) -> None:
    """Load a ``save_pretrained`` folder into ``model`` in place, through transformers' own
    loader. A plain ``load_state_dict`` of its ``model.safetensors`` (what the Trainer does on
    ``resume_from_checkpoint``) silently skips tensors whose saved layout differs from the
    in-memory one: a Qwen-Omni MoE saves its experts one by one but holds them fused, so a
    resumed run would continue with the experts of the starting model."""
    dtype = next(model.parameters()).dtype
    fresh = type(model).from_pretrained(folder, dtype=dtype)
    missing, unexpected = model.load_state_dict(fresh.state_dict(), strict=False)
    if missing or unexpected:
        raise UserError(
            f"checkpoint {folder} does not fit the model ({len(missing)} missing, {len(unexpected)} unexpected tensors); "
            "resume with the same model config it was written with"
        )
