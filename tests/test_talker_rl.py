"""talker_gspo and talker_speaker_ft on a tiny Talker; voice adapters applied by name."""

import json
import os

import pytest
import torch

from posttrain.config import load_config
from recipes import defaults_path, load_recipe


def _state(talker_dir):
    from posttrain.talker import load_bundle

    return {k: v.clone() for k, v in load_bundle(talker_dir).talker.state_dict().items()}


@pytest.mark.slow
def test_talker_gspo_tiny_run_logs_every_reward_and_moves_the_talker(tiny_talker, tmp_path):
    module = load_recipe("talker_gspo")
    cfg = load_config(module.Config, defaults_path("talker_gspo"), [
        f"policy.path={tiny_talker}", "max_steps=2", "gspo.prompts_per_step=2", "gspo.num_generations=2",
        "gspo.steps_per_generation=1", "eval.sentences=2", "eval.every=1", "save_every=0", "optim.lr=0.001",
        "rewards=[{name: wer, params: {transform: 1-wer}}, {name: prosody, weight: 0.5}]", f"output_dir={tmp_path}",
    ])
    before = _state(tiny_talker)
    result = module.run(cfg)
    metrics = result.summary["metrics"]
    assert set(metrics) == {"wer", "f0_range", "speaker_similarity"}
    logged = [json.loads(line) for line in open(os.path.join(result.run_dir, "metrics.jsonl"))]
    keys = set().union(*logged)
    assert {"reward/combined", "reward/wer", "reward/prosody", "held_out/wer", "clip_ratio"} <= keys
    assert os.path.exists(os.path.join(result.run_dir, "examples", "step_1", "00.wav"))
    after = _state(os.path.join(result.run_dir, "talker"))
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_gspo_config_errors(tmp_path):
    from tests.conftest import run_cli

    rc, _, err = run_cli("run", "talker_gspo", "max_steps=3", "gspo.steps_per_generation=2", f"output_dir={tmp_path}")
    assert rc == 2 and "not a multiple of gspo.steps_per_generation" in err
    rc, _, err = run_cli("run", "talker_gspo", "rewards=[]", f"output_dir={tmp_path}")
    assert rc == 2 and "config key 'rewards'" in err


def test_lora_merge_keeps_the_outputs(tiny_talker):
    from posttrain.models.qwen_omni import talker_losses, talker_stream_batch
    from posttrain.talker import load_bundle
    from posttrain.voices import add_lora, merge_lora

    bundle = load_bundle(tiny_talker)
    talker = bundle.talker.eval()
    add_lora(talker, rank=4, alpha=8)
    with torch.no_grad():  # make the adapters do something
        for n, p in talker.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    codes = torch.randint(0, 256, (4, 30), generator=torch.Generator().manual_seed(0))
    stream = [("text", t) for t in bundle.text_tokens("the cat")] + [("speech", f) for f in range(30)]
    batch = talker_stream_batch(talker, bundle.text_embed, [stream], [codes], [0])
    with torch.no_grad():
        adapted = talker_losses(talker, batch)
        merge_lora(talker)
        merged = talker_losses(talker, batch)
    assert not any("lora_" in n for n, _ in talker.named_parameters())
    assert torch.allclose(adapted[0], merged[0], atol=1e-4) and torch.allclose(adapted[1], merged[1], atol=1e-4)


@pytest.mark.slow
def test_speaker_ft_saves_a_voice_that_loads_by_name_only_on_its_base(tiny_talker, tmp_path):
    from posttrain.errors import ModelError
    from posttrain.talker import load_bundle
    from tests.conftest import run_cli

    module = load_recipe("talker_speaker_ft")
    cfg = load_config(module.Config, defaults_path("talker_speaker_ft"), [
        f"policy.path={tiny_talker}", "data.clips=6", "max_steps=3", "batch_size=2", "eval.sentences=2", "save_every=0",
        "voice.name=tiny-voice", f"output_dir={tmp_path}",
    ])
    base = _state(tiny_talker)
    result = module.run(cfg)
    s = result.summary
    assert set(s["metrics"]) == {"speaker_similarity", "speaker_similarity_raw", "wer"}
    voice_dir = s["voice_dir"]
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "speaker_token.safetensors", "reference.npy", "voice.json"):
        assert os.path.exists(os.path.join(voice_dir, name)), name
    # the base Talker is untouched; the voice applies by name on top of it
    assert all(torch.equal(base[k], v) for k, v in _state(tiny_talker).items())
    bundle = load_bundle(tiny_talker, voice="tiny-voice")
    assert bundle.voices[-1] == "tiny-voice" and "tiny-voice" in bundle.rates
    assert any(not torch.equal(base[k], v) for k, v in bundle.talker.state_dict().items() if k in base)
    rc, out, err = run_cli("eval", "tts", "--talker", tiny_talker, "--voice", "tiny-voice", "--n", "1", "--output", str(tmp_path / "tts"))
    assert rc == 0, err
    assert "tiny-voice" in out
    # not on another base Talker
    other = os.path.join(result.run_dir, "other")
    fresh = load_bundle(tiny_talker)
    with torch.no_grad():
        next(fresh.talker.parameters()).add_(1.0)
    fresh.save(other)
    with pytest.raises(ModelError, match="trained on another base Talker"):
        load_bundle(other, voice="tiny-voice")
    with pytest.raises(ModelError, match="unknown voice 'nobody'"):
        load_bundle(tiny_talker, voice="nobody")


def test_speaker_ft_bad_recordings(tiny_talker, tmp_path):
    from tests.conftest import run_cli

    folder = tmp_path / "rec"
    folder.mkdir()
    import numpy as np
    import soundfile as sf

    sf.write(folder / "a.wav", np.zeros(16000, np.float32), 16000)
    rc, _, err = run_cli("run", "talker_speaker_ft", f"policy.path={tiny_talker}", f"data.path={folder}", f"output_dir={tmp_path}")
    assert rc == 2 and "a.wav: no transcript a.txt" in err and "Traceback" not in err
    (folder / "a.txt").write_text("hello there")
    rc, _, err = run_cli("run", "talker_speaker_ft", f"policy.path={tiny_talker}", f"data.path={folder}", f"output_dir={tmp_path}")
    assert rc == 2 and "a.wav): audio is silent" in err
    assert not os.path.exists(tmp_path / "talker_speaker_ft")
