"""Bad input through the real CLI: one clear message, exit code 2, no traceback, nothing
written that looks like a finished run."""

import json
import os

import pytest

from tests.conftest import run_cli

RECIPE = "thinker_specialist_distill"


def _assert_user_error(rc, out, err, *needles):
    assert rc == 2, (rc, out, err)
    assert "Traceback" not in err and "Traceback" not in out, err
    for needle in needles:
        assert needle in err, (needle, err)


def test_list_and_help():
    rc, out, err = run_cli("list")
    assert rc == 0 and RECIPE in out and "teacher" in out
    rc, out, err = run_cli("run", RECIPE, "--help")
    assert rc == 0
    assert "kd.divergence = forward_kl" in out and "choices: forward_kl, reverse_kl, jsd" in out
    assert "teachers = {arithmetic: embedded, strings: embedded}" in out


@pytest.mark.parametrize(
    "args, needles",
    [
        (["run", "thinker_specialist_distil"], ["unknown recipe 'thinker_specialist_distil'", "did you mean thinker_specialist_distill"]),
        (["run", RECIPE, "max_stepz=3"], ["unknown config key 'max_stepz'", "max_steps"]),
        (["run", RECIPE, "max_steps=many"], ["'max_steps': expected an integer, got 'many'"]),
        (["run", RECIPE, "kd.divergence=kl"], ["'kd.divergence'", "forward_kl, reverse_kl, jsd"]),
        (["run", RECIPE, "teachers.chemistry=embedded"], ["'teachers.chemistry'", "built-in domains"]),
    ],
)
def test_config_errors(args, needles, tmp_path):
    rc, out, err = run_cli(*args, f"output_dir={tmp_path}")
    _assert_user_error(rc, out, err, *needles)
    assert not os.path.exists(tmp_path / RECIPE)


def _data(tmp_path, lines):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_data_and_model_errors_name_the_culprit(tmp_path):
    out_dir = f"output_dir={tmp_path / 'runs'}"
    rc, out, err = run_cli("run", RECIPE, out_dir, f"data.path={tmp_path / 'missing.jsonl'}")
    _assert_user_error(rc, out, err, "missing.jsonl", "does not exist")

    good = json.dumps({"prompt": "What is 1 + 1?", "domain": "arithmetic"})
    path = _data(tmp_path, [good, '{"prompt": "What is 2 + 2?", "domain": ', good])
    rc, out, err = run_cli("run", RECIPE, out_dir, f"data.path={path}")
    _assert_user_error(rc, out, err, "data.jsonl, line 2: not valid JSON")

    path = _data(tmp_path, [good, json.dumps({"prompt": "pH of water?", "domain": "chemistry"})])
    rc, out, err = run_cli("run", RECIPE, out_dir, f"data.path={path}")
    _assert_user_error(rc, out, err, "line 2: domain 'chemistry' has no teacher", "teachers.chemistry=PATH")

    path = _data(tmp_path, [good, json.dumps({"prompt": "no domain"})])
    rc, out, err = run_cli("run", RECIPE, out_dir, f"data.path={path}")
    _assert_user_error(rc, out, err, "line 2: missing field 'domain'")

    rc, out, err = run_cli("run", RECIPE, out_dir, f"teachers.arithmetic={tmp_path / 'no-teacher'}")
    _assert_user_error(rc, out, err, "teachers.arithmetic", "no-teacher", "does not exist")
    assert not os.path.exists(tmp_path / "runs")  # nothing written for a run that never started


def test_unwritable_output_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    rc, out, err = run_cli("run", RECIPE, f"output_dir={blocker}", "max_steps=1")
    _assert_user_error(rc, out, err, "cannot write the run directory", "output_dir")


def test_a_rollout_timeout_ends_the_run_with_one_line(monkeypatch, capsys):
    """A hung engine or reward worker is not the user's input but not a bug either: one line,
    exit 1, how to go on, no traceback."""
    import recipes.thinker_specialist_distill as recipe
    from posttrain.cli import main
    from posttrain.errors import RolloutTimeoutError

    def hung(cfg):
        raise RolloutTimeoutError("engine 1 of 2 (hf, node 10.0.0.5, pid 42) did not answer within 300 s (restarted)")

    monkeypatch.setattr(recipe, "run", hung)
    assert main(["run", RECIPE, "max_steps=1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: engine 1 of 2 (hf, node 10.0.0.5, pid 42) did not answer") and err.count("\n") == 1
    assert "resume=true" in err and "Traceback" not in err
