from dataclasses import dataclass

import pytest

from posttrain.config import RunConfig, describe, load_config, option, parse_overrides
from posttrain.errors import ConfigError


@dataclass
class Inner:
    lr: float = option(1e-3, "learning rate", min=0.0)
    schedule: str = option("cosine", "schedule", choices=["cosine", "linear"])


@dataclass
class Cfg(RunConfig):
    inner: Inner = option(default_factory=Inner, help="inner section")
    names: list[str] = option(["a"], "names")
    table: dict[str, str] = option({"x": "1"}, "a mapping")
    flag: bool = option(False, "a flag")
    maybe: int | None = option(None, "optional int")


def test_overrides_are_typed_from_the_dataclass(tmp_path):
    cfg = load_config(Cfg, None, ["inner.lr=2e-4", "max_steps=7", "flag=true", "names=[b, c]", "table.y=2", "maybe=3", "run_name=007"])
    assert cfg.inner.lr == pytest.approx(2e-4) and isinstance(cfg.inner.lr, float)
    assert cfg.max_steps == 7 and cfg.flag is True
    assert cfg.names == ["b", "c"]
    assert cfg.table == {"y": "2"}  # a CLI mapping key adds to the YAML's, not the dataclass default
    assert cfg.maybe == 3
    assert cfg.run_name == "007"  # strings stay strings, not ints


def test_yaml_defaults_then_user_yaml_then_cli(tmp_path):
    defaults = tmp_path / "defaults.yaml"
    defaults.write_text("max_steps: 10\ninner:\n  lr: 0.1\n  schedule: linear\n")
    user = tmp_path / "user.yaml"
    user.write_text("inner:\n  lr: 0.5\n")
    cfg = load_config(Cfg, str(defaults), [f"config={user}", "seed=3"])
    assert (cfg.max_steps, cfg.inner.lr, cfg.inner.schedule, cfg.seed) == (10, 0.5, "linear", 3)


def test_unknown_key_names_it_and_suggests():
    with pytest.raises(ConfigError, match=r"unknown config key 'inner\.lrr'.*did you mean inner\.lr"):
        load_config(Cfg, None, ["inner.lrr=1"])
    with pytest.raises(ConfigError, match="unknown config key 'max_stpes'.*max_steps"):
        load_config(Cfg, None, ["max_stpes=1"])


def test_wrong_type_and_bad_values():
    with pytest.raises(ConfigError, match="'max_steps': expected an integer, got 'ten'"):
        load_config(Cfg, None, ["max_steps=ten"])
    with pytest.raises(ConfigError, match="'inner.schedule'.*'cosin'.*cosine, linear"):
        load_config(Cfg, None, ["inner.schedule=cosin"])
    with pytest.raises(ConfigError, match="'inner.lr': -1.0 is below the minimum 0.0"):
        load_config(Cfg, None, ["inner.lr=-1"])
    with pytest.raises(ConfigError, match="'flag': expected true or false"):
        load_config(Cfg, None, ["flag=maybe"])
    with pytest.raises(ConfigError, match="bad override 'max_steps'"):
        load_config(Cfg, None, ["max_steps"])
    with pytest.raises(ConfigError, match="'max_steps' has no sub-keys"):
        load_config(Cfg, None, ["max_steps.x=1"])


def test_yaml_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_steps: 3\ninner: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml' line \d+.*YAML syntax error"):
        load_config(Cfg, None, [f"config={bad}"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Cfg, None, [f"config={tmp_path / 'missing.yaml'}"])
    typo = tmp_path / "typo.yaml"
    typo.write_text("inner:\n  lrr: 1\n")
    with pytest.raises(ConfigError, match="inner.lrr"):
        load_config(Cfg, None, [f"config={typo}"])


def test_rewards_list_of_sections():
    cfg = load_config(Cfg, None, ["rewards=[{name: language, weight: 0.5}, {name: 'my.mod:fn', params: {k: 1}}]"])
    assert [r.name for r in cfg.rewards] == ["language", "my.mod:fn"]
    assert cfg.rewards[0].weight == 0.5 and cfg.rewards[1].params == {"k": 1}
    with pytest.raises(ConfigError, match=r"rewards\[0\]\.wieght"):
        load_config(Cfg, None, ["rewards=[{name: x, wieght: 1}]"])


def test_describe_lists_every_field_with_default_and_help():
    rows = {key: (tp, default, help_text) for key, tp, default, help_text in describe(load_config(Cfg, None, []))}
    assert rows["inner.lr"][1] == "0.001" and "learning rate" in rows["inner.lr"][2]
    assert "choices: cosine, linear" in rows["inner.schedule"][2]
    assert "max_steps" in rows and "resume" in rows and "output_dir" in rows


def test_config_file_paths_are_collected():
    nested, files = parse_overrides(Cfg, ["config=a.yaml", "seed=1"])
    assert files == ["a.yaml"] and nested == {"seed": 1}
