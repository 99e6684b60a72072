"""The bad-input corpus (tests/bad_inputs/cases.py) through the real CLI.

Every case runs `posttrain.cli.main(argv)` in this process (a subprocess per case would spend
5-10 s importing torch each time); a few also run as real `posttrain` processes to prove the
no-traceback behaviour end to end. Each must: exit 2, print one ``error:`` line naming the
fault and the fix, show no traceback, and leave nothing that looks like a finished run (no
summary.json, no checkpoint without its state.json, no temp files).
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest

from posttrain import cli
from tests.bad_inputs.cases import CASES, Case

BY_NAME = {c.name: c for c in CASES}
assert len(BY_NAME) == len(CASES), "case names must be unique"
print(f"bad-input corpus: {len(CASES)} kinds")  # shown with -s; the terminal summary (conftest.py) always


def _materialise(case: Case, tmp: str) -> None:
    for rel, spec in case.files.items():
        if spec is None:
            continue
        path = os.path.join(tmp, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if callable(spec):
            spec(path)
        elif isinstance(spec, bytes):
            with open(path, "wb") as fh:
                fh.write(spec)
        else:
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(spec)


def _argv(case: Case, tmp: str) -> list[str]:
    argv = [a.replace("{tmp}", tmp) for a in case.argv]
    if argv[0] == "run" and not any(a.startswith("output_dir=") for a in argv):
        argv.append(f"output_dir={tmp}/runs")
    return argv


def complete_looking_outputs(root: str) -> list[str]:
    """Files under ``root`` that would pass for finished work: a summary.json, a checkpoint
    folder without its state.json, a left-over temp file or folder."""
    bad = []
    for dirpath, dirnames, filenames in os.walk(root):
        if "summary.json" in filenames:
            bad.append(os.path.join(dirpath, "summary.json"))
        for name in dirnames + filenames:
            if ".tmp-" in name or name.endswith(".tmp"):
                bad.append(os.path.join(dirpath, name))
        if os.path.basename(dirpath).startswith("step-") and "state.json" not in filenames:
            bad.append(dirpath)
    return bad


def _inject(case: Case, monkeypatch) -> None:
    if case.inject == "enospc-on-second-checkpoint":
        import posttrain.checkpoint as checkpoint

        real, calls = checkpoint.save_model, []

        def save_model(model, filename, *args, **kwargs):
            calls.append(filename)
            if len(calls) == 2:  # the second checkpoint's first file: the disk fills up
                with open(filename, "wb") as fh:
                    fh.write(b"\0" * 64)  # half a file, as a real ENOSPC leaves
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
            return real(model, filename, *args, **kwargs)

        monkeypatch.setattr(checkpoint, "save_model", save_model)
    elif case.inject:
        raise AssertionError(f"unknown injection {case.inject!r}")


SLOW = {"disk/full-while-saving-checkpoint"}  # trains a tiny Talker to its second checkpoint (~50 s)


@pytest.mark.parametrize(
    "case", [pytest.param(c, id=c.name, marks=[pytest.mark.slow] if c.name in SLOW else []) for c in CASES]
)
def test_bad_input(case: Case, tmp_path, monkeypatch, capsys):
    tmp = str(tmp_path)
    _materialise(case, tmp)
    for key, value in case.env.items():
        monkeypatch.setenv(key, value.replace("{tmp}", tmp))
    monkeypatch.chdir(tmp)
    _inject(case, monkeypatch)
    rc = cli.main(_argv(case, tmp))
    out, err = capsys.readouterr()
    assert rc == case.exit_code, (rc, out[-2000:], err[-2000:])
    assert "Traceback" not in out + err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err[-2000:]
    for fragment in case.expect:
        assert fragment.replace("{tmp}", tmp) in errors[0], (fragment, errors[0])
    assert complete_looking_outputs(tmp) == []
    if case.inject == "enospc-on-second-checkpoint":
        # the earlier good checkpoint survives, complete; nothing of the failed one is left
        runs = [os.path.join(d, n) for d, dirs, _ in os.walk(tmp) for n in dirs if n == "checkpoints"]
        assert len(runs) == 1
        assert sorted(os.listdir(runs[0])) == ["step-000002"]
        assert os.path.exists(os.path.join(runs[0], "step-000002", "state.json"))


def test_corpus_covers_every_area():
    areas = {}
    for case in CASES:
        areas.setdefault(case.name.split("/")[0], []).append(case.name)
    assert set(areas) == {"config", "data", "audio", "model", "reward", "disk"}
    assert len(CASES) >= 40
    assert all(len(v) >= 3 for v in areas.values()), {k: len(v) for k, v in areas.items()}


@pytest.mark.parametrize("name", ["config/unknown-key", "data/malformed-jsonl-line", "reward/raises"])
def test_real_process_prints_no_traceback(name, tmp_path):
    """The installed `posttrain` command, as a user runs it: one error line, exit 2."""
    case = BY_NAME[name]
    tmp = str(tmp_path)
    _materialise(case, tmp)
    exe = os.path.join(os.path.dirname(sys.executable), "posttrain")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "posttrain"]
    proc = subprocess.run(cmd + _argv(case, tmp), capture_output=True, text=True, cwd=tmp, timeout=300, env=dict(os.environ))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and all(f in lines[-1] for f in case.expect), proc.stderr[-2000:]
    assert complete_looking_outputs(tmp) == []


def test_disk_full_while_saving_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    """The fast twin of disk/full-while-saving-checkpoint, at the checkpoint API."""
    import torch

    import posttrain.checkpoint as checkpoint
    from posttrain.errors import UserError

    model = torch.nn.Linear(3, 2)
    root = str(tmp_path / "checkpoints")
    checkpoint.save_checkpoint(root, 1, {"m": model})
    real = checkpoint.save_model

    def full_disk(model, filename, *args, **kwargs):
        with open(filename, "wb") as fh:
            fh.write(b"\0" * 8)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

    monkeypatch.setattr(checkpoint, "save_model", full_disk)
    with pytest.raises(UserError, match="could not write checkpoint .*step-000002: No space left on device; free disk space"):
        checkpoint.save_checkpoint(root, 2, {"m": model})
    monkeypatch.setattr(checkpoint, "save_model", real)
    assert os.listdir(root) == ["step-000001"]
    assert checkpoint.latest_checkpoint(root).endswith("step-000001")
    with torch.no_grad():
        model.weight.zero_()
    checkpoint.load_checkpoint(checkpoint.latest_checkpoint(root), {"m": model})
    assert float(model.weight.detach().abs().sum()) > 0  # the good checkpoint still loads


def test_cli_sets_offline_flags(monkeypatch, capsys):
    for name in cli.OFFLINE_ENV:
        monkeypatch.delenv(name, raising=False)
    assert cli.main(["run", "no_such_recipe"]) == 2
    assert all(os.environ[name] == "1" for name in cli.OFFLINE_ENV)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # a user who explicitly allows the hub keeps that choice
    cli.main(["run", "no_such_recipe"])
    assert os.environ["HF_HUB_OFFLINE"] == "0"
    capsys.readouterr()
