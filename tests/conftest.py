import os
import subprocess
import sys

import pytest

# Tests never reach the network and never touch the user's cache.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session", autouse=True)
def posttrain_cache(tmp_path_factory):
    """One posttrain cache for the whole session (teachers and tokenizers built once)."""
    path = os.environ.get("POSTTRAIN_TEST_CACHE") or str(tmp_path_factory.mktemp("posttrain-cache"))
    os.environ["POSTTRAIN_CACHE"] = path
    return path


@pytest.fixture(scope="session")
def tokenizer(posttrain_cache):
    from posttrain.models.qwen_omni import load_tokenizer

    return load_tokenizer("embedded")


def run_cli(*args, cwd=None, timeout=600):
    """Run the real `posttrain` command; returns (exit code, stdout, stderr)."""
    proc = subprocess.run(
        [sys.executable, "-m", "posttrain", *args],
        capture_output=True,
        text=True,
        cwd=cwd or REPO,
        timeout=timeout,
        env=dict(os.environ),
    )
    return proc.returncode, proc.stdout, proc.stderr


TINY_PRETRAIN = [
    "batch_size=4", "data.train_size=48", "data.eval_size=6", "data.voices=[en-us, en-gb]",
    "talker.hidden_size=64", "talker.num_layers=1",
]


@pytest.fixture(scope="session")
def tiny_talker(posttrain_cache):
    """A tiny Talker folder from a 10-step talker_pretrain run (built once per session)."""
    from recipes.talker_pretrain import embedded_checkpoint

    return embedded_checkpoint(10, overrides=TINY_PRETRAIN)


def pytest_terminal_summary(terminalreporter):
    """One line saying how many kinds of the bad-input corpus ran (tests/bad_inputs/cases.py)."""
    ran = {
        outcome: [r for r in terminalreporter.stats.get(outcome, []) if "test_bad_inputs.py::test_bad_input[" in getattr(r, "nodeid", "")]
        for outcome in ("passed", "failed")
    }
    total = len(ran["passed"]) + len(ran["failed"])
    if total:
        terminalreporter.write_line(f"bad-input corpus: {total} kinds run through the CLI, {len(ran['passed'])} passed")
