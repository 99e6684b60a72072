"""talker_dpo: preference pairs of decoded speech, DPO on the Talker's sequence log-probs."""

import json
import os

import pytest
import torch

from posttrain.config import load_config
from recipes import defaults_path, load_recipe

def _pairs_from_random_talker(bundle, n=6):
    from posttrain.data.preference_pairs import Candidate, PreferencePair
    from posttrain.models.qwen_omni import talker_generate_batch

    texts = ["the cat sees a red ball", "my friend likes two blue cups", "the dog finds the old hat"] * 4
    voices = [bundle.voices[i % len(bundle.voices)] for i in range(len(texts))]
    out = talker_generate_batch(bundle.talker, bundle.text_embed, [bundle.text_tokens(t) for t in texts], [bundle.voice_id(v) for v in voices],
                                [bundle.rate(v) for v in voices], temperature=1.0, seed=0, max_frames=60)
    cands = [Candidate(c, s, e, 0.0, {}) for c, s, e, _ in out]
    return [PreferencePair(texts[i], voices[i], cands[i], cands[i + n]) for i in range(n)]


def test_dpo_steps_raise_every_training_pairs_implicit_margin(tiny_talker):
    import copy

    from posttrain.losses import dpo_loss
    from posttrain.talker import load_bundle
    from recipes.talker_dpo import Config, pair_batch_logps, pair_logps, preference_accuracy

    cfg = load_config(Config, defaults_path("talker_dpo"), [])
    bundle = load_bundle(tiny_talker)
    pairs = _pairs_from_random_talker(bundle)
    reference = copy.deepcopy(bundle)
    ref = pair_logps(reference, pairs, cfg)
    assert preference_accuracy(bundle, ref, pairs, cfg)["preference_accuracy"] == 0.5  # policy == reference: all ties
    talker = bundle.talker
    talker.train()
    opt = torch.optim.Adam(talker.parameters(), lr=1e-3)
    for _ in range(15):
        pc, pr, _ = pair_batch_logps(bundle, pairs, cfg, with_grad=True)
        loss, _, _ = dpo_loss(pc, pr, ref[0], ref[1], beta=0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
    talker.eval()
    assert loss.item() < 0.69  # below log 2, the loss at the start
    assert preference_accuracy(bundle, ref, pairs, cfg)["preference_accuracy"] == 1.0


def test_pairs_round_trip_and_bad_pairs_are_named(tiny_talker, tmp_path):
    from posttrain.data.preference_pairs import load_pairs, save_pairs
    from posttrain.errors import DataError
    from posttrain.talker import load_bundle

    bundle = load_bundle(tiny_talker)
    pairs = _pairs_from_random_talker(bundle, n=3)
    path = tmp_path / "pairs.jsonl"
    save_pairs(str(path), pairs)
    again = load_pairs(str(path), bundle.voices)
    assert [p.text for p in again] == [p.text for p in pairs]
    assert all(torch.equal(a.chosen.codes, b.chosen.codes) and a.chosen.stream == b.chosen.stream for a, b in zip(again, pairs))
    rows = [json.loads(line) for line in open(path)]
    rows[1]["voice"] = "nobody"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"pairs.jsonl, line 2: voice 'nobody' is not one of this Talker's voices"):
        load_pairs(str(path), bundle.voices)
    del rows[1]["voice"]
    rows[0]["chosen"]["codes"] = "garbage"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match="line 1: malformed candidate"):
        load_pairs(str(path), bundle.voices)


@pytest.mark.slow
def test_talker_dpo_tiny_run_and_pairs_tool(tiny_talker, tmp_path):
    module = load_recipe("talker_dpo")
    cfg = load_config(module.Config, defaults_path("talker_dpo"), [
        f"policy.path={tiny_talker}", "pairs.train_prompts=6", "pairs.eval_prompts=4", "pairs.candidates=3", "pairs.margin=0.0",
        "eval.sentences=2", "max_steps=4", "dpo.batch_size=2", "save_every=0", "rewards=[{name: wer}]", "optim.lr=0.001",
        f"output_dir={tmp_path}",
    ])
    from posttrain.talker import load_bundle

    before_state = {k: v.clone() for k, v in load_bundle(tiny_talker).talker.state_dict().items()}
    result = module.run(cfg)
    metrics = result.summary["metrics"]
    assert metrics["preference_accuracy"]["before"] == 0.5
    assert metrics["wer"]["better"] == "lower" and 0 <= metrics["wer"]["after"] <= 1
    rows = [json.loads(line) for line in open(os.path.join(result.run_dir, "data", "pairs_train.jsonl"))]
    assert len(rows) == 6 and all(r["chosen"]["reward"] >= r["rejected"]["reward"] for r in rows)
    after = load_bundle(os.path.join(result.run_dir, "talker")).talker.state_dict()
    assert any(not torch.equal(before_state[k], after[k]) for k in before_state)
    # the pairs tool on the same Talker, and its bad input
    out = tmp_path / "tool.jsonl"
    from data_tools.build_preference_pairs import main

    assert main(["--talker", tiny_talker, "--output", str(out), "--prompts", "2", "--candidates", "2", "--margin", "0", "--reward", "wer=1"]) == 0
    assert len(open(out).readlines()) == 2
    assert main(["--talker", tiny_talker, "--output", str(out), "--candidates", "1"]) == 2
    assert main(["--talker", str(tmp_path), "--output", str(out)]) == 2


def test_pairs_with_greedy_residual_codes_differ_only_where_the_talker_chose(tiny_talker):
    """``code_temperature=0`` reaches the sampler: every candidate's residual codes are the
    code predictor's most likely ones, so two candidates that chose the same codebook-0 token
    at frame 0 have the same residual codes there."""
    from posttrain.config import RewardConfig
    from posttrain.data.preference_pairs import build_pairs
    from posttrain.registry import RewardSet
    from posttrain.rollout.speech import TalkerEngine
    from posttrain.talker import load_bundle

    bundle = load_bundle(tiny_talker)
    engine = TalkerEngine(bundle, batch_size=16)
    seen = []
    generate = engine.generate
    engine.generate = lambda requests, seed=None: seen.extend(requests) or generate(requests, seed=seed)
    rewards = RewardSet([RewardConfig("wer", 1.0, {"transform": "1-wer"})])
    prompts = [("the cat sees a red ball", bundle.voices[0]), ("my friend likes two blue cups", bundle.voices[1])]
    pairs, stats = build_pairs(engine, rewards, prompts, n=4, temperature=1.0, margin=0.0, seed=3, progress=False, code_temperature=0.0)
    assert stats["candidates"] == 8 and len(pairs) == 2
    assert [r.code_temperature for r in seen] == [0.0] * 8 and all(r.temperature == 1.0 for r in seen)
    for p in pairs:
        c, r = p.chosen.codes, p.rejected.codes
        if c[0, 0] == r[0, 0]:
            assert torch.equal(c[1:, 0], r[1:, 0])
