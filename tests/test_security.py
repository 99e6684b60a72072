"""Security properties, checked on the source and on behaviour:
no remote code unless the user sets trust_remote_code, weights never unpickled freely, no
shell strings, reward plugins only from names the user wrote, no network at run time."""

from __future__ import annotations

import ast
import os

import pytest

from posttrain.errors import ModelError
from tests.conftest import REPO

SOURCE_DIRS = ("posttrain", "recipes", "rewards", "data_tools")


def _sources():
    for top in SOURCE_DIRS:
        for dirpath, _, filenames in os.walk(os.path.join(REPO, top)):
            for name in sorted(filenames):
                if name.endswith(".py"):
                    path = os.path.join(dirpath, name)
                    with open(path, encoding="utf-8") as fh:
                        yield os.path.relpath(path, REPO), ast.parse(fh.read(), path)


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
            yield node, owner, name


def _keyword(node: ast.Call, name: str):
    for kw in node.keywords:
        if kw.arg == name:
            return kw.value
    return None


def test_source_has_no_unsafe_calls():
    problems = []
    scanned = 0
    for rel, tree in _sources():
        scanned += 1
        for node, owner, name in _calls(tree):
            where = f"{rel}:{node.lineno}"
            remote = _keyword(node, "trust_remote_code")
            if isinstance(remote, ast.Constant) and remote.value is True:
                problems.append(f"{where}: trust_remote_code=True")
            if owner == "torch" and name == "load":
                weights_only = _keyword(node, "weights_only")
                if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                    problems.append(f"{where}: torch.load without weights_only=True")
            shell = _keyword(node, "shell")
            if shell is not None and not (isinstance(shell, ast.Constant) and shell.value is False):
                problems.append(f"{where}: {name}(shell=...)")
            if (owner, name) in {("os", "system"), ("os", "popen"), ("subprocess", "getoutput"), ("subprocess", "getstatusoutput")}:
                problems.append(f"{where}: {owner}.{name} runs a shell string")
            if owner == "pickle" and name in ("load", "loads"):
                problems.append(f"{where}: pickle.{name}")
            if isinstance(node.func, ast.Name) and name in ("eval", "exec"):
                problems.append(f"{where}: {name}()")
    assert scanned > 50
    assert problems == []


def test_subprocesses_get_argument_lists():
    """Every subprocess call passes a list (no command string a shell would parse)."""
    found = 0
    for rel, tree in _sources():
        for node, owner, name in _calls(tree):
            if owner == "subprocess" and name in ("run", "Popen", "call", "check_call", "check_output"):
                found += 1
                first = node.args[0] if node.args else _keyword(node, "args")
                assert not isinstance(first, (ast.Constant, ast.JoinedStr, ast.BinOp)), f"{rel}:{node.lineno}"
    assert found >= 1  # espeak-ng is run this way


def test_remote_code_refused_unless_the_user_allows_it(tmp_path):
    from posttrain.models import hub
    from tests.bad_inputs.fixtures import make_remote_code_model

    folder = str(tmp_path / "m")
    make_remote_code_model(folder)
    hub.allow_remote_code(False)
    with pytest.raises(ModelError, match="asks to run its own Python code .*trust_remote_code=true"):
        hub.resolve(folder, "teacher")
    try:
        hub.allow_remote_code(True)
        assert hub.resolve(folder, "teacher") == folder
    finally:
        hub.allow_remote_code(False)
    from posttrain.config import RunConfig

    assert RunConfig().trust_remote_code is False


def test_tokenizer_asking_for_remote_code_is_refused(tmp_path):
    import json

    from posttrain.models import hub

    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["tok.T", None]}}))
    with pytest.raises(ModelError, match="'auto_map' in tokenizer_config.json"):
        hub.resolve(str(folder), "tokenizer")


def test_reward_plugins_only_from_names_in_the_config(tmp_path, monkeypatch):
    """A plugin file lying in the working directory is never imported unless named."""
    from posttrain.config import RewardConfig
    from posttrain.registry import RewardSet, builtin_rewards

    marker = tmp_path / "imported"
    (tmp_path / "sneaky_plugin.py").write_text(
        f"open({str(marker)!r}, 'w').write('yes')\n\ndef reward(prompts, completions, **kw):\n    return [1.0] * len(completions)\n"
    )
    monkeypatch.chdir(tmp_path)
    assert "sneaky_plugin" not in builtin_rewards()
    rewards = RewardSet([RewardConfig(name="language")])
    assert list(rewards.functions) == ["language"]
    assert not marker.exists()
    named = RewardSet([RewardConfig(name="sneaky_plugin:reward")])
    assert marker.exists() and named.score(["p"], ["c"])[0] == [1.0]


def test_no_network_at_run_time(tmp_path, monkeypatch):
    """Offline by default: a hub name that is not cached is a ModelError, never a download."""
    from posttrain.models import hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert hub.offline()
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelError, match="not in the local Hugging Face cache and posttrain does not download"):
        hub.resolve("nobody-xyz/not-a-model", "student")
