"""talker_pretrain end to end on tiny settings, and `posttrain eval tts` on its Talker."""

import json
import os

import pytest

from posttrain.config import load_config
from recipes import defaults_path, load_recipe
from tests.conftest import run_cli

TINY = [
    "max_steps=12",
    "batch_size=4",
    "data.train_size=48",
    "data.eval_size=2",
    "data.voices=[en-us, en-gb]",
    "long_context.steps=2",
    "long_context.lengths=[2]",
    "long_context.batch_size=2",
    "talker.hidden_size=64",
    "talker.num_layers=1",
    "save_every=0",
]


@pytest.mark.slow
def test_talker_pretrain_smoke_and_eval_tts(tmp_path):
    module = load_recipe("talker_pretrain")
    cfg = load_config(module.Config, defaults_path("talker_pretrain"), TINY + [f"output_dir={tmp_path}"])
    result = module.run(cfg)
    metrics = result.summary["metrics"]
    assert metrics["loss"]["after"] < metrics["loss"]["before"]
    assert metrics["wer"]["better"] == "lower" and 0.0 <= metrics["wer"]["after"] <= 1.0
    assert "loss_2x" in result.summary["long_context"]
    talker_dir = os.path.join(result.run_dir, "talker")
    for name in ("talker.json", "model/model.safetensors", "codec/codec.json"):
        assert os.path.exists(os.path.join(talker_dir, name)), name
    eval_dir = os.path.join(result.run_dir, "eval")
    table = json.load(open(os.path.join(eval_dir, "tts_eval.json")))
    assert table["summary"]["count"] == 2 and table["summary"]["first_packet_latency"] > 0
    # the trained Talker's weights differ from a fresh build of the same config
    from posttrain.talker import load_bundle

    bundle = load_bundle(talker_dir)
    assert bundle.voices == ["en-us", "en-gb"]
    rc, out, err = run_cli("eval", "tts", "--talker", talker_dir, "--n", "1", "--output", str(tmp_path / "tts"))
    assert rc == 0, err
    assert "| wer |" in out and "first_packet_latency" in out
    assert os.path.exists(tmp_path / "tts" / "examples" / "00.wav")


def test_talker_config_errors(tmp_path):
    rc, out, err = run_cli("run", "talker_pretrain", "codec.path=qwen-code2wav", f"output_dir={tmp_path}")
    assert rc == 2 and "codec.path" in err and "only decodes" in err
    rc, out, err = run_cli("run", "talker_pretrain", "layout=interleaved", f"output_dir={tmp_path}")
    assert rc == 2 and "'layout'" in err and "aria, plain" in err
    rc, out, err = run_cli("eval", "tts", "--talker", str(tmp_path))
    assert rc == 2 and "not a Talker folder" in err and "Traceback" not in err
