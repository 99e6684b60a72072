"""The reward plugin system: built-ins by entry point, user plugins by module:function or
file path, TRL-style functions unchanged, and clear errors for broken plugins."""

import json
import math
import textwrap
from types import SimpleNamespace

import pytest

from posttrain.errors import RewardError
from posttrain.registry import RewardSet, builtin_rewards, call_reward, resolve_reward
from tests.conftest import run_cli

PLUGIN = textwrap.dedent(
    '''
    def length_reward(prompts, completions, **kwargs):
        """Longer answers score higher (a user's plugin)."""
        return [min(len(c) / 20, 1.0) for c in completions]

    def trl_style(completions, **kwargs):
        # the shape TRL's GRPOTrainer documents: completions plus dataset columns as kwargs
        return [1.0 if c.strip().endswith("!") else 0.0 for c in completions]

    def needs_param(prompts, completions, target="x", **kwargs):
        return [float(target in c) for c in completions]

    def raises_on_third(prompts, completions, **kwargs):
        for c in completions:
            if c == "boom":
                raise ValueError("cannot score this one")
        return [0.5] * len(completions)

    def wrong_length(prompts, completions, **kwargs):
        return [1.0]

    def returns_nan(prompts, completions, **kwargs):
        return [float("nan")] * len(completions)

    def returns_strings(prompts, completions, **kwargs):
        return ["good"] * len(completions)

    def no_opinion(prompts, completions, **kwargs):
        return [None if "?" in c else 1.0 for c in completions]
    '''
)


@pytest.fixture()
def plugin_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(PLUGIN)
    return str(path)


def test_builtins_are_registered_by_entry_point():
    names = builtin_rewards()
    for name in ("wer", "prosody", "speaker_similarity", "language", "persona", "instruction_following", "number_rendering"):
        assert name in names
    assert callable(resolve_reward("instruction_following"))


def test_user_plugins_by_file_and_module(plugin_file, tmp_path, monkeypatch):
    fn = resolve_reward(f"{plugin_file}:length_reward")
    assert fn(prompts=["p"], completions=["a" * 10]) == [0.5]
    monkeypatch.syspath_prepend(str(tmp_path))
    assert resolve_reward("my_rewards:trl_style")(completions=["hi!"]) == [1.0]


def test_resolution_errors():
    with pytest.raises(RewardError, match="unknown reward 'werr'"):
        resolve_reward("werr")
    with pytest.raises(RewardError, match="importing 'no_such_module_xyz' failed"):
        resolve_reward("no_such_module_xyz:f")
    with pytest.raises(RewardError, match="has no function 'missing'"):
        resolve_reward("rewards.language:missing")


def test_broken_plugins_are_named_with_the_sample(plugin_file):
    prompts, completions = ["a", "b", "c"], ["ok", "fine", "boom"]
    with pytest.raises(RewardError, match=r"'raises_on_third' raised on sample 2: ValueError: cannot score"):
        call_reward("raises_on_third", resolve_reward(f"{plugin_file}:raises_on_third"), prompts, completions, {})
    with pytest.raises(RewardError, match="returned 1 values for 3 samples"):
        call_reward("wrong_length", resolve_reward(f"{plugin_file}:wrong_length"), prompts, completions, {})
    with pytest.raises(RewardError, match="returned nan for sample 0"):
        call_reward("returns_nan", resolve_reward(f"{plugin_file}:returns_nan"), prompts, completions, {})
    with pytest.raises(RewardError, match="returned str 'good' for sample 0"):
        call_reward("returns_strings", resolve_reward(f"{plugin_file}:returns_strings"), prompts, completions, {})


def test_weighted_combination_skips_no_opinion(plugin_file):
    specs = [
        SimpleNamespace(name=f"{plugin_file}:trl_style", weight=2.0, params={}),
        SimpleNamespace(name=f"{plugin_file}:no_opinion", weight=1.0, params={}),
        SimpleNamespace(name=f"{plugin_file}:needs_param", weight=1.0, params={"target": "!"}),
    ]
    rewards = RewardSet(specs)
    combined, per = rewards.score(["p", "p"], ["yes!", "why?"])
    assert per["trl_style"] == [1.0, 0.0] and per["no_opinion"] == [1.0, None] and per["needs_param"] == [1.0, 0.0]
    assert combined[0] == pytest.approx(1.0)
    assert combined[1] == pytest.approx((2 * 0.0 + 1 * 0.0) / 3)  # None left out, weights renormalised
    assert not any(math.isnan(c) for c in combined)


def test_rewards_cli_scores_a_file_with_a_user_plugin(plugin_file, tmp_path):
    data = tmp_path / "samples.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": "say hi", "completion": c}) for c in ["hi!", "hello", "hey!"]) + "\n")
    out = tmp_path / "scores.jsonl"
    rc, stdout, stderr = run_cli("rewards", "score", "--reward", f"{plugin_file}:trl_style", "--data", str(data), "--output", str(out))
    assert rc == 0, stderr
    assert "mean 0.6667" in stdout and "none 0" in stdout
    assert [json.loads(l)["score"] for l in out.read_text().splitlines()] == [1.0, 0.0, 1.0]
    rc, stdout, stderr = run_cli("rewards", "score", "--reward", "instruction_following", "--data", str(data))
    assert rc == 0 and "no opinion on any sample (none 3)" in stdout  # no constraints column
    rc, stdout, stderr = run_cli("rewards", "score", "--reward", f"{plugin_file}:raises_on_third", "--data", str(data))
    assert rc == 0  # nothing in this file makes it raise
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "completion": "boom"}) + "\n")
    rc, stdout, stderr = run_cli("rewards", "score", "--reward", f"{plugin_file}:raises_on_third", "--data", str(bad))
    assert rc == 2 and "raised on sample 0" in stderr and "Traceback" not in stderr
    rc, stdout, stderr = run_cli("rewards", "list")
    assert rc == 0 and "wer" in stdout and "instruction_following" in stdout
