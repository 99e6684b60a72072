"""thinker_interaction_rl: the GSPO loss by hand and against TRL, the engine-backed GRPO trainer,
the warm-up replies, a tiny end-to-end run, and bad input through the CLI."""

import copy
import json
import math
import os

import pytest
import torch

from posttrain.losses import group_advantages, gspo_loss, sequence_log_ratio
from tests.conftest import run_cli


# --------------------------------------------------------------------------- the loss


def test_gspo_loss_matches_hand_computation():
    # Two groups of two replies; rewards (1, 0) in each, so A = +-0.5 / (std + 1e-4), std = sqrt(0.5).
    logps = torch.tensor([[0.1, 0.3], [-0.2, 9.0], [0.05, 0.05], [-0.3, -0.3]], requires_grad=True)
    old = torch.zeros(4, 2)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0], [1.0, 1.0]])  # 9.0 is padding
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0])
    a = 0.5 / (math.sqrt(0.5) + 1e-4)
    # Sequence ratios exp(mean log-ratio): e^0.2, e^-0.2, e^0.05, e^-0.3; clip range [0.9, 1.2].
    s = [math.exp(0.2), math.exp(-0.2), math.exp(0.05), math.exp(-0.3)]
    clip = lambda x: min(max(x, 0.9), 1.2)
    adv = [a, -a, a, -a]
    expected = -sum(min(si * ai, clip(si) * ai) for si, ai in zip(s, adv)) / 4
    # e^0.2 > 1.2 with A > 0: clipped; e^-0.2 and e^-0.3 < 0.9 with A < 0: clipped; e^0.05 is inside.
    assert expected == pytest.approx(-(1.2 * a - 0.9 * a + math.exp(0.05) * a - 0.9 * a) / 4)

    assert group_advantages(rewards, 2).tolist() == pytest.approx(adv, rel=1e-6)
    assert sequence_log_ratio(logps, old, mask).tolist() == pytest.approx([0.2, -0.2, 0.05, -0.3], rel=1e-6)
    loss = gspo_loss(logps, old, mask, rewards, group_size=2, epsilon_low=0.1, epsilon_high=0.2)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    # Only the unclipped sequence carries a gradient: d/dlogp_t of -(e^mean * a)/4 = -e^0.05 * a / (4 * 2).
    grad = logps.grad
    assert grad[2].tolist() == pytest.approx([-math.exp(0.05) * a / 8] * 2, rel=1e-5)
    assert grad[[0, 1, 3]].abs().max().item() == 0.0


def test_gspo_loss_on_policy_is_minus_mean_advantage_and_ignores_empty_replies():
    logps = torch.randn(4, 3)
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0], [0, 0, 0], [1, 0, 0]])
    rewards = torch.tensor([3.0, 1.0, 2.0, 2.0])
    # On-policy every ratio is 1, so the loss is -mean(A * has_tokens): group 1 sums to 0, group 2 is 0.
    loss = gspo_loss(logps, logps.clone(), mask, rewards, group_size=2)
    assert loss.item() == pytest.approx(0.0, abs=1e-7)
    loss = gspo_loss(logps, logps.clone(), mask, torch.tensor([3.0, 1.0, 2.0, 0.0]), group_size=2)
    a = 1.0 / (math.sqrt(2.0) + 1e-4)
    assert loss.item() == pytest.approx(-(a - a + 0.0 - a) / 4, rel=1e-5)  # reply 3 has no tokens


# --------------------------------------------------------------------------- the trainer


def _tiny_trainer(tmp_path, tokenizer, reward_funcs, engine_cls=None, separate_engine=False, **overrides):
    from datasets import Dataset
    from trl import GRPOConfig

    from posttrain.data.conversations import make_conversations
    from posttrain.models.qwen_omni import TinyThinkerSpec, build_tiny_thinker
    from posttrain.rollout import HFEngine
    from posttrain.trainers import GSPO_PAPER, EngineGRPOTrainer

    model = build_tiny_thinker(tokenizer, TinyThinkerSpec(hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1), seed=0)
    rows = make_conversations(8, turns=1, seed=0, languages=["en"])
    engine = (engine_cls or HFEngine)(copy.deepcopy(model) if separate_engine else model, tokenizer)
    settings = dict(GSPO_PAPER, steps_per_generation=2, epsilon=0.2, epsilon_high=0.3, max_steps=4)
    settings.update(overrides)
    args = GRPOConfig(
        output_dir=str(tmp_path / "trainer"), num_generations=2, per_device_train_batch_size=4,
        max_completion_length=6, learning_rate=1e-2, logging_steps=1, save_strategy="no",
        report_to="none", use_cpu=True, bf16=False, gradient_checkpointing=False, disable_tqdm=True, seed=0,
        **settings,
    )
    dataset = Dataset.from_list([{k: v for k, v in r.items() if k != "reference"} for r in rows])
    trainer = EngineGRPOTrainer(model=model, engine=engine, reward_funcs=reward_funcs, args=args,
                                train_dataset=dataset, processing_class=tokenizer)
    return trainer, rows


def _length_reward(prompts, completions, **kwargs):
    return [float(len(c[-1]["content"])) for c in completions]


def test_gspo_loss_and_advantages_agree_with_trl(tmp_path, tokenizer):
    """TRL's GRPOTrainer with importance_sampling_level='sequence' computes our gspo_loss, and its
    advantages are our group_advantages of the rewards."""
    # Without the MoE load-balancing term TRL adds for MoE models (router_aux_loss_coef).
    trainer, rows = _tiny_trainer(tmp_path, tokenizer, [_length_reward], router_aux_loss_coef=0.0)
    trainer.current_gradient_accumulation_steps = 1
    batch = [dict(r) for r in rows[:2] for _ in range(2)]  # 2 prompts x num_generations
    inputs = trainer._generate_and_score_completions([{k: v for k, v in r.items() if k != "reference"} for r in batch])
    rewards = torch.tensor(list(trainer._logs["rewards"]["_length_reward"])[-4:])
    assert inputs["advantages"].tolist() == pytest.approx(group_advantages(rewards, 2).tolist(), abs=1e-5)

    model = trainer.model
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    n = inputs["completion_ids"].shape[1]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits[:, -n - 1:-1].float()
    logps = torch.log_softmax(logits, -1).gather(-1, inputs["completion_ids"].unsqueeze(-1)).squeeze(-1)
    mask = inputs["completion_mask"].float()
    # The rollout policy differs from the current one by a known per-token shift, some beyond the clip range.
    old = logps + torch.tensor([0.5, -0.01, 0.02, -0.6]).unsqueeze(1)
    inputs["old_per_token_logps"] = old
    inputs["advantages"] = group_advantages(rewards, 2)
    theirs = trainer._compute_loss(model, inputs)
    ours = gspo_loss(logps, old, mask, rewards, group_size=2, epsilon_low=0.2, epsilon_high=0.3)
    assert ours.abs().item() > 1e-3
    assert theirs.item() == pytest.approx(ours.item(), rel=1e-4, abs=1e-6)


def test_completions_come_from_the_engine_which_gets_every_weight_version(tmp_path, tokenizer):
    from posttrain.rollout import HFEngine

    class RecordingEngine(HFEngine):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.calls, self.versions = [], []

        def generate(self, requests, seed=None):
            self.calls.append(len(requests))
            return super().generate(requests, seed)

        def update_weights(self, state, version):
            self.versions.append((state is None, version))
            super().update_weights(state, version)

    trainer, _ = _tiny_trainer(tmp_path, tokenizer, [_length_reward], engine_cls=RecordingEngine, steps_per_generation=1)
    before = {k: v.clone() for k, v in trainer.model.named_parameters()}
    trainer.train()
    engine = trainer.engine
    assert engine.calls == [4, 4, 4, 4]  # one rollout batch per optimiser step, 2 prompts x 2 replies
    assert engine.versions == [(True, 1), (True, 2), (True, 3), (True, 4)]  # after every step; shared model: no state
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.named_parameters())


def test_a_separate_engine_receives_the_trained_weights(tmp_path, tokenizer):
    trainer, _ = _tiny_trainer(tmp_path, tokenizer, [_length_reward], separate_engine=True, steps_per_generation=1, max_steps=2)
    assert trainer.engine.model is not trainer.model
    trainer.train()
    assert trainer.engine.weight_version == 2
    theirs = dict(trainer.engine.model.named_parameters())
    assert all(torch.equal(v, theirs[k]) for k, v in trainer.model.named_parameters())


# --------------------------------------------------------------------------- the recipe


def test_warmup_replies_are_the_reference_or_fail_their_reward():
    from posttrain.config import RewardConfig
    from posttrain.data.conversations import make_conversations
    from posttrain.registry import RewardSet
    from recipes.thinker_interaction_rl import template_reply

    import random

    rows = make_conversations(40, turns=2, seed=3)
    rng = random.Random(0)
    assert [template_reply(r, set(), rng) for r in rows] == [r["reference"] for r in rows]
    columns = {k: [r[k] for r in rows] for k in ("persona", "language", "constraints")}
    prompts = [r["prompt"] for r in rows]
    for flaw, reward in [("language", "language"), ("persona", "persona"), ("rules", "instruction_following")]:
        rewards = RewardSet([RewardConfig(reward)])
        good, _ = rewards.score(prompts, [r["reference"] for r in rows], **columns)
        bad, _ = rewards.score(prompts, [template_reply(r, {flaw}, rng) for r in rows], **columns)
        assert sum(good) / len(good) == pytest.approx(1.0)
        assert sum(bad) / len(bad) < 0.8, flaw


def _tiny_overrides(tmp_path):
    return [
        f"output_dir={tmp_path}", "run_name=tiny", "max_steps=4", "save_every=2", "log_every=1",
        "policy.size.hidden_size=64", "policy.size.num_layers=1", "policy.size.num_heads=2", "policy.size.num_kv_heads=1",
        "warmup.steps=3", "warmup.batch_size=4",
        "data.train_size=16", "data.eval_size=4", "data.long_eval_size=2", "data.long_context_chars=800",
        "gspo.num_generations=2", "gspo.batch_size=4", "gspo.steps_per_generation=2", "gspo.max_completion_length=12",
        "gspo.epsilon=0.2", "gspo.epsilon_high=0.3", "optim.lr=0.01", "optim.warmup_steps=0", "eval.samples=1",
    ]


def test_tiny_run_moves_parameters_and_logs_every_reward(tmp_path):
    from safetensors.torch import load_file

    from posttrain.config import load_config
    from recipes import defaults_path
    from recipes.thinker_interaction_rl import RECIPE, Config, embedded_warmup, run

    cfg = load_config(Config, defaults_path(RECIPE), _tiny_overrides(tmp_path))
    result = run(cfg)
    run_dir = result.run_dir

    start = load_file(os.path.join(embedded_warmup(cfg), "model.safetensors"))
    end = load_file(os.path.join(run_dir, "model", "model.safetensors"))
    moved = [k for k in start if k.startswith(("model.layers", "lm_head")) and not torch.equal(start[k], end[k])]
    assert moved, "no decoder parameter changed"

    names = ["language", "persona", "instruction_following"]
    metrics = result.summary["metrics"]
    for name in ["combined"] + names:
        for suffix in ("", "_long"):
            m = metrics[f"reward/{name}{suffix}"]
            assert m["better"] == "higher" and 0.0 <= m["before"] <= 1.0 and 0.0 <= m["after"] <= 1.0
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        rows = [json.loads(line) for line in fh]
    training = [r for r in rows if "loss" in r]
    assert [r["step"] for r in training] == [1, 2, 3, 4]
    for name in ["combined"] + names:  # per-reward training curves, logged at every rollout
        assert [r["step"] for r in training if f"reward/{name}" in r] == [1, 3]
    assert all(r.get("rollout/staleness", 0.0) == 0.0 for r in training)
    assert os.path.exists(os.path.join(run_dir, "plots", "reward.png"))
    assert os.path.exists(os.path.join(run_dir, "plots", "held_out.png"))
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["step-000002", "step-000004"]
    assert os.path.exists(os.path.join(run_dir, "data", "held_out_long.jsonl"))

    # Killed after the step-2 checkpoint: resume=true continues from it and ends as one run.
    import shutil

    os.remove(os.path.join(run_dir, "summary.json"))
    shutil.rmtree(os.path.join(run_dir, "checkpoints", "step-000004"))
    resumed = run(load_config(Config, defaults_path(RECIPE), _tiny_overrides(tmp_path) + ["resume=true"]))
    assert resumed.run_dir == run_dir
    assert resumed.summary["metrics"]["reward/combined"]["before"] == metrics["reward/combined"]["before"]
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        rows = [json.loads(line) for line in fh]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]


@pytest.mark.parametrize(
    "rows, message",
    [
        (
            [{"prompt": [{"role": "user", "content": "Hi! Please answer in English."}], "language": "en"},
             {"prompt": [{"role": "system", "content": "Name: Mia"}, {"role": "assistant", "content": "Hello."}]}],
            "line 2: the conversation has no user turn",
        ),
        (
            [{"prompt": [{"role": "user", "content": "Hallo! Bitte antworte auf Deutsch."}], "language": "de"},
             {"prompt": [{"role": "user", "content": "Hi there."}], "language": "en"},
             {"prompt": [{"role": "user", "content": "Hola."}], "language": "xx"}],
            "line 3, field 'language': unknown language code 'xx'",
        ),
    ],
)
def test_bad_conversations_fail_with_one_line_naming_the_line(tmp_path, rows, message):
    path = tmp_path / "conversations.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    code, out, err = run_cli("run", "thinker_interaction_rl", f"data.path={path}", f"output_dir={tmp_path / 'runs'}")
    assert code == 2, err
    assert message in err and str(path) in err
    assert "Traceback" not in err
    assert not (tmp_path / "runs").exists()  # refused before any work


@pytest.mark.slow
def test_default_run_raises_the_combined_reward_by_at_least_0_2(tmp_path):
    code, out, err = run_cli("run", "thinker_interaction_rl", f"output_dir={tmp_path}", "run_name=default", timeout=1500)
    assert code == 0, err
    with open(tmp_path / "thinker_interaction_rl" / "default" / "summary.json") as fh:
        metrics = json.load(fh)["metrics"]
    combined = metrics["reward/combined"]
    assert combined["after"] - combined["before"] >= 0.2, combined
    assert metrics["reward/combined_long"]["after"] > metrics["reward/combined_long"]["before"]
    for name in ("language", "persona", "instruction_following"):
        assert f"reward/{name}" in metrics and f"reward/{name}_long" in metrics
    assert "reward/combined" in out and "→" in out  # the before -> after table and summary line
